"""Error-feedback weight rounding: the patches it measures, the levels it picks, and that it
reaches the quantized graph on onnxruntime's own scales."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from device.preprocess import preprocess
from tests.quant_graphs import tiny_yolo
from tests.test_quantize import samples
from toolkit import quantize, weight_rounding


def correlated_inputs(count: int, columns: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(columns, columns)) + 2.0 * np.eye(columns)
    return rng.normal(size=(count, columns)) @ mixing


def test_error_feedback_cuts_the_output_error_of_nearest_rounding():
    rng = np.random.default_rng(1)
    inputs = correlated_inputs(2000, 48)
    weights = rng.normal(0, 0.2, (16, 48))
    scales = np.abs(weights).max(axis=1) / 127

    nearest = np.round(weights / scales[:, None])
    feedback = weight_rounding.round_with_error_feedback(weights, inputs.T @ inputs, scales, 127)

    def output_error(levels):
        return np.linalg.norm(inputs @ (weights - levels * scales[:, None]).T)

    assert feedback.dtype.kind == "i" and np.abs(feedback).max() <= 127
    assert output_error(feedback) < 0.8 * output_error(nearest)
    # The levels stay near the weights: each within a couple of steps of nearest rounding.
    assert np.abs(feedback - nearest).max() <= 3


def test_uncorrelated_inputs_give_nearest_rounding():
    rng = np.random.default_rng(2)
    weights = rng.normal(0, 0.2, (8, 20))
    scales = np.abs(weights).max(axis=1) / 127
    diagonal = np.diag(rng.uniform(0.5, 2.0, 20))

    levels = weight_rounding.round_with_error_feedback(weights, diagonal, scales, 127)

    np.testing.assert_array_equal(levels, np.round(weights / scales[:, None]))


def test_unfolded_patches_reproduce_the_conv(tmp_path):
    path, roles = tiny_yolo(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    second = next(n for n in model.graph.node if roles[n.name] == "second")
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    model.graph.output.append(onnx.helper.make_tensor_value_info(second.input[0], 1, None))
    model.graph.output.append(onnx.helper.make_tensor_value_info(second.output[0], 1, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    conv_input, conv_output = session.run([second.input[0], second.output[0]], {"images": image})

    rows, cols = weight_rounding.output_grid(second, *conv_input.shape[2:])
    patches = weight_rounding.unfold(conv_input[0], second, np.arange(rows * cols))
    kernel = weights[second.input[1]].reshape(len(weights[second.input[1]]), -1)
    rebuilt = patches @ kernel.T + weights[second.input[2]]

    assert (rows, cols) == conv_output.shape[2:]
    np.testing.assert_allclose(rebuilt.T.reshape(conv_output.shape[1:]), conv_output[0], atol=1e-4)


def test_static_int8_with_error_feedback_keeps_the_scales_and_tracks_fp32_closer(tmp_path):
    path, _ = tiny_yolo(tmp_path / "tiny.onnx", seed=4)
    model, info = quantize.load_fp32_model(path)
    tail = quantize.find_detect_tail(model, info)
    frames = samples(24, seed=5)
    graphs, errors = {}, {}
    for rounding in ("nearest", "error-feedback"):
        recipe = quantize.preset_recipe(quantize.PRESETS["x86-vnni"], weight_rounding=rounding)
        output = tmp_path / f"tiny-{rounding}.onnx"
        written = quantize.static_quantize(
            path, output, frames, info, recipe, float_nodes=tail.nodes
        )
        assert written.quantization.weight_rounding == rounding
        graphs[rounding] = {
            i.name: numpy_helper.to_array(i) for i in onnx.load(str(output)).graph.initializer
        }
        errors[rounding] = output_error(path, output, frames, info)

    levels = [name for name in graphs["nearest"] if name.endswith("_quantized")]
    scales = [
        name for name in graphs["nearest"] if name.endswith("weight_scale") or "_scale" in name
    ]
    assert levels and scales
    for name in scales:
        np.testing.assert_array_equal(graphs["nearest"][name], graphs["error-feedback"][name])
    changed = [
        n for n in levels if not np.array_equal(graphs["nearest"][n], graphs["error-feedback"][n])
    ]
    assert changed
    assert errors["error-feedback"] < errors["nearest"]


def output_error(fp32_path, int8_path, frames, info) -> float:
    sessions = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        for p in (fp32_path, int8_path)
    ]
    total = 0.0
    for frame in frames:
        tensor, _ = preprocess(frame.image, info)
        reference, candidate = (s.run(None, {"images": tensor})[0] for s in sessions)
        total += float(np.abs(reference[..., 4:] - candidate[..., 4:]).mean())
    return total / len(frames)


def test_hessians_survive_a_round_trip(tmp_path):
    hessians = {"/model.0/conv/Conv": np.eye(3), "/model.1/conv/Conv": np.ones((2, 2))}
    stored = tmp_path / "h.npz"

    weight_rounding.save_hessians(hessians, stored)
    loaded = weight_rounding.load_hessians(stored)

    assert list(loaded) == list(hessians)
    for name, value in hessians.items():
        np.testing.assert_array_equal(loaded[name], value)


@pytest.mark.parametrize("columns", [weight_rounding.MAX_COLUMNS + 1])
def test_layers_too_wide_for_error_feedback_are_left_out(tmp_path, columns):
    path, roles = tiny_yolo(tmp_path / "tiny.onnx")
    model, info = quantize.load_fp32_model(path)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    original = weight_rounding.MAX_COLUMNS
    try:
        weight_rounding.MAX_COLUMNS = 8 * 9 - 1  # below the 3x3 Convs on 8 channels
        hessians = weight_rounding.input_hessians(path, samples(2), info, convs)
    finally:
        weight_rounding.MAX_COLUMNS = original
    assert {roles[name] for name in hessians} == {"first", "head0", "head1"}
