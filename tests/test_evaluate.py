"""Detection metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device.types import Detection
from toolkit.evaluate import (
    COCO_IOU_THRESHOLDS,
    ImageBoxes,
    agreement,
    average_precision,
    box_iou,
    class_average_precisions,
    match,
    mean_average_precision,
)


def boxes(rows, classes, scores=None) -> ImageBoxes:
    return ImageBoxes.from_arrays(rows, classes, scores)


def test_box_iou_of_half_overlapping_squares_is_one_third():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)

    iou = box_iou(a, b)

    np.testing.assert_allclose(iou, [[1 / 3, 0.0, 1.0]], rtol=1e-6)


def test_match_needs_same_class_and_takes_each_reference_once():
    reference = boxes([[0, 0, 10, 10]], [0])
    # Two predictions on the one reference box: only the higher score matches. A third box
    # overlaps perfectly but has another class.
    prediction = boxes([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10]], [0, 0, 1], [0.6, 0.9, 0.8])

    hits = match(prediction, reference, 0.5)

    assert hits.tolist() == [False, True, False]


def test_agreement_counts_recall_and_precision_over_all_images():
    reference = [boxes([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), boxes([[0, 0, 5, 5]], [2])]
    candidate = [
        boxes([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [0.9, 0.8]),  # one hit, one extra
        boxes([[0, 0, 5, 5]], [2], [0.5]),  # hit
    ]

    result = agreement(reference, candidate, 0.5)

    assert (result.matched, result.reference, result.candidate) == (2, 3, 3)
    assert result.recall == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(2 / 3)


def test_agreement_of_nothing_with_nothing_is_perfect():
    result = agreement([ImageBoxes.empty()], [ImageBoxes.empty()])
    assert (result.recall, result.precision) == (1.0, 1.0)


def test_agreement_rejects_different_image_counts():
    with pytest.raises(ValueError, match="same number of images"):
        agreement([ImageBoxes.empty()], [])


def test_average_precision_uses_the_precision_envelope():
    # Ranked hits: TP, FP, TP over 2 positives -> (r, p) = (.5, 1), (.5, .5), (1, 2/3).
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_map50_of_a_hand_ranked_case():
    truth = [boxes([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
    predictions = [
        boxes(
            [[0, 0, 10, 10], [40, 40, 50, 50], [20, 0, 30, 10]],
            [0, 0, 0],
            [0.9, 0.8, 0.7],
        )
    ]
    assert mean_average_precision(truth, predictions) == pytest.approx(5 / 6)


def test_map_averages_over_classes_with_ground_truth_only():
    truth = [boxes([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 1])]
    # Class 0 found; class 1 missed; class 5 has no ground truth and must not count.
    predictions = [boxes([[0, 0, 10, 10], [60, 60, 70, 70]], [0, 5], [0.9, 0.95])]

    per_class = class_average_precisions(truth, predictions, 0.5)

    assert per_class == {0: pytest.approx(1.0), 1: 0.0}
    assert mean_average_precision(truth, predictions) == pytest.approx(0.5)


def test_map50_95_counts_the_thresholds_an_iou_passes():
    # IoU 0.72 passes 0.50, 0.55, 0.60, 0.65, 0.70 and fails 0.75 ... 0.95: 5 of 10.
    truth = [boxes([[0, 0, 10, 10]], [3])]
    predictions = [boxes([[0, 0, 10, 7.2]], [3], [0.9])]

    assert mean_average_precision(truth, predictions, COCO_IOU_THRESHOLDS) == pytest.approx(0.5)
    assert mean_average_precision(truth, predictions) == pytest.approx(1.0)


def test_map_without_ground_truth_is_nan():
    assert math.isnan(mean_average_precision([ImageBoxes.empty()], [ImageBoxes.empty()]))


def test_image_boxes_from_detections_and_score_filter():
    detections = [
        Detection(1, 2, 3, 4, 0.9, 0, "person"),
        Detection(5, 6, 7, 8, 0.1, 2, "car"),
    ]

    found = ImageBoxes.from_detections(detections)

    assert found.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert found.classes.tolist() == [0, 2]
    assert len(found.above(0.25)) == 1
    assert len(ImageBoxes.from_detections([])) == 0
