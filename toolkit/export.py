"""Export a YOLOv5 model to ONNX with the metadata the device runtime needs, then prove it.

Tensor contract of the exported graph:

- input ``images``: ``(N, 3, H, W)`` float32, RGB, 0..1, letterboxed (``device.preprocess``);
- output ``output0``: ``(N, anchors, 5 + nc)`` float32, rows ``cx, cy, w, h`` in input pixels,
  objectness and class probabilities after the sigmoid (``xywh_obj_cls``).

FP16 exports keep float32 inputs and outputs (converted after export: tracing in half precision
needs a GPU).  Every file is written as a draft next to the output, proven by
:mod:`toolkit.verify`, and only then renamed into place; a failure leaves no output file.

Python API: :func:`export_model` does it all; the stages (:func:`check_options`,
:func:`prepare_output`, :func:`model_info`, :func:`export_onnx`, :func:`publish`) are separate so
that other commands (e.g. quantization) can put their own stage between them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from device.contract import ModelInfo, Source
from device.errors import ConfigError, ToolkitError
from toolkit import __version__
from toolkit.checkpoint import Checkpoint, load_model
from toolkit.yolo import YoloV5

if TYPE_CHECKING:
    from toolkit.verify import VerifyReport

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "output0"
MIN_OPSET = 11
# The TorchScript-based exporter (fast, deterministic) writes opsets up to 20.
MAX_OPSET = 20
DEFAULT_OPSET = 17
# Beyond these the example input alone takes gigabytes; YOLOv5 is trained at 640 (P5) or 1280.
MAX_SIDE = 4096
MAX_BATCH = 64


@dataclass(frozen=True)
class ExportOptions:
    """How to export: input size, batch, opset, dynamic axes, simplification, precision."""

    imgsz: tuple[int, int] = (640, 640)  # (height, width)
    batch_size: int = 1
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = False
    dynamic_size: bool = False
    simplify: bool = True
    half: bool = False

    @property
    def precision(self) -> str:
        return "fp16" if self.half else "fp32"


@dataclass
class ExportResult:
    """What an export produced and how it was proven."""

    path: Path
    info: ModelInfo
    verification: VerifyReport | None = None
    num_anchors: int = 3  # per cell
    timings: dict[str, float] = field(default_factory=dict)


def parse_imgsz(values: int | str | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """``640``, ``"640"``, ``"480,640"``, ``[480, 640]`` -> (height, width)."""
    if isinstance(values, str):
        parts = [p for p in values.replace("x", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"Image size '{values}' is not a number or 'height,width' pair, e.g. 640 or "
                "480,640."
            ) from None
    if isinstance(values, int):
        values = [values]
    values = list(values)
    if len(values) not in (1, 2):
        raise ConfigError(f"Expected one image size or height,width, got {values}.")
    return (values[0], values[-1])


def check_options(options: ExportOptions, stride: int = 32) -> None:
    """Reject option values and combinations that cannot work, before any work starts."""
    problems = []
    height, width = options.imgsz
    if min(height, width) < stride:
        problems.append(f"image size {height}x{width} is smaller than the stride {stride}")
    for side, value in (("height", height), ("width", width)):
        if value % stride:
            lower, upper = value // stride * stride, (value // stride + 1) * stride
            problems.append(
                f"image {side} {value} is not a multiple of the model's stride {stride} "
                f"(use {lower or upper} or {upper})"
            )
    if max(height, width) > MAX_SIDE:
        problems.append(f"image size {height}x{width} is above the largest supported {MAX_SIDE}")
    if options.batch_size < 1:
        problems.append(f"batch size must be at least 1, got {options.batch_size}")
    if options.batch_size > MAX_BATCH:
        problems.append(
            f"batch size {options.batch_size} is above {MAX_BATCH}; use --dynamic-batch for "
            "large batches"
        )
    if not MIN_OPSET <= options.opset <= MAX_OPSET:
        problems.append(f"opset must be within {MIN_OPSET}..{MAX_OPSET}, got {options.opset}")
    if problems:
        raise ConfigError("Cannot export: " + "; ".join(problems) + ".")


def default_output(weights: Path, options: ExportOptions) -> Path:
    """``<weights stem>.onnx`` (``-fp16`` for half precision) in the current directory."""
    suffix = "-fp16" if options.half else ""
    return Path.cwd() / f"{weights.stem}{suffix}.onnx"


def prepare_output(output: Path) -> Path:
    """Check, before the export, that ``output`` can be written; create its folder."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ConfigError(f"The output file should end in .onnx, got '{output.name}'.")
    if output.is_dir():
        raise ConfigError(f"The output {output} is a directory; give a file name ending .onnx.")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ToolkitError(
            f"Cannot write to the output folder {output.parent}: {exc.strerror}. "
            "Choose another --output or fix the folder's permissions."
        ) from exc
    return output


