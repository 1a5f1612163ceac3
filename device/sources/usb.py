"""USB (UVC) cameras and other V4L2 devices, read with OpenCV.

An unplugged camera is noticed three ways: its /dev node vanishes, reads fail, or (with some
drivers) reads keep returning the last image, which the frozen-frame check catches.
"""

from __future__ import annotations

import glob
import logging
import os

import cv2
import numpy as np

from device.sources.config import UsbCameraConfig
from device.sources.live import LiveSource, SourceLost
from device.sources.opencv_capture import open_ffmpeg_capture, read_bgr, release_quietly

log = logging.getLogger(__name__)

_BACKENDS = {"v4l2": cv2.CAP_V4L2, "any": cv2.CAP_ANY}


def video_devices() -> list[str]:
    """The /dev/video* nodes present now, in number order."""
    return sorted(glob.glob("/dev/video*"), key=lambda p: (len(p), p))


class UsbCameraSource(LiveSource):
    """One V4L2 device; reconnects when it is unplugged and plugged in again."""

    def __init__(self, config: UsbCameraConfig) -> None:
        self.device_path = config.device_path
        super().__init__(
            config.name or self.device_path.name,
            read_timeout_s=config.read_timeout_s,
            frozen_after_s=config.frozen_after_s,
            reconnect=config.reconnect,
        )
        self.config = config
        self.negotiated: dict = {}
        self._capture: cv2.VideoCapture | None = None

    def _missing_reason(self) -> str | None:
        if self.device_path.exists():
            return None
        found = ", ".join(video_devices()) or "none"
        return (
            f"No camera at {self.device_path} (video devices present: {found}). Expected a USB "
            "camera there: check the cable and 'v4l2-ctl --list-devices', or set source.device "
            "to one of the devices present; a CSI ribbon camera uses source type 'picamera'."
        )

    def _connect(self) -> None:
        missing = self._missing_reason()
        if missing:
            raise SourceLost(missing)
        if not os.access(self.device_path, os.R_OK | os.W_OK):
            raise SourceLost(
                f"No permission to open {self.device_path}. Add the user running the daemon to "
                "the 'video' group ('sudo usermod -aG video $USER', then log in again)."
            )
        capture = self._open_capture()
        if not capture.isOpened():
            release_quietly(capture)
            raise SourceLost(
                f"{self.device_path} exists but OpenCV ({self.config.backend} backend) could not "
                "open it. It may be busy in another program, or not a capture node (cameras "
                "often add a metadata node too: try the next /dev/video number)."
            )
        self._apply_settings(capture)
        self._capture = capture

    def _open_capture(self) -> cv2.VideoCapture:
        if self.config.backend == "ffmpeg":
            return open_ffmpeg_capture(
                str(self.device_path),
                open_timeout_s=self.read_timeout_s,
                read_timeout_s=self.read_timeout_s,
                options={},
            )
        return cv2.VideoCapture(str(self.device_path), _BACKENDS[self.config.backend])

    def _apply_settings(self, capture: cv2.VideoCapture) -> None:
        """Ask for the configured format, size and rate (FOURCC first: it limits the sizes) and
        log what the driver actually granted."""
        config = self.config
        if config.fourcc:
            capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*config.fourcc))
        if config.width:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
        if config.height:
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
        if config.fps:
            capture.set(cv2.CAP_PROP_FPS, config.fps)
        # One driver buffer keeps frames current on V4L2; other backends ignore it.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        capture.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.read_timeout_s * 1000))

        fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
        self.negotiated = {
            "width": int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "fps": round(capture.get(cv2.CAP_PROP_FPS), 2),
            "fourcc": "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\0"),
        }
        log.info("source %s: %s opened with %s", self.name, self.device_path, self.negotiated)

    def _grab(self) -> np.ndarray:
        if self._capture is None:
            raise SourceLost("not connected")
        return read_bgr(self._capture, str(self.device_path))

    def _disconnect(self) -> None:
        capture, self._capture = self._capture, None
        release_quietly(capture)

    def status(self) -> dict:
        status = super().status()
        status.update(kind="usb", device=str(self.device_path), negotiated=self.negotiated)
        return status
