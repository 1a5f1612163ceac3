"""INT8 quantization of a YOLOv5 ONNX model: recipes, target presets, the float Detect tail,
and the search for the fewest layers to keep in float within a fidelity budget.

Static quantization inserts QuantizeLinear/DequantizeLinear pairs (QDQ) with ranges measured
on real frames; onnxruntime then fuses them into integer kernels.  Three things decide whether
the result is both fast and faithful:

- the target's integer kernels: x86 without VNNI saturates int16 sums of u8 x s8 products
  unless weights use 7 bits (``reduce_range``); x86 with VNNI and ARM with the dot-product
  extension do not need that, and ARM prefers int8 activations;
- the Detect tail, which concatenates box pixels (0..640) with 0..1 scores: one int8 scale
  cannot hold both, so everything after each head's last Conv stays float.  It is found by
  walking the graph back from the output, never by node names, which differ between exports;
- activation ranges: measured once on the calibration frames, then narrowed where the
  network cannot tell values apart anyway (below a SiLU's flat negative tail), so that the 256
  levels go where they matter;
- a few layers whose activations quantize badly: measured per layer, then kept in float.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorData,
    TensorsData,
    create_calibrator,
    quantize_dynamic,
    quantize_static,
    save_tensors_data,
)

from device.contract import ModelInfo, Quantization, model_info_from_metadata
from device.errors import ToolkitError
from toolkit import weight_rounding
from toolkit.calibrate import CalibrationReader, Sample

log = logging.getLogger(__name__)

# Op types that may sit between a head's last Conv and the model output in a YOLOv5 export:
# the reshape to (batch, anchors, ny, nx, 5 + classes), sigmoid, grid and anchor decoding, and
# the concatenation of heads; constant-building ops appear in exports that were not simplified.
DETECT_TAIL_OP_TYPES = frozenset(
    {
        "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Div", "Expand", "Flatten",
        "Gather", "Identity", "Mul", "Pow", "Range", "Reshape", "Shape", "Sigmoid", "Slice",
        "Split", "Squeeze", "Sub", "Tile", "Transpose", "Unsqueeze",
    }
)  # fmt: skip

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
WEIGHT_ROUNDINGS = ("error-feedback", "nearest")
MIN_CALIBRATION_SAMPLES = 32
CALIBRATION_CHUNK = 16  # frames per calibration pass
HESSIAN_FRAMES = 128  # calibration frames that measure the Conv inputs for weight rounding
SILU_TRIM_ERROR = 1 / 32  # of a step: what clipping a SiLU input may cost (trim_silu_inputs)


@dataclass(frozen=True)
class Preset:
    """Integer types and kernels' needs of one target CPU family."""

    name: str
    activation_type: str  # "uint8" or "int8"
    weight_type: str
    reduce_range: bool
    description: str
    # The measured winner on the target: which op types, and which layers start out float.
    op_types: tuple[str, ...] | None = None
    # onnxruntime's x86 INT8 Conv is slow on 3 input channels: yolov5n's first Conv took
    # 2.0 ms in INT8 against 1.1 ms in float on an AVX-512 EPYC.
    float_first_conv: bool = False
    float_head_convs: bool = False
    per_channel: bool = True


