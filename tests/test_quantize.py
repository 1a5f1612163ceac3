"""Quantization logic on tiny graphs: the float tail by structure, presets in the metadata,
static and dynamic INT8 that load and run in onnxruntime, and models that are not YOLOv5."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from device.contract import METADATA_KEY, model_info_from_metadata
from device.errors import ToolkitError
from tests.quant_graphs import SIZE, tiny_yolo
from toolkit import quantize
from toolkit.calibrate import Sample


@pytest.fixture
def tiny(tmp_path):
    return tiny_yolo(tmp_path / "tiny.onnx")


def samples(count: int = 8, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [
        Sample(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), f"noise{i}") for i in range(count)
    ]


def run(path, image_tensor):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": image_tensor})[0]


def metadata(path):
    model = onnx.load(str(path))
    return {p.key: p.value for p in model.metadata_props}


def test_tail_is_found_by_structure_not_names(tiny):
    path, roles = tiny
    model, info = quantize.load_fp32_model(path)

    tail = quantize.find_detect_tail(model, info)

    assert sorted(roles[n] for n in tail.head_convs) == ["head0", "head1"]
    assert roles[tail.first_conv] == "first"
    tail_roles = {roles[n] for n in tail.nodes}
    assert tail_roles == {"tail0", "tail1", "tail-concat"}
    expected = sum(1 for role in roles.values() if role.startswith("tail"))
    assert len(tail.nodes) == expected


def test_layer_groups_pair_each_conv_with_its_silu(tiny):
    path, roles = tiny
    model, info = quantize.load_fp32_model(path)
    groups = quantize.layer_groups(model, quantize.find_detect_tail(model, info))

    by_role = {roles[k]: sorted(roles[m] for m in members) for k, members in groups.items()}

    assert by_role["first"] == ["first", "first/mul", "first/sigmoid"]
    assert by_role["head0"] == ["head0"]
    assert not any(role.startswith("tail") for role in by_role)


def test_output_straight_from_a_non_detect_op_is_rejected(tmp_path):
    path, _ = tiny_yolo(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    # Put a Softmax between the heads' concatenation and the output: not a YOLOv5 Detect tail.
    model.graph.node[-1].output[0] = "pre_softmax"
    model.graph.node.append(helper.make_node("Softmax", ["pre_softmax"], ["output0"], axis=2))
    onnx.save(model, str(path))

    model, info = quantize.load_fp32_model(path)
    with pytest.raises(ToolkitError, match="found Softmax"):
        quantize.find_detect_tail(model, info)


def test_model_without_metadata_is_rejected(tmp_path):
    path, _ = tiny_yolo(tmp_path / "bare.onnx", metadata=False)
    with pytest.raises(ToolkitError, match="Expected a YOLOv5 ONNX model with metadata"):
        quantize.load_fp32_model(path)


def test_metadata_with_other_class_count_is_rejected(tmp_path):
    path, _ = tiny_yolo(tmp_path / "tiny.onnx")
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            info = json.loads(entry.value)
            info["names"] = ["only-one"]
            entry.value = json.dumps(info)
    onnx.save(model, str(path))

    with pytest.raises(ToolkitError, match=r"\(batch, anchors, 6\) for 1 classes"):
        quantize.load_fp32_model(path)


def test_missing_and_damaged_model_files(tmp_path):
    with pytest.raises(ToolkitError, match="Model not found"):
        quantize.load_fp32_model(tmp_path / "nope.onnx")
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    with pytest.raises(ToolkitError, match=r"Could not read .* as an ONNX model"):
        quantize.load_fp32_model(damaged)


@pytest.mark.parametrize(
    ("preset_name", "activation_dtype", "reduce_range"),
    [("x86", np.uint8, True), ("x86-vnni", np.uint8, False), ("arm64", np.int8, False)],
)
def test_static_preset_is_in_the_graph_and_the_metadata(
    tiny, tmp_path, preset_name, activation_dtype, reduce_range
):
    path, _ = tiny
    model, info = quantize.load_fp32_model(path)
    tail = quantize.find_detect_tail(model, info)
    recipe = quantize.preset_recipe(quantize.resolve_preset(preset_name))
    output = tmp_path / f"tiny-{preset_name}.onnx"

    written = quantize.static_quantize(
        path, output, samples(), info, recipe, float_nodes=list(tail.nodes), seed=7
    )

    stored = model_info_from_metadata(metadata(output))
    assert stored == written
    assert stored.precision == "int8"
    q = stored.quantization
    assert (q.mode, q.preset, q.format, q.seed, q.calibration_samples) == (
        "static", preset_name, "QDQ", 7, 8
    )  # fmt: skip
    assert q.reduce_range is reduce_range
    assert q.activation_type == np.dtype(activation_dtype).name
    assert sorted(q.float_nodes) == sorted(tail.nodes)

    graph = onnx.load(str(output)).graph
    zero_points = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    input_quant = next(
        n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "images"
    )
    assert zero_points[input_quant.input[2]].dtype == activation_dtype
    # Nothing in the tail computes on quantized tensors: each of its nodes keeps its name and
    # reads float tensors (no DequantizeLinear right before it except at the heads' outputs).
    assert {n.name for n in graph.node} >= set(tail.nodes)
    assert not any(n.op_type == "QuantizeLinear" for n in graph.node if n.name in tail.nodes)


def test_static_int8_runs_and_stays_close_to_fp32(tiny, tmp_path):
    path, _ = tiny
    model, info = quantize.load_fp32_model(path)
    tail = quantize.find_detect_tail(model, info)
    recipe = quantize.preset_recipe(quantize.PRESETS["x86-vnni"])
    output = tmp_path / "tiny-int8.onnx"
    quantize.static_quantize(path, output, samples(16), info, recipe, float_nodes=tail.nodes)

    from device.preprocess import preprocess

    tensor, _ = preprocess(samples(1, seed=99)[0].image, info)
    fp32, int8 = run(path, tensor), run(output, tensor)

    assert int8.shape == fp32.shape == (1, 16 * 16 + 8 * 8, 7)
    # Boxes are in input pixels (0..32), scores 0..1: both survive because the tail is float.
    np.testing.assert_allclose(int8[..., 4:], fp32[..., 4:], atol=0.08)
    np.testing.assert_allclose(int8[..., :4], fp32[..., :4], atol=2.0)


def test_dynamic_int8_uses_uint8_conv_integer_and_runs(tiny, tmp_path, caplog):
    path, _ = tiny
    _, info = quantize.load_fp32_model(path)
    output = tmp_path / "tiny-dynamic.onnx"

    with caplog.at_level("WARNING"):
        written = quantize.dynamic_quantize(path, output, info)

    assert "slower than FP32" in caplog.text
    graph = onnx.load(str(output)).graph
    conv_integer = [n for n in graph.node if n.op_type == "ConvInteger"]
    assert len(conv_integer) == 4
    weights = {i.name: i for i in graph.initializer}
    assert all(weights[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in conv_integer)
    assert written.quantization.mode == "dynamic"
    assert model_info_from_metadata(metadata(output)).precision == "int8"

    tensor = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    np.testing.assert_allclose(run(output, tensor)[..., 4:], run(path, tensor)[..., 4:], atol=0.1)


def test_quantizing_an_int8_model_again_is_rejected(tiny, tmp_path):
    path, _ = tiny
    _, info = quantize.load_fp32_model(path)
    output = tmp_path / "tiny-dynamic.onnx"
    quantize.dynamic_quantize(path, output, info)

    with pytest.raises(ToolkitError, match="already quantized"):
        quantize.load_fp32_model(output)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ToolkitError, match="auto, x86, x86-vnni, arm64"):
        quantize.resolve_preset("riscv")


def test_auto_preset_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(quantize.platform, "machine", lambda: "aarch64")
    assert quantize.resolve_preset("auto").name == "arm64"

    monkeypatch.setattr(quantize.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(quantize, "_cpu_flags", lambda: {"avx2", "fma"})
    assert quantize.resolve_preset("auto").name == "x86"
    monkeypatch.setattr(quantize, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert quantize.resolve_preset("auto").name == "x86-vnni"


def test_search_keeps_the_fewest_worst_layers():
    ranking = [(f"layer{i}", float(i)) for i in range(10)]
    calls = []

    def evaluate(layers):
        calls.append(len(layers))
        # Fidelity reaches the budget once the 3 worst layers are float.
        good = len(layers) >= 3
        return quantize.Fidelity(0.99 if good else 0.9, 0.99)

    result = quantize.search_float_layers(ranking, evaluate, 0.03)

    assert result.within_budget
    assert result.chosen == ["layer0", "layer1", "layer2"]
    assert len(calls) <= 6


def test_search_reports_when_no_amount_of_float_is_enough():
    ranking = [(f"layer{i}", float(i)) for i in range(4)]

    result = quantize.search_float_layers(
        ranking, lambda layers: quantize.Fidelity(0.5 + 0.1 * len(layers), 1.0), 0.03
    )

    assert not result.within_budget
    assert result.chosen == ["layer0", "layer1", "layer2", "layer3"]


@pytest.mark.parametrize("tolerance", [0.002, 0.01, 0.05])
def test_silu_is_within_tolerance_of_zero_below_the_flat_point(tolerance):
    c = quantize.silu_flat_below(tolerance)

    def silu_magnitude(x):
        return x / (1.0 + np.exp(x))  # |SiLU(-x)| = x * sigmoid(-x)

    assert silu_magnitude(c) <= tolerance < silu_magnitude(c - 0.02)
    assert all(silu_magnitude(x) <= tolerance for x in np.linspace(c, c + 30, 50))


def tiny_ranges(model, low: float, high: float):
    from onnxruntime.quantization import CalibrationMethod, TensorData, TensorsData

    tensors = {o for n in model.graph.node for o in n.output}
    data = {
        t: TensorData(lowest=np.float32(low), highest=np.float32(high)) for t in sorted(tensors)
    }
    return TensorsData(CalibrationMethod.MinMax, data)


def test_only_silu_inputs_are_trimmed_and_only_their_low_end(tiny):
    path, roles = tiny
    model = onnx.load(str(path))
    ranges = tiny_ranges(model, -40.0, 10.0)
    silu_outputs = {mul.output[0] for _, mul in quantize.silu_nodes(model).values()}
    for name in silu_outputs:
        ranges[name] = type(ranges[name])(lowest=np.float32(-0.278), highest=np.float32(10.0))

    trimmed = quantize.trim_silu_inputs(model, ranges)

    producer_role = {o: roles[n.name] for n in model.graph.node for o in n.output}
    changed = {producer_role[t] for t in ranges if float(ranges[t].range_value[0]) != -40.0}
    assert changed - {producer_role[t] for t in silu_outputs} == {"first", "second"}
    assert trimmed == 2
    floor = -quantize.silu_flat_below((10.0 + 0.278) / 255 * quantize.SILU_TRIM_ERROR)
    first_out = next(n.output[0] for n in model.graph.node if roles[n.name] == "first")
    assert float(ranges[first_out].range_value[0]) == pytest.approx(floor)
    assert float(ranges[first_out].range_value[1]) == 10.0
    assert -12.0 < floor < -6.0


def test_trimmed_ranges_reach_the_quantized_graph(tiny, tmp_path):
    path, roles = tiny
    # Scale the first Conv up so that its outputs reach far below SiLU's flat point, as a
    # trained YOLOv5's do.
    model = onnx.load(str(path))
    first = next(n for n in model.graph.node if roles[n.name] == "first")
    weight = next(i for i in model.graph.initializer if i.name == first.input[1])
    weight.CopyFrom(
        onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 30, weight.name)
    )
    onnx.save(model, str(path))
    model, info = quantize.load_fp32_model(path)
    tail = quantize.find_detect_tail(model, info)
    first_out = next(n.output[0] for n in model.graph.node if roles[n.name] == "first")
    scales = {}
    for trim in (True, False):
        recipe = quantize.preset_recipe(quantize.PRESETS["x86-vnni"], trim_silu_inputs=trim)
        output = tmp_path / f"tiny-trim-{trim}.onnx"
        info_out = quantize.static_quantize(
            path, output, samples(16), info, recipe, float_nodes=tail.nodes
        )
        assert info_out.quantization.silu_inputs_trimmed is trim
        graph = onnx.load(str(output)).graph
        values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        quant = next(
            n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == first_out
        )
        scales[trim] = float(values[quant.input[1]])

    # Far fewer levels go to the negative values that the SiLU flattens anyway.
    assert scales[True] < scales[False] * 0.75
