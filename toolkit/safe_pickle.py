"""A pickle module for ``torch.load(pickle_module=...)`` that runs no code from the file.

Ultralytics checkpoints pickle whole ``nn.Module`` objects, so a plain ``torch.load`` would
import and run whatever classes and functions the file names.  Here every global the pickle
asks for goes through :meth:`Unpickler.find_class`, which answers from a fixed allow-list:

- tensor and container rebuilders (``torch._utils._rebuild_tensor_v2``, ``OrderedDict``, ...)
  are returned as themselves: they only rebuild data;
- YOLOv5 blocks (``models.*``) and ``torch.nn`` layers become :class:`ModuleStub` subclasses
  that record the pickled attributes and do nothing else;
- a few data types Ultralytics writes next to the model (numpy scalars, paths) become inert
  :class:`DataStub` objects;
- anything else raises :class:`RefusedGlobal`, naming the global.

Storages are resolved by torch's own wrapper before ``find_class`` is reached.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any, ClassVar

import torch

from device.errors import ToolkitError

# YOLOv5 blocks this toolkit implements, by the module upstream defines them in.
YOLOV5_CLASSES = {
    "models.yolo": {"Model", "DetectionModel", "Detect"},
    "models.common": {"Conv", "C3", "Bottleneck", "SPPF", "Concat", "Focus", "SPP"}
    | {"BottleneckCSP"},
    # YOLOv5 up to v4.0 swapped in its own activations for export.
    "utils.activations": {"SiLU", "Hardswish"},
}

TORCH_LAYERS = {
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"SiLU", "ReLU", "LeakyReLU", "Hardswish", "Sigmoid"},
    "torch.nn.modules.linear": {"Identity"},
    "torch.nn.modules.pooling": {"MaxPool2d"},
    "torch.nn.modules.upsampling": {"Upsample"},
    "torch.nn.modules.container": {"Sequential", "ModuleList"},
}

REBUILDERS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    # Protocol 2 pickles bytes (e.g. inside numpy scalars) as _codecs.encode(text, "latin1").
    ("_codecs", "encode"): lambda text, encoding="utf-8": str(text).encode(encoding),
}
REBUILDERS.update(
    {
        ("torch", name): getattr(torch, name)
        for name in ("float16", "float32", "float64", "bfloat16")
    }
)

# Data Ultralytics stores beside the model (best_fitness, training options): kept inert.
DATA_CLASSES = {
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "numpy.dtypes": {"Float64DType", "Float32DType", "Int64DType"},
    "pathlib": {"PosixPath", "WindowsPath", "Path"},
    "argparse": {"Namespace"},
}


# Where a pickle's globals would reach the system; named as a likely attack, not a wrong file.
_SYSTEM_MODULES = {
    "os",
    "posix",
    "nt",
    "subprocess",
    "builtins",
    "sys",
    "shutil",
    "socket",
    "importlib",
    "pickle",
    "runpy",
    "code",
    "codeop",
    "pty",
    "ctypes",
    "webbrowser",
    "multiprocessing",
    "signal",
    "io",
    "tempfile",
    "urllib",
    "http",
    "asyncio",
    "threading",
    "functools",
    "operator",
    "types",
    "inspect",
    "marshal",
    "_io",
    "_posixsubprocess",
}


class RefusedGlobal(ToolkitError):
    """The pickle names a global outside the allow-list."""

    def __init__(self, module: str, name: str, why: str) -> None:
        super().__init__(why)
        self.global_name = f"{module}.{name}"


class ModuleStub:
    """An inert stand-in for a pickled ``nn.Module``: holds its pickled ``__dict__``."""

    qualname: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> ModuleStub:
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = state if isinstance(state, dict) else {}

    @property
    def kind(self) -> str:
        """The class name without its module, e.g. ``Conv`` or ``Conv2d``."""
        return self.qualname.rsplit(".", 1)[-1]

    def children(self) -> dict[str, ModuleStub | None]:
        return dict(self.state.get("_modules") or {})

    def __repr__(self) -> str:
        return f"<stub {self.qualname}>"


class DataStub(ModuleStub):
    """An inert stand-in for a non-module object stored beside the model."""


_stub_classes: dict[str, type[ModuleStub]] = {}


def _stub(module: str, name: str, base: type[ModuleStub]) -> type[ModuleStub]:
    qualname = f"{module}.{name}"
    if qualname not in _stub_classes:
        _stub_classes[qualname] = type(name, (base,), {"qualname": qualname})
    return _stub_classes[qualname]


def _refusal(module: str, name: str) -> RefusedGlobal:
    qualname = f"{module}.{name}"
    if module.startswith("ultralytics"):
        why = (
            f"This checkpoint names '{qualname}': it comes from the 'ultralytics' package "
            "(YOLOv8, YOLO11, YOLOv5u or later), whose architecture and output differ from "
            "YOLOv5's. Expected an Ultralytics YOLOv5 checkpoint (github.com/ultralytics/yolov5). "
            "Export that model with 'yolo export format=onnx' instead."
        )
    elif module.startswith("models."):
        supported = sorted(set().union(*YOLOV5_CLASSES.values()) - {"Model", "DetectionModel"})
        why = (
            f"This checkpoint uses the YOLOv5 component '{qualname}', which this toolkit does "
            f"not implement (supported blocks: {', '.join(supported)}; detection models only). "
            "Export it with YOLOv5's own export.py, or retrain with a supported architecture."
        )
    elif name[:1].isupper() and module.split(".")[0] not in _SYSTEM_MODULES:
        why = (
            f"This file holds {qualname!r}, which is not part of a YOLOv5 detection model. "
            "Expected an Ultralytics YOLOv5 checkpoint (models.yolo.Model or DetectionModel, "
            "as YOLOv5's train.py saves it). Nothing from the file was imported or executed."
        )
    else:
        why = (
            f"Refusing to load: the checkpoint's pickle references {qualname!r}, which is not "
            "on the allow-list of tensor rebuilders and YOLOv5 layers. A YOLOv5 checkpoint "
            "never needs it; the file may be crafted to run code. Nothing was executed."
        )
    return RefusedGlobal(module, name, why)


class Unpickler(pickle.Unpickler):
    """An unpickler whose globals come only from the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        if (module, name) in REBUILDERS:
            return REBUILDERS[(module, name)]
        if name in YOLOV5_CLASSES.get(module, ()) or name in TORCH_LAYERS.get(module, ()):
            return _stub(module, name, ModuleStub)
        if name in DATA_CLASSES.get(module, ()):
            return _stub(module, name, DataStub)
        raise _refusal(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` with the restricted unpickler (torch's legacy format calls this)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    import io

    return Unpickler(io.BytesIO(data), **kwargs).load()
