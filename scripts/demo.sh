#!/usr/bin/env bash
# The main job on the shipped demo model: set up, export, quantize with its proof report, then
# run the device daemon on the demo clip for a bounded number of frames.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

out=out/demo
mkdir -p "$out"

echo "== toolkit export --quantize static (demo model, demo clip as calibration data)"
.venv/bin/toolkit export --output "$out/shapes-yolov5n.onnx" --quantize static

int8=$(ls "$out"/shapes-yolov5n-int8-*.onnx | grep -v dynamic | head -n 1)

echo "== toolkit-device run on the demo clip with $int8"
.venv/bin/toolkit-device run --model "$int8" --source models/demo/shapes-clip.mp4 \
    --max-frames 40 --jsonl - --no-http
