"""A tiny ONNX model whose output is fixed rows: exact, fast detector and daemon tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device.contract import ModelInfo


def write_constant_model(
    path: Path,
    rows: np.ndarray,
    names: list[str],
    *,
    input_size: tuple[int, int] = (640, 640),
    info_overrides: dict | None = None,
    output_name: str = "output0",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model mapping any (1, 3, H, W) input to ``rows`` as (1, anchors, 5 + classes).

    The output depends on the input (times zero) so that onnxruntime runs a real graph.
    ``metadata`` replaces the ModelInfo metadata (e.g. with only Ultralytics' keys).
    """
    rows = np.asarray(rows, dtype=np.float32)[np.newaxis]
    height, width = input_size
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, height, width])
    output = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, list(rows.shape))
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
        helper.make_node("Add", ["fixed", "nothing"], [output_name]),
    ]
    initializers = [
        numpy_helper.from_array(rows, "fixed"),
        numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "constant", [images], [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8

    info = ModelInfo(names=names, input_size=input_size, **(info_overrides or {}))
    for key, value in (metadata if metadata is not None else info.to_metadata()).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