PRESETS = {
    "x86": Preset(
        "x86",
        "uint8",
        "int8",
        True,
        "x86-64 without VNNI: u8 activations x s8 weights; 7-bit weights avoid the int16 "
        "saturation of the AVX2 u8 x s8 multiply-add",
        float_first_conv=True,
    ),
    "x86-vnni": Preset(
        "x86-vnni",
        "uint8",
        "int8",
        False,
        "x86-64 with AVX-VNNI or AVX512-VNNI: u8 x s8 dot products accumulate in 32 bits, so "
        "full 8-bit weights",
        float_first_conv=True,
    ),
    "arm64": Preset(
        "arm64",
        "int8",
        "int8",
        False,
        "64-bit ARM with the dot-product extension (Cortex-A76 and later, Raspberry Pi 5): "
        "s8 x s8 dot products. A Cortex-A72 (Pi 4) lacks it and may run INT8 slower than FP32",
    ),
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a static INT8 model besides the calibration frames."""

    preset: Preset
    calibrate_method: str = "minmax"
    quant_format: str = "QDQ"
    per_channel: bool = True
    # None quantizes every op type onnxruntime supports; the Detect tail stays float anyway.
    op_types: tuple[str, ...] | None = None
    float_first_conv: bool = False  # the input layer sees raw pixels; cheap to keep float
    float_head_convs: bool = False  # the heads' last Convs feed the float tail directly
    percentile: float = 99.999
    trim_silu_inputs: bool = True
    weight_rounding: str = "error-feedback"  # or "nearest", onnxruntime's own


def preset_recipe(preset: Preset, **overrides) -> Recipe:
    """The preset's recipe, with any option the user set explicitly."""
    recipe = Recipe(
        preset=preset,
        per_channel=preset.per_channel,
        op_types=preset.op_types,
        float_first_conv=preset.float_first_conv,
        float_head_convs=preset.float_head_convs,
    )
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def host_preset() -> str:
    """The preset for this machine's CPU, for ``--preset auto``."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    flags = _cpu_flags()
    if {"avx512_vnni", "avx_vnni"} & flags:
        return "x86-vnni"
    return "x86"


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    return set()


def resolve_preset(name: str) -> Preset:
    if name == "auto":
        name = host_preset()
        log.info("Preset auto: this host is %s", name)
    if name not in PRESETS:
        raise ToolkitError(
            f"Unknown target preset '{name}'. Expected one of auto, {', '.join(PRESETS)}."
        )
    return PRESETS[name]


@dataclass(frozen=True)
class DetectTail:
    """The float part after the heads: its node names and the heads' last Convs."""

    nodes: tuple[str, ...]
    head_convs: tuple[str, ...]
    first_conv: str


def load_fp32_model(model_path: str | Path) -> tuple[onnx.ModelProto, ModelInfo]:
    """Load an FP32 YOLOv5 ONNX model and its metadata, rejecting anything else."""
    path = Path(model_path)
    if not path.is_file():
        raise ToolkitError(
            f"Model not found: {path}. Pass the FP32 .onnx written by 'toolkit export' or by "
            "Ultralytics' exporter."
        )
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise ToolkitError(
            f"Could not read {path} as an ONNX model: {exc}. Export the model again."
        ) from exc

    metadata = {p.key: p.value for p in model.metadata_props}
    info = model_info_from_metadata(metadata, model_path=str(path))
    quantized = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}
    if info.precision != "fp32" or any(n.op_type in quantized for n in model.graph.node):
        raise ToolkitError(
            f"{path} is already quantized ({info.precision}). Quantize the FP32 model instead."
        )
    _check_output(model, info, path)
    return model, info


def _check_output(model: onnx.ModelProto, info: ModelInfo, path: Path) -> None:
    outputs = model.graph.output
    if len(outputs) != 1:
        raise ToolkitError(
            f"Expected a YOLOv5 export with one output (batch, anchors, 5 + classes), found "
            f"{len(outputs)} outputs in {path}. Export without extra outputs or NMS."
        )
    dims = [d.dim_value or d.dim_param for d in outputs[0].type.tensor_type.shape.dim]
    width = 5 + info.num_classes
    if len(dims) != 3 or (isinstance(dims[2], int) and dims[2] != width):
        raise ToolkitError(
            f"Expected the output of {path} to be (batch, anchors, {width}) for "
            f"{info.num_classes} classes, found {dims}. Only YOLOv5 detection exports "
            "(cx, cy, w, h, obj, classes) are supported."
        )


