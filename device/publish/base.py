"""The small interface every output implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from device.types import FrameResult

# The daemon's health report, given to the MQTT and HTTP outputs: a JSON-ready dict whose
# "healthy" key is true while the pipeline works (HTTP /health answers 503 otherwise).
HealthProvider = Callable[[], dict]


class Sink(ABC):
    """Receives every frame's result.  ``publish`` is called from the detection loop and must
    return quickly: slow work (network, disk) belongs in the sink's own thread or queue."""

    name: str = "sink"
    # Set by the daemon before start(): an output whose reader is gone for good (stdout piped
    # into a program that exited) asks the whole daemon to stop, as a Unix filter would.
    stop_daemon: Callable[[str], None] | None = None

    def start(self) -> None:  # noqa: B027 (optional hook: a no-op unless a sink needs it)
        """Connect or open files; called once before the first result."""

    @abstractmethod
    def publish(self, result: FrameResult) -> None:
        """Hand over one frame's result without blocking."""

    def close(self) -> None:  # noqa: B027 (optional hook: a no-op unless a sink needs it)
        """Flush and release; called once on every exit path."""

    def status(self) -> dict:
        return {"name": self.name}

    def __enter__(self) -> Sink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
