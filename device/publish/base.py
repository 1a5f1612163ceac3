"""The small interface every output implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

from device.types import FrameResult


class Sink(ABC):
    """Receives every frame's result.  ``publish`` is called from the detection loop and must
    return quickly: slow work (network, disk) belongs in the sink's own thread or queue."""

    name: str = "sink"

    def start(self) -> None:
        """Connect or open files; called once before the first result."""

    @abstractmethod
    def publish(self, result: FrameResult) -> None:
        """Hand over one frame's result without blocking."""

    def close(self) -> None:
        """Flush and release; called once on every exit path."""

    def status(self) -> dict:
        return {"name": self.name}

    def __enter__(self) -> Sink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
