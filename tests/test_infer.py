"""Detector: session setup from the model's metadata, and the whole frame-to-detections path."""

from __future__ import annotations

import numpy as np
import pytest

from device.errors import ToolkitError
from device.infer import Detector, SessionConfig, read_model_info
from device.postprocess import PostprocessConfig
from tests.constant_model import write_constant_model

NAMES = ["person", "car"]


def fixed_rows():
    # cx, cy, w, h, obj, person, car in 640x640 input pixels.
    return [
        [320, 320, 64, 128, 0.9, 0.9, 0.1],  # person: x 288..352, y 256..384
        [40, 200, 100, 60, 0.8, 0.0, 1.0],  # car crossing the left edge: x -10..90, y 170..230
        [600, 600, 10, 10, 0.1, 1.0, 0.0],  # below threshold
    ]


@pytest.fixture
def constant_model(tmp_path):
    return write_constant_model(tmp_path / "constant.onnx", fixed_rows(), NAMES)


def test_detect_returns_boxes_in_frame_pixels_of_a_wide_frame(constant_model):
    frame = np.zeros((432, 768, 3), dtype=np.uint8)  # scale 640/768, 140 rows of pad above

    with Detector(constant_model) as detector:
        found = detector.detect(frame)

    assert [(d.label, round(d.score, 4)) for d in found] == [("person", 0.81), ("car", 0.8)]
    expected = [[345.6, 139.2, 422.4, 292.8], [0.0, 36.0, 108.0, 108.0]]
    np.testing.assert_allclose([[d.x1, d.y1, d.x2, d.y2] for d in found], expected, atol=1e-3)


def test_thresholds_and_class_filter_reach_the_postprocessing(constant_model):
    frame = np.zeros((640, 640, 3), dtype=np.uint8)
    config = PostprocessConfig(conf_threshold=0.05, classes=frozenset({0}))

    with Detector(constant_model, postprocess_config=config) as detector:
        found = detector.detect(frame)

    assert [(d.label, round(d.score, 4)) for d in found] == [("person", 0.81), ("person", 0.1)]


def test_session_uses_the_configured_threads_without_spinning(constant_model):
    detector = Detector(constant_model, session_config=SessionConfig(intra_op_threads=3))
    options = detector.session.get_session_options()

    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_spinning_can_be_enabled(constant_model):
    config = SessionConfig(intra_op_threads=1, allow_spinning=True)
    options = Detector(constant_model, session_config=config).session.get_session_options()

    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_model_info_comes_from_the_metadata(constant_model):
    info = read_model_info(constant_model)

    assert info.names == NAMES
    assert info.input_size == (640, 640)


def test_metadata_that_does_not_match_the_graph_is_rejected(tmp_path):
    model = write_constant_model(tmp_path / "m.onnx", fixed_rows(), ["person", "car", "bus"])

    with pytest.raises(ToolkitError, match=r"7 columns per row, but its metadata lists 3"):
        Detector(model)


def test_unknown_class_ids_are_rejected_before_running(constant_model):
    config = PostprocessConfig(classes=frozenset({5}))

    with pytest.raises(ToolkitError, match=r"Class ids \[5\] are not in the model"):
        Detector(constant_model, postprocess_config=config)


def test_missing_model_file_says_what_to_pass(tmp_path):
    with pytest.raises(ToolkitError, match=r"Model file not found: .*nope.onnx"):
        Detector(tmp_path / "nope.onnx")


def test_a_file_that_is_not_onnx_is_reported(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")

    with pytest.raises(ToolkitError, match=r"could not load .*junk.onnx"):
        Detector(junk)


def test_an_ultralytics_export_with_only_its_own_metadata_runs(tmp_path):
    # Older YOLOv5 exports name the output 'output' and carry only 'stride' and 'names'.
    model = write_constant_model(
        tmp_path / "ultralytics.onnx",
        fixed_rows(),
        NAMES,
        input_size=(480, 640),
        output_name="output",
        metadata={"stride": "32", "names": "{0: 'person', 1: 'car'}"},
    )
    detector = Detector(model, session_config=SessionConfig(intra_op_threads=1))
    found = detector.detect(np.zeros((480, 640, 3), dtype=np.uint8))

    assert detector.info.output_name == "output"
    assert detector.info.input_size == (480, 640)
    assert [d.label for d in found] == ["person", "car"]