def find_detect_tail(model: onnx.ModelProto, info: ModelInfo | None = None) -> DetectTail:
    """Walk back from the output through the Detect decoding to each head's last Conv."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}

    tail: list[str] = []
    heads: list[str] = []
    seen: set[int] = set()
    pending = [o.name for o in graph.output]
    while pending:
        tensor = pending.pop()
        if tensor in constants or not tensor:
            continue
        if tensor in graph_inputs:
            raise ToolkitError(
                "Expected a YOLOv5 Detect head (Conv, then reshape/sigmoid/decode ops) before "
                f"the output, but the output depends on the input '{tensor}' without a Conv in "
                "between. This is not a YOLOv5 detection export."
            )
        node = producer[tensor]
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Conv":
            heads.append(node.name)
            continue
        if node.op_type not in DETECT_TAIL_OP_TYPES:
            raise ToolkitError(
                f"Expected only Detect decoding ops between the heads' Convs and the output, "
                f"found {node.op_type} ('{node.name}'). This is not a YOLOv5 detection export "
                "(YOLOv8-style and NMS-included exports are not supported)."
            )
        tail.append(node.name)
        pending.extend(node.input)

    _check_heads(model, heads, info)
    first = _first_conv(model)
    ordered_heads = [n.name for n in graph.node if n.name in set(heads)]
    return DetectTail(tuple(tail), tuple(ordered_heads), first)


def _check_heads(model: onnx.ModelProto, heads: list[str], info: ModelInfo | None) -> None:
    # Ultralytics' metadata does not list the strides (P6 models have four heads).
    expected = len(info.strides) if info and info.source.kind != "ultralytics-onnx" else None
    if not heads or (expected and len(heads) != expected):
        raise ToolkitError(
            f"Expected {expected or 'one or more'} detection heads (one per stride) ending in a "
            f"Conv, found {len(heads)}. This is not a YOLOv5 detection export."
        )
    if info is None:
        return
    weights = {i.name: i for i in model.graph.initializer}
    rows = 5 + info.num_classes
    for node in model.graph.node:
        if node.name in heads and node.input[1] in weights:
            channels = weights[node.input[1]].dims[0]
            if channels % rows:
                raise ToolkitError(
                    f"Head Conv '{node.name}' has {channels} output channels, not a multiple of "
                    f"5 + {info.num_classes} classes: model and metadata do not belong together."
                )


def _first_conv(model: onnx.ModelProto) -> str:
    inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] in inputs:
            return node.name
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return convs[0] if convs else ""


def layer_groups(model: onnx.ModelProto, tail: DetectTail) -> dict[str, list[str]]:
    """Quantizable layers outside the tail: each Conv with its SiLU (Sigmoid, Mul), and every
    other node on its own.  Keys are the Conv's (or node's) name."""
    silu = silu_nodes(model)
    skip = set(tail.nodes)
    groups: dict[str, list[str]] = {}
    grouped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in skip:
            continue
        members = [node.name, *(n.name for n in silu.get(node.output[0], ()))]
        groups[node.name] = members
        grouped.update(members)
    for node in model.graph.node:
        if node.name not in grouped and node.name not in skip:
            groups[node.name] = [node.name]
    return groups


@dataclass
class QuantizedModel:
    """An INT8 model written to disk and how it was made."""

    path: Path
    info: ModelInfo
    float_layers: list[str] = field(default_factory=list)  # kept float by the budget search


def float_nodes_for(recipe: Recipe, tail: DetectTail, groups: dict[str, list[str]]) -> list[str]:
    """Nodes the recipe keeps in float: the tail, and the first and head Convs if asked."""
    nodes = list(tail.nodes)
    if recipe.float_first_conv and tail.first_conv:
        nodes += groups.get(tail.first_conv, [tail.first_conv])
    if recipe.float_head_convs:
        for head in tail.head_convs:
            nodes += groups.get(head, [head])
    return nodes


def static_quantize(
    model_path: Path,
    output_path: Path,
    samples: Sequence[Sample],
    info: ModelInfo,
    recipe: Recipe,
    *,
    float_nodes: Sequence[str],
    seed: int = 0,
    calibration_cache: Path | None = None,
    announce: bool = True,
) -> ModelInfo:
    """Calibrate on ``samples`` and write a static INT8 model; return its metadata.

    With ``calibration_cache`` what the calibration frames tell (activation ranges, and the
    Conv inputs' statistics for weight rounding) is measured on the first call and read back
    on later ones, so that the budget search's candidates cost no calibration pass."""
    with contextlib.ExitStack() as stack:
        if calibration_cache is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="toolkit-ranges."))
            calibration_cache = Path(folder) / "ranges.json"
        if not calibration_cache.is_file():
            measure_ranges(model_path, samples, info, recipe, calibration_cache)
        hessians = conv_input_hessians(model_path, samples, info, recipe, calibration_cache, seed)

        temp_path = stack.enter_context(_atomic_output(output_path, announce=announce))
        stack.enter_context(_quiet_onnxruntime_root_logger())
        quantize_static(
            str(model_path),
            str(temp_path),
            CalibrationReader(samples, info),
            quant_format=QuantFormat.QDQ if recipe.quant_format == "QDQ" else QuantFormat.QOperator,
            op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
            per_channel=recipe.per_channel,
            reduce_range=recipe.preset.reduce_range,
            activation_type=QUANT_TYPES[recipe.preset.activation_type],
            weight_type=QUANT_TYPES[recipe.preset.weight_type],
            nodes_to_exclude=list(float_nodes),
            calibrate_method=CALIBRATION_METHODS[recipe.calibrate_method],
            calibration_cache_path=calibration_cache,
        )
        if hessians:
            round_weights_with_error_feedback(temp_path, model_path, hessians)
        quantized_info = _int8_info(
            info,
            Quantization(
                mode="static",
                preset=recipe.preset.name,
                format=recipe.quant_format,
                activation_type=recipe.preset.activation_type,
                weight_type=recipe.preset.weight_type,
                per_channel=recipe.per_channel,
                reduce_range=recipe.preset.reduce_range,
                calibrate_method=recipe.calibrate_method,
                calibration_samples=len(samples),
                seed=seed,
                float_nodes=list(float_nodes),
                op_types=list(recipe.op_types or ["all"]),
                float_first_conv=recipe.float_first_conv,
                float_head_convs=recipe.float_head_convs,
                silu_inputs_trimmed=recipe.trim_silu_inputs,
                weight_rounding="error-feedback" if hessians else "nearest",
            ),
        )
        _write_metadata(temp_path, quantized_info)
    return quantized_info


