"""Build a YOLOv5 detection model from its architecture dict.

The dict is what Ultralytics writes as ``model.yaml`` into every checkpoint and ships as
``models/yolov5*.yaml``: ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors``,
``backbone`` and ``head`` (rows of ``[from, repeats, block, args]``), optionally ``activation``
and ``ch``.  Block names are looked up in a fixed table, and string arguments are resolved from
a fixed set of names: the dict is data, nothing in it is evaluated.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from device.errors import ToolkitError
from toolkit.yolo.blocks import C3, SPP, SPPF, Bottleneck, BottleneckCSP, Concat, Conv, Focus
from toolkit.yolo.head import Detect

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "models"

# Blocks whose first argument is the output channel count (scaled by width_multiple).
_CHANNEL_BLOCKS: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "BottleneckCSP": BottleneckCSP,
    "SPPF": SPPF,
    "SPP": SPP,
    "Focus": Focus,
}
# Blocks whose second argument (after channels) is the repeat count.
_REPEATED_INSIDE = {"C3", "BottleneckCSP"}

SUPPORTED_BLOCKS = (*_CHANNEL_BLOCKS, "Concat", "Detect", "nn.Upsample")

_ACTIVATION = re.compile(r"^(?:nn\.)?(SiLU|ReLU|Hardswish|Identity|LeakyReLU)\(([0-9.eE+-]*)\)$")


def make_divisible(value: float, divisor: int = 8) -> int:
    """The smallest multiple of ``divisor`` that is at least ``value``."""
    return math.ceil(value / divisor) * divisor


def parse_activation(text: str) -> nn.Module:
    """An activation module from its architecture string, e.g. ``nn.LeakyReLU(0.1)``."""
    match = _ACTIVATION.match(text.replace(" ", ""))
    if not match:
        raise ToolkitError(
            f"Unsupported activation '{text}' in the model architecture. Supported: nn.SiLU(), "
            "nn.ReLU(), nn.LeakyReLU(slope), nn.Hardswish(), nn.Identity()."
        )
    name, arg = match.groups()
    if name == "LeakyReLU":
        return nn.LeakyReLU(float(arg) if arg else 0.01)
    return getattr(nn, name)()


class YoloV5(nn.Module):
    """A YOLOv5 detector. See the package docstring for the train/eval output contract."""

    def __init__(self, cfg: dict[str, Any], *, nc: int | None = None, names=None) -> None:
        super().__init__()
        self.yaml = copy.deepcopy(cfg)
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = nc
        in_channels = int(self.yaml.get("ch", 3))

        layers, self.sources, self.save = _parse_layers(self.yaml, in_channels)
        self.model = nn.ModuleList(layers)
        activation = self.yaml.get("activation")
        if activation:
            replace_activations(self, lambda: parse_activation(activation))

        detect = self.detect
        probe = 256
        with torch.no_grad():
            self.train()
            maps = self.forward(torch.zeros(1, in_channels, probe, probe))
        # Kept on the CPU whatever the model's device: it is read as Python numbers.
        detect.stride = torch.tensor(
            [probe / m.shape[-3] for m in maps], dtype=torch.float32, device="cpu"
        )
        _fix_anchor_order(detect, self.yaml["anchors"])
        detect.anchors /= detect.stride.to(detect.anchors.device).view(-1, 1, 1)
        _initialize_biases(detect)

        self.names = _names(names, self.yaml["nc"])
        self.eval()

    @property
    def detect(self) -> Detect:
        return self.model[-1]

    @property
    def stride(self) -> torch.Tensor:
        return self.detect.stride

    @property
    def nc(self) -> int:
        return self.detect.nc

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``x``: (batch, 3, H, W) float RGB 0..1, H and W multiples of the largest stride."""
        outputs: list[torch.Tensor | None] = []
        for index, (layer, source) in enumerate(zip(self.model, self.sources, strict=True)):
            if source != -1:
                x = (
                    outputs[source]
                    if isinstance(source, int)
                    else [x if j == -1 else outputs[j] for j in source]
                )
            x = layer(x)
            outputs.append(x if index in self.save else None)
        return x

    def fuse(self) -> YoloV5:
        """Fold batch norms into convolutions for faster inference and export."""
        for module in self.modules():
            if isinstance(module, Conv):
                module.fuse()
        return self


def build_model(cfg: dict[str, Any], *, nc: int | None = None, names=None) -> YoloV5:
    """A YOLOv5 model (random weights, eval mode) from an architecture dict.

    ``nc`` overrides the dict's class count; ``names`` (list or index->name dict) sets the
    class names, which default to ``"0", "1", ...``.
    """
    _check_config(cfg)
    try:
        return YoloV5(cfg, nc=nc, names=names)
    except ToolkitError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # The dict is data from a file: a wrong row shape or value is a bad file, not a bug.
        raise ToolkitError(
            f"The YOLOv5 architecture dict is malformed ({type(exc).__name__}: {exc}). Expected "
            "rows of [from, repeats, block, args] as in YOLOv5's models/yolov5*.yaml; the "
            "checkpoint or yaml is damaged or from an unsupported variant."
        ) from exc


