"""INT8 Conv weights rounded with error feedback instead of to the nearest level.

Rounding each weight to its nearest INT8 level is what onnxruntime's quantizer does, and it
leaves each Conv's output off by the sum of many small independent errors.  On a small detector
that is most of the score noise.  Error feedback (GPTQ: Frantar et al., 2022, after Optimal
Brain Quantization) rounds one input column at a time and moves the rounding error onto the
columns still to be rounded, in proportion to how the layer's real inputs correlate.  It needs
only those inputs' second moments H = X^T X, measured on the calibration frames, and keeps
onnxruntime's per-channel scales, so the quantized biases stay valid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from device.contract import ModelInfo
from device.preprocess import preprocess
from toolkit.calibrate import Sample

log = logging.getLogger(__name__)

# Input positions sampled per frame and layer: enough for a stable H, cheap on 640x640 inputs.
POSITIONS_PER_FRAME = 1024
# Layers with more input columns (channels x kernel area) keep nearest rounding: the cost of
# error feedback grows with the cube of this, and large models are less sensitive anyway.
MAX_COLUMNS = 2304
DAMPING = 0.01  # of H's mean diagonal, so that H stays invertible


def input_hessians(
    model_path: Path,
    samples: Sequence[Sample],
    info: ModelInfo,
    conv_names: Sequence[str],
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """H = X^T X of each named Conv's unfolded input over ``samples``, from the FP32 model."""
    model = onnx.load(str(model_path))
    wanted = set(conv_names)
    weight_dims = {i.name: i.dims for i in model.graph.initializer}
    convs = [
        node
        for node in model.graph.node
        if node.name in wanted and _groups(node) == 1 and _columns(node, weight_dims) <= MAX_COLUMNS
    ]
    session, outputs = _session_with_conv_inputs(model, convs)
    rng = np.random.default_rng(seed)

    input_name = session.get_inputs()[0].name
    hessians: dict[str, np.ndarray] = {}
    for sample in samples:
        tensor, _ = preprocess(sample.image, info)
        values = dict(zip(outputs, session.run(outputs, {input_name: tensor}), strict=True))
        values[input_name] = tensor
        for node in convs:
            activation = values[node.input[0]][0]
            rows, cols = output_grid(node, *activation.shape[1:])
            count = min(POSITIONS_PER_FRAME, rows * cols)
            positions = rng.choice(rows * cols, count, replace=False)
            columns = unfold(activation, node, positions)
            hessians[node.name] = hessians.get(node.name, 0) + columns.T @ columns
    return hessians


