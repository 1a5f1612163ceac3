"""Boxes and labels drawn on a copy of a frame, and JPEG encoding, for the HTTP and snapshot
outputs. Called only when an image is actually wanted, never per frame on the hot path."""

from __future__ import annotations

import cv2
import numpy as np

from device.errors import ToolkitError
from device.types import Detection

# A fixed palette, BGR, indexed by class id, so one class keeps one colour everywhere.
_PALETTE = (
    (56, 56, 255),
    (151, 157, 255),
    (31, 112, 255),
    (29, 178, 255),
    (49, 210, 207),
    (10, 249, 72),
    (23, 204, 146),
    (134, 219, 61),
    (52, 147, 26),
    (187, 212, 0),
    (168, 153, 44),
    (255, 194, 0),
    (147, 69, 52),
    (255, 115, 100),
    (236, 24, 0),
    (255, 56, 132),
    (133, 0, 82),
    (255, 56, 203),
    (200, 149, 255),
    (199, 55, 255),
)


def class_colour(class_id: int) -> tuple[int, int, int]:
    return _PALETTE[class_id % len(_PALETTE)]


def draw_detections(image: np.ndarray, detections: list[Detection]) -> np.ndarray:
    """A copy of the BGR image with each detection's box and "label score" drawn on it."""
    canvas = image.copy()
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    font_scale = max(0.4, min(height, width) / 900)

    for det in detections:
        colour = class_colour(det.class_id)
        x1, y1 = round(det.x1), round(det.y1)
        x2, y2 = round(det.x2), round(det.y2)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)

        # The label sits above the box, or inside it when the box touches the top edge.
        text = f"{det.label} {det.score:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(
            text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness
        )
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + text_w + 2, top + text_h + baseline + 2), colour, -1)
        cv2.putText(
            canvas,
            text,
            (x1 + 1, top + text_h + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    return canvas


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR uint8 image."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ToolkitError(
            f"OpenCV could not encode a frame of shape {image.shape} and dtype {image.dtype} as "
            f"JPEG: expected a (height, width, 3) uint8 BGR image"
        )
    return buffer.tobytes()
