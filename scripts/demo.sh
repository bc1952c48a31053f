#!/usr/bin/env bash
# Set up the service (no torch; OpenVINO for --precision bf16, RosettaSciIO for microscope files) and run the main job: the service on the shipped default
# ensemble, fed by a replayed synthetic movie. Extra arguments go to `elit-stream demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ELIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip > /dev/null 2>&1 || true
echo "installing into $VENV (log: $VENV/install.log) ..." >&2
"$VENV/bin/python" -m pip install -q -e ".[openvino,io,view]" > "$VENV/install.log" 2>&1 \
    || { cat "$VENV/install.log" >&2; echo "installation failed (see above)" >&2; exit 1; }
exec "$VENV/bin/elit-stream" demo "$@"
