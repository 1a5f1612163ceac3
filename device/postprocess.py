"""Postprocessing: raw YOLOv5 output to detections in frame pixels.

Input contract: one image's rows from the Detect head, shape (anchors, 5 + classes), float32,
columns ``cx, cy, w, h, obj, cls...`` with boxes in model-input pixels and probabilities after
sigmoid.  A detection's score is ``obj * cls``.

Steps, in YOLOv5's order: keep rows whose score passes its class threshold, suppress overlaps
(per class or across classes), keep the ``max_detections`` best, then map the boxes back through
the letterbox that was actually applied and clip them to the frame.

Non-maximum suppression is a vectorized numpy greedy loop rather than ``cv2.dnn.NMSBoxes``:
it gives the same answer on every OpenCV build a board may have, it is exact for per-class
suppression (no float32 class offsets that shift IoU), ties break deterministically by row
order, and after the score threshold only tens to hundreds of rows remain, so each of the few
loop steps is a single vector operation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from device.errors import ToolkitError
from device.preprocess import LetterboxTransform
from device.types import Detection

BOX_COLUMNS = 4
OBJECTNESS_COLUMN = 4
FIRST_CLASS_COLUMN = 5


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds and filters applied to the raw model output."""

    conf_threshold: float = 0.25  # minimum obj x cls score, inclusive
    iou_threshold: float = 0.45  # a box overlapping a better one by more than this is dropped
    max_detections: int = 300  # per frame, best scores first
    class_agnostic: bool = False  # suppress overlaps across classes, not only within one
    class_thresholds: Mapping[int, float] = field(default_factory=dict)  # per-class conf
    classes: frozenset[int] | None = None  # keep only these class ids; None keeps all
    multi_label: bool = False  # one row may yield several classes (evaluation style)
    max_candidates: int = 30000  # rows entering NMS, best first; bounds the worst case

    def __post_init__(self) -> None:
        check_config(self)

    def thresholds(self, num_classes: int) -> np.ndarray:
        """The score threshold of every class as a (classes,) float32 vector."""
        values = np.full(num_classes, self.conf_threshold, dtype=np.float32)
        for class_id, threshold in self.class_thresholds.items():
            if 0 <= class_id < num_classes:
                values[class_id] = threshold
        return values


def check_config(config: PostprocessConfig) -> None:
    """Reject values that cannot work, once, before any frame is processed."""
    problems = []
    if not 0.0 <= config.conf_threshold <= 1.0:
        problems.append(f"conf_threshold must be within 0..1, got {config.conf_threshold}")
    if not 0.0 <= config.iou_threshold <= 1.0:
        problems.append(f"iou_threshold must be within 0..1, got {config.iou_threshold}")
    if config.max_detections < 1:
        problems.append(f"max_detections must be at least 1, got {config.max_detections}")
    if config.max_candidates < 1:
        problems.append(f"max_candidates must be at least 1, got {config.max_candidates}")
    for class_id, threshold in config.class_thresholds.items():
        if not 0.0 <= threshold <= 1.0:
            problems.append(f"class_thresholds[{class_id}] must be within 0..1, got {threshold}")
    if problems:
        raise ToolkitError("Invalid postprocessing settings: " + "; ".join(problems) + ".")


