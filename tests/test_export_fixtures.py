"""The shared ONNX fixtures other parts' tests rely on: shapes, names and metadata."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from device.contract import model_info_from_metadata
from tests.conftest import TINY_CLASSES


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_tiny_onnx_runs_and_describes_itself(tiny_onnx):
    info = model_info_from_metadata(_metadata(tiny_onnx))
    assert info.names == TINY_CLASSES
    assert info.input_size == (320, 320)

    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    output = session.run(None, {"images": np.zeros((1, 3, 320, 320), np.float32)})[0]
    # 3 anchors x (40x40 + 20x20 + 10x10) cells, 5 + 3 values per row.
    assert output.shape == (1, 3 * (1600 + 400 + 100), 8)


def test_yolov5n_onnx_metadata(yolov5n_onnx, yolov5n_pt):
    info = model_info_from_metadata(_metadata(yolov5n_onnx))
    assert len(info.names) == 80 and info.names[0] == "person" and info.names[5] == "bus"
    assert info.input_size == (640, 640) and info.strides == [8, 16, 32]
    assert info.source.sha256 == "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3"
    assert info.source.file == yolov5n_pt.name
    assert {"torch", "onnx", "onnxruntime", "onnxslim"} <= set(info.tools)
