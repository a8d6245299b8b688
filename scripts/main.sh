#!/usr/bin/env bash
# The main job on a fresh machine: installs jaxeff into a virtual environment (VENV, default .venv) and trains
# the tiny decoder LM on the embedded King James Bible corpus. Extra arguments go to the trainer
# (e.g. `bash scripts/main.sh train.steps=100`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/python" -m train.lm --config configs/lm_tiny.yaml "$@"
