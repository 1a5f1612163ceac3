"""Load an Ultralytics YOLOv5 ``.pt`` checkpoint without its code and without running any.

Stages: check the file is a torch checkpoint at all, unpickle it through
:mod:`toolkit.safe_pickle` (allow-listed globals only; modules become inert stubs), find the
model (EMA weights first, like upstream), collect its tensors by parameter name, build the
project's own :class:`~toolkit.yolo.YoloV5` from the checkpoint's architecture dict and copy
the tensors in.  Works for ``models.yolo.Model`` (older) and ``models.yolo.DetectionModel``
(newer) files, fp16 or fp32, fused or not, with any class count, anchors and multiples.
"""

from __future__ import annotations

import collections
import copy
import copyreg
import datetime as dt
import hashlib
import logging
import os
import pickle
import tempfile
import types
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from device.errors import ToolkitError
from toolkit import safe_pickle
from toolkit.safe_pickle import ModuleStub, RefusedGlobal
from toolkit.yolo import YoloV5, build_model
from toolkit.yolo.blocks import C3, SPP, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, Focus
from toolkit.yolo.head import Detect

log = logging.getLogger(__name__)

_MODEL_CLASSES = {"models.yolo.Model", "models.yolo.DetectionModel"}
_ACTIVATIONS = {"SiLU", "ReLU", "LeakyReLU", "Hardswish", "Identity", "Sigmoid"}
# Layer hyperparameters read from the pickle: batch-norm ones are applied (YOLOv5 trains with
# eps 1e-3, others may not), convolution ones must agree with the architecture dict.
_SETTINGS = {
    "BatchNorm2d": ("eps", "momentum"),
    "Conv2d": ("kernel_size", "stride", "padding", "dilation", "groups"),
}
# Buffers older YOLOv5 versions registered that the model derives itself.
_DERIVED_BUFFERS = ("anchor_grid",)
# YOLOv5 nests modules about 5 deep; far deeper is a crafted file (and Python's recursion limit).
_MAX_DEPTH = 64