def check_class_ids(config: PostprocessConfig, num_classes: int) -> None:
    """Reject class ids the model does not have, naming the valid range."""
    asked = set(config.class_thresholds) | set(config.classes or ())
    unknown = sorted(c for c in asked if not 0 <= c < num_classes)
    if unknown:
        raise ToolkitError(
            f"Class ids {unknown} are not in the model, which has classes 0..{num_classes - 1}. "
            "Use ids or names from the model's metadata."
        )


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) centre x, centre y, width, height to x1, y1, x2, y2."""
    half = boxes[:, 2:4] / 2
    return np.concatenate([boxes[:, 0:2] - half, boxes[:, 0:2] + half], axis=1)


def decode(
    rows: np.ndarray, config: PostprocessConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows passing their class threshold as (boxes xyxy in input pixels, scores, class ids),
    best score first, at most ``config.max_candidates``."""
    if rows.ndim != 2 or rows.shape[1] <= FIRST_CLASS_COLUMN:
        raise ToolkitError(
            f"Expected model output rows of shape (anchors, 5 + classes), got {rows.shape}."
        )
    num_classes = rows.shape[1] - FIRST_CLASS_COLUMN
    thresholds = config.thresholds(num_classes)
    allowed = np.ones(num_classes, dtype=bool)
    if config.classes is not None:
        allowed[:] = False
        allowed[[c for c in config.classes if 0 <= c < num_classes]] = True
    if not allowed.any():
        return _empty()

    # obj x cls <= obj because cls <= 1, so rows whose objectness misses the lowest threshold
    # can be dropped before the (rows x classes) multiply: usually all but a few hundred.
    objectness = rows[:, OBJECTNESS_COLUMN]
    rows = rows[objectness >= thresholds[allowed].min()]
    scores = rows[:, FIRST_CLASS_COLUMN:] * rows[:, OBJECTNESS_COLUMN : OBJECTNESS_COLUMN + 1]

    if config.multi_label:
        row_index, class_ids = np.nonzero((scores >= thresholds) & allowed)
        best = scores[row_index, class_ids]
    else:
        class_ids = scores.argmax(axis=1)
        row_index = np.arange(len(rows))
        best = scores[row_index, class_ids]
        keep = (best >= thresholds[class_ids]) & allowed[class_ids]
        row_index, class_ids, best = row_index[keep], class_ids[keep], best[keep]

    order = np.argsort(-best, kind="stable")[: config.max_candidates]
    row_index, class_ids, best = row_index[order], class_ids[order], best[order]
    boxes = xywh_to_xyxy(rows[row_index, :BOX_COLUMNS])
    return boxes.astype(np.float32), best.astype(np.float32), class_ids.astype(np.int64)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((0, 4), dtype=np.float32),
        np.zeros(0, dtype=np.float32),
        np.zeros(0, dtype=np.int64),
    )


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of (N, 4) xyxy boxes, as (N,) float."""
    inter_w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    intersection = inter_w * inter_h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def nms(
    boxes: np.ndarray,
    class_ids: np.ndarray,
    *,
    iou_threshold: float,
    class_agnostic: bool = False,
    max_detections: int = 300,
) -> np.ndarray:
    """Greedy non-maximum suppression over boxes already sorted best first.

    Returns the indices kept, in order.  A box is dropped when its IoU with a kept box is
    greater than ``iou_threshold`` and, unless ``class_agnostic``, the classes are equal.
    """
    boxes = boxes.astype(np.float64)
    remaining = np.arange(len(boxes))
    kept: list[int] = []
    while remaining.size and len(kept) < max_detections:
        best, rest = remaining[0], remaining[1:]
        kept.append(int(best))
        overlaps = box_iou(boxes[best], boxes[rest]) > iou_threshold
        if not class_agnostic:
            overlaps &= class_ids[rest] == class_ids[best]
        remaining = rest[~overlaps]
    return np.asarray(kept, dtype=np.int64)


def postprocess(
    rows: np.ndarray,
    transform: LetterboxTransform,
    names: list[str],
    config: PostprocessConfig,
) -> list[Detection]:
    """One image's raw rows to detections in frame pixels, best score first."""
    boxes, scores, class_ids = decode(rows, config)
    keep = nms(
        boxes,
        class_ids,
        iou_threshold=config.iou_threshold,
        class_agnostic=config.class_agnostic,
        max_detections=config.max_detections,
    )
    frame_boxes = transform.boxes_to_frame(boxes[keep])
    return _to_detections(frame_boxes, scores[keep], class_ids[keep], names)


def _to_detections(
    boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, names: list[str]
) -> list[Detection]:
    detections = []
    for (x1, y1, x2, y2), score, class_id in zip(
        boxes.tolist(), scores.tolist(), class_ids.tolist(), strict=True
    ):
        # A box lying wholly in the letterbox border has no area once clipped to the frame.
        if x2 <= x1 or y2 <= y1:
            continue
        label = names[class_id] if class_id < len(names) else str(class_id)
        detections.append(Detection(x1, y1, x2, y2, score, class_id, label))
    return detections
