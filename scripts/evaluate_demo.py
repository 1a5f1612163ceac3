"""Measure the demo model's true accuracy on the generated validation set, as the product would.

The checkpoint is exported with the project's exporter, run through the device's own Detector
(letterbox, onnxruntime, NMS) and scored with ``toolkit.evaluate``: mAP50 and mAP50-95 at a
0.001 score floor, plus precision and recall at the deployment threshold (0.25, IoU 0.5).  The
numbers are written as data beside the model (``models/demo/shapes-yolov5n.json``), which the
tests check the committed model against.

    .venv/bin/python scripts/evaluate_demo.py            # prints the table, rewrites the JSON
    .venv/bin/python scripts/evaluate_demo.py --weights /tmp/run/shapes-yolov5n.pt --no-write
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from toolkit.calibrate import load_samples, open_source  # noqa: E402
from toolkit.checkpoint import read_checkpoint  # noqa: E402
from toolkit.demo import DEMO_IMAGE_SIZE, demo_val_dataset, demo_weights  # noqa: E402
from toolkit.evaluate import (  # noqa: E402
    COCO_IOU_THRESHOLDS,
    MAP_CONF_THRESHOLD,
    agreement,
    class_average_precisions,
    detect_samples,
    mean_average_precision,
)
from toolkit.export import export_model  # noqa: E402

log = logging.getLogger("evaluate_demo")

DEPLOY_CONF_THRESHOLD = 0.25


def accuracy(model_path: Path, samples: list, names: list[str]) -> dict:
    """True accuracy of an ONNX model on labelled samples."""
    images = [s.image for s in samples]
    truth = [s.labels for s in samples]
    ranked = detect_samples(model_path, images, conf_threshold=MAP_CONF_THRESHOLD)
    per_class = class_average_precisions(truth, ranked, 0.5)
    deployed = [p.above(DEPLOY_CONF_THRESHOLD) for p in ranked]
    found = agreement(truth, deployed, 0.5)
    return {
        "map50": round(mean_average_precision(truth, ranked, (0.5,)), 4),
        "map50_95": round(mean_average_precision(truth, ranked, COCO_IOU_THRESHOLDS), 4),
        "ap50_per_class": {names[c]: round(ap, 4) for c, ap in sorted(per_class.items())},
        "precision_at_0.25": round(found.precision, 4),
        "recall_at_0.25": round(found.recall, 4),
    }


def evaluate(weights: Path, val_dir: Path, image_size: int) -> dict:
    checkpoint = read_checkpoint(weights)
    source = open_source(val_dir)
    samples = load_samples(source, source.items)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export_model(weights, Path(scratch) / "demo.onnx", imgsz=image_size)
        metrics = accuracy(onnx_path, samples, checkpoint.names)
    return {
        "model": weights.name,
        "sha256": checkpoint.sha256,
        "names": checkpoint.names,
        "input_size": [image_size, image_size],
        "validation_set": {
            "path": "models/demo/val",
            "images": len(samples),
            "objects": sum(len(s.labels) for s in samples),
        },
        "evaluated_with": "scripts/evaluate_demo.py: toolkit export (ONNX FP32, opset 17), "
        "device Detector (onnxruntime), toolkit.evaluate",
        "onnx_fp32": metrics,
    }


def print_table(report: dict) -> None:
    metrics = report["onnx_fp32"]
    val = report["validation_set"]
    height, width = report["input_size"]
    print(f"{report['model']}: {val['images']} images, {val['objects']} objects, {height}x{width}")
    print(f"{'metric':<22}{'value':>8}")
    for key in ("map50", "map50_95", "precision_at_0.25", "recall_at_0.25"):
        print(f"{key:<22}{metrics[key]:>8.4f}")
    for name, ap in metrics["ap50_per_class"].items():
        print(f"{'AP50 ' + name:<22}{ap:>8.4f}")


def write_json(report: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--val", type=Path, default=None, help="default: models/demo/val")
    parser.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE)
    parser.add_argument("--no-write", action="store_true", help="print only, keep the JSON")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    weights = args.weights or demo_weights()
    report = evaluate(weights, args.val or demo_val_dataset(), args.image_size)
    print_table(report)
    if not args.no_write:
        target = weights.with_suffix(".json")
        write_json(report, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
