"""Detection metrics for the demo training run: NMS and COCO-style mAP50 / mAP50-95.

Follows upstream YOLOv5's ``val.py``: class-aware NMS at IoU 0.6 with a 0.001 score floor, a
prediction is true at IoU threshold t when it overlaps an unmatched ground truth of its class by
at least t (highest IoU first), AP is the area under the monotone precision envelope sampled at
101 recall points, averaged over classes and the ten thresholds 0.50:0.05:0.95.

Boxes here are ``x1, y1, x2, y2`` in the pixels of one image.
"""

from __future__ import annotations

import numpy as np
import torch

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU between (N, 4) and (M, 4) x1, y1, x2, y2 boxes."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area_a[:, None] + area_b[None] - inter + 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy NMS, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        if order.size == 1:
            break
        overlaps = box_iou(boxes[best : best + 1], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou_threshold]
    return np.array(keep, dtype=np.int64)


def decode_detections(
    output: torch.Tensor | np.ndarray,
    *,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.6,
    max_detections: int = 300,
) -> np.ndarray:
    """One image's (anchors, 5 + nc) decoded output to (K, 6) ``x1, y1, x2, y2, score, class``
    in input pixels, after class-aware NMS. Score is objectness times class probability."""
    rows = output.detach().cpu().numpy() if isinstance(output, torch.Tensor) else output
    rows = rows[rows[:, 4] > conf_threshold]
    scores_per_class = rows[:, 5:] * rows[:, 4:5]
    classes = scores_per_class.argmax(1)
    scores = scores_per_class[np.arange(len(rows)), classes]
    keep = scores > conf_threshold
    rows, classes, scores = rows[keep], classes[keep], scores[keep]

    boxes = np.empty((len(rows), 4), np.float32)
    boxes[:, :2] = rows[:, :2] - rows[:, 2:4] / 2
    boxes[:, 2:] = rows[:, :2] + rows[:, 2:4] / 2

    # Offsetting each class far apart makes one NMS pass class-aware.
    offset = classes[:, None].astype(np.float32) * 4096.0
    kept = nms(boxes + offset, scores, iou_threshold)[:max_detections]
    return np.concatenate([boxes[kept], scores[kept, None], classes[kept, None]], 1)


def match_predictions(predictions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(K, 10) booleans: whether each prediction is a true positive at each IoU threshold.

    ``predictions`` (K, 6) ``x1, y1, x2, y2, score, class``; ``truth`` (M, 5) ``class, x1, y1,
    x2, y2``.
    """
    correct = np.zeros((len(predictions), len(IOU_THRESHOLDS)), bool)
    if not len(predictions) or not len(truth):
        return correct
    iou = box_iou(truth[:, 1:], predictions[:, :4])
    same_class = truth[:, 0:1] == predictions[None, :, 5]
    for t, threshold in enumerate(IOU_THRESHOLDS):
        gt_index, pred_index = np.nonzero((iou >= threshold) & same_class)
        if not len(gt_index):
            continue
        pairs = np.stack([gt_index, pred_index, iou[gt_index, pred_index]], 1)
        pairs = pairs[pairs[:, 2].argsort()[::-1]]
        pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]
        pairs = pairs[pairs[:, 2].argsort()[::-1]]
        pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]
        correct[pairs[:, 1].astype(int), t] = True
    return correct


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, sampled at 101 recall points (COCO)."""
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([1.0], precision, [0.0]))
    envelope = np.flip(np.maximum.accumulate(np.flip(precision)))
    points = np.linspace(0, 1, 101)
    return float(np.trapezoid(np.interp(points, recall, envelope), points))


def mean_average_precision(
    correct: np.ndarray, scores: np.ndarray, pred_classes: np.ndarray, true_classes: np.ndarray
) -> dict[str, float | list[float]]:
    """mAP50, mAP50-95, and per-class AP50, from all images' matches pooled together."""
    order = np.argsort(-scores)
    correct, pred_classes = correct[order], pred_classes[order]
    classes = np.unique(true_classes)
    ap = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    for row, cls in enumerate(classes):
        hits = correct[pred_classes == cls]
        positives = int((true_classes == cls).sum())
        if not len(hits):
            continue
        true_pos = hits.cumsum(0)
        false_pos = (1 - hits).cumsum(0)
        recall = true_pos / positives
        precision = true_pos / (true_pos + false_pos)
        for t in range(len(IOU_THRESHOLDS)):
            ap[row, t] = average_precision(recall[:, t], precision[:, t])
    return {
        "map50": float(ap[:, 0].mean()) if len(classes) else 0.0,
        "map50_95": float(ap.mean()) if len(classes) else 0.0,
        "ap50_per_class": {int(c): float(a) for c, a in zip(classes, ap[:, 0], strict=True)},
    }
