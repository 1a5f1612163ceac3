"""Detection metrics: matching, precision and recall, mAP50 and mAP50-95.

Two uses: agreement of a quantized model with its FP32 source (the FP32 detections play the
ground truth), and true accuracy against a labelled YOLO dataset.

Contracts: boxes are (N, 4) float arrays of x1, y1, x2, y2 in the pixels of one image, scores
(N,) in 0..1, classes (N,) integer class indices.  A prediction matches a reference box of the
same class when their IoU reaches the threshold; each reference box is matched at most once,
predictions taken in descending score order (the COCO rule).  Average precision is the area
under the monotone precision envelope of the precision/recall curve (every point, no 101-point
sampling), so small cases can be checked by hand.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device.types import Detection

COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image: detections (with scores) or ground truth (scores all 1)."""

    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 pixels
    scores: np.ndarray  # (N,) float32
    classes: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def empty(cls) -> ImageBoxes:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    @classmethod
    def from_detections(cls, detections: Sequence[Detection]) -> ImageBoxes:
        if not detections:
            return cls.empty()
        return cls(
            np.array([[d.x1, d.y1, d.x2, d.y2] for d in detections], np.float32),
            np.array([d.score for d in detections], np.float32),
            np.array([d.class_id for d in detections], np.int64),
        )

    @classmethod
    def from_arrays(cls, boxes, classes, scores=None) -> ImageBoxes:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        classes = np.asarray(classes, np.int64).reshape(-1)
        scores = np.ones(len(classes), np.float32) if scores is None else scores
        return cls(boxes, np.asarray(scores, np.float32).reshape(-1), classes)

    def above(self, score_threshold: float) -> ImageBoxes:
        keep = self.scores >= score_threshold
        return ImageBoxes(self.boxes[keep], self.scores[keep], self.classes[keep])


@dataclass(frozen=True)
class Agreement:
    """How well a candidate's detections reproduce a reference's, at one IoU threshold."""

    matched: int
    reference: int  # reference boxes in all images
    candidate: int  # candidate boxes in all images

    @property
    def recall(self) -> float:
        """Share of reference boxes found; 1.0 when there were none to find."""
        return self.matched / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        """Share of candidate boxes that match a reference box; 1.0 when there were none."""
        return self.matched / self.candidate if self.candidate else 1.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of (N, 4) and (M, 4) x1, y1, x2, y2 boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match(prediction: ImageBoxes, reference: ImageBoxes, iou_threshold: float) -> np.ndarray:
    """(N,) bool: which predictions match a reference box, greedy in descending score."""
    hits = np.zeros(len(prediction), bool)
    if not len(prediction) or not len(reference):
        return hits

    iou = box_iou(prediction.boxes, reference.boxes)
    iou[prediction.classes[:, None] != reference.classes[None, :]] = 0.0
    taken = np.zeros(len(reference), bool)
    for i in np.argsort(-prediction.scores, kind="stable"):
        candidates = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            taken[j] = True
            hits[i] = True
    return hits


def agreement(
    reference: Sequence[ImageBoxes], candidate: Sequence[ImageBoxes], iou_threshold: float = 0.5
) -> Agreement:
    """Matched, reference and candidate counts over images given in the same order."""
    _check_same_length(reference, candidate)
    matched = sum(
        int(match(c, r, iou_threshold).sum()) for r, c in zip(reference, candidate, strict=True)
    )
    return Agreement(
        matched=matched,
        reference=sum(len(r) for r in reference),
        candidate=sum(len(c) for c in candidate),
    )


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope of a recall-ordered curve (all points)."""
    recall = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 0.0]))
    precision = np.concatenate(([1.0], precision, [0.0]))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def class_average_precisions(
    ground_truth: Sequence[ImageBoxes], predictions: Sequence[ImageBoxes], iou_threshold: float
) -> dict[int, float]:
    """AP per class that has ground truth; predictions of other classes count nowhere."""
    _check_same_length(ground_truth, predictions)
    hits, scores, classes = [], [], []
    for truth, pred in zip(ground_truth, predictions, strict=True):
        hits.append(match(pred, truth, iou_threshold))
        scores.append(pred.scores)
        classes.append(pred.classes)
    hits, scores, classes = (
        np.concatenate(v) if v else np.zeros(0) for v in (hits, scores, classes)
    )
    truth_classes = np.concatenate([t.classes for t in ground_truth]) if ground_truth else []

    result = {}
    for cls in np.unique(truth_classes):
        positives = int(np.sum(truth_classes == cls))
        mine = classes == cls
        order = np.argsort(-scores[mine], kind="stable")
        true_pos = np.cumsum(hits[mine][order])
        recall = true_pos / positives
        precision = true_pos / np.arange(1, len(true_pos) + 1)
        result[int(cls)] = average_precision(recall, precision)
    return result


def mean_average_precision(
    ground_truth: Sequence[ImageBoxes],
    predictions: Sequence[ImageBoxes],
    iou_thresholds: Sequence[float] = (0.5,),
) -> float:
    """mAP over the classes present in the ground truth, averaged over IoU thresholds.

    ``(0.5,)`` gives mAP50, ``COCO_IOU_THRESHOLDS`` mAP50-95.  No ground truth at all gives
    NaN: there is nothing to measure."""
    per_threshold = []
    for threshold in iou_thresholds:
        per_class = class_average_precisions(ground_truth, predictions, threshold)
        if not per_class:
            return float("nan")
        per_threshold.append(np.mean(list(per_class.values())))
    return float(np.mean(per_threshold))


def _check_same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"expected the same number of images on both sides, got {len(a)} and {len(b)}"
        )


# ---------------------------------------------------------------- running models for the proof

MAP_CONF_THRESHOLD = 0.001  # mAP ranks every candidate; agreement uses the deployment threshold


def detect_samples(
    model_path: str | Path, images: Sequence[np.ndarray], *, conf_threshold: float
) -> list[ImageBoxes]:
    """Detections of a model on each image, through the device's own Detector."""
    from device.infer import Detector
    from device.postprocess import PostprocessConfig

    with Detector(model_path, PostprocessConfig(conf_threshold=conf_threshold)) as detector:
        return [ImageBoxes.from_detections(detector.detect(image)) for image in images]


def measure_latency(
    model_paths: Sequence[str | Path],
    tensor: np.ndarray,
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 0,
) -> list[tuple[float, float]]:
    """(median, p95) inference milliseconds of each model on ``tensor``, with the device's
    session settings (``threads`` 0: one per usable CPU).

    The models run in turn, one inference each per round, so that load from other processes
    falls on all of them alike and their ratios stay meaningful on a busy machine."""
    from device.infer import Detector, SessionConfig

    config = SessionConfig(intra_op_threads=threads)
    detectors = [Detector(path, session_config=config) for path in model_paths]
    try:
        for detector in detectors:
            for _ in range(warmup):
                detector.infer(tensor)
        times: list[list[float]] = [[] for _ in detectors]
        for _ in range(runs):
            for detector, samples in zip(detectors, times, strict=True):
                start = time.perf_counter()
                detector.infer(tensor)
                samples.append((time.perf_counter() - start) * 1000)
    finally:
        for detector in detectors:
            detector.close()
    return [(float(np.median(t)), float(np.percentile(t, 95))) for t in times]
