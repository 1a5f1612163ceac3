"""What the OpenCV-based sources share: opening a VideoCapture with explicit timeouts, and turning
whatever it returns into a BGR uint8 frame."""

from __future__ import annotations

import logging
import os
import threading

import cv2
import numpy as np

from device.sources.live import SourceLost

log = logging.getLogger(__name__)

FFMPEG_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

# OpenCV's FFmpeg backend reads its demuxer options from one process-wide environment variable
# at open time, so opens that set it must not interleave.
_ffmpeg_env_lock = threading.Lock()

# OpenCV's own warnings ("backend is generally available but can't be used to capture by name"
# on every failed reconnect attempt) only puzzle users: the sources say what went wrong.
try:
    from cv2.utils import logging as opencv_logging

    opencv_logging.setLogLevel(opencv_logging.LOG_LEVEL_ERROR)
except ImportError:
    # OpenCV 4.11 (the last line for numpy 1, as on Raspberry Pi OS) has only the flat call;
    # 2 is cv::utils::logging::LOG_LEVEL_ERROR.
    cv2.setLogLevel(2)


def ffmpeg_options_string(options: dict[str, str]) -> str:
    """Options in the 'key;value|key;value' form OpenCV's FFmpeg backend reads, keeping any the
    user already set in the environment."""
    merged = dict(options)
    for item in filter(None, os.environ.get(FFMPEG_OPTIONS_ENV, "").split("|")):
        key, _, value = item.partition(";")
        merged.setdefault(key, value)
    return "|".join(f"{key};{value}" for key, value in merged.items())


def open_ffmpeg_capture(
    target: str, *, open_timeout_s: float, read_timeout_s: float, options: dict[str, str]
) -> cv2.VideoCapture:
    """A VideoCapture on the FFmpeg backend whose open and reads give up after the timeouts
    instead of blocking forever."""
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        int(open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        int(read_timeout_s * 1000),
    ]
    with _ffmpeg_env_lock:
        saved = os.environ.get(FFMPEG_OPTIONS_ENV)
        combined = ffmpeg_options_string(options)
        if combined:
            os.environ[FFMPEG_OPTIONS_ENV] = combined
        try:
            return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        finally:
            if saved is None:
                os.environ.pop(FFMPEG_OPTIONS_ENV, None)
            else:
                os.environ[FFMPEG_OPTIONS_ENV] = saved


def release_quietly(capture: cv2.VideoCapture | None) -> None:
    if capture is None:
        return
    try:
        capture.release()
    except cv2.error as exc:
        log.debug("releasing a capture failed: %s", exc)


def read_bgr(capture: cv2.VideoCapture, what: str) -> np.ndarray:
    """The next frame of ``capture`` as BGR uint8 (H, W, 3), C-contiguous."""
    ok, image = capture.read()
    if not ok or image is None:
        raise SourceLost(f"no frame from {what} (stream ended, stalled or device lost)")
    return as_bgr(image)


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Grey or BGRA images from some devices and files, and 16-bit ones, to BGR uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceLost(f"expected 8- or 16-bit pixels, found {image.dtype}")
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)