def measure_ranges(
    model_path: Path, samples: Sequence[Sample], info: ModelInfo, recipe: Recipe, cache: Path
) -> None:
    """Run the calibration frames through the FP32 model once and save each activation's range
    (SiLU inputs trimmed if the recipe says so) where quantize_static reads it."""
    reader = CalibrationReader(samples, info)
    with (
        tempfile.TemporaryDirectory(prefix="toolkit-calibrate.") as folder,
        _quiet_onnxruntime_root_logger(),
    ):
        calibrator = create_calibrator(
            Path(model_path),
            list(recipe.op_types) if recipe.op_types else None,
            augmented_model_path=str(Path(folder) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[recipe.calibrate_method],
            extra_options={"percentile": recipe.percentile},
        )
        # In chunks, so that the histogram methods, which keep whole activations, stay within
        # memory. (onnxruntime's own max_intermediate_outputs option would be simpler, but its
        # 1.32 MinMax calibrator discards the collected chunks instead of merging them.)
        for start in range(0, len(samples), CALIBRATION_CHUNK):
            reader.set_range(start_index=start, end_index=start + CALIBRATION_CHUNK)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()

    if recipe.trim_silu_inputs:
        trimmed = trim_silu_inputs(onnx.load(str(model_path), load_external_data=False), ranges)
        log.debug("Trimmed the negative range of %d SiLU inputs", trimmed)
    save_tensors_data(ranges, cache)


def conv_input_hessians(
    model_path: Path,
    samples: Sequence[Sample],
    info: ModelInfo,
    recipe: Recipe,
    calibration_cache: Path,
    seed: int,
) -> dict[str, np.ndarray]:
    """The Conv inputs' second moments that error-feedback rounding needs (none for nearest
    rounding), measured on up to HESSIAN_FRAMES calibration frames and kept beside the
    ranges."""
    if recipe.weight_rounding != "error-feedback" or recipe.quant_format != "QDQ":
        return {}  # QOperator graphs carry their weights inside QLinearConv
    stored = calibration_cache.with_name(calibration_cache.stem + ".hessians.npz")
    if stored.is_file():
        return weight_rounding.load_hessians(stored)

    picks = np.linspace(0, len(samples) - 1, min(HESSIAN_FRAMES, len(samples))).round()
    model = onnx.load(str(model_path), load_external_data=False)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    hessians = weight_rounding.input_hessians(
        model_path, [samples[int(i)] for i in picks], info, convs, seed=seed
    )
    weight_rounding.save_hessians(hessians, stored)
    return hessians


def round_weights_with_error_feedback(
    quantized_path: Path, model_path: Path, hessians: dict[str, np.ndarray]
) -> None:
    quantized = onnx.load(str(quantized_path))
    fp32 = onnx.load(str(model_path))
    changed = weight_rounding.apply(quantized, fp32, hessians)
    log.debug("Rounded the weights of %d Convs with error feedback", changed)
    onnx.save(quantized, str(quantized_path))


def trim_silu_inputs(model: onnx.ModelProto, ranges: TensorsData) -> int:
    """Raise the low end of each SiLU input's range to where SiLU has gone flat.

    SiLU(x) = x * sigmoid(x) tends to 0 for very negative x: below -c it stays within
    c * sigmoid(-c) of it.  A YOLOv5 Conv's output often reaches -50 while SiLU's minimum is
    -0.28, so most input levels are spent on values the SiLU maps to nearly the same output.
    Clipping them at -c frees those levels.  Its error is systematic, though: it adds up over
    the next Conv's inputs instead of averaging out like rounding does, so c is chosen for an
    error of a small fraction of the output's quantization step.  Returns how many ranges
    were narrowed."""
    trimmed = 0
    for pre_activation, (_, mul) in silu_nodes(model).items():
        activation = mul.output[0]
        if pre_activation not in ranges or activation not in ranges:
            continue
        low, high = ranges[pre_activation].range_value
        out_low, out_high = ranges[activation].range_value
        step = float(np.max(out_high) - np.min(out_low)) / 255
        floor = -silu_flat_below(step * SILU_TRIM_ERROR)
        if float(np.min(low)) >= floor or float(np.max(high)) <= floor:
            continue
        fields = {k: v for k, v in ranges[pre_activation].to_dict().items() if k != "CLS"}
        fields["lowest"] = np.full_like(low, floor)
        ranges[pre_activation] = TensorData(**fields)
        trimmed += 1
    return trimmed


def silu_flat_below(tolerance: float) -> float:
    """The smallest c past SiLU's minimum (x = -1.28) with |SiLU(-c)| = c * sigmoid(-c) within
    ``tolerance``: below -c, SiLU is within ``tolerance`` of zero."""
    c = np.arange(1.3, 40.0, 0.01)
    flat = c / (1.0 + np.exp(c)) <= tolerance
    return float(c[np.argmax(flat)]) if flat.any() else float(c[-1])


def silu_nodes(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, onnx.NodeProto]]:
    """The Sigmoid and Mul of each x * sigmoid(x), keyed by the tensor x, where x feeds
    nothing else."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for node in model.graph.node:
        if node.op_type != "Sigmoid":
            continue
        tensor = node.input[0]
        users = consumers.get(tensor, [])
        muls = [n for n in users if n.op_type == "Mul" and node.output[0] in n.input]
        if len(users) == 2 and len(muls) == 1 and tensor in muls[0].input:
            found[tensor] = (node, muls[0])
    return found


def dynamic_quantize(model_path: Path, output_path: Path, info: ModelInfo) -> ModelInfo:
    """Write a dynamic INT8 model: weights int8 ahead of time, activations per run."""
    log.warning(
        "Dynamic INT8 turns Conv into ConvInteger, which onnxruntime runs with slow generic "
        "kernels: expect it to be slower than FP32 for a conv net. Use static INT8 to deploy."
    )
    tail = find_detect_tail(onnx.load(str(model_path)), info)
    with _atomic_output(output_path) as temp_path, _quiet_onnxruntime_root_logger():
        # ConvInteger on CPU only has kernels for uint8 weights.
        quantize_dynamic(
            str(model_path),
            str(temp_path),
            op_types_to_quantize=["Conv"],
            per_channel=False,
            weight_type=QuantType.QUInt8,
            nodes_to_exclude=list(tail.nodes),
        )
        quantized_info = _int8_info(
            info,
            Quantization(
                mode="dynamic",
                format="QOperator",
                activation_type="uint8",
                weight_type="uint8",
                float_nodes=list(tail.nodes),
                op_types=["Conv"],
            ),
        )
        _write_metadata(temp_path, quantized_info)
    return quantized_info


def _int8_info(info: ModelInfo, quantization: Quantization) -> ModelInfo:
    import onnxruntime

    tools = {**info.tools, "onnxruntime": onnxruntime.__version__}
    return info.model_copy(
        update={"precision": "int8", "quantization": quantization, "tools": tools}
    )


def _write_metadata(path: Path, info: ModelInfo) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


@contextlib.contextmanager
def _atomic_output(output_path: Path, *, announce: bool = True):
    """A temp path beside ``output_path``, renamed over it only if the block succeeds."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(
        prefix=f".{output_path.stem}.", suffix=".onnx.tmp", dir=output_path.parent
    )
    os.close(handle)
    temp_path = Path(temp)
    try:
        yield temp_path
        os.replace(temp_path, output_path)
        (log.info if announce else log.debug)(
            "Wrote %s (%.1f MB)", output_path, output_path.stat().st_size / 1e6
        )
    finally:
        temp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_onnxruntime_root_logger():
    """onnxruntime's quantizer logs advice to the root logger; keep it at debug level."""
    root = logging.getLogger()
    level = root.level
    if level < logging.ERROR and not log.isEnabledFor(logging.DEBUG):
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---------------------------------------------------------------- fidelity budget search


