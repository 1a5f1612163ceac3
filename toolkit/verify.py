"""Prove an exported ONNX model against the PyTorch model it came from.

Stages: the ONNX checker and the input/output contract; one real image (or a synthetic one)
through ``device.preprocess``; the PyTorch model and an onnxruntime session on the same
tensor; the outputs compared within the tolerance stated for the precision. A failure raises
ToolkitError; the caller then discards the file.

Tolerances, per output element (``|onnx - torch|``):
  boxes (cx, cy, w, h, input pixels): ``<= box_atol + box_rtol * |torch|``, on the rows whose
    objectness in PyTorch is at least ``box_min_objectness`` (all rows for fp32)
  objectness and class probabilities (0..1), all rows: ``<= score_atol``
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch

from device.contract import ModelInfo
from device.errors import ToolkitError
from device.preprocess import preprocess
from toolkit.yolo import YoloV5

log = logging.getLogger(__name__)

SYNTHETIC_IMAGE = "synthetic"


@dataclass(frozen=True)
class Tolerance:
    box_atol: float  # input pixels
    box_rtol: float
    score_atol: float
    # Rows that can never become detections are skipped for boxes: in fp16 a large anchor
    # turns a tiny logit error into pixels of width on boxes nobody will see.
    box_min_objectness: float = 0.0

    def describe(self) -> str:
        return (
            f"boxes <= {self.box_atol:g} px + {self.box_rtol:g} x value"
            + (f" where obj >= {self.box_min_objectness:g}" if self.box_min_objectness else "")
            + f", scores <= {self.score_atol:g}"
        )


# fp32 differs from PyTorch only by operation order and the batch-norm fusion (~1e-3 px,
# ~1e-6 score); fp16 rounds every activation to 11 significant bits.
TOLERANCES = {
    "fp32": Tolerance(box_atol=0.05, box_rtol=1e-4, score_atol=1e-4),
    "fp16": Tolerance(box_atol=2.0, box_rtol=1e-2, score_atol=5e-2, box_min_objectness=0.01),
}


@dataclass
class VerifyReport:
    """How closely the ONNX model reproduced PyTorch on one image."""

    image: str
    input_shape: tuple[int, ...]
    precision: str
    tolerance: Tolerance
    max_box_diff: float
    max_score_diff: float
    worst_box_excess: float  # > 0 means the box tolerance was exceeded
    detections_torch: int
    detections_onnx: int

    @property
    def passed(self) -> bool:
        return self.worst_box_excess <= 0 and self.max_score_diff <= self.tolerance.score_atol

    def summary(self) -> str:
        verdict = "agrees with" if self.passed else "DIFFERS from"
        return (
            f"ONNX ({self.precision}) {verdict} PyTorch on {self.image} "
            f"{'x'.join(map(str, self.input_shape))}: max |diff| boxes "
            f"{self.max_box_diff:.2e} px, scores {self.max_score_diff:.2e} "
            f"(tolerance: {self.tolerance.describe()}); detections at conf 0.25: "
            f"PyTorch {self.detections_torch}, ONNX {self.detections_onnx}"
        )


def verify_onnx(
    path: Path, model: YoloV5, info: ModelInfo, *, image: str | Path | None = None
) -> VerifyReport:
    """Check ``path`` and compare it with ``model`` on ``image``; raise if they disagree."""
    check_graph(path, info)
    frame, label = load_image(image)
    tensor = input_tensor(frame, info)
    reference = run_torch(model, tensor)
    candidate = run_onnx(path, info, tensor)
    report = compare(reference, candidate, info, label, tuple(tensor.shape))
    if not report.passed:
        raise ToolkitError(
            f"Verification failed, so no model was written: {report.summary()}. "
            "Try another --opset or --no-simplify, and report the problem if it persists."
        )
    log.debug("%s", report.summary())
    return report


def check_graph(path: Path, info: ModelInfo) -> None:
    """The ONNX checker, then the names, types and sizes the runtime relies on."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ToolkitError(f"The exported graph fails the ONNX checker: {exc}") from exc

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if list(inputs) != [info.input_name] or list(outputs) != [info.output_name]:
        raise ToolkitError(
            f"Expected input '{info.input_name}' and output '{info.output_name}', found inputs "
            f"{list(inputs)} and outputs {list(outputs)}."
        )
    float32 = onnx.TensorProto.FLOAT
    for value in (inputs[info.input_name], outputs[info.output_name]):
        if value.type.tensor_type.elem_type != float32:
            raise ToolkitError(f"Expected '{value.name}' to be float32 in the exported graph.")
    last_dim = outputs[info.output_name].type.tensor_type.shape.dim[-1].dim_value
    if last_dim != 5 + info.num_classes:
        raise ToolkitError(
            f"Expected output rows of 5 + {info.num_classes} values, the graph has {last_dim}."
        )


