"""Typed settings for every frame source; ``type`` picks the kind.

In the daemon's YAML these sit under ``source:``, for example::

    source:
      type: stream
      url: tcp://127.0.0.1:8888
      reconnect: {initial_delay_s: 1, max_delay_s: 10}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

PICAMERA_FORMATS = ("RGB888", "BGR888", "XRGB8888", "XBGR8888", "YUV420", "YVU420")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https", "tcp", "udp", "rtmp", "srt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReconnectPolicy(_Strict):
    """How a live source comes back after losing its camera or stream."""

    initial_delay_s: float = Field(
        1.0, gt=0, le=60, description="wait before the first reconnect attempt"
    )
    max_delay_s: float = Field(
        5.0, gt=0, le=600, description="longest wait between attempts; waits double up to it"
    )
    backoff_factor: float = Field(
        2.0, ge=1, le=10, description="each failed attempt multiplies the wait by this"
    )
    max_attempts: int = Field(
        0, ge=0, description="failed attempts in a row before giving up (FAILED); 0 never gives up"
    )
    retry_on_start: bool = Field(
        False, description="keep retrying when the very first connection fails, instead of an error"
    )


class _LiveSourceConfig(_Strict):
    name: str = Field("", description="label for frames, logs and status; derived when empty")
    read_timeout_s: float = Field(
        5.0, gt=0, le=120, description="no frame for this long counts as a lost connection"
    )
    frozen_after_s: float = Field(
        10.0, ge=0, le=3600, description="identical frames for this long count as lost; 0 disables"
    )
    reconnect: ReconnectPolicy = Field(
        default_factory=ReconnectPolicy, description="retrying after the source is lost"
    )


def _even(value: int) -> int:
    if value % 2:
        raise ValueError("must be even for the camera's YUV pipeline")
    return value


class PiCameraConfig(_LiveSourceConfig):
    """A CSI camera through picamera2 (Raspberry Pi OS package python3-picamera2)."""

    type: Literal["picamera"] = "picamera"
    camera: int = Field(
        0, ge=0, le=7, description="camera number, as 'rpicam-hello --list-cameras'"
    )
    width: int = Field(1280, ge=64, le=9152, description="frame width in pixels (even)")
    height: int = Field(720, ge=64, le=6944, description="frame height in pixels (even)")
    format: Literal[PICAMERA_FORMATS] = Field(  # type: ignore[valid-type]
        "RGB888", description="stream format; RGB888 already holds OpenCV's B,G,R byte order"
    )
    fps: float = Field(30.0, gt=0, le=240, description="frame rate, set as FrameDurationLimits")
    buffer_count: int = Field(6, ge=2, le=16, description="frame buffers the camera cycles through")

    _check_even = field_validator("width", "height")(_even)


class UsbCameraConfig(_LiveSourceConfig):
    """A USB (UVC) camera or any V4L2 device, read with OpenCV."""

    type: Literal["usb"] = "usb"
    device: str = Field(
        "/dev/video0", description="device path (/dev/video0, /dev/v4l/by-id/...) or its number"
    )
    width: int | None = Field(None, ge=16, le=8192, description="requested width; None keeps it")
    height: int | None = Field(None, ge=16, le=8192, description="requested height; None keeps it")
    fps: float | None = Field(None, gt=0, le=480, description="requested frame rate; None keeps it")
    fourcc: str | None = Field(
        None, pattern=r"^[A-Z0-9 ]{4}$", description="pixel format such as MJPG or YUYV"
    )
    backend: Literal["v4l2", "ffmpeg", "any"] = Field(
        "v4l2", description="OpenCV capture backend; v4l2 is the native one on Linux"
    )

    @field_validator("device", mode="before")
    @classmethod
    def _number_as_text(cls, device: object) -> object:
        return str(device) if isinstance(device, int) and not isinstance(device, bool) else device

    @property
    def device_path(self) -> Path:
        return Path(f"/dev/video{self.device}") if self.device.isdigit() else Path(self.device)


class StreamConfig(_LiveSourceConfig):
    """A network stream read through OpenCV's FFmpeg backend: RTSP, HTTP MJPEG, or the raw H.264
    over TCP that 'rpicam-vid --listen -o tcp://0.0.0.0:8888' serves."""

    type: Literal["stream"] = "stream"
    url: str = Field(description="rtsp://, http(s):// (MJPEG), tcp://host:port (H.264), ...")
    # An encoder can send bit-identical frames of a perfectly still scene (all-skip P-frames),
    # so streams wait longer than cameras before calling identical frames frozen.
    frozen_after_s: float = Field(
        30.0, ge=0, le=3600, description="identical frames for this long count as lost; 0 disables"
    )
    open_timeout_s: float = Field(
        10.0, gt=0, le=120, description="how long connecting may take before it counts as failed"
    )
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP transport; tcp survives lossy Wi-Fi without smeared frames"
    )
    ffmpeg_options: dict[str, str] = Field(
        default_factory=dict, description="extra FFmpeg demuxer options, e.g. analyzeduration"
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in STREAM_SCHEMES or not urlsplit(url).netloc:
            schemes = ", ".join(f"{s}://" for s in STREAM_SCHEMES)
            raise ValueError(f"expected a URL starting with one of {schemes} and a host")
        return url


class VideoFileConfig(_Strict):
    """A video file, decoded with OpenCV's FFmpeg backend."""

    type: Literal["file"] = "file"
    name: str = Field("", description="label for frames, logs and status; derived when empty")
    path: Path = Field(description="the video file (mp4, mkv, avi, ...)")
    loop: bool = Field(False, description="start again at the end instead of finishing")
    realtime: bool = Field(
        False,
        description="play at the file's frame rate, dropping frames a slow consumer misses, "
        "like a camera; otherwise every frame is delivered as fast as it is asked for",
    )


class ImageFolderConfig(_Strict):
    """The images of one folder, in name order."""

    type: Literal["folder"] = "folder"
    name: str = Field("", description="label for frames, logs and status; derived when empty")
    path: Path = Field(description="folder holding .jpg, .png, .bmp, .webp or .tif images")
    loop: bool = Field(False, description="start again after the last image instead of finishing")
    fps: float = Field(0.0, ge=0, le=1000, description="deliver at this rate; 0 as fast as asked")


SourceConfig = Annotated[
    PiCameraConfig | UsbCameraConfig | StreamConfig | VideoFileConfig | ImageFolderConfig,
    Field(discriminator="type"),
]
SOURCE_CONFIG = TypeAdapter(SourceConfig)