@dataclass(frozen=True)
class Fidelity:
    """How far an INT8 model strays from FP32 on some images: agreement with FP32's
    detections and, when the images are labelled, how much true mAP50 it loses.  The budget
    search and the proof report judge with this one rule."""

    recall: float
    precision: float
    map50_drop: float | None = None  # FP32's mAP50 minus this model's, with labels only

    def within(self, max_drop: float) -> bool:
        agrees = self.recall >= 1 - max_drop and self.precision >= 1 - max_drop
        return agrees and (self.map50_drop is None or self.map50_drop <= max_drop)

    def describe(self) -> str:
        text = f"recall {self.recall:.3f}, precision {self.precision:.3f} vs FP32"
        if self.map50_drop is not None:
            text += f", mAP50 drop {self.map50_drop:.3f} vs labels"
        return text


@dataclass
class SearchStep:
    float_layers: list[str]
    fidelity: Fidelity


@dataclass
class SearchResult:
    ranking: list[tuple[str, float]]  # (layer, local SQNR in dB), worst first
    steps: list[SearchStep]
    chosen: list[str]  # layers kept in float
    within_budget: bool


def rank_layers(
    model_path: Path,
    quantized_path: Path,
    samples: Sequence[Sample],
    info: ModelInfo,
    groups: dict[str, list[str]],
) -> list[tuple[str, float]]:
    """Layers by how much quantizing their outputs hurts: the signal-to-quantization-noise
    ratio (dB) between each activation before and after its QDQ pair, worst first."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    with tempfile.TemporaryDirectory(prefix="toolkit-rank.") as folder:
        augmented = Path(folder) / "augmented.onnx"
        with _quiet_onnxruntime_root_logger():
            modify_model_output_intermediate_tensors(str(quantized_path), str(augmented))
            activations = collect_activations(str(augmented), CalibrationReader(samples, info))
        matching = create_activation_matching(activations)
        errors = {
            tensor: compute_signal_to_quantization_noice_ratio(pair["pre_qdq"], pair["post_qdq"])
            for tensor, pair in matching.items()
        }

    model = onnx.load(str(model_path), load_external_data=False)
    producer = {out: node.name for node in model.graph.node for out in node.output}
    group_of = {member: key for key, members in groups.items() for member in members}
    worst: dict[str, float] = {}
    for tensor, error in errors.items():
        group = group_of.get(producer.get(tensor, ""))
        if group is not None:
            worst[group] = min(worst.get(group, np.inf), error)

    # A float layer costs time in proportion to its multiply-adds: a layer ten times dearer
    # than average must be COST_WEIGHT_DB worse to rank level with it.
    shares = conv_cost_shares(model, groups)
    average = 1.0 / max(len(shares), 1)

    def badness(item: tuple[str, float]) -> float:
        share = max(shares.get(item[0], average), 1e-6)
        return item[1] + COST_WEIGHT_DB * np.log10(share / average)

    return sorted(worst.items(), key=badness)


COST_WEIGHT_DB = 10.0


def conv_cost_shares(model: onnx.ModelProto, groups: dict[str, list[str]]) -> dict[str, float]:
    """Each Conv group's share of the model's Conv multiply-adds (from inferred shapes)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    macs: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in groups:
            continue
        out_shape = shapes.get(node.output[0], [])
        kernel = weights.get(node.input[1], [])
        if len(out_shape) == 4 and kernel:
            macs[node.name] = float(np.prod(out_shape[1:]) * np.prod(kernel[1:]))
    total = sum(macs.values()) or 1.0
    return {name: value / total for name, value in macs.items()}


