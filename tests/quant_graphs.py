"""Tiny YOLOv5-shaped ONNX graphs built in code, for fast quantization logic tests.

Two heads (strides 2 and 4, one anchor, 5 + 2 columns) over a two-Conv backbone with SiLU, and
the Detect tail exactly as YOLOv5 exports it: Reshape, Transpose, Sigmoid, Split, grid and anchor
arithmetic, Concat, Reshape, and a final Concat of the heads.  Node names are random strings so
that nothing can rely on them.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device.contract import ModelInfo

NAMES = ["cat", "dog"]
SIZE = 32
COLUMNS = 5 + len(NAMES)


class GraphBuilder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.roles: dict[str, str] = {}  # random node name -> role, for assertions

    def name(self, role: str) -> str:
        name = "n" + secrets.token_hex(4)
        self.roles[name] = role
        return name

    def const(self, value: np.ndarray) -> str:
        tensor_name = "c" + secrets.token_hex(4)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), tensor_name))
        return tensor_name

    def node(self, op: str, inputs: list[str], role: str, **attrs) -> str:
        out = "t" + secrets.token_hex(4)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(role), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, role: str, *, k: int = 3, s: int = 1) -> str:
        weight = self.const(self.rng.normal(0, 0.3, (cout, cin, k, k)).astype(np.float32))
        bias = self.const(self.rng.normal(0, 0.1, cout).astype(np.float32))
        return self.node("Conv", [x, weight, bias], role, kernel_shape=[k, k], strides=[s, s],
                         pads=[k // 2] * 4)  # fmt: skip

    def silu(self, x: str, role: str) -> str:
        sig = self.node("Sigmoid", [x], role + "/sigmoid")
        return self.node("Mul", [x, sig], role + "/mul")

    def detect_tail(self, head: str, grid_size: int, stride: int, index: int) -> str:
        role = f"tail{index}"
        x = self.node("Reshape", [head, self.const(np.array([1, 1, COLUMNS, grid_size,
                      grid_size], np.int64))], role)  # fmt: skip
        x = self.node("Transpose", [x], role, perm=[0, 1, 3, 4, 2])
        x = self.node("Sigmoid", [x], role)
        outs = ["s" + secrets.token_hex(4) for _ in range(3)]
        split = self.const(np.array([2, 2, COLUMNS - 4], np.int64))
        self.nodes.append(helper.make_node("Split", [x, split], outs, axis=4, name=self.name(role)))
        xy, wh, conf = outs
        two = self.const(np.array(2.0, np.float32))
        ys, xs = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
        grid = np.stack([xs, ys], -1).reshape(1, 1, grid_size, grid_size, 2).astype(np.float32)
        xy = self.node("Mul", [xy, two], role)
        xy = self.node("Add", [xy, self.const(grid - 0.5)], role)
        xy = self.node("Mul", [xy, self.const(np.array(float(stride), np.float32))], role)
        wh = self.node("Mul", [wh, two], role)
        wh = self.node("Pow", [wh, two], role)
        anchor = np.full((1, 1, 1, 1, 2), 2.0 * stride, np.float32)
        wh = self.node("Mul", [wh, self.const(anchor)], role)
        y = self.node("Concat", [xy, wh, conf], role, axis=4)
        shape = self.const(np.array([1, grid_size * grid_size, COLUMNS], np.int64))
        return self.node("Reshape", [y, shape], role)


def tiny_yolo(path: Path, *, metadata: bool = True, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """Write the tiny model; return its path and the role of every (random) node name."""
    b = GraphBuilder(seed)
    x = b.silu(b.conv("images", 3, 8, "first", s=2), "first")  # 16x16, stride 2
    y = b.silu(b.conv(x, 8, 8, "second", s=2), "second")  # 8x8, stride 4
    heads = [b.conv(x, 8, COLUMNS, "head0", k=1), b.conv(y, 8, COLUMNS, "head1", k=1)]
    tails = [b.detect_tail(heads[0], 16, 2, 0), b.detect_tail(heads[1], 8, 4, 1)]
    out = "output0"
    b.nodes.append(helper.make_node("Concat", tails, [out], axis=1, name=b.name("tail-concat")))

    graph = helper.make_graph(
        b.nodes,
        "tiny-yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 16 * 16 + 8 * 8, COLUMNS])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        info = ModelInfo(names=NAMES, input_size=(SIZE, SIZE), stride=4, strides=[2, 4])
        for key, value in info.to_metadata().items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, b.roles
