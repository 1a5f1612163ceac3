"""Object events from per-frame detections: which frames make new, update and end."""

from __future__ import annotations

from device.publish.config import MqttEventsConfig
from device.publish.events import ObjectTracker, box_iou
from device.types import Detection


def det(x: float, label: str = "person", score: float = 0.8) -> Detection:
    return Detection(x, 0.0, x + 10.0, 10.0, score, 0 if label == "person" else 2, label)


def kinds(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["type"], e["after"]["label"]) for e in events]


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_flicker_is_never_announced_and_steady_objects_are():
    tracker = ObjectTracker(MqttEventsConfig(min_frames=3, end_after=1.0))
    assert tracker.update("cam", 0.0, [det(0), det(50, "car")]) == []
    assert tracker.update("cam", 0.1, [det(1)]) == []
    assert kinds(tracker.update("cam", 0.2, [det(2)])) == [("new", "person")]
    # The person ends; the car seen once is forgotten without a word.
    assert kinds(tracker.update("cam", 1.5, [])) == [("end", "person")]
    assert tracker.counts() == {}


def test_two_objects_keep_their_ids_while_moving():
    tracker = ObjectTracker(MqttEventsConfig(min_frames=1, update_interval=0.0))
    first = tracker.update("cam", 0.0, [det(0), det(100)])
    ids = {e["after"]["box"][0]: e["after"]["id"] for e in first}
    assert len(set(ids.values())) == 2

    moved = tracker.update("cam", 0.1, [det(104), det(4)])  # order swapped, both moved
    assert {e["type"] for e in moved} == {"update"}
    by_x = {e["after"]["box"][0]: e["after"]["id"] for e in moved}
    assert by_x[4.0] == ids[0.0] and by_x[104.0] == ids[100.0]
    assert tracker.counts() == {"person": 2}


def test_updates_are_rate_limited_and_need_a_change():
    tracker = ObjectTracker(MqttEventsConfig(min_frames=1, update_interval=1.0))
    tracker.update("cam", 0.0, [det(0, score=0.5)])
    assert tracker.update("cam", 0.5, [det(5, score=0.9)]) == []  # too soon
    (update,) = tracker.update("cam", 1.1, [det(5, score=0.9)])
    assert update["type"] == "update"
    assert update["before"]["top_score"] == 0.5 and update["after"]["top_score"] == 0.9
    assert tracker.update("cam", 2.5, [det(5, score=0.9)]) == []  # nothing changed


def test_end_after_time_unseen_and_end_all():
    tracker = ObjectTracker(MqttEventsConfig(min_frames=1, end_after=1.0, labels=["person"]))
    tracker.update("cam", 0.0, [det(0), det(50, "car")])
    assert tracker.counts() == {"person": 1}, "a label not tracked was counted"
    assert tracker.expire(0.9) == []
    (end,) = tracker.expire(1.1)
    assert end["type"] == "end" and end["after"]["end_time"] == 0.0
    assert end["after"]["active"] is False and end["before"]["active"] is True

    tracker.update("cam", 5.0, [det(0)])
    assert kinds(tracker.end_all()) == [("end", "person")]
    assert tracker.counts() == {}


def test_labels_become_single_safe_topic_levels():
    from device.publish.mqtt import MqttTopics

    topics = MqttTopics("cam")

    assert topics.objects("person") == "cam/objects/person"
    assert topics.objects("cell phone") == "cam/objects/cell_phone"
    assert topics.snapshot("a/b+c#") == "cam/snapshot/a_b_c_"