def search_float_layers(
    ranking: Sequence[tuple[str, float]],
    evaluate: Callable[[list[str]], Fidelity],
    max_drop: float,
    *,
    max_layers: int = 24,
) -> SearchResult:
    """The fewest worst-ranked layers to keep in float so that ``evaluate`` is within budget.

    Tries 0, 1, 2, 4, 8 ... of the worst layers until one fits, then bisects between the last
    miss and the first fit (fidelity grows with the count in practice): about six
    quantize-and-measure rounds.  When nothing fits, keeps the count that came closest."""
    names = [name for name, _ in ranking][:max_layers]
    steps: list[SearchStep] = []

    def fits(count: int) -> bool:
        fidelity = evaluate(names[:count])
        steps.append(SearchStep(names[:count], fidelity))
        log.info("Budget search: %d float layers -> %s", count, fidelity.describe())
        return fidelity.within(max_drop)

    if fits(0):
        return SearchResult(list(ranking), steps, [], True)

    low, high, count = 0, None, 1
    while count <= len(names):
        if fits(count):
            high = count
            break
        low = count
        count = len(names) if count < len(names) < count * 2 else count * 2
    if high is None:
        best = max(
            steps,
            key=lambda s: (min(s.fidelity.recall, s.fidelity.precision), -len(s.float_layers)),
        )
        return SearchResult(list(ranking), steps, best.float_layers, False)

    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return SearchResult(list(ranking), steps, names[:high], True)