@dataclass
class Checkpoint:
    """What a YOLOv5 checkpoint holds, as plain data."""

    path: Path
    sha256: str
    model_class: str
    architecture: dict[str, Any]
    names: list[str]
    tensors: dict[str, torch.Tensor]
    stride: list[float]
    weights_dtype: str
    fused: bool = False
    activations: dict[str, nn.Module] = field(default_factory=dict)
    layer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def load_model(path: str | Path) -> tuple[YoloV5, Checkpoint]:
    """The YOLOv5 model (float32, eval mode) in ``path`` and what the file said about it."""
    checkpoint = read_checkpoint(path)
    return build_from_checkpoint(checkpoint), checkpoint


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a YOLOv5 checkpoint safely; raise ToolkitError saying what is wrong otherwise."""
    path = Path(path)
    _check_container(path)
    root = _unpickle(path)
    model = _find_model(root, path)
    return _describe(model, root, path)


def build_from_checkpoint(checkpoint: Checkpoint) -> YoloV5:
    """The project's YoloV5 with the checkpoint's architecture and weights (float32, eval)."""
    # Built on the meta device: shapes only, no random initialisation; every tensor is then
    # allocated empty and filled from the checkpoint (a strict load, so none stays empty).
    with torch.device("meta"):
        model = build_model(checkpoint.architecture, names=checkpoint.names)
        _apply_activations(model, checkpoint.activations)
        _apply_layer_settings(model, checkpoint)
        if checkpoint.fused:
            model.fuse()
    # Shapes are compared before any memory is allocated: a damaged or crafted architecture
    # (say width_multiple 1000) must not allocate gigabytes first.
    given = _check_fit(model, checkpoint)
    model.to_empty(device="cpu")
    _copy_weights(model, given, checkpoint)
    _check_stride(model, checkpoint)
    log.info(
        "Loaded %s: %d classes, %d parameters, %s weights, strides %s",
        checkpoint.path.name,
        checkpoint.num_classes,
        checkpoint.num_parameters,
        checkpoint.weights_dtype,
        [int(s) for s in checkpoint.stride],
    )
    return model.float().eval()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_container(path: Path) -> None:
    if not path.exists():
        raise ToolkitError(
            f"Weights file not found: {path}. Expected a YOLOv5 .pt checkpoint; give its path, "
            "or an official name such as yolov5s.pt to download it."
        )
    if not path.is_file():
        raise ToolkitError(f"Expected a YOLOv5 .pt checkpoint file, found a directory: {path}.")
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
    except OSError as exc:
        raise ToolkitError(f"Cannot read weights file {path}: {exc.strerror}.") from exc

    if head.startswith(b"PK"):
        _check_zip(path)
    elif not head.startswith(b"\x80"):
        raise ToolkitError(
            f"{path} is not a torch checkpoint: it starts with bytes {head!r}, expected a zip "
            f"archive (torch >= 1.6) or a pickle (older torch).{_hint_for(path, head)}"
        )


def _hint_for(path: Path, head: bytes) -> str:
    if path.suffix == ".onnx" or head[:1] == b"\x08":
        return " It looks like an ONNX model, which needs no export."
    if not head:
        return " The file is empty: download or copy it again."
    return " Pass the .pt file that YOLOv5's train.py wrote (best.pt or last.pt)."


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl")]
            if pickles:
                # torch does not check CRCs; a damaged pickle would parse as nonsense.
                archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ToolkitError(
            f"{path} is a truncated or corrupt zip archive ({exc}), so not a readable torch "
            "checkpoint. Download or copy the file again and compare its size and checksum."
        ) from exc
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise ToolkitError(
            f"{path} is a TorchScript archive, not a YOLOv5 checkpoint. Pass the .pt file that "
            "YOLOv5's train.py wrote (best.pt or last.pt)."
        )
    if not any(n.endswith("data.pkl") for n in names):
        raise ToolkitError(
            f"{path} is a zip archive without 'data.pkl', so not a torch checkpoint "
            f"(first entries: {names[:3]}). Pass a YOLOv5 .pt checkpoint."
        )


def _unpickle(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # The legacy format compares pickled module source with the (stub) classes.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            return torch.load(
                path, map_location="cpu", pickle_module=safe_pickle, weights_only=False, mmap=False
            )
    except RefusedGlobal as exc:
        raise ToolkitError(f"{path}: {exc}") from None
    except ToolkitError:
        raise
    except Exception as exc:  # torch and pickle raise many types for a damaged file
        raise ToolkitError(
            f"Could not read {path} as a torch checkpoint: {type(exc).__name__}: {exc}. "
            "The file is damaged or not a YOLOv5 checkpoint; download or copy it again."
        ) from exc


def _find_model(root: Any, path: Path) -> ModuleStub:
    if isinstance(root, ModuleStub):
        candidates = [root]
    elif isinstance(root, dict):
        if _is_state_dict(root):
            raise _state_dict_error(path, root)
        # Upstream prefers the EMA weights when a training checkpoint has both.
        candidates = [root.get("ema"), root.get("model")]
    else:
        candidates = []

    for candidate in candidates:
        if isinstance(candidate, ModuleStub) and candidate.qualname in _MODEL_CLASSES:
            return candidate
        if isinstance(candidate, ModuleStub):
            raise ToolkitError(
                f"{path} holds a '{candidate.qualname}', expected a YOLOv5 detection model "
                f"({' or '.join(sorted(_MODEL_CLASSES))})."
            )
        if isinstance(candidate, dict) and _is_state_dict(candidate):
            raise _state_dict_error(path, candidate)

    found = sorted(root) if isinstance(root, dict) else type(root).__name__
    raise ToolkitError(
        f"{path} is a torch file but holds no YOLOv5 model: expected a dict with 'model' "
        f"(or 'ema') holding a models.yolo.Model, found {found}."
    )


def _is_state_dict(value: dict) -> bool:
    return bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _state_dict_error(path: Path, state: dict) -> ToolkitError:
    keys = list(state)[:2]
    return ToolkitError(
        f"{path} is a plain state_dict ({len(state)} tensors, e.g. {keys}) with no "
        "architecture, so its layers, classes and anchors are unknown. Expected a YOLOv5 "
        "checkpoint as train.py saves it (a dict whose 'model' is the whole model); save "
        "one with torch.save({'model': model}, path) from the YOLOv5 repository."
    )


def _describe(model: ModuleStub, root: Any, path: Path) -> Checkpoint:
    state = model.state
    architecture = state.get("yaml")
    if not isinstance(architecture, dict):
        raise ToolkitError(
            f"{path}: the model carries no architecture dict ('yaml'), so it cannot be rebuilt. "
            "Expected a checkpoint written by YOLOv5's train.py."
        )
    architecture = dict(architecture)
    nc = state.get("nc")
    if isinstance(nc, int) and nc != architecture.get("nc"):
        architecture["nc"] = nc
    nc = architecture.get("nc")
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ToolkitError(
            f"{path}: the architecture dict gives the class count nc={nc!r}; expected an "
            "integer >= 1. The file is damaged or not written by YOLOv5's train.py."
        )

    tensors: dict[str, torch.Tensor] = {}
    activations: dict[str, nn.Module] = {}
    settings: dict[str, dict[str, Any]] = {}
    fused = _collect(model, "", tensors, activations, settings)
    if not tensors:
        raise ToolkitError(f"{path}: the model holds no weights.")

    dtypes = sorted(
        {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    )
    names = _class_names(state.get("names"), nc, path)
    stride = state.get("stride")
    return Checkpoint(
        path=path,
        sha256=sha256_of(path),
        model_class=model.qualname,
        architecture=architecture,
        names=names,
        tensors=tensors,
        stride=[float(s) for s in stride] if stride is not None else [],
        weights_dtype="/".join(dtypes),
        fused=fused,
        activations=activations,
        layer_settings=settings,
        extra=_extra(root),
    )


def _collect(
    stub: ModuleStub,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    activations: dict[str, nn.Module],
    settings: dict[str, dict[str, Any]],
) -> bool:
    """Gather parameters and persistent buffers by name; return whether Convs were fused."""
    if prefix.count(".") > _MAX_DEPTH:
        raise ToolkitError(
            f"The checkpoint nests modules more than {_MAX_DEPTH} deep (at {prefix[:80]}...); "
            "a YOLOv5 model nests about 5. The file is damaged or crafted."
        )
    state = stub.state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + name] = value.detach()
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in non_persistent:
            tensors[prefix + name] = value.detach()

    fused = (
        stub.kind == "Conv"
        and stub.qualname.startswith("models.")
        and (stub.children().get("bn") is None)
    )
    for name, child in stub.children().items():
        if not isinstance(child, ModuleStub):
            continue
        if child.kind in _ACTIVATIONS:
            activations[prefix + name] = _activation(child)
        if child.kind in _SETTINGS:
            kept = {k: child.state[k] for k in _SETTINGS[child.kind] if k in child.state}
            settings[prefix + name] = {"kind": child.kind, **kept}
        fused = _collect(child, f"{prefix}{name}.", tensors, activations, settings) or fused
    return fused


def _activation(stub: ModuleStub) -> nn.Module:
    if stub.kind == "LeakyReLU":
        return nn.LeakyReLU(float(stub.state.get("negative_slope", 0.01)))
    return getattr(nn, stub.kind)()


def _class_names(names: Any, nc: int, path: Path) -> list[str]:
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list | tuple) or len(names) != nc:
        log.warning("%s has no usable class names for its %d classes; using indices", path, nc)
        return [str(i) for i in range(nc)]
    return [str(n) for n in names]


def _extra(root: Any) -> dict[str, Any]:
    if not isinstance(root, dict):
        return {}
    keep = {k: root[k] for k in ("epoch", "date", "updates") if k in root}
    return {k: v for k, v in keep.items() if isinstance(v, int | float | str)}


def _apply_activations(model: YoloV5, activations: dict[str, nn.Module]) -> None:
    # Older YOLOv5 versions used LeakyReLU or Hardswish; follow what each layer pickled.
    for path, activation in activations.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            continue
        if isinstance(getattr(parent, name, None), nn.Module):
            setattr(parent, name, activation)


def _apply_layer_settings(model: YoloV5, checkpoint: Checkpoint) -> None:
    modules = dict(model.named_modules())
    for path, settings in checkpoint.layer_settings.items():
        module = modules.get(path)
        if isinstance(module, nn.BatchNorm2d) and settings["kind"] == "BatchNorm2d":
            module.eps = float(settings.get("eps", module.eps))
            module.momentum = settings.get("momentum", module.momentum)
        elif isinstance(module, nn.Conv2d) and settings["kind"] == "Conv2d":
            _check_conv(module, path, settings, checkpoint.path)


def _check_conv(conv: nn.Conv2d, path: str, settings: dict[str, Any], source: Path) -> None:
    for key in _SETTINGS["Conv2d"]:
        if key not in settings:
            continue
        pickled, built = settings[key], getattr(conv, key)
        if isinstance(pickled, list):
            pickled = tuple(pickled)
        if isinstance(built, tuple) and isinstance(pickled, int):
            pickled = (pickled,) * len(built)
        if pickled != built:
            raise ToolkitError(
                f"{source}: layer {path} has {key} {pickled} in the checkpoint but {built} in "
                "the architecture it carries. The file is inconsistent or from an unsupported "
                "YOLOv5 variant."
            )


def _check_fit(model: YoloV5, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint tensors the model takes; raise if any is missing, extra or misshapen."""
    expected = model.state_dict()
    given = {
        k: v for k, v in checkpoint.tensors.items() if k.rpartition(".")[2] not in _DERIVED_BUFFERS
    }
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)}, architecture {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ToolkitError(
            f"{checkpoint.path}: the weights do not fit the architecture the checkpoint "
            f"describes ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} of another shape; first: "
            f"{(missing + unexpected + mismatched)[:3]}). The file is inconsistent or from an "
            "unsupported YOLOv5 variant."
        )
    return given


@torch.no_grad()
def _copy_weights(model: YoloV5, given: dict[str, torch.Tensor], checkpoint: Checkpoint) -> None:
    bad = [k for k, v in given.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ToolkitError(
            f"{checkpoint.path}: weights contain NaN or infinity ({bad[:3]}); the training run "
            "diverged or the file is damaged."
        )
    model.load_state_dict(given, strict=True)


def _check_stride(model: YoloV5, checkpoint: Checkpoint) -> None:
    built = [float(s) for s in model.stride]
    if checkpoint.stride and built != checkpoint.stride:
        raise ToolkitError(
            f"{checkpoint.path}: the checkpoint says strides {checkpoint.stride}, its "
            f"architecture gives {built}. The file is inconsistent."
        )


def save_ultralytics_checkpoint(
    model: YoloV5,
    path: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    half: bool = True,
    model_class: str = "DetectionModel",
) -> Path:
    """Save ``model`` as YOLOv5's train.py does: a dict whose ``model`` is the whole module,
    pickled under upstream's class names (``models.yolo.DetectionModel``, ``models.common.*``)
    with fp16 weights, so that this loader and YOLOv5's own read it. Written atomically.

    ``model_class`` is ``DetectionModel`` (YOLOv5 v6.2+) or ``Model`` (older releases)."""
    if model_class not in ("DetectionModel", "Model"):
        raise ToolkitError(f"model_class must be DetectionModel or Model, got {model_class!r}.")
    path = Path(path)
    clone = _upstream_layout(model, half=half)
    payload: dict[str, Any] = {
        "epoch": -1,
        "best_fitness": None,
        "model": clone,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "date": dt.datetime.now().isoformat(),
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        names = {**_UPSTREAM_NAMES, YoloV5: ("models.yolo", model_class)}
        torch.save(payload, name, pickle_module=_pickle_module(names), pickle_protocol=2)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)
    log.info("Saved YOLOv5 checkpoint %s", path)
    return path


# Our classes under the names upstream's pickles use.
_UPSTREAM_NAMES: dict[type, tuple[str, str]] = {
    YoloV5: ("models.yolo", "DetectionModel"),
    Detect: ("models.yolo", "Detect"),
    **{cls: ("models.common", cls.__name__) for cls in (Conv, C3, Bottleneck, SPPF, Concat)},
    **{cls: ("models.common", cls.__name__) for cls in (SPP, Focus, BottleneckCSP)},
}


def _upstream_layout(model: YoloV5, *, half: bool) -> YoloV5:
    """A copy of ``model`` with upstream's attributes (per-layer from/index, Sequential)."""
    clone = copy.deepcopy(model).eval()
    clone = clone.half() if half else clone.float()
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    for index, (layer, source) in enumerate(zip(clone.model, clone.sources, strict=True)):
        block = layer[0] if isinstance(layer, nn.Sequential) else layer
        module, name = _UPSTREAM_NAMES.get(
            type(block), (type(block).__module__, type(block).__name__)
        )
        layer.f, layer.i, layer.type = source, index, f"{module}.{name}"
        layer.np = sum(p.numel() for p in layer.parameters())
    detect = clone.detect
    detect.grid = [torch.empty(0) for _ in range(detect.nl)]
    detect.anchor_grid = [torch.empty(0) for _ in range(detect.nl)]
    detect.export = False
    return clone


def _upstream_state(obj: nn.Module) -> dict[str, Any]:
    state = dict(obj.__dict__)
    if isinstance(obj, YoloV5):
        state["_modules"] = collections.OrderedDict(state["_modules"])
        state["_modules"]["model"] = nn.Sequential(*obj.model)
        state.pop("sources", None)
        state["save"] = sorted(obj.save)
        state["stride"] = obj.stride.clone()
        state["inplace"] = True
    elif isinstance(obj, Detect):
        state.pop("_grids", None)
    if isinstance(obj, Conv) and obj.bn is None:
        # Upstream deletes the batch norm when fusing.
        state["_modules"] = collections.OrderedDict(
            (k, v) for k, v in state["_modules"].items() if k != "bn"
        )
    return state


class _UpstreamPickler(pickle._Pickler):
    """Writes our modules under upstream's class names (pure-Python pickler: its
    ``save_global`` can be overridden)."""

    names: ClassVar[dict[type, tuple[str, str]]] = _UPSTREAM_NAMES

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in self.names:
            return (copyreg.__newobj__, (type(obj),), _upstream_state(obj))
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj in self.names:
            module, qualname = self.names[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _pickle_module(names: dict[type, tuple[str, str]]) -> types.ModuleType:
    """A module object for ``torch.save(pickle_module=...)`` using ``names``."""
    module = types.ModuleType("upstream_pickle")
    module.Pickler = type("Pickler", (_UpstreamPickler,), {"names": names})
    # torch's legacy (pre-1.6, non-zip) format also pickles small headers with dump().
    module.dump = lambda obj, file, protocol=2: module.Pickler(file, protocol).dump(obj)
    return module


__all__ = [
    "Checkpoint",
    "build_from_checkpoint",
    "load_model",
    "read_checkpoint",
    "save_ultralytics_checkpoint",
]