def _session_with_conv_inputs(
    model: onnx.ModelProto, convs: Sequence[onnx.NodeProto]
) -> tuple[ort.InferenceSession, list[str]]:
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({node.input[0] for node in convs} - graph_inputs)
    present = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in present:
            model.graph.output.append(
                helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, wanted


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _groups(node: onnx.NodeProto) -> int:
    return int(_attribute(node, "group", 1))


def _columns(node: onnx.NodeProto, weight_dims: dict) -> int:
    """Input columns of a Conv's weight (channels x kernel area); above MAX_COLUMNS when its
    weight is not a constant."""
    dims = weight_dims.get(node.input[1])
    return int(np.prod(dims[1:])) if dims else MAX_COLUMNS + 1


def output_grid(node: onnx.NodeProto, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of a Conv's output on a (height, width) input."""
    kernel, strides, pads, dilations = _geometry(node)
    span = [dilations[i] * (kernel[i] - 1) + 1 for i in range(2)]
    rows = (height + pads[0] + pads[2] - span[0]) // strides[0] + 1
    cols = (width + pads[1] + pads[3] - span[1]) // strides[1] + 1
    return rows, cols


def unfold(activation: np.ndarray, node: onnx.NodeProto, positions: np.ndarray) -> np.ndarray:
    """(positions, channels x kernel area) input patches of a Conv on a (C, H, W) input at
    flat output ``positions``, in the order of the weight's flattened (C, kh, kw) axes."""
    kernel, strides, pads, dilations = _geometry(node)
    padded = np.pad(activation, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    _, cols = output_grid(node, *activation.shape[1:])

    top = (positions // cols) * strides[0]
    left = (positions % cols) * strides[1]
    ys = top[:, None, None] + (np.arange(kernel[0]) * dilations[0])[None, :, None]
    xs = left[:, None, None] + (np.arange(kernel[1]) * dilations[1])[None, None, :]
    patches = padded[:, ys, xs]  # (C, positions, kh, kw)
    return patches.transpose(1, 0, 2, 3).reshape(len(positions), -1).astype(np.float64)


def _geometry(node: onnx.NodeProto) -> tuple[list[int], list[int], list[int], list[int]]:
    return (
        list(_attribute(node, "kernel_shape", [1, 1])),
        list(_attribute(node, "strides", [1, 1])),
        list(_attribute(node, "pads", [0, 0, 0, 0])),
        list(_attribute(node, "dilations", [1, 1])),
    )


def round_with_error_feedback(
    weights: np.ndarray, hessian: np.ndarray, scales: np.ndarray, qmax: int
) -> np.ndarray:
    """INT levels (rows, columns) for float ``weights`` on the grid ``scales`` (one per row).

    Columns are rounded in order of decreasing input energy; after each, its rounding error,
    weighted by the inverse Hessian's Cholesky factor, is subtracted from the later columns."""
    weights = weights.astype(np.float64).copy()
    hessian = hessian.astype(np.float64).copy()
    dead = np.diag(hessian) == 0  # inputs that never fire: their weights do not matter
    hessian[dead, dead] = 1.0
    weights[:, dead] = 0.0

    order = np.argsort(-np.diag(hessian), kind="stable")
    weights, hessian = weights[:, order], hessian[np.ix_(order, order)]
    hessian += DAMPING * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    factor = np.linalg.cholesky(np.linalg.inv(hessian)).T  # upper triangular

    scales = scales.reshape(-1).astype(np.float64)
    levels = np.zeros(weights.shape, np.int64)
    for column in range(weights.shape[1]):
        target = weights[:, column]
        levels[:, column] = np.clip(np.round(target / scales), -qmax, qmax)
        error = (target - levels[:, column] * scales) / factor[column, column]
        weights[:, column + 1 :] -= np.outer(error, factor[column, column + 1 :])
    return levels[:, np.argsort(order)]


def apply(
    quantized: onnx.ModelProto, fp32: onnx.ModelProto, hessians: dict[str, np.ndarray]
) -> int:
    """Replace the INT8 weights of each Conv in ``quantized`` that has a Hessian with levels
    rounded by error feedback on the same scales; return how many Convs changed."""
    initializers = {i.name: i for i in quantized.graph.initializer}
    producer = {out: node for node in quantized.graph.node for out in node.output}
    fp32_initializers = {i.name: i for i in fp32.graph.initializer}
    float_weights = {
        node.name: fp32_initializers.get(node.input[1])
        for node in fp32.graph.node
        if node.op_type == "Conv"
    }

    changed = 0
    for node in quantized.graph.node:
        dequantize = producer.get(node.input[1]) if node.op_type == "Conv" else None
        original = float_weights.get(node.name)
        if (
            node.name not in hessians
            or original is None
            or not _is_weight_grid(dequantize, initializers)
        ):
            continue  # kept in float, or weights not stored as symmetric per-channel INT8
        levels = numpy_helper.to_array(initializers[dequantize.input[0]])
        scales = numpy_helper.to_array(initializers[dequantize.input[1]])
        rounded = round_with_error_feedback(
            numpy_helper.to_array(original).reshape(len(levels), -1),
            hessians[node.name],
            scales,
            qmax=int(np.abs(levels).max()),  # nearest rounding put each row's largest there
        )
        update = rounded.astype(levels.dtype).reshape(levels.shape)
        initializers[dequantize.input[0]].CopyFrom(
            numpy_helper.from_array(update, dequantize.input[0])
        )
        changed += 1
    return changed


def _is_weight_grid(dequantize: onnx.NodeProto | None, initializers: dict) -> bool:
    """A DequantizeLinear of constant weights with one scale per output channel, zero at 0."""
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return False
    if len(dequantize.input) < 3 or not all(n in initializers for n in dequantize.input[:3]):
        return False
    levels = initializers[dequantize.input[0]]
    scales = numpy_helper.to_array(initializers[dequantize.input[1]])
    zero_points = numpy_helper.to_array(initializers[dequantize.input[2]])
    return scales.size == levels.dims[0] and not np.any(zero_points)


def save_hessians(hessians: dict[str, np.ndarray], path: Path) -> None:
    arrays = {f"h{i}": h.astype(np.float32) for i, h in enumerate(hessians.values())}
    with path.open("wb") as file:
        np.savez(file, names=np.array(list(hessians)), **arrays)


def load_hessians(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {str(name): stored[f"h{i}"] for i, name in enumerate(stored["names"])}