def config_path(name: str) -> Path:
    """The shipped architecture file for ``yolov5n`` ... ``yolov5x`` (``.yaml`` optional)."""
    stem = Path(name).stem
    path = CONFIG_DIR / f"{stem}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ToolkitError(
            f"No architecture config '{name}': expected one of {shipped} in {CONFIG_DIR}, "
            "or pass the path of a YOLOv5 model yaml."
        )
    return path


def load_config(name_or_path: str | Path) -> dict[str, Any]:
    """An architecture dict from a yaml file path or a shipped name such as ``yolov5s``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = config_path(str(name_or_path))
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ToolkitError(f"Could not read architecture config {path}: {exc}") from exc
    _check_config(cfg, where=str(path))
    return cfg


def replace_activations(model: nn.Module, factory) -> None:
    """Swap every SiLU in ``model`` for ``factory()`` (architectures with a custom activation)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.SiLU):
                setattr(parent, child_name, factory())


def _check_config(cfg: Any, where: str = "the architecture dict") -> None:
    if not isinstance(cfg, dict):
        raise ToolkitError(f"Expected a YOLOv5 architecture dict in {where}, found {type(cfg)}.")
    missing = [k for k in ("nc", "anchors", "backbone", "head") if k not in cfg]
    if missing:
        raise ToolkitError(
            f"The YOLOv5 architecture in {where} lacks {missing}; expected keys nc, "
            "depth_multiple, width_multiple, anchors, backbone and head."
        )
    nc = cfg["nc"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ToolkitError(
            f"The YOLOv5 architecture in {where} has nc={nc!r}; expected a class count >= 1."
        )


def _resolve_arg(value: Any, cfg: dict[str, Any]) -> Any:
    # Upstream eval()s these strings; only the names it actually uses are resolved here.
    if not isinstance(value, str):
        return value
    known = {"nc": cfg["nc"], "anchors": cfg["anchors"], "None": None, "True": True}
    known["False"] = False
    return known.get(value, value)


def _parse_layers(
    cfg: dict[str, Any], in_channels: int
) -> tuple[list[nn.Module], list[int | list[int]], set[int]]:
    depth = float(cfg.get("depth_multiple", 1.0))
    width = float(cfg.get("width_multiple", 1.0))
    anchors = cfg["anchors"]
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else int(anchors)
    outputs_per_cell = na * (cfg["nc"] + 5)

    layers: list[nn.Module] = []
    sources: list[int | list[int]] = []
    save: set[int] = set()
    channels = [in_channels]
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for index, row in enumerate(rows):
        try:
            source, repeats, block, args = row
        except (TypeError, ValueError):
            raise ToolkitError(
                f"Layer {index} of the architecture is {row!r}; expected [from, repeats, "
                "block, args]."
            ) from None
        args = [_resolve_arg(a, cfg) for a in args]
        repeats = max(round(repeats * depth), 1) if repeats > 1 else repeats
        previous = channels[source] if isinstance(source, int) else None

        if block in _CHANNEL_BLOCKS:
            out = args[0]
            if out != outputs_per_cell:
                out = make_divisible(out * width, 8)
            args = [previous, out, *args[1:]]
            if block in _REPEATED_INSIDE:
                args.insert(2, repeats)
                repeats = 1
            factory = _CHANNEL_BLOCKS[block]
        elif block == "Concat":
            out = sum(channels[j] for j in source)
            factory = Concat
        elif block == "Detect":
            args = list(args)
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(source)
            args.append([channels[j] for j in source])
            out = None
            factory = Detect
        elif block in ("nn.Upsample", "Upsample"):
            out = previous
            factory = nn.Upsample
        else:
            raise ToolkitError(
                f"Layer {index} uses block '{block}', which this toolkit does not implement. "
                f"Supported blocks: {', '.join(SUPPORTED_BLOCKS)}."
            )

        layer = nn.Sequential(*(factory(*args) for _ in range(repeats))) if repeats > 1 else None
        layers.append(layer if layer is not None else factory(*args))
        sources.append(source)
        save.update(j % index for j in ([source] if isinstance(source, int) else source) if j != -1)
        if index == 0:
            channels = []
        channels.append(out)
    return layers, sources, save


def _fix_anchor_order(detect: Detect, anchors: Any) -> None:
    # Anchors must grow with the stride; upstream flips them when they do not.
    if not isinstance(anchors, list):
        return  # a bare anchor count: placeholders until the checkpoint's own arrive
    areas = [sum(w * h for w, h in zip(a[::2], a[1::2], strict=True)) / len(a) for a in anchors]
    area_step = areas[-1] - areas[0]
    stride_step = float(detect.stride[-1] - detect.stride[0])
    if area_step and (area_step > 0) != (stride_step > 0):
        log.info("Reversing anchor order to match the stride order")
        detect.anchors[:] = detect.anchors.flip(0)


@torch.no_grad()
def _initialize_biases(detect: Detect) -> None:
    # Upstream's prior: about 8 objects per 640 image, classes equally likely.
    for conv, stride in zip(detect.m, detect.stride, strict=True):
        bias = conv.bias.view(detect.na, -1)
        bias[:, 4] += math.log(8 / (640 / float(stride)) ** 2)
        bias[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99999))


def _names(names, nc: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(nc)]
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    names = [str(n) for n in names]
    if len(names) != nc:
        raise ToolkitError(f"Expected {nc} class names for {nc} classes, found {len(names)}.")
    return names
