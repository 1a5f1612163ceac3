"""The MQTT output against a real mosquitto on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from device.publish.config import MqttConfig
from device.publish.mqtt import MqttSink
from device.stats import RuntimeStats
from device.types import Detection, Frame, FrameResult
from tests.broker import MosquittoBroker, MqttRecorder, make_tls_files, mosquitto_binary

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
IMAGE = np.zeros((48, 64, 3), np.uint8)  # MQTT never looks at pixels


def person(x: float, score: float = 0.8) -> Detection:
    return Detection(x, 10.0, x + 20.0, 40.0, score, 0, "person")


def result(index: int, detections: list[Detection], timestamp: float | None = None) -> FrameResult:
    stamp = time.time() if timestamp is None else timestamp
    frame = Frame(IMAGE, index, stamp, time.monotonic(), source="test-cam")
    return FrameResult(frame, detections, {"inference": 0.03})


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def sink_for(broker, prefix: str, **overrides) -> tuple[MqttSink, RuntimeStats]:
    settings = {
        "enabled": True,
        "host": broker.host,
        "port": broker.port,
        "topic_prefix": prefix,
        "stats_interval": 0,
        "reconnect_min_delay": 0.2,
        "reconnect_max_delay": 0.5,
        **overrides,
    }
    stats = RuntimeStats()
    return MqttSink(MqttConfig(**settings), stats), stats


def payloads(messages) -> list[dict]:
    return [json.loads(m.payload) for m in messages]


def test_availability_is_online_and_retained(mqtt_broker, mqtt_prefix):
    sink, stats = sink_for(mqtt_broker, mqtt_prefix)
    with sink:
        assert wait_until(lambda: sink.connected), "the sink never connected"
        # A subscriber arriving later still learns the state: the message is retained.
        late = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/available")
        try:
            (message,) = late.wait_for(lambda m: True)
            assert (message.payload, message.retain) == ("online", True)
        finally:
            late.close()
        assert stats.snapshot()["outputs"]["mqtt"]["connected"] is True


def test_object_events_counts_and_detections(mqtt_broker, mqtt_prefix):
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/#")
    sink, stats = sink_for(
        mqtt_broker,
        mqtt_prefix,
        detections="all",
        events={"min_frames": 2, "end_after": 0.3, "update_interval": 0.0},
    )
    try:
        with sink:
            assert wait_until(lambda: sink.connected)
            t0 = time.time()
            # A person walks right over three frames, then leaves; a one-frame car is noise.
            sink.publish(result(0, [person(10), Detection(0, 0, 5, 5, 0.4, 2, "car")], t0))
            sink.publish(result(1, [person(14, 0.85)], t0 + 0.05))
            sink.publish(result(2, [person(20, 0.9)], t0 + 0.10))
            sink.publish(result(3, [], t0 + 0.15))

            events = payloads(
                recorder.wait_for(lambda m: m.topic == f"{mqtt_prefix}/events", count=3)
            )
            detections = payloads(
                recorder.wait_for(lambda m: m.topic == f"{mqtt_prefix}/detections", count=4)
            )
            counts = recorder.wait_for(
                lambda m: m.topic == f"{mqtt_prefix}/objects/person", count=2
            )
    finally:
        recorder.close()

    assert [e["type"] for e in events] == ["new", "update", "end"]
    new, update, end = events
    assert new["after"]["label"] == "person" and new["after"]["frames"] == 2
    assert new["after"]["id"] == update["after"]["id"] == end["after"]["id"]
    assert update["before"]["box"] == [14.0, 10.0, 34.0, 40.0]
    assert update["after"]["box"] == [20.0, 10.0, 40.0, 40.0]
    assert update["after"]["top_score"] == pytest.approx(0.9)
    assert end["after"]["active"] is False and end["after"]["end_time"] is not None
    assert not any(e["after"]["label"] == "car" for e in events), "one-frame noise was announced"

    assert [d["frame"] for d in detections] == [0, 1, 2, 3]
    assert detections[0]["detections"][0]["label"] == "person"
    assert [c.payload for c in counts] == ["1", "0"]

    outputs = stats.snapshot()["outputs"]["mqtt"]
    assert outputs["published"] >= 3 + 4 + 2, outputs
    assert outputs.get("dropped", 0) == 0


def test_object_snapshots_are_retained_jpegs(mqtt_broker, mqtt_prefix):
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/snapshot/#")
    image = np.full((240, 320, 3), 128, np.uint8)
    sink, _ = sink_for(
        mqtt_broker,
        mqtt_prefix,
        events={"min_frames": 1, "update_interval": 0.0, "snapshot": True, "snapshot_height": 120},
    )
    try:
        with sink:
            assert wait_until(lambda: sink.connected)
            t0 = time.time()
            for index, score in enumerate((0.6, 0.5, 0.9)):  # new, worse (none), better
                frame = Frame(image, index, t0 + index * 0.1, time.monotonic(), source="cam")
                sink.publish(FrameResult(frame, [Detection(40, 40, 200, 200, score, 0, "person")]))
            snapshots = recorder.wait_for(lambda m: True, count=2)
            time.sleep(0.3)  # a third, unwanted one would arrive by now
    finally:
        recorder.close()
    assert len(recorder.messages) == 2
    assert {m.topic for m in snapshots} == {f"{mqtt_prefix}/snapshot/person"}
    pictures = [cv2.imdecode(np.frombuffer(m.data, np.uint8), cv2.IMREAD_COLOR) for m in snapshots]
    assert all(p.shape == (120, 160, 3) for p in pictures)

    late = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/snapshot/#")
    try:
        (retained,) = late.wait_for(lambda m: True)
    finally:
        late.close()
    assert retained.retain and retained.data == snapshots[-1].data


def test_stats_are_published_periodically(mqtt_broker, mqtt_prefix):
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/stats")
    sink, stats = sink_for(mqtt_broker, mqtt_prefix, stats_interval=0.3)
    sink.health = lambda: {"healthy": True, "state": "running"}
    for _ in range(3):
        stats.record_frame({"inference": 0.04}, ["person"])
    try:
        with sink:
            messages = payloads(recorder.wait_for(lambda m: True, count=3))
    finally:
        recorder.close()

    last = messages[-1]
    assert last["frames_processed"] == 3
    assert last["detections"] == {"person": 3}
    assert last["stage_ms_last"]["inference"] == pytest.approx(40.0)
    assert last["health"] == {"healthy": True, "state": "running"}
    assert last["outputs"]["mqtt"]["broker"] == f"127.0.0.1:{mqtt_broker.port}"


_DYING_PUBLISHER = """
import sys, time
from device.publish.config import MqttConfig
from device.publish.mqtt import MqttSink
from device.stats import RuntimeStats

