"""Static INT8 of the real yolov5n, calibrated on real video frames, against FP32 on held-out
real images (photos, coco8, unused video frames). Skipped without ../shared/realdata."""

from __future__ import annotations

import pytest

from tests.conftest import realdata_file
from toolkit import calibrate, evaluate, quantize

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

VIDEOS = ["video/car-detection.mp4", "video/one-by-one-person-detection.mp4"]


@pytest.fixture(scope="module")
def real_samples():
    videos = [calibrate.open_source(realdata_file(v)) for v in VIDEOS]
    calibration, held_video = calibrate.sample_split(videos, 32, 40, seed=0)
    photos = calibrate.open_source(realdata_file("images"))
    coco8 = calibrate.open_source(realdata_file("coco8/images"))
    held = calibrate.load_samples(photos, photos.items) + calibrate.load_samples(coco8, coco8.items)
    return calibration, held + held_video


def agreement(model_path, reference, held_out):
    found = evaluate.detect_samples(model_path, [s.image for s in held_out], conf_threshold=0.25)
    return evaluate.agreement(reference, found, 0.5)


def test_static_int8_keeps_fp32_detections_and_a_quantized_tail_loses_them(
    yolov5n_onnx, real_samples, tmp_path
):
    calibration, held_out = real_samples
    model, info = quantize.load_fp32_model(yolov5n_onnx)
    tail = quantize.find_detect_tail(model, info)
    groups = quantize.layer_groups(model, tail)
    recipe = quantize.preset_recipe(quantize.PRESETS["x86-vnni"])
    reference = evaluate.detect_samples(
        yolov5n_onnx, [s.image for s in held_out], conf_threshold=0.25
    )
    assert sum(len(r) for r in reference) > 40  # enough detections for the bound to mean much

    ours = tmp_path / "ours.onnx"
    quantize.static_quantize(
        yolov5n_onnx, ours, calibration, info, recipe,
        float_nodes=quantize.float_nodes_for(recipe, tail, groups),
    )  # fmt: skip
    result = agreement(ours, reference, held_out)
    assert result.recall >= 0.9, result
    assert result.precision >= 0.9, result

    # The same recipe with the Detect tail quantized too: one int8 scale for box pixels and
    # probabilities, and the scores collapse.
    naive = tmp_path / "naive.onnx"
    quantize.static_quantize(yolov5n_onnx, naive, calibration, info, recipe, float_nodes=[])
    assert agreement(naive, reference, held_out).recall < 0.2
