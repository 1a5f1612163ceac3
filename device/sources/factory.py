"""From settings (or a short command-line string) to an open FrameSource."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError

from device.errors import ConfigError
from device.sources.base import FrameSource
from device.sources.config import (
    SOURCE_CONFIG,
    STREAM_SCHEMES,
    ImageFolderConfig,
    PiCameraConfig,
    SourceConfig,
    StreamConfig,
    UsbCameraConfig,
    VideoFileConfig,
)


def create_source(config: SourceConfig) -> FrameSource:
    """The source for ``config``, not yet opened.  Imports only what that kind needs, so a
    board without picamera2 can still read a stream."""
    if isinstance(config, PiCameraConfig):
        from device.sources.picamera import PiCameraSource

        return PiCameraSource(config)
    if isinstance(config, UsbCameraConfig):
        from device.sources.usb import UsbCameraSource

        return UsbCameraSource(config)
    if isinstance(config, StreamConfig):
        from device.sources.stream import StreamSource

        return StreamSource(config)
    if isinstance(config, VideoFileConfig):
        from device.sources.video_file import VideoFileSource

        return VideoFileSource(config)
    if isinstance(config, ImageFolderConfig):
        from device.sources.image_folder import ImageFolderSource

        return ImageFolderSource(config)
    raise TypeError(f"not a source configuration: {config!r}")


def open_source(config: SourceConfig | dict) -> FrameSource:
    """The source for ``config`` (a model or a plain dict), opened: capturing for live sources.
    Raises ToolkitError when it cannot work, with what was expected and what to do."""
    if isinstance(config, dict):
        config = parse_source_config(config)
    source = create_source(config)
    source.open()
    return source


def parse_source_config(data: dict) -> SourceConfig:
    """Validate a ``source:`` mapping, or raise ConfigError naming the key and what it expects."""
    try:
        return SOURCE_CONFIG.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error, data.get("type")) for error in exc.errors())
        raise ConfigError(f"Invalid source settings: {problems}.") from exc


def _describe(error: dict, kind: object) -> str:
    """One validation error as 'source.key (got value): what is expected'."""
    loc = list(error["loc"])
    if loc and loc[0] == kind:
        loc = loc[1:]  # pydantic puts the discriminator's value first
    key = ".".join(["source", *(str(part) for part in loc)])
    got = "" if error["type"] == "extra_forbidden" else f" (got {error.get('input')!r})"
    return f"{key}{got}: {error['msg']}"


def source_config_from_string(text: str, **settings) -> SourceConfig:
    """A source from one command-line word, with optional extra settings:

    ``picamera`` or ``picamera:1``; ``usb``, ``/dev/video0`` or ``0``; a URL (rtsp://, http://,
    tcp://host:port, ...); a folder of images; any other path is a video file.
    """
    scheme = urlsplit(text).scheme.lower()
    if text == "picamera" or text.startswith("picamera:"):
        camera = text.partition(":")[2]
        data = {"type": "picamera", **({"camera": camera} if camera else {})}
    elif text == "usb" or text.isdigit() or text.startswith("/dev/video"):
        data = {"type": "usb", **({"device": text} if text != "usb" else {})}
    elif scheme in STREAM_SCHEMES:
        data = {"type": "stream", "url": text}
    elif "://" in text:
        schemes = ", ".join(f"{s}://" for s in STREAM_SCHEMES)
        raise ConfigError(
            f"{scheme or 'this'}:// streams are not supported. Expected a URL "
            f"starting with one of {schemes}, a camera (picamera, usb, /dev/videoN), a video "
            "file or an image folder."
        )
    elif Path(text).expanduser().is_dir():
        data = {"type": "folder", "path": text}
    else:
        data = {"type": "file", "path": text}
    return parse_source_config({**data, **settings})
