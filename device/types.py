"""Data passed between the runtime's stages.

Frames are always BGR, uint8, shape (height, width, 3), C-contiguous: the layout OpenCV uses.
Boxes are always x1, y1, x2, y2 in the pixels of the frame they were found in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    """One captured image and where it came from."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    index: int  # counts frames delivered by this source, from 0
    timestamp: float  # wall-clock seconds (time.time()) at capture
    monotonic: float  # time.monotonic() at capture, for latency measurements
    source: str = ""


@dataclass(frozen=True)
class Detection:
    """One detected object, in frame pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float  # objectness x class probability
    class_id: int
    label: str

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "class_id": self.class_id,
            "score": round(self.score, 4),
            "box": [round(v, 1) for v in (self.x1, self.y1, self.x2, self.y2)],
        }


@dataclass
class FrameResult:
    """What the pipeline found in one frame, with per-stage timings in seconds."""

    frame: Frame
    detections: list[Detection]
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        height, width = self.frame.image.shape[:2]
        return {
            "source": self.frame.source,
            "frame": self.frame.index,
            "timestamp": round(self.frame.timestamp, 3),
            "width": width,
            "height": height,
            "detections": [d.as_dict() for d in self.detections],
            "timings_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
        }
