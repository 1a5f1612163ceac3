"""The small interface every frame source implements."""

from __future__ import annotations

import enum
import logging
import time
from abc import ABC, abstractmethod

from device.types import Frame

log = logging.getLogger(__name__)


class SourceState(str, enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    ENDED = "ended"  # a finite source (file, folder) has delivered its last frame
    FAILED = "failed"  # gave up; the daemon reports it and exits non-zero


class FrameSource(ABC):
    """A camera, stream, file or folder that yields BGR uint8 frames.

    ``read`` returns the newest frame not yet returned, waiting at most ``timeout`` seconds;
    ``None`` means no new frame in that time (a live source keeps trying to reconnect in the
    background) or, once ``state`` is ENDED or FAILED, that no more will come.  Live sources
    keep only the newest frame and count the ones they drop.
    """

    name: str = "source"

    def __init__(self) -> None:
        self.state = SourceState.CONNECTING
        self.frames_captured = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self.last_error = ""
        self.state_since = time.time()

    @abstractmethod
    def open(self) -> None:
        """Start capturing; raise ToolkitError when the source can never work."""

    @abstractmethod
    def read(self, timeout: float) -> Frame | None:
        """The newest unread frame, or None after ``timeout`` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Stop capturing and release the device; safe to call twice."""

    def _set_state(self, state: SourceState, reason: str = "", *, quiet: bool = False) -> None:
        """Change state, logging the change once (never per frame); ``quiet`` when the caller
        raises the reason as an error instead, so that it is not reported twice."""
        if reason and state not in (SourceState.STREAMING, SourceState.ENDED):
            self.last_error = reason
        if state == self.state:
            return
        previous, self.state, self.state_since = self.state, state, time.time()
        if quiet:
            return
        level = logging.WARNING if state == SourceState.FAILED else logging.INFO
        suffix = f": {reason}" if reason else ""
        log.log(level, "source %s: %s -> %s%s", self.name, previous.value, state.value, suffix)

    @property
    def finished(self) -> bool:
        return self.state in (SourceState.ENDED, SourceState.FAILED)

    def status(self) -> dict:
        return {
            "name": self.name,
            "state": self.state.value,
            "frames_captured": self.frames_captured,
            "frames_dropped": self.frames_dropped,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "state_since": round(self.state_since, 3),
        }

    def __enter__(self) -> FrameSource:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
