#!/usr/bin/env bash
# Creates .venv with the host tools, the device runtime and the test tools.
# pip's own output goes to .venv/setup.log and is shown only when the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi

log=.venv/setup.log
echo "== setting up .venv (pip log: $log)"
if ! { .venv/bin/python -m pip install --upgrade pip \
        && .venv/bin/python -m pip install -e '.[host,dev]'; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "error: installing the project into .venv failed; the full pip log is $log" >&2
    exit 1
fi
echo "== .venv ready: $(.venv/bin/python -c 'import torch, onnxruntime; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")')"
