"""Whether the daemon is doing its job, for /health, MQTT stats and the systemd watchdog.

Healthy means: the detection loop is running and a frame went through it within
``max_frame_age`` seconds.  The pipeline calls ``frame_done`` per frame (cheap: one clock read)
and the outputs call ``status()`` whenever they are asked.
"""

from __future__ import annotations

import threading
import time


class Health:
    """Thread-safe liveness of the detection loop."""

    def __init__(self, max_frame_age: float = 10.0, *, clock=time.monotonic) -> None:
        self.max_frame_age = max_frame_age
        self._clock = clock
        self._lock = threading.Lock()
        self._state = "starting"
        self._since = clock()
        self._last_frame: float | None = None
        self._frames = 0
        self._reason = ""
        self._problem = ""  # set while something is wrong although frames may still arrive

    def set_state(self, state: str, reason: str = "") -> None:
        """``starting``, ``running``, ``stopping`` or ``stopped``, with a reason when useful."""
        with self._lock:
            self._state, self._since, self._reason = state, self._clock(), reason

    def set_problem(self, problem: str) -> None:
        """Mark the daemon unhealthy for ``problem`` (e.g. a stuck stage); "" clears it."""
        with self._lock:
            self._problem = problem

    def frame_done(self) -> None:
        now = self._clock()
        with self._lock:
            self._last_frame = now
            self._frames += 1

    @property
    def ok(self) -> bool:
        return self.status()["healthy"]

    def status(self) -> dict:
        """``{"healthy": bool, "state": ..., "reason": ..., "frames": n, "last_frame_age": s}``."""
        now = self._clock()
        with self._lock:
            state, since, reason, last, frames, problem = (
                self._state,
                self._since,
                self._reason,
                self._last_frame,
                self._frames,
                self._problem,
            )
        # Before the first frame, the time since the loop started is the age that counts.
        age = now - (last if last is not None else since)
        ok = state == "running" and age <= self.max_frame_age and not problem
        if state == "running" and problem:
            reason = problem
        elif state == "running" and not ok and not reason:
            reason = f"no frame for {age:.1f} s (limit {self.max_frame_age:g} s)"
        return {
            "healthy": ok,
            "state": state,
            "reason": reason,
            "frames": frames,
            "last_frame_age": round(now - last, 3) if last is not None else None,
        }

    __call__ = status  # outputs take a ``health() -> dict`` callable
