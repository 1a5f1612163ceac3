"""The machinery shared by live sources: a reader thread that keeps only the newest frame,
notices lost, stalled, frozen or vanished cameras, and reconnects with backoff.

A subclass says how to connect, grab one frame and disconnect; everything about threads, state
and counters lives here.  The reader thread is the only one that touches the device, so a
backend that is not thread-safe (OpenCV captures, picamera2) never sees two callers.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

import numpy as np

from device.errors import ToolkitError
from device.sources.base import FrameSource, SourceState
from device.sources.config import ReconnectPolicy
from device.types import Frame

log = logging.getLogger(__name__)

_PRESENCE_CHECK_INTERVAL_S = 0.5
_FROZEN_SAMPLE_STEP = 8  # compare every 8th pixel in each direction: cheap, still exact for a copy


class SourceLost(Exception):
    """The device or stream is unavailable for now; the message says why, for the user."""


class LiveSource(FrameSource):
    """A camera or stream read by a background thread; ``read`` hands out the newest frame."""

    def __init__(
        self,
        name: str,
        *,
        read_timeout_s: float,
        frozen_after_s: float,
        reconnect: ReconnectPolicy,
    ) -> None:
        super().__init__()
        self.name = name
        self.read_timeout_s = read_timeout_s
        self.frozen_after_s = frozen_after_s
        self.policy = reconnect
        self.reconnect_attempts = 0  # failed attempts since the source was last streaming
        self.stop_timeout_s = read_timeout_s + 2.0  # longest a connect or grab may block

        self._ready = threading.Condition()
        self._latest: tuple[np.ndarray, float, float] | None = None
        self._unread = False
        self._delivered = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._streamed_before = False
        self._frozen_sample: np.ndarray | None = None
        self._frozen_since = 0.0
        self._next_presence_check = 0.0

    # What a subclass provides; all are called from the reader thread only (and ``_connect``
    # once from ``open``, before the thread starts).

    @abstractmethod
    def _connect(self) -> None:
        """Open the device or stream; raise SourceLost with a user-facing reason on failure."""

    @abstractmethod
    def _grab(self) -> np.ndarray:
        """The next frame as BGR uint8 (H, W, 3); raise SourceLost when none comes in time."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Release the device; must not raise and must be safe when not connected."""

    def _missing_reason(self) -> str | None:
        """Why the device is known to be gone (e.g. its /dev node vanished), or None."""
        return None

    # The FrameSource interface.

    def open(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._set_state(SourceState.CONNECTING)
        try:
            self._connect()
            self._connected = True
        except ToolkitError as exc:
            self._disconnect()
            self._set_state(SourceState.FAILED, str(exc), quiet=True)
            raise
        except SourceLost as exc:
            self._disconnect()
            if not self.policy.retry_on_start:
                self._set_state(SourceState.FAILED, str(exc), quiet=True)
                raise ToolkitError(str(exc)) from exc
            self._set_state(SourceState.RECONNECTING, str(exc))
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def read(self, timeout: float) -> Frame | None:
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self._unread:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.finished:
                    return None
                self._ready.wait(remaining)
            image, wall, mono = self._latest
            self._unread = False
            index = self._delivered
            self._delivered += 1
        return Frame(image=image, index=index, timestamp=wall, monotonic=mono, source=self.name)

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.stop_timeout_s)
            if thread.is_alive():
                log.warning("source %s: reader thread did not stop in time", self.name)
                return
        self._disconnect()
        self._connected = False
        with self._ready:
            self._ready.notify_all()

    def status(self) -> dict:
        status = super().status()
        status["reconnect_attempts"] = self.reconnect_attempts
        latest = self._latest
        status["last_frame_age_s"] = round(time.monotonic() - latest[2], 3) if latest else None
        return status

    # The reader thread.

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._connected and not self._reconnect():
                    return
                try:
                    self._check_present()
                    image = self._grab()
                    self._check_frozen(image)
                except SourceLost as exc:
                    self._lose(str(exc))
                    continue
                except Exception as exc:  # a backend bug must not end capture silently
                    log.exception("source %s: unexpected error while reading", self.name)
                    self._lose(f"unexpected error: {exc}")
                    continue
                self._publish(image)
        finally:
            self._disconnect()
            self._connected = False

    def _publish(self, image: np.ndarray) -> None:
        wall, mono = time.time(), time.monotonic()
        with self._ready:
            if self._unread:
                self.frames_dropped += 1
            self._latest = (image, wall, mono)
            self._unread = True
            self.frames_captured += 1
            self._ready.notify_all()
        if self.state != SourceState.STREAMING:
            if self._streamed_before:
                self.reconnects += 1
            self._streamed_before = True
            self.reconnect_attempts = 0
            self._set_state(SourceState.STREAMING)

    def _lose(self, reason: str) -> None:
        self._disconnect()
        self._connected = False
        self._frozen_sample = None
        self._set_state(SourceState.RECONNECTING, reason)

    def _reconnect(self) -> bool:
        """Try to connect until it works (True), the source is closed or attempts run out."""
        delay = self.policy.initial_delay_s
        while not self._stop.wait(delay):
            self.reconnect_attempts += 1
            try:
                self._check_present()
                self._connect()
                self._connected = True
                log.info("source %s: connected again, waiting for frames", self.name)
                return True
            except (SourceLost, ToolkitError) as exc:
                self._disconnect()
                self.last_error = str(exc)
                log.debug(
                    "source %s: attempt %d failed: %s", self.name, self.reconnect_attempts, exc
                )
            if self.policy.max_attempts and self.reconnect_attempts >= self.policy.max_attempts:
                self._give_up()
                return False
            delay = min(delay * self.policy.backoff_factor, self.policy.max_delay_s)
        return False

    def _give_up(self) -> None:
        reason = f"gave up after {self.reconnect_attempts} attempts; last error: {self.last_error}"
        self._set_state(SourceState.FAILED, reason)
        with self._ready:
            self._ready.notify_all()

    def _check_present(self) -> None:
        now = time.monotonic()
        if now < self._next_presence_check:
            return
        self._next_presence_check = now + _PRESENCE_CHECK_INTERVAL_S
        reason = self._missing_reason()
        if reason:
            raise SourceLost(reason)

    def _check_frozen(self, image: np.ndarray) -> None:
        """Raise SourceLost once the frames have been identical for ``frozen_after_s``: an
        unplugged USB camera or a stalled encoder can keep returning its last image."""
        if not self.frozen_after_s:
            return
        sample = image[::_FROZEN_SAMPLE_STEP, ::_FROZEN_SAMPLE_STEP]
        now = time.monotonic()
        if self._frozen_sample is None or not np.array_equal(sample, self._frozen_sample):
            self._frozen_sample = sample.copy()
            self._frozen_since = now
            return
        if now - self._frozen_since >= self.frozen_after_s:
            raise SourceLost(f"frozen: identical frames for {now - self._frozen_since:.1f} s")
