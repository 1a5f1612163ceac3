"""A tiny YOLOv5-shaped ONNX model with the project's metadata, built in code for fast tests.

Input ``images`` (1, 3, 64, 64) float32; output ``output0`` (1, 64, 5 + classes) after a
sigmoid, like a Detect head's inference output (boxes are meaningless, the shapes are right).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device.contract import ModelInfo

NAMES = ["person", "car"]
SIZE = 64


def tiny_model_info(precision: str = "fp32") -> ModelInfo:
    return ModelInfo(names=NAMES, input_size=(SIZE, SIZE), precision=precision, opset=17)


def write_tiny_model(
    path: Path, *, precision: str = "fp32", opset: int = 17, seed: int = 0
) -> Path:
    """Save the model at ``path`` and return it."""
    channels = 5 + len(NAMES)
    cells = (SIZE // 8) ** 2
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(
        rng.normal(0, 0.1, (channels, 3, 1, 1)).astype(np.float32), "conv.weight"
    )
    shape = numpy_helper.from_array(np.array([1, channels, cells], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["images", "conv.weight"], ["conv"], strides=[8, 8]),
        helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["rows"], perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["rows"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, cells, channels])],
        initializer=[weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    info = tiny_model_info(precision)
    for key, value in info.to_metadata().items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, str(path))
    return Path(path)


def write_unloadable_model(path: Path) -> Path:
    """Valid ONNX with valid metadata whose graph onnxruntime refuses: a node input is missing."""
    write_tiny_model(path)
    model = onnx.load(str(path))
    model.graph.node[0].input[1] = "no_such_weight"
    onnx.save(model, str(path))
    return Path(path)
