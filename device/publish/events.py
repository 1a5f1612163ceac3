"""Turns per-frame detections into per-object events: new, update, end, each with the object's
state before and after, the shape Frigate users know.

Objects are followed from frame to frame by greedy box overlap (IoU) within one label. That is
enough for events and counts; it is not a re-identification tracker.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from device.publish.config import MqttEventsConfig
from device.types import Detection

# An update is worth sending when the box moved this much (IoU with the last sent box below it).
_MOVED_IOU = 0.8


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class TrackedObject:
    """One object followed across frames."""

    id: str
    label: str
    class_id: int
    source: str
    box: tuple[float, float, float, float]
    score: float
    top_score: float
    start_time: float
    last_seen: float
    frames: int = 1
    announced: bool = False
    end_time: float | None = None
    last_event_time: float = 0.0
    sent: dict = field(default_factory=dict)  # the state in the last event sent

    def state(self) -> dict:
        x1, y1, x2, y2 = self.box
        return {
            "id": self.id,
            "label": self.label,
            "class_id": self.class_id,
            "source": self.source,
            "score": round(self.score, 4),
            "top_score": round(self.top_score, 4),
            "box": [round(v, 1) for v in self.box],
            "area": round(max(0.0, x2 - x1) * max(0.0, y2 - y1), 1),
            "start_time": round(self.start_time, 3),
            "frame_time": round(self.last_seen, 3),
            "end_time": None if self.end_time is None else round(self.end_time, 3),
            "frames": self.frames,
            "active": self.end_time is None,
        }


class ObjectTracker:
    """Keeps the objects in view and says which events their changes make."""

    def __init__(self, config: MqttEventsConfig) -> None:
        self.config = config
        self._labels = set(config.labels) if config.labels is not None else None
        self._objects: list[TrackedObject] = []

    def update(self, source: str, timestamp: float, detections: list[Detection]) -> list[dict]:
        """Match one frame's detections to known objects; the events this frame causes."""
        wanted = [d for d in detections if self._labels is None or d.label in self._labels]
        events: list[dict] = []

        matched = self._match(wanted)
        for obj, det in matched:
            event = self._follow(obj, det, timestamp)
            if event is not None:
                events.append(event)

        seen = {id(det) for _, det in matched}
        for det in wanted:
            if id(det) not in seen:
                obj = self._start(source, det, timestamp)
                if obj.frames >= self.config.min_frames:
                    events.append(self._announce(obj, timestamp))

        events.extend(self.expire(timestamp))
        return events

    def expire(self, now: float) -> list[dict]:
        """End every object unseen for ``end_after`` seconds."""
        events = []
        for obj in [o for o in self._objects if now - o.last_seen > self.config.end_after]:
            self._objects.remove(obj)
            if obj.announced:
                events.append(self._end(obj))
        return events

    def end_all(self) -> list[dict]:
        """End every object, e.g. when the daemon stops, so no consumer keeps a stale one."""
        events = [self._end(o) for o in self._objects if o.announced]
        self._objects.clear()
        return events

    def counts(self) -> dict[str, int]:
        """Announced objects in view, per label."""
        counts: dict[str, int] = {}
        for obj in self._objects:
            if obj.announced:
                counts[obj.label] = counts.get(obj.label, 0) + 1
        return counts

    def _match(self, detections: list[Detection]) -> list[tuple[TrackedObject, Detection]]:
        """Greedy pairing by highest IoU, same label only, above the configured overlap."""
        candidates = []
        for obj in self._objects:
            for det in detections:
                if det.label != obj.label:
                    continue
                overlap = box_iou(obj.box, (det.x1, det.y1, det.x2, det.y2))
                if overlap >= self.config.iou:
                    candidates.append((overlap, obj, det))
        candidates.sort(key=lambda c: c[0], reverse=True)

        pairs, used_objects, used_dets = [], set(), set()
        for _, obj, det in candidates:
            if id(obj) in used_objects or id(det) in used_dets:
                continue
            used_objects.add(id(obj))
            used_dets.add(id(det))
            pairs.append((obj, det))
        return pairs

    def _start(self, source: str, det: Detection, timestamp: float) -> TrackedObject:
        obj = TrackedObject(
            id=f"{timestamp:.6f}-{secrets.token_hex(3)}",
            label=det.label,
            class_id=det.class_id,
            source=source,
            box=(det.x1, det.y1, det.x2, det.y2),
            score=det.score,
            top_score=det.score,
            start_time=timestamp,
            last_seen=timestamp,
        )
        self._objects.append(obj)
        return obj

    def _follow(self, obj: TrackedObject, det: Detection, timestamp: float) -> dict | None:
        obj.box = (det.x1, det.y1, det.x2, det.y2)
        obj.score = det.score
        obj.top_score = max(obj.top_score, det.score)
        obj.last_seen = timestamp
        obj.frames += 1

        if not obj.announced:
            return self._announce(obj, timestamp) if obj.frames >= self.config.min_frames else None
        if timestamp - obj.last_event_time < self.config.update_interval:
            return None
        if not self._changed(obj):
            return None
        return self._event("update", obj, timestamp)

    @staticmethod
    def _changed(obj: TrackedObject) -> bool:
        sent = obj.sent
        if obj.top_score > sent["top_score"] + 1e-4:
            return True
        return box_iou(obj.box, tuple(sent["box"])) < _MOVED_IOU

    def _announce(self, obj: TrackedObject, timestamp: float) -> dict:
        obj.announced = True
        return self._event("new", obj, timestamp)

    def _end(self, obj: TrackedObject) -> dict:
        obj.end_time = obj.last_seen
        return self._event("end", obj, obj.last_seen)

    @staticmethod
    def _event(kind: str, obj: TrackedObject, timestamp: float) -> dict:
        after = obj.state()
        before = after if kind == "new" else obj.sent
        obj.sent = after
        obj.last_event_time = timestamp
        return {"type": kind, "before": before, "after": after}
