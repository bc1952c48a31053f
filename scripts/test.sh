#!/usr/bin/env bash
# Set up everything (virtualenv, trainer + test extras) and run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ELIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip > /dev/null 2>&1 || true
# Pinned CPU wheel first, so the `train` extra does not pull several GB of CUDA packages.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
echo "installing into $VENV (log: $VENV/install.log) ..." >&2
"$VENV/bin/python" -m pip install -q -e ".[train,test,openvino,io,cluster]" > "$VENV/install.log" 2>&1 \
    || { cat "$VENV/install.log" >&2; echo "installation failed (see above)" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest "$@"
