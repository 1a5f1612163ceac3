"""Models on aarch64 against their x86 results: tensors, raw outputs and detections."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from device.infer import Detector, SessionConfig
from device.postprocess import PostprocessConfig

ONE_GREY_LEVEL = 1 / 255


def test_model_matches_x86(model_case):
    name, model, case = model_case
    tolerance = model["tolerance"]
    x86_input = np.load(case["input"])
    expected = np.load(case["output"])

    if "image" in case:
        rows, detections = _run_device_path(model["path"], case["image"], x86_input)
    else:
        rows, detections = _run_session(model["path"], x86_input), None
    _save_output(f"{name}-{case['name']}", rows)

    assert rows.shape == expected.shape and rows.dtype == expected.dtype
    if "elementwise" in tolerance:
        _check_elementwise(rows, expected, tolerance["elementwise"], x86_input.shape)
    if "statistics" in tolerance:
        fp32 = np.load(case["fp32_output"])
        _check_statistics(rows, expected, fp32, tolerance["statistics"])
    if detections is not None:
        _check_detections(detections, case["detections"], tolerance["detections"])


def _run_device_path(model_path: str, image: str, x86_input: np.ndarray):
    """What the daemon does with a photo: decode, letterbox, infer, postprocess."""
    detector = Detector(model_path, session_config=SessionConfig(intra_op_threads=1))
    tensor, transform = detector.preprocess(cv2.imread(image))

    # JPEG decoding and resizing on ARM give the x86 tensor (measured: bit-identical).
    grey_levels = float(np.abs(tensor - x86_input).max()) / ONE_GREY_LEVEL
    assert grey_levels <= 1.0 + 1e-3, f"preprocessed {image} differs by {grey_levels:.2f} levels"

    rows = detector.infer(tensor)
    detections = [d.as_dict() for d in detector.postprocess(rows, transform)]
    if grey_levels > 0:
        rows = detector.infer(x86_input)  # compare raw outputs on the very same input
    return rows[np.newaxis], detections


def _run_session(model_path: str, tensor: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: tensor})
    return output


def _save_output(name: str, rows: np.ndarray) -> None:
    # The host compares the Pi 4's and the Pi 5's results afterwards.
    out = os.environ.get("EDGE_ARM_OUT")
    if out:
        np.save(Path(out) / f"{name}.npy", rows)


def _check_elementwise(rows, expected, limits, input_shape) -> None:
    if limits.get("box_atol_fraction") is None:
        boxes, scores, box_atol = None, np.abs(rows - expected), 0.0
    else:
        boxes = np.abs(rows[..., :4] - expected[..., :4])
        scores = np.abs(rows[..., 4:] - expected[..., 4:])
        box_atol = limits["box_atol_fraction"] * max(input_shape[2:])
    assert scores.max() <= limits["score_atol"], (
        f"obj/cls: max |arm - x86| = {scores.max():.2e}, tolerance {limits['score_atol']:.0e}"
    )
    if boxes is not None:
        assert boxes.max() <= box_atol, (
            f"boxes: max |arm - x86| = {boxes.max():.2e} px, tolerance {box_atol:.2e} px"
        )


def _check_statistics(rows, expected, fp32, limits) -> None:
    """For kernels that round differently: the bulk agrees, and ARM is as faithful to FP32."""
    difference = np.abs(rows[..., 4:] - expected[..., 4:])
    mean, p99 = float(difference.mean()), float(np.quantile(difference, 0.99))
    assert mean <= limits["score_mean_atol"], f"mean |arm - x86| obj/cls = {mean:.2e}"
    assert p99 <= limits["score_p99_atol"], f"99th percentile |arm - x86| obj/cls = {p99:.2e}"

    arm_error = float(np.abs(rows[..., 4:] - fp32[..., 4:]).mean())
    x86_error = float(np.abs(expected[..., 4:] - fp32[..., 4:]).mean())
    ratio = arm_error / max(x86_error, 1e-12)
    assert ratio <= limits["fp32_error_ratio"], (
        f"mean obj/cls error against FP32: arm {arm_error:.2e}, x86 {x86_error:.2e}"
    )


def _check_detections(found: list[dict], reference: list[dict], rule: dict) -> None:
    confident = PostprocessConfig().conf_threshold + rule["margin"]
    if rule["margin"] == 0:
        assert len(found) == len(reference), f"arm {_brief(found)}\nx86 {_brief(reference)}"
    problems = _unmatched(reference, found, rule, confident, "x86", "arm")
    problems += _unmatched(found, reference, rule, confident, "arm", "x86")
    assert not problems, "\n".join([*problems, f"arm {_brief(found)}", f"x86 {_brief(reference)}"])


def _unmatched(wanted, pool, rule, confident, wanted_on, pool_on) -> list[str]:
    """Confident detections of ``wanted`` without a same-class counterpart in ``pool``."""
    problems = []
    for detection in wanted:
        if detection["score"] < confident:
            continue
        same_class = [d for d in pool if d["class_id"] == detection["class_id"]]
        best = max(same_class, key=lambda d: _iou(d["box"], detection["box"]), default=None)
        if best is None:
            problems.append(f"{_brief([detection])} on {wanted_on}: none on {pool_on}")
            continue
        iou = _iou(best["box"], detection["box"])
        gap = abs(best["score"] - detection["score"])
        if iou < rule["min_iou"] or gap > rule["score_atol"]:
            problems.append(
                f"{_brief([detection])} on {wanted_on}: best on {pool_on} {_brief([best])}, "
                f"IoU {iou:.3f} (min {rule['min_iou']}), score gap {gap:.4f} "
                f"(max {rule['score_atol']})"
            )
    return problems


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brief(detections: list[dict]) -> str:
    return ", ".join(f"{d['label']} {d['score']:.3f} {d['box']}" for d in detections) or "none"
