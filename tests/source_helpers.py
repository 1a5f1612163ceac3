"""Helpers for the frame-source tests: bounded waits and first frames."""

from __future__ import annotations

import time
from collections.abc import Callable

from device.sources.base import FrameSource
from device.types import Frame


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def read_frames(source: FrameSource, count: int, timeout: float = 10.0) -> list[Frame]:
    """``count`` frames from ``source``, failing after ``timeout`` seconds in all."""
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or source.finished:
            raise AssertionError(
                f"got {len(frames)} of {count} frames; source status {source.status()}"
            )
        frame = source.read(timeout=min(remaining, 1.0))
        if frame is not None:
            frames.append(frame)
    return frames


def drain(source: FrameSource, limit: int = 10_000) -> list[Frame]:
    """Every frame a finite source gives until it finishes (at most ``limit``)."""
    frames = []
    while not source.finished and len(frames) < limit:
        frame = source.read(timeout=2.0)
        if frame is not None:
            frames.append(frame)
    return frames


def assert_bgr_frame(frame: Frame, height: int, width: int) -> None:
    image = frame.image
    assert image.shape == (height, width, 3)
    assert image.dtype.name == "uint8"
    assert image.flags["C_CONTIGUOUS"]