def model_info(model: YoloV5, checkpoint: Checkpoint | None, options: ExportOptions) -> ModelInfo:
    """The metadata contract for this export."""
    strides = [int(s) for s in model.stride]
    source = Source(kind="yolov5")
    if checkpoint is not None:
        source = Source(file=checkpoint.path.name, sha256=checkpoint.sha256, kind="yolov5")
    return ModelInfo(
        names=list(model.names),
        input_size=options.imgsz,
        batch_size=options.batch_size,
        dynamic_batch=options.dynamic_batch,
        dynamic_size=options.dynamic_size,
        stride=max(strides),
        strides=strides,
        precision=options.precision,
        opset=options.opset,
        source=source,
        tools=tool_versions(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def tool_versions() -> dict[str, str]:
    versions = {"edge-yolo-toolkit": __version__, "torch": torch.__version__}
    for package in ("onnx", "onnxruntime", "onnxslim"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def export_onnx(model: YoloV5, info: ModelInfo, options: ExportOptions, path: Path) -> Path:
    """Trace ``model`` to ONNX at ``path``: fused, simplified, metadata attached."""
    traced = _trace(model, options)
    if options.simplify:
        traced = _simplify(traced)
    if options.half:
        traced = _to_fp16(traced)
    _attach_metadata(traced, info)
    onnx.save(traced, str(path))
    log.info("Wrote ONNX draft %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    return path


def _trace(model: YoloV5, options: ExportOptions) -> onnx.ModelProto:
    export_model_ = copy.deepcopy(model).float().eval().fuse()
    export_model_.detect.dynamic = options.dynamic_size
    for parameter in export_model_.parameters():
        parameter.requires_grad_(False)
    example = torch.zeros(options.batch_size, 3, *options.imgsz)

    axes: dict[str, dict[int, str]] = {INPUT_NAME: {}, OUTPUT_NAME: {}}
    if options.dynamic_batch:
        axes[INPUT_NAME][0] = axes[OUTPUT_NAME][0] = "batch"
    if options.dynamic_size:
        axes[INPUT_NAME].update({2: "height", 3: "width"})
        axes[OUTPUT_NAME][1] = "anchors"

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated; it is kept for its speed and
        # because its graphs load in the older onnxruntime builds that boards run.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            export_model_,
            (example,),
            buffer,
            dynamo=False,
            opset_version=options.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={k: v for k, v in axes.items() if v} or None,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    before = len(model.graph.node)
    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:  # onnxslim raises assorted types; the plain graph still works
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", exc)
        return model
    log.info("Simplified with onnxslim: %d -> %d nodes", before, len(slimmed.graph.node))
    return slimmed


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # float32 in and out so that the runtime's preprocessing and postprocessing are unchanged;
    # the box decoding stays float32 too: fp16 has 0.5 px steps at 640 and a grid computed at
    # run time (dynamic sizes) would lose up to several pixels.
    tail = detect_tail(model.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=tail)
    # The converter appends its input casts after the nodes that read them.
    _sort_topologically(half.graph)
    log.info("Converted weights and activations to fp16 (inputs and outputs stay float32)")
    return half


def detect_tail(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes between the detection heads' last Conv and the output: the box
    decoding. Found by walking back from the output and stopping at Conv nodes, so it does not
    depend on node names."""
    producer = {output: node for node in graph.node for output in node.output}
    pending = [o.name for o in graph.output]
    tail: dict[str, None] = {}
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.op_type == "Conv" or node.name in tail:
            continue
        tail[node.name] = None
        pending.extend(node.input)
    return list(tail)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ToolkitError(
                f"The converted graph has a cycle or a dangling input at node "
                f"'{pending[0].name}'; export without --half."
            )
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy_, node in zip(copies, ordered, strict=True):
        copy_.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _attach_metadata(model: onnx.ModelProto, info: ModelInfo) -> None:
    model.producer_name = "edge-yolo-toolkit"
    model.producer_version = __version__
    model.doc_string = f"YOLOv5 detector, {info.num_classes} classes, exported by toolkit export"
    del model.metadata_props[:]
    for key, value in info.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


@contextlib.contextmanager
def draft_path(output: Path) -> Iterator[Path]:
    """A temporary file beside ``output``; removed on every exit path unless published."""
    handle, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.stem}.", suffix=".onnx")
    os.close(handle)
    draft = Path(name)
    try:
        yield draft
    finally:
        draft.unlink(missing_ok=True)


def publish(draft: Path, output: Path) -> Path:
    """Atomically move the proven draft to ``output`` (replacing an older file)."""
    os.chmod(draft, 0o644)
    os.replace(draft, output)
    log.info("Saved %s", output)
    return output


def export_model(
    weights: str | Path,
    output: str | Path | None = None,
    *,
    imgsz: int | tuple[int, int] | list[int] | str = 640,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    simplify: bool = True,
    half: bool = False,
    verify_image: str | Path | None = None,
    download_url: str | None = None,
) -> Path:
    """Export a YOLOv5 checkpoint to a proven ONNX file and return its path.

    ``weights`` is a path to a .pt file or an official name (``yolov5s.pt``), downloaded into
    the cache when missing. Raises ToolkitError on any problem, leaving no output file.
    """
    result = run_export(
        weights,
        output,
        ExportOptions(
            imgsz=parse_imgsz(imgsz),
            batch_size=batch_size,
            opset=opset,
            dynamic_batch=dynamic_batch,
            dynamic_size=dynamic_size,
            simplify=simplify,
            half=half,
        ),
        verify_image=verify_image,
        download_url=download_url,
    )
    return result.path


def run_export(
    weights: str | Path,
    output: str | Path | None,
    options: ExportOptions,
    *,
    verify_image: str | Path | None = None,
    download_url: str | None = None,
) -> ExportResult:
    """The export stages in order; see :func:`export_model`."""
    from toolkit.download import resolve_weights
    from toolkit.verify import load_image, verify_onnx

    timings: dict[str, float] = {}
    check_options(options)
    load_image(verify_image)  # a bad image path fails now, not after the export
    target = prepare_output(Path(output) if output else default_output(Path(weights), options))
    weights_path = resolve_weights(weights, url=download_url)

    started = time.perf_counter()
    model, checkpoint = load_model(weights_path)
    check_options(options, stride=int(max(model.stride)))
    timings["load"] = time.perf_counter() - started

    info = model_info(model, checkpoint, options)
    with draft_path(target) as draft, _out_of_memory_is_an_error(options):
        started = time.perf_counter()
        export_onnx(model, info, options, draft)
        timings["export"] = time.perf_counter() - started

        started = time.perf_counter()
        report = verify_onnx(draft, model, info, image=verify_image)
        timings["verify"] = time.perf_counter() - started

        publish(draft, target)
    return ExportResult(
        path=target,
        info=info,
        verification=report,
        num_anchors=model.detect.na,
        timings=timings,
    )


@contextlib.contextmanager
def _out_of_memory_is_an_error(options: ExportOptions) -> Iterator[None]:
    try:
        yield
    except MemoryError as exc:
        raise _memory_error(options) from exc
    except RuntimeError as exc:
        if "allocate" not in str(exc):
            raise
        raise _memory_error(options) from exc


def _memory_error(options: ExportOptions) -> ToolkitError:
    height, width = options.imgsz
    return ToolkitError(
        f"Ran out of memory exporting at batch {options.batch_size} x {height}x{width}. Use a "
        "smaller --imgsz or --batch-size (or --dynamic-batch), or free memory; no file was "
        "written."
    )


def describe(result: ExportResult) -> str:
    """A short human summary: what was written, how it was proven, how long it took."""
    info = result.info
    batch = "N" if info.dynamic_batch else str(info.batch_size)
    size = "HxW" if info.dynamic_size else "x".join(map(str, info.input_size))
    rows = "anchors"
    if not info.dynamic_size:
        cells = sum(info.input_size[0] // s * (info.input_size[1] // s) for s in info.strides)
        rows = str(cells * result.num_anchors)
    lines = [
        f"Exported {info.source.file or 'model'} -> {result.path} "
        f"({result.path.stat().st_size / 1e6:.1f} MB, {info.precision}, opset {info.opset}, "
        f"images {batch}x3x{size} -> output0 {batch}x{rows}x{5 + info.num_classes}, "
        f"{info.num_classes} classes)",
    ]
    if result.verification is not None:
        lines.append(f"Verified: {result.verification.summary()}")
    if result.timings:
        lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    return "\n".join(lines)