def load_image(image: str | Path | None) -> tuple[np.ndarray, str]:
    """A BGR uint8 frame from ``image``, or a synthetic one when none is given."""
    if image is None:
        return synthetic_image(), SYNTHETIC_IMAGE
    path = Path(image)
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if frame is None:
        raise ToolkitError(
            f"Cannot read the verification image {path}: expected a JPEG or PNG file. "
            "Pass another --verify-image, or none to use a synthetic image."
        )
    return frame, path.name


def synthetic_image(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic non-square test scene: gradient, shapes and noise (BGR uint8)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, width, dtype=np.float32)
    frame = np.repeat(ramp[np.newaxis, :, np.newaxis], height, 0).repeat(3, 2)
    frame = frame.astype(np.uint8)
    for _ in range(12):
        x1, y1 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x2, y2 = x1 + int(rng.integers(20, 200)), y1 + int(rng.integers(20, 200))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(frame, (x1, y1), (x2, y2), color, -1)
        else:
            cv2.circle(frame, (x1, y1), int(rng.integers(10, 80)), color, -1)
    noise = rng.integers(-12, 13, frame.shape)
    return np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def input_tensor(frame: np.ndarray, info: ModelInfo) -> np.ndarray:
    """The frame preprocessed as the device will, repeated to the exported batch size."""
    tensor, _ = preprocess(frame, info)
    return np.ascontiguousarray(np.repeat(tensor, max(info.batch_size, 1), axis=0))


def run_torch(model: YoloV5, tensor: np.ndarray) -> np.ndarray:
    model = model.float().eval()
    with torch.no_grad():
        return model(torch.from_numpy(tensor)).numpy()


def run_onnx(path: Path, info: ModelInfo, tensor: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return session.run([info.output_name], {info.input_name: tensor})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ToolkitError(f"onnxruntime could not run the exported model: {exc}") from exc


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    info: ModelInfo,
    label: str,
    input_shape: tuple[int, ...],
) -> VerifyReport:
    if reference.shape != candidate.shape:
        raise ToolkitError(
            f"The ONNX output has shape {candidate.shape}, PyTorch gives {reference.shape}."
        )
    tolerance = TOLERANCES.get(info.precision, TOLERANCES["fp16"])
    rows = reference[..., 4] >= tolerance.box_min_objectness
    box_diff = np.abs(candidate[..., :4] - reference[..., :4])[rows]
    score_diff = np.abs(candidate[..., 4:] - reference[..., 4:])
    allowed = tolerance.box_atol + tolerance.box_rtol * np.abs(reference[..., :4][rows])
    return VerifyReport(
        image=label,
        input_shape=input_shape,
        precision=info.precision,
        tolerance=tolerance,
        max_box_diff=float(box_diff.max(initial=0.0)),
        max_score_diff=float(score_diff.max(initial=0.0)),
        worst_box_excess=float((box_diff - allowed).max(initial=-1.0)),
        detections_torch=_count_detections(reference[0]),
        detections_onnx=_count_detections(candidate[0]),
    )


def _count_detections(rows: np.ndarray, conf: float = 0.25, iou: float = 0.45) -> int:
    scores = rows[:, 4:5] * rows[:, 5:]
    best = scores.max(1)
    keep = best >= conf
    if not keep.any():
        return 0
    boxes = rows[keep, :4]
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    classes = scores[keep].argmax(1)
    picked = cv2.dnn.NMSBoxesBatched(
        [[float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for x1, y1, x2, y2 in xyxy],
        best[keep].tolist(),
        classes.tolist(),
        conf,
        iou,
    )
    return len(picked)
