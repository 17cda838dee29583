#!/usr/bin/env bash
# GPU acceptance: one prepared run (about ten minutes on one GPU) that checks the harness's GPU paths and
# writes its figures as JSON under results/ (benchmarks/gpu_acceptance.py says what it checks).
# Refuses in one line, writing nothing, where torch sees no GPU.
#   scripts/gpu_acceptance.sh [--out DIR] [--only 1,2,...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x "$python" ]] || python=python3
exec "$python" benchmarks/gpu_acceptance.py "$@"
