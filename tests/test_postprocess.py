"""Postprocessing on hand-built output rows, with exact expected values."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from device.errors import ToolkitError
from device.postprocess import PostprocessConfig, decode, nms, postprocess
from device.preprocess import LetterboxTransform, letterbox

NAMES = ["person", "bicycle", "car"]
IDENTITY_640 = LetterboxTransform((640, 640), (640, 640), 0, 0)


def row(cx, cy, w, h, obj, *cls):
    values = [cx, cy, w, h, obj, *cls]
    values += [0.0] * (5 + len(NAMES) - len(values))
    return values


def rows(*items):
    return np.asarray(items, dtype=np.float32)


def boxes_of(detections):
    return [[d.x1, d.y1, d.x2, d.y2] for d in detections]


def test_score_is_objectness_times_class_and_threshold_is_inclusive():
    output = rows(
        row(100, 100, 20, 20, 0.5, 0.5),  # 0.25: exactly at the threshold, kept
        row(300, 100, 20, 20, 0.5, 0.49),  # 0.245: just below, dropped
        row(500, 100, 20, 20, 0.9, 0.2),  # high objectness alone is not enough: 0.18
        row(100, 300, 20, 20, 0.3, 0.0, 0.0, 1.0),  # 0.3 as class 2
        row(300, 300, 20, 20, 0.2, 1.0),  # objectness below the threshold
    )
    found = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(conf_threshold=0.25))

    assert [(d.label, d.score) for d in found] == [("car", pytest.approx(0.3)), ("person", 0.25)]
    assert boxes_of(found) == [[90, 290, 110, 310], [90, 90, 110, 110]]


def test_best_class_is_reported_with_its_own_score():
    output = rows(row(320, 320, 40, 40, 0.8, 0.1, 0.6, 0.5))
    (found,) = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig())

    assert (found.class_id, found.label) == (1, "bicycle")
    assert found.score == pytest.approx(0.48)


def test_boxes_map_back_to_a_wide_frame_and_clip_at_its_edges():
    # A 768x432 frame letterboxed into 640x640: scale 640/768, 360 rows of image, 140 pad above.
    transform = LetterboxTransform((432, 768), (360, 640), pad_top=140, pad_left=0)
    output = rows(
        row(20, 165, 60, 70, 0.9, 0.9),  # crosses the top-left corner: x -10..50, y 130..200
        row(620, 480, 60, 40, 0.9, 0.0, 0.9),  # crosses the bottom-right: x 590..650, y 460..500
        row(320, 320, 60, 60, 0.9, 0.0, 0.0, 0.9),  # fully inside: x 290..350, y 290..350
        row(320, 60, 60, 60, 0.9, 0.0, 0.0, 0.8),  # wholly in the top border: dropped
    )
    found = postprocess(output, transform, NAMES, PostprocessConfig())

    assert [d.label for d in found] == ["person", "bicycle", "car"]
    expected = [
        [0.0, 0.0, 60.0, 72.0],
        [708.0, 384.0, 768.0, 432.0],
        [348.0, 180.0, 420.0, 252.0],
    ]
    np.testing.assert_allclose(boxes_of(found), expected, atol=1e-3)


def test_boxes_map_back_to_a_tall_frame_with_side_padding():
    # A 480x270 portrait frame into 640x640: scale 640/480, 360 columns, 140 pad left.
    transform = LetterboxTransform((480, 270), (640, 360), pad_top=0, pad_left=140)
    output = rows(row(160, 40, 40, 80, 0.7, 0.0, 0.0, 1.0))  # x 140..180, y 0..80
    (found,) = postprocess(output, transform, NAMES, PostprocessConfig())

    np.testing.assert_allclose(boxes_of([found]), [[0.0, 0.0, 30.0, 60.0]], atol=1e-3)


def test_per_class_nms_keeps_overlapping_boxes_of_different_classes():
    output = rows(
        row(100, 100, 100, 100, 0.9, 1.0),  # person 0.9
        row(110, 100, 100, 100, 0.8, 0.0, 0.0, 1.0),  # car 0.8, IoU 90/110 = 0.818 with it
    )
    per_class = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig())
    agnostic = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(class_agnostic=True))

    assert [d.label for d in per_class] == ["person", "car"]
    assert [d.label for d in agnostic] == ["person"]


def test_nms_drops_only_overlaps_strictly_above_the_iou_threshold():
    # Second box is half of the first: IoU exactly 0.5.
    output = rows(row(50, 50, 100, 100, 0.9, 1.0), row(50, 25, 100, 50, 0.8, 1.0))

    at_half = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(iou_threshold=0.5))
    below = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(iou_threshold=0.45))

    assert [d.score for d in at_half] == [pytest.approx(0.9), pytest.approx(0.8)]
    assert [d.score for d in below] == [pytest.approx(0.9)]


def test_a_suppressed_box_does_not_suppress_others():
    # B overlaps A and C; C does not overlap A. Greedy NMS keeps A and C.
    output = rows(
        row(50, 50, 100, 100, 0.9, 1.0),  # A: x 0..100
        row(110, 50, 100, 100, 0.8, 1.0),  # B: x 60..160, IoU with A 0.25, with C 0.43
        row(170, 50, 100, 100, 0.7, 1.0),  # C: x 120..220, IoU with A 0
    )
    found = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(iou_threshold=0.2))

    assert [d.score for d in found] == [pytest.approx(0.9), pytest.approx(0.7)]


def test_max_detections_keeps_the_best_scores_in_order():
    scores = [0.3, 0.9, 0.5, 0.7, 0.4]
    output = rows(*(row(50 + 100 * i, 50, 40, 40, s, 1.0) for i, s in enumerate(scores)))
    found = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(max_detections=3))

    assert [round(d.score, 4) for d in found] == [0.9, 0.7, 0.5]
    assert [d.x1 for d in found] == [130.0, 330.0, 230.0]


def test_class_filter_keeps_only_chosen_classes_after_choosing_the_best_class():
    output = rows(
        row(100, 100, 40, 40, 0.9, 1.0),  # person
        row(300, 100, 40, 40, 0.9, 0.0, 0.0, 0.9),  # car
        row(500, 100, 40, 40, 0.9, 0.0, 0.8, 0.7),  # bicycle best, car second: not a car
    )
    found = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(classes=frozenset({2})))

    assert [(d.label, d.x1) for d in found] == [("car", 280.0)]


def test_class_filter_applies_before_agnostic_nms():
    output = rows(
        row(100, 100, 100, 100, 0.9, 1.0),  # person, filtered out
        row(105, 100, 100, 100, 0.8, 0.0, 0.0, 1.0),  # car under it
    )
    config = PostprocessConfig(classes=frozenset({2}), class_agnostic=True)
    found = postprocess(output, IDENTITY_640, NAMES, config)

    assert [d.label for d in found] == ["car"]


def test_per_class_thresholds_override_the_default():
    output = rows(
        row(100, 100, 40, 40, 0.5, 1.0),  # person 0.5 < its 0.6
        row(300, 100, 40, 40, 0.3, 0.0, 0.0, 1.0),  # car 0.3 >= default 0.25
        row(500, 100, 40, 40, 0.15, 0.0, 1.0),  # bicycle 0.15 >= its 0.1
    )
    config = PostprocessConfig(conf_threshold=0.25, class_thresholds={0: 0.6, 1: 0.1})
    found = postprocess(output, IDENTITY_640, NAMES, config)

    assert [d.label for d in found] == ["car", "bicycle"]


def test_multi_label_reports_each_class_above_its_threshold():
    output = rows(row(100, 100, 40, 40, 0.8, 0.9, 0.0, 0.5))
    found = postprocess(output, IDENTITY_640, NAMES, PostprocessConfig(multi_label=True))

    assert [(d.label, round(d.score, 4)) for d in found] == [("person", 0.72), ("car", 0.4)]


def test_no_rows_pass_gives_no_detections():
    output = rows(row(100, 100, 40, 40, 0.1, 1.0))
    assert postprocess(output, IDENTITY_640, NAMES, PostprocessConfig()) == []
    assert postprocess(output[:0], IDENTITY_640, NAMES, PostprocessConfig()) == []


def test_decode_sorts_best_first_and_caps_candidates():
    output = rows(*(row(10 * i, 10, 4, 4, 0.3 + 0.1 * i, 1.0) for i in range(5)))
    boxes, scores, class_ids = decode(output, PostprocessConfig(max_candidates=2))

    np.testing.assert_allclose(scores, [0.7, 0.6])
    np.testing.assert_allclose(boxes, [[38, 8, 42, 12], [28, 8, 32, 12]])
    assert class_ids.tolist() == [0, 0]


def test_invalid_settings_are_rejected_with_the_value():
    with pytest.raises(ToolkitError, match=r"iou_threshold must be within 0..1, got 1.5"):
        PostprocessConfig(iou_threshold=1.5)
    with pytest.raises(ToolkitError, match=r"class_thresholds\[3\]"):
        PostprocessConfig(class_thresholds={3: -0.1})


def test_wrong_output_shape_is_explained():
    with pytest.raises(ToolkitError, match=r"anchors, 5 \+ classes"):
        decode(np.zeros((10, 5), dtype=np.float32), PostprocessConfig())


def test_numpy_nms_matches_opencv_on_random_boxes():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 600, size=(300, 2))
    sizes = rng.uniform(10, 120, size=(300, 2))
    boxes = np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)
    scores = rng.uniform(0.3, 1.0, size=300).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]

    ours = nms(boxes, np.zeros(300, dtype=np.int64), iou_threshold=0.45, max_detections=300)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    theirs = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, 0.45)

    assert sorted(ours.tolist()) == sorted(np.asarray(theirs).reshape(-1).tolist())


@pytest.mark.parametrize(
    ("frame_size", "target", "scaleup"),
    [
        ((432, 768), (640, 640), True),
        ((480, 270), (640, 640), True),
        ((1080, 1920), (384, 640), True),
        ((200, 300), (640, 640), False),
        ((333, 517), (320, 320), True),
    ],
)
def test_letterbox_inverse_recovers_a_drawn_rectangle(frame_size, target, scaleup):
    height, width = frame_size
    x1, y1, x2, y2 = width // 5, height // 3, width * 3 // 5, height * 4 // 5
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[y1:y2, x1:x2] = 255

    padded, transform = letterbox(frame, target, pad_value=0, scaleup=scaleup)

    # Where the rectangle landed in input pixels, from the pixels themselves.
    ys, xs = np.nonzero(padded[:, :, 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float32)
    recovered = transform.boxes_to_frame(found)[0]

    # One input pixel of rounding at the edges of the resized rectangle, in frame pixels.
    tolerance = max(1 / transform.scale_x, 1 / transform.scale_y)
    np.testing.assert_allclose(recovered, [x1, y1, x2, y2], atol=tolerance)


@pytest.mark.parametrize(
    ("frame_size", "target"),
    [((432, 768), (640, 640)), ((480, 270), (640, 640)), ((333, 517), (320, 320))],
)
def test_letterbox_inverse_is_exact_for_the_forward_mapping(frame_size, target):
    frame = np.zeros((*frame_size, 3), dtype=np.uint8)
    _, transform = letterbox(frame, target)
    height, width = frame_size
    boxes = np.array([[0, 0, width, height], [10.5, 20.25, width / 2, height / 3]])

    forward = boxes.copy()
    forward[:, [0, 2]] = boxes[:, [0, 2]] * transform.scale_x + transform.pad_left
    forward[:, [1, 3]] = boxes[:, [1, 3]] * transform.scale_y + transform.pad_top

    np.testing.assert_allclose(transform.boxes_to_frame(forward), boxes, atol=1e-3)
