"""The shipped demo model and its generated data: present, loadable, accurate as recorded.

The demo model (models/demo/shapes-yolov5n.pt) is what every command uses by default, so these
tests go through the product's own path: the safe checkpoint loader, the ONNX exporter, the
device's Detector and toolkit.evaluate, on the committed validation set and clip.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from toolkit.calibrate import load_samples, open_source
from toolkit.checkpoint import read_checkpoint
from toolkit.demo import (
    DEMO_CLASS_NAMES,
    DEMO_IMAGE_SIZE,
    demo_val_dataset,
    demo_video,
    demo_video_labels,
    demo_weights,
)
from toolkit.evaluate import (
    COCO_IOU_THRESHOLDS,
    MAP_CONF_THRESHOLD,
    ImageBoxes,
    agreement,
    box_iou,
    detect_samples,
    mean_average_precision,
)
from toolkit.export import export_model
from toolkit.prove import QuantizeRequest, quantize_and_prove
from toolkit.yolo import load_config

DEPLOY_CONF = 0.25


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory) -> Path:
    """The demo model exported as the user would, at its training size."""
    out = tmp_path_factory.mktemp("demo") / "shapes-yolov5n.onnx"
    return export_model(demo_weights(), out, imgsz=DEMO_IMAGE_SIZE)


@pytest.fixture(scope="module")
def val_samples() -> list:
    source = open_source(demo_val_dataset())
    return load_samples(source, source.items)


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The accuracy measured when the model was committed (scripts/evaluate_demo.py)."""
    return json.loads(demo_weights().with_suffix(".json").read_text())


def test_demo_checkpoint_is_an_ultralytics_yolov5n():
    checkpoint = read_checkpoint(demo_weights())

    assert checkpoint.model_class == "models.yolo.DetectionModel"
    assert checkpoint.names == list(DEMO_CLASS_NAMES)
    assert checkpoint.weights_dtype.startswith("float16")
    assert checkpoint.stride == [8.0, 16.0, 32.0]
    # The YOLOv5n architecture, only the class count changed.
    upstream = load_config("yolov5n")
    for key in ("depth_multiple", "width_multiple", "anchors", "backbone", "head"):
        assert checkpoint.architecture[key] == upstream[key], key
    assert checkpoint.architecture["nc"] == len(DEMO_CLASS_NAMES)
    assert demo_weights().stat().st_size < 5_000_000


def test_demo_val_set_is_a_yolo_dataset(val_samples):
    root = demo_val_dataset()
    names = (root / "names.txt").read_text().split()
    data = yaml.safe_load((root / "data.yaml").read_text())

    assert names == list(DEMO_CLASS_NAMES) == data["names"]
    assert len(val_samples) == 100
    objects = np.concatenate([s.labels.classes for s in val_samples])
    # Every class is well represented, and some images hold no object at all.
    assert np.bincount(objects, minlength=4).min() >= 50
    assert any(len(s.labels) == 0 for s in val_samples)


def test_demo_model_finds_the_right_shapes(demo_onnx, val_samples):
    labelled = [s for s in val_samples if len(s.labels)][:12]
    found = detect_samples(demo_onnx, [s.image for s in labelled], conf_threshold=DEPLOY_CONF)

    # The largest shape of an image is found with its class and a tight box, in most images
    # (10 of these 12 when the model was committed).
    hits = []
    for sample, detections in zip(labelled, found, strict=True):
        truth = sample.labels
        biggest = int(np.argmax(np.prod(truth.boxes[:, 2:] - truth.boxes[:, :2], axis=1)))
        same_class = detections.classes == truth.classes[biggest]
        iou = box_iou(truth.boxes[biggest : biggest + 1], detections.boxes[same_class])[0]
        hits.append(bool(iou.size) and iou.max() >= 0.7)
    assert sum(hits) >= 8, [s.name for s, hit in zip(labelled, hits, strict=True) if not hit]

    counts = agreement([s.labels for s in labelled], found, 0.5)
    assert counts.recall >= 0.7 and counts.precision >= 0.5, counts


def test_demo_model_accuracy_is_as_recorded(demo_onnx, val_samples, recorded):
    truth = [s.labels for s in val_samples]
    ranked = detect_samples(
        demo_onnx, [s.image for s in val_samples], conf_threshold=MAP_CONF_THRESHOLD
    )

    map50 = mean_average_precision(truth, ranked, (0.5,))
    map50_95 = mean_average_precision(truth, ranked, COCO_IOU_THRESHOLDS)
    assert map50 == pytest.approx(recorded["onnx_fp32"]["map50"], abs=0.005)
    assert map50_95 == pytest.approx(recorded["onnx_fp32"]["map50_95"], abs=0.005)
    assert map50 >= 0.7


def test_demo_clip_is_the_default_source_and_the_model_tracks_it(demo_onnx):
    capture = cv2.VideoCapture(str(demo_video()))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    labels = json.loads(demo_video_labels().read_text())

    assert len(frames) == len(labels["frames"]) == 100
    assert frames[0].shape == (360, 640, 3)

    picked = list(range(0, 100, 10))
    found = detect_samples(demo_onnx, [frames[i] for i in picked], conf_threshold=DEPLOY_CONF)
    truth = [_clip_truth(labels["frames"][i], frames[i].shape[:2]) for i in picked]
    counts = agreement(truth, found, 0.5)
    assert counts.recall >= 0.85 and counts.precision >= 0.6, counts


def _clip_truth(rows: list, size: tuple[int, int]) -> ImageBoxes:
    height, width = size
    array = np.asarray(rows, np.float64).reshape(-1, 5)
    cx, cy = array[:, 1] * width, array[:, 2] * height
    w, h = array[:, 3] * width, array[:, 4] * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return ImageBoxes.from_arrays(boxes, array[:, 0].astype(np.int64))


@pytest.mark.slow
def test_demo_model_static_int8_keeps_its_map50(demo_onnx, tmp_path, recorded):
    """Static INT8, calibrated on the demo clip, proven on the labelled set it never saw."""
    request = QuantizeRequest(
        model=demo_onnx,
        data=[demo_video()],
        eval_data=[demo_val_dataset()],
        modes=("static",),
        samples=64,
        eval_samples=100,
        latency_runs=3,
        output_dir=tmp_path,
    )
    report = quantize_and_prove(request)
    fp32, int8 = report.variants

    assert report.held_out["labelled"] and report.held_out["count"] == 100
    assert fp32.map50 == pytest.approx(recorded["onnx_fp32"]["map50"], abs=0.005)
    assert fp32.map50 - int8.map50 <= request.max_drop, (fp32.map50, int8.map50)
    # It also keeps nearly every FP32 detection (the agreement part of the proof).
    assert int8.recall >= 1 - request.max_drop, int8
