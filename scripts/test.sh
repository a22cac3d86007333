#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs lint, type checks and every test, slow ones included.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check tandem tests benchmarks
.venv/bin/ruff format --check tandem tests benchmarks
echo "== mypy"
.venv/bin/mypy tandem
echo "== pytest"
.venv/bin/python -m pytest -q -ra "$@"
