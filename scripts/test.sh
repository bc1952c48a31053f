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
"$VENV/bin/python" -m pip install -q -e ".[train,test,openvino,io,cluster,view]" > "$VENV/install.log" 2>&1 \
    || { cat "$VENV/install.log" >&2; echo "installation failed (see above)" >&2; exit 1; }
# The live view's browser test drives Debian's Chromium (tests/test_view.py; skipped without it).
if ! command -v chromium > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "installing chromium for the browser test (log: $VENV/apt.log) ..." >&2
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } \
        > "$VENV/apt.log" 2>&1 || echo "chromium not installed (see $VENV/apt.log): the browser test will skip" >&2
fi
exec "$VENV/bin/python" -m pytest "$@"
