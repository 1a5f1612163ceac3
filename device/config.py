"""The daemon's configuration: one YAML file, typed, with command-line overrides.

Every section rejects unknown keys.  A problem is reported with the file, the YAML line, the
key path, the value found and what is expected, for all problems at once::

    daemon.yaml:7: detect.conf = 1.5: expected a number at most 1
    daemon.yaml:12: outputs.mqtt.prot: unknown key; did you mean 'port'? (expected one of ...)

Example::

    model:
      path: /opt/edge-yolo/yolov5n.onnx
    source:
      type: usb
      device: /dev/video0
    detect:
      conf: 0.4
      classes: [person, car]
    outputs:
      jsonl: {enabled: true, path: /var/lib/edge-yolo/detections.jsonl}
      mqtt: {enabled: true, host: 192.168.1.10}
"""

from __future__ import annotations

import difflib
import json
import logging
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from device.errors import ConfigError
from device.publish.config import HttpConfig, MqttConfig, SnapshotConfig
from device.publish.jsonl import JsonlConfig
from device.sources.config import SourceConfig

log = logging.getLogger(__name__)


def _id_to_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError("expected a class name (person) or id (0)")
    return value


# A class by name ("person") or by id (0, or "0"); resolved against the model's names later.
ClassRef = Annotated[str, BeforeValidator(_id_to_text), Field(min_length=1)]
Score = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The ONNX model and how onnxruntime may use the CPU."""

    path: Path = Field(description="the .onnx file written by 'toolkit export' or 'quantize'")
    intra_op_threads: int = Field(
        0, ge=0, le=256, description="threads inside one operator; 0 means one per usable CPU"
    )
    inter_op_threads: int = Field(1, ge=1, le=256, description="operators run at once")
    allow_spinning: bool = Field(
        False, description="let idle onnxruntime threads spin; starves capture on small boards"
    )


class DetectConfig(_Section):
    """Which detections are kept."""

    conf: float = Field(0.25, ge=0.0, le=1.0, description="minimum objectness x class score")
    iou: float = Field(0.45, ge=0.0, le=1.0, description="overlap above which NMS drops a box")
    max_detections: int = Field(100, ge=1, le=10000, description="most detections per frame")
    class_agnostic: bool = Field(False, description="suppress overlapping boxes across classes")
    classes: list[ClassRef] | None = Field(
        None, description="keep only these classes, by name or id (None: all)"
    )
    class_conf: dict[ClassRef, Score] = Field(
        default_factory=dict, description="per-class minimum score, by name or id"
    )
    multi_label: bool = Field(False, description="let one box carry several classes")


class PipelineConfig(_Section):
    """How frames move through the daemon."""

    max_frames: int | None = Field(None, ge=1, description="stop after this many frames")
    frame_policy: Literal["auto", "newest", "every"] = Field(
        "auto",
        description="newest: skip to the newest frame (cameras); every: process all (files); "
        "auto: newest for live sources, every for files and folders",
    )
    max_fps: float | None = Field(
        None, gt=0, le=1000, description="run the model at most this often (None: flat out)"
    )
    read_timeout_s: float = Field(0.5, gt=0, le=60, description="wait per read from the source")
    health_max_frame_age_s: float = Field(
        10.0, gt=0, le=3600, description="healthy while a frame was processed this recently"
    )
    stall_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a stage stuck this long stops the systemd watchdog"
    )
    stats_log_interval_s: float = Field(
        60.0, ge=0, le=86400, description="seconds between summary log lines (0: never)"
    )


class OutputsConfig(_Section):
    """Where results go."""

    jsonl: JsonlConfig = Field(default_factory=JsonlConfig, description="JSON lines")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="MQTT broker")
    http: HttpConfig = Field(
        default_factory=HttpConfig,
        description="HTTP server: /health, metrics, stats, latest frame (on 127.0.0.1:8080)",
    )
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig, description="JPEG files")


class DaemonConfig(_Section):
    """Everything ``toolkit-device run`` needs."""

    model: ModelConfig = Field(description="the ONNX model, e.g. model: {path: yolov5n.onnx}")
    source: SourceConfig = Field(
        description="where frames come from, e.g. source: {type: usb, device: /dev/video0}"
    )
    detect: DetectConfig = Field(default_factory=DetectConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="how much the daemon logs"
    )


# Loading


def read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    """The file's mapping and its node tree (for line numbers)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"Config file not found: {path}. Pass the path of a YAML file "
            "(see 'toolkit-device run --help' for an example)."
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            f"Config file {path} is a folder. Pass the path of a YAML file inside it, such as "
            f"{path / 'daemon.yaml'}."
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"Config file {path} is not UTF-8 text (undecodable byte at offset {exc.start}). "
            "Expected a YAML text file; 'toolkit-device example-config' prints one."
        ) from None
    except OSError as exc:
        raise ConfigError(f"Could not read config file {path}: {exc.strerror or exc}.") from None

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None

    if data is None:
        data, node = {}, None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, source:, ...) at the top, "
            f"found a {type(data).__name__}."
        )
    _reject_duplicate_keys(node, path)
    return data, node


