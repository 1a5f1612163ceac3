#!/usr/bin/env bash
# The main job on real data: the official yolov5n.pt, calibrated on the two real videos and
# proven on the real photos and the labelled coco8 images, then the daemon on a real video.
# Usage: bash scripts/demo_realdata.sh [REALDATA_DIR]   (default: ../shared/realdata)
set -euo pipefail
cd "$(dirname "$0")/.."

realdata=${1:-../shared/realdata}
if [ ! -f "$realdata/models/yolov5n.pt" ]; then
    echo "error: expected the real data folder with models/yolov5n.pt at '$realdata';" \
        "pass its path as the first argument." >&2
    exit 1
fi
[ -x .venv/bin/toolkit ] || bash scripts/setup.sh

out=out/realdata
mkdir -p "$out"

echo "== toolkit export --quantize static: yolov5n.pt, real videos calibrate, photos + coco8 prove"
.venv/bin/toolkit export --weights "$realdata/models/yolov5n.pt" --output "$out/yolov5n.onnx" \
    --verify-image "$realdata/images/bus.jpg" --quantize static \
    --calib-data "$realdata/video/car-detection.mp4" \
    --calib-data "$realdata/video/one-by-one-person-detection.mp4" \
    --eval-data "$realdata/images" --eval-data "$realdata/coco8"

int8=$(ls "$out"/yolov5n-int8-*.onnx | grep -v dynamic | head -n 1)

echo "== toolkit-device run on the people video with $int8"
.venv/bin/toolkit-device run --model "$int8" \
    --source "$realdata/video/one-by-one-person-detection.mp4" \
    --max-frames 60 --jsonl - --no-http --classes person
