"""Network streams (RTSP, HTTP MJPEG, raw H.264 over TCP from 'rpicam-vid --listen') read with
OpenCV's FFmpeg backend, with open and read timeouts so a dead peer never blocks the reader."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from device.sources.config import StreamConfig
from device.sources.live import LiveSource, SourceLost
from device.sources.opencv_capture import open_ffmpeg_capture, read_bgr, release_quietly

# A raw H.264 stream has no container to say what it is, so FFmpeg probes it for up to 5 s by
# default; half a second is plenty for the SPS/PPS and first keyframe rpicam-vid sends.
RAW_TCP_PROBE = {"analyzeduration": "500000", "probesize": "500000"}


def redact_url(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class StreamSource(LiveSource):
    """One network stream; reconnects with backoff when it drops, stalls or freezes."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__(
            config.name or redact_url(config.url),
            read_timeout_s=config.read_timeout_s,
            frozen_after_s=config.frozen_after_s,
            reconnect=config.reconnect,
        )
        self.config = config
        self.stop_timeout_s = max(config.read_timeout_s, config.open_timeout_s) + 2.0
        self.url_for_humans = redact_url(config.url)
        self._capture: cv2.VideoCapture | None = None

    def _ffmpeg_options(self) -> dict[str, str]:
        options = {}
        scheme = urlsplit(self.config.url).scheme.lower()
        if scheme in ("rtsp", "rtsps"):
            options["rtsp_transport"] = self.config.rtsp_transport
        elif scheme == "tcp":
            options.update(RAW_TCP_PROBE)
        options.update(self.config.ffmpeg_options)
        return options

    def _connect(self) -> None:
        capture = open_ffmpeg_capture(
            self.config.url,
            open_timeout_s=self.config.open_timeout_s,
            read_timeout_s=self.config.read_timeout_s,
            options=self._ffmpeg_options(),
        )
        if not capture.isOpened():
            release_quietly(capture)
            raise SourceLost(
                f"Could not open the stream {self.url_for_humans} within "
                f"{self.config.open_timeout_s:g} s. Expected a reachable RTSP, HTTP MJPEG or "
                "H.264-over-TCP stream; check that the camera or 'rpicam-vid --listen' is running, "
                "the host and port are right, and try the URL with 'ffprobe'."
            )
        self._capture = capture

    def _grab(self) -> np.ndarray:
        if self._capture is None:
            raise SourceLost("not connected")
        return read_bgr(self._capture, f"the stream {self.url_for_humans}")

    def _disconnect(self) -> None:
        capture, self._capture = self._capture, None
        release_quietly(capture)

    def status(self) -> dict:
        return {**super().status(), "kind": "stream", "url": self.url_for_humans}