def _reject_duplicate_keys(node: yaml.Node | None, path: Path, trail: str = "") -> None:
    """PyYAML silently keeps the last of two equal keys; a config should not."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{trail}.{key}" if trail else key
            if key in seen:
                raise ConfigError(
                    f"{path}:{key_node.start_mark.line + 1}: {where}: key given twice "
                    f"(first on line {seen[key]}); keep one."
                )
            seen[key] = key_node.start_mark.line + 1
            _reject_duplicate_keys(value_node, path, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, path, f"{trail}[{index}]")


def load_config(
    path: Path | None, overrides: dict[str, Any] | None = None, *, flag_names=None
) -> DaemonConfig:
    """Validate a YAML file (optional) merged with command-line ``overrides``.

    ``overrides`` maps dotted key paths (``detect.conf``) to values; ``flag_names`` maps the
    same paths to the flags that set them, so errors name the flag the user typed.
    """
    data, node = read_yaml(path) if path is not None else ({}, None)
    for dotted, value in (overrides or {}).items():
        _set_path(data, dotted.split("."), value)
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        found = [
            format_error(error, node, path, flag_names or {}, overrides or {})
            for error in exc.errors()
        ]
        lines = [text for _, text in sorted(found, key=lambda item: item[0])]
        where = f"{path}" if path is not None else "The command line"
        count = len(lines)
        header = f"{where} has {count} problem{'s' if count > 1 else ''}:"
        raise ConfigError("\n  ".join([header, *lines])) from None


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    data[keys[-1]] = value


# Error messages


def format_error(
    error: dict, node: yaml.Node | None, path: Path | None, flag_names: dict, overrides: dict
) -> tuple[int, str]:
    """(YAML line or 0, message): where (file:line or flag), key path, value, what is expected."""
    loc, model = _resolve(error["loc"])
    dotted = _dotted(loc)
    flag = next((flag_names[k] for k in overrides if k in flag_names and _covers(k, dotted)), "")
    line = _line_of(node, loc)

    if error["type"] == "extra_forbidden":
        what = f"{dotted}: unknown key{_suggestion(str(loc[-1]), model)}"
    elif error["type"] == "missing":
        what = f"{dotted}: required key is missing ({_description(str(loc[-1]), model)})"
    else:
        what = f"{dotted} = {_short(error.get('input'))}: {_expected(error)}"

    if flag:
        return 0, f"{flag}: {what}"
    if line and path is not None:
        return line, f"{path}:{line}: {what}"
    return line or 0, what


def _resolve(raw_loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """The key path as the user wrote it (without pydantic's union tags) and the model that
    holds its last key."""
    loc: list = []
    model: Any = DaemonConfig
    for part in raw_loc[:-1] if raw_loc else ():
        if model is _SOURCE_UNION:
            model = _SOURCE_MODELS.get(part)
            continue  # the tag pydantic puts after 'source' is not a key in the file
        loc.append(part)
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _field_model(field.annotation) if field is not None else None
    if raw_loc:
        loc.append(raw_loc[-1])
    return tuple(loc), model if isinstance(model, type) else None


def _field_model(annotation: Any) -> Any:
    if set(typing.get_args(annotation)) & set(_SOURCE_MODELS.values()):
        return _SOURCE_UNION
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _field_model(arg)
        if found is not None:
            return found
    return None


_SOURCE_UNION = object()
_SOURCE_MODELS = {
    typing.get_args(model.model_fields["type"].annotation)[0]: model
    for model in typing.get_args(typing.get_args(SourceConfig)[0])
}


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _covers(override: str, dotted: str) -> bool:
    return (
        dotted == override or dotted.startswith(override + ".") or dotted.startswith(override + "[")
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(error: dict) -> str:
    message = error["msg"]
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        words = {
            "less_than_equal": "at most",
            "greater_than_equal": "at least",
            "less_than": "below",
            "greater_than": "above",
        }
        bound = next(iter(context.values()), "")
        return f"expected a number {words[kind]} {bound}"
    if kind == "literal_error":
        return f"expected one of {context.get('expected', '')}"
    if kind == "union_tag_invalid":
        return f"expected 'type' to be one of {context.get('expected_tags', '')}"
    if message.startswith("Value error, "):
        return message[len("Value error, ") :]
    return message[0].lower() + message[1:] if message else kind


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """The YAML line of the deepest key of ``loc`` present in the file."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _suggestion(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (expected one of: {', '.join(allowed)})"


def _description(key: str, model: type[BaseModel] | None) -> str:
    field = model.model_fields.get(key) if model is not None else None
    if field is not None and field.description:
        return field.description
    return "see 'toolkit-device run --help'"


# A complete example, generated from the schema so that it never drifts from it


def example_yaml(source_type: str = "usb") -> str:
    """Every key with its default and description, as a YAML file to start from."""
    required = {
        "stream": {"url": "tcp://raspberrypi.local:8888"},
        "file": {"path": "/home/pi/video.mp4"},
        "folder": {"path": "/home/pi/images"},
    }
    source = {"type": source_type, **required.get(source_type, {})}
    config = DaemonConfig(model={"path": "/opt/edge-yolo/model.onnx"}, source=source)
    lines = [
        "# toolkit-device daemon config (toolkit-device run FILE; check: toolkit-device "
        "check-config FILE).",
        "# Every key shows its default; delete the ones you do not change.",
    ]
    _render(DaemonConfig, config.model_dump(mode="json"), 0, lines)
    return "\n".join(lines) + "\n"


def _render(model: type[BaseModel], values: dict, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    fields = sorted(model.model_fields.items(), key=lambda item: item[0] != "type")
    for name, field in fields:
        value = values[name]
        description = field.description or ""
        nested = _field_model(field.annotation)
        if nested is _SOURCE_UNION:
            nested = _SOURCE_MODELS[value["type"]]
            description += f"; type: {' | '.join(_SOURCE_MODELS)}, the other keys depend on it"
        if isinstance(value, dict) and isinstance(nested, type):
            if description:
                lines.append(f"{pad}# {description}")
            lines.append(f"{pad}{name}:")
            _render(nested, value, depth + 1, lines)
        else:
            # JSON is YAML's flow style: strings quoted, null, true, [..], {..}.
            comment = f"  # {description}" if description else ""
            lines.append(f"{pad}{name}: {json.dumps(value)}{comment}")