config = MqttConfig(enabled=True, host="127.0.0.1", port=int(sys.argv[1]), topic_prefix=sys.argv[2])
sink = MqttSink(config, RuntimeStats())
sink.start()
deadline = time.monotonic() + 10
while not sink.connected and time.monotonic() < deadline:
    time.sleep(0.02)
print("connected" if sink.connected else "not connected", flush=True)
time.sleep(30)
"""


def test_last_will_says_offline_when_the_process_dies(mqtt_broker, mqtt_prefix):
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/available")
    process = subprocess.Popen(
        [sys.executable, "-c", _DYING_PUBLISHER, str(mqtt_broker.port), mqtt_prefix],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "connected"
        recorder.wait_for(lambda m: m.payload == "online")

        process.kill()  # no close(), no DISCONNECT packet: only the broker's last will
        process.wait(timeout=10)

        recorder.wait_for(lambda m: m.payload == "offline")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        recorder.close()

    late = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/available")
    try:
        (retained,) = late.wait_for(lambda m: True)
    finally:
        late.close()
    assert (retained.payload, retained.retain) == ("offline", True)


def test_close_ends_objects_and_says_offline(mqtt_broker, mqtt_prefix):
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/#")
    sink, _ = sink_for(mqtt_broker, mqtt_prefix, events={"min_frames": 1, "end_after": 60})
    try:
        sink.start()
        assert wait_until(lambda: sink.connected)
        sink.publish(result(0, [person(10)]))
        recorder.wait_for(lambda m: m.topic.endswith("/events"))
        sink.close()

        recorder.wait_for(
            lambda m: m.topic.endswith("/events") and json.loads(m.payload)["type"] == "end"
        )
        available = recorder.wait_for(lambda m: m.topic.endswith("/available"), count=2)
    finally:
        recorder.close()

    assert [m.payload for m in available] == ["online", "offline"]
    messages = [m.topic for m in recorder.messages]
    assert messages.index(f"{mqtt_prefix}/available", 1) > messages.index(
        f"{mqtt_prefix}/events"
    ), "offline must come after the last events"
    assert not sink.connected


def test_broker_restart_never_blocks_and_publishing_resumes(private_mqtt_broker, mqtt_prefix):
    broker = private_mqtt_broker
    sink, stats = sink_for(
        broker,
        mqtt_prefix,
        detections="all",
        max_queued=50,
        events={"min_frames": 1, "end_after": 60},
    )
    with sink:
        assert wait_until(lambda: sink.connected)

        broker.stop()
        assert wait_until(lambda: not sink.connected), "the sink did not notice the broker died"

        # 200 frames, each with a new person somewhere else: 200 'new' events and 200
        # per-frame messages while nobody can receive them.
        started = time.monotonic()
        for index in range(200):
            sink.publish(result(index, [person(100.0 * index)]))
        loop_seconds = time.monotonic() - started
        assert wait_until(lambda: sink.status()["inbox"] == 0)

        dropped = stats.snapshot()["outputs"]["mqtt"]["dropped"]
        # Per-frame messages are dropped while away, events kept up to max_queued (oldest out).
        assert dropped >= 200 + (200 - 50), dropped
        assert sink.status()["backlog"] <= 50

        published_before = stats.snapshot()["outputs"]["mqtt"]["published"]
        broker.start()
        assert wait_until(lambda: sink.connected, timeout=15), "no reconnect after restart"
        recorder = MqttRecorder(broker, f"{mqtt_prefix}/#")
        try:
            # The fresh broker lost its retained messages: the sink sends them again.
            recorder.wait_for(lambda m: m.topic.endswith("/available") and m.payload == "online")
            assert wait_until(lambda: sink.status()["backlog"] == 0)
            # The 50 events kept through the outage went out, plus 'online' and the counts.
            assert wait_until(
                lambda: stats.snapshot()["outputs"]["mqtt"]["published"] >= published_before + 51
            )

            sink.publish(result(500, [person(50.0)]))
            (after,) = recorder.wait_for(
                lambda m: m.topic.endswith("/detections") and json.loads(m.payload)["frame"] == 500
            )
        finally:
            recorder.close()

    assert json.loads(after.payload)["detections"][0]["label"] == "person"
    # Not a pass/fail timing: shows that 200 calls took no broker round trips.
    print(f"200 publish() calls with the broker down took {loop_seconds * 1000:.1f} ms")


def test_start_with_no_broker_returns_at_once(mqtt_prefix):
    from tests.broker import free_port

    sink, stats = sink_for(
        type("Nowhere", (), {"host": "127.0.0.1", "port": free_port()}), mqtt_prefix
    )
    sink.start()
    try:
        for index in range(20):
            sink.publish(result(index, [person(10)]))
        assert not sink.connected
    finally:
        sink.close()
    assert stats.snapshot()["outputs"]["mqtt"]["connected"] is False


def test_tls_with_password_from_the_environment(tmp_path, mqtt_prefix, monkeypatch, caplog):
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    try:
        tls = make_tls_files(tmp_path)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    broker = MosquittoBroker(tmp_path, tls=tls, users={"cam": "s3cret"})
    broker.start()
    monkeypatch.setenv("EDGE_TEST_MQTT_PASSWORD", "s3cret")
    secure = {"username": "cam", "tls": {"ca_file": str(tls.ca)}}
    try:
        sink, stats = sink_for(
            broker, mqtt_prefix, password_env="EDGE_TEST_MQTT_PASSWORD", **secure
        )
        with sink:
            assert wait_until(lambda: sink.connected), broker.log_path.read_text()[-2000:]
            # 'online' went out with QoS 1, so the broker acknowledged it.
            assert wait_until(lambda: stats.snapshot()["outputs"]["mqtt"]["published"] >= 1)

        wrong, _ = sink_for(broker, mqtt_prefix, password="wrong", **secure)
        with caplog.at_level("WARNING", logger="device.publish.mqtt"), wrong:
            assert wait_until(lambda: "refused the connection" in caplog.text, timeout=10)
            assert not wrong.connected
        assert "wrong" not in caplog.text, "the password was logged"
    finally:
        broker.stop()


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"hostname": "x"}, "Extra inputs are not permitted"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"topic_prefix": "cams/#"}, "without wildcards"),
        ({"reconnect_min_delay": 10, "reconnect_max_delay": 2}, "larger than"),
        ({"password": "secret"}, "needs a username"),
        ({"events": {"min_frames": 0}}, "greater than or equal to 1"),
        ({"tls": {"cert_file": "client.crt"}}, "cert_file and key_file go together"),
    ],
)
def test_config_rejects_bad_settings(settings, expected):
    with pytest.raises(ValidationError, match=expected):
        MqttConfig(**settings)


def test_password_from_a_missing_environment_variable_is_a_clear_error(monkeypatch):
    from device.errors import ConfigError

    monkeypatch.delenv("EDGE_TEST_MQTT_PASSWORD", raising=False)
    config = MqttConfig(username="cam", password_env="EDGE_TEST_MQTT_PASSWORD")
    with pytest.raises(ConfigError, match="EDGE_TEST_MQTT_PASSWORD"):
        MqttSink(config, RuntimeStats())
