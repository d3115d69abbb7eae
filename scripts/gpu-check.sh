#!/usr/bin/env bash
# Everything llmprod runs only on an NVIDIA GPU, in one prepared pass, for the
# day a GPU machine is at hand (it never is in CI):
#
#   1. the machine: nvidia-smi, torch, Triton, bitsandbytes versions
#   2. the Triton kernel tests, compiled for the GPU (no interpreter), and the
#      Engine on the Triton backend against the torch backend (tests/kernels)
#   3. the real model on CUDA: Triton vs torch attention, greedy tokens equal,
#      decode speed of each
#   4. bitsandbytes: the int8 tests, quantization="int8" (int8-bnb) on the real
#      model, and an NF4 / FP4 4-bit layer against its float16 reference
#   5. the kernel benchmarks (paged attention, store_kv)
#
# Each step's output goes to $OUT/<step>.txt (default gpu-check-out/); a failing
# step is reported and the next one still runs; the exit status is the number of
# failed steps. Record the results, with the device named, in docs/benchmarks.md.
#
#   bash scripts/gpu-check.sh            # on the GPU machine, after the README's
#                                        # test install (+ pip install bitsandbytes)
#   bash scripts/gpu-check.sh --dry-run  # anywhere: checks that every test, module
#                                        # and option it calls still exists
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=${OUT:-gpu-check-out}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --out=*) OUT=${arg#--out=} ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
mkdir -p "$OUT"
FAILED=0

step() {  # step NAME COMMAND... : run it (or, dry, show it), output to $OUT/NAME.txt
    local name=$1
    shift
    echo "== $name: $*"
    if [ "$DRY" = 1 ]; then
        return 0
    fi
    local t0=$SECONDS
    if "$@" >"$OUT/$name.txt" 2>&1; then
        echo "   ok ($((SECONDS - t0)) s)"
    else
        echo "   FAILED ($((SECONDS - t0)) s); last lines of $OUT/$name.txt:"
        tail -n 15 "$OUT/$name.txt" | sed 's/^/   | /'
        FAILED=$((FAILED + 1))
    fi
}

if [ "$DRY" = 1 ]; then
    # What the real run calls must exist: test files collect, scripts parse
    # their options, the helper module imports.
    set -e
    for f in tests/kernels/test_paged_attention.py tests/kernels/test_store_kv.py \
             tests/kernels/test_engine_triton.py tests/quant/test_int8.py \
             tests/quant/test_bnb_checkpoint.py scripts/gpu_check.py \
             benchmarks/kernels/bench_paged_attention.py \
             benchmarks/kernels/bench_store_kv.py; do
        [ -f "$f" ] || { echo "missing: $f" >&2; exit 1; }
    done
    TRITON_INTERPRET=1 "$PY" -m pytest --collect-only -q -p no:cacheprovider \
        tests/kernels tests/quant/test_int8.py tests/quant/test_bnb_checkpoint.py \
        >/dev/null
    "$PY" benchmarks/kernels/bench_paged_attention.py --help >/dev/null
    "$PY" benchmarks/kernels/bench_store_kv.py --help >/dev/null
    "$PY" scripts/gpu_check.py --dry-run
    set +e
fi

step machine "$PY" scripts/gpu_check.py machine
step kernel-tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels
step engine-triton-vs-torch "$PY" scripts/gpu_check.py engine
step bnb-tests "$PY" -m pytest -q -p no:cacheprovider tests/quant/test_int8.py \
    tests/quant/test_bnb_checkpoint.py
step bnb-engine-and-4bit "$PY" scripts/gpu_check.py bnb
step bench-paged-attention "$PY" benchmarks/kernels/bench_paged_attention.py --mode all
step bench-store-kv "$PY" benchmarks/kernels/bench_store_kv.py

if [ "$DRY" = 1 ]; then
    echo "dry run: every step's test, script and module is in place"
    exit 0
fi
echo "$FAILED step(s) failed; outputs in $OUT/"
exit "$FAILED"
