"""End to end: the daemon, started through its CLI on a real video with the real yolov5n, publishes
person events to a real mosquitto, serves real values over HTTP, saves snapshots, and says
'offline' when stopped with SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest
import yaml

from tests.broker import MqttRecorder, free_port
from tests.conftest import realdata_file

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TOKEN = "e2e-token"


def get(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def wait_for_health(base: str, process: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the daemon exited before it became healthy"
        status, body = get(f"{base}/health", token=None)
        if status == 200:
            return json.loads(body)
        time.sleep(0.2)
    raise AssertionError(f"/health did not answer 200 within {timeout} s")


def test_daemon_publishes_people_over_mqtt_and_http(
    yolov5n_onnx, mqtt_broker, mqtt_prefix, tmp_path
):
    video = realdata_file("video/one-by-one-person-detection.mp4")
    port = free_port()
    snapshots = tmp_path / "snapshots"
    config = {
        "model": {"path": str(yolov5n_onnx), "intra_op_threads": 1},
        # Looping, so the daemon runs like a camera until it is told to stop.
        "source": {"type": "file", "path": str(video), "loop": True},
        "detect": {"conf": 0.4, "classes": ["person"]},
        "outputs": {
            "mqtt": {
                "enabled": True,
                "host": mqtt_broker.host,
                "port": mqtt_broker.port,
                "topic_prefix": mqtt_prefix,
                "stats_interval": 1.0,
                "detections": "with_objects",
                "detections_interval": 1.0,
            },
            "http": {"enabled": True, "host": "127.0.0.1", "port": port, "token": TOKEN},
            "snapshots": {
                "enabled": True,
                "directory": str(snapshots),
                "min_interval": 0.2,
                "max_files": 3,
            },
        },
    }
    config_path = tmp_path / "daemon.yaml"
    config_path.write_text(yaml.safe_dump(config))
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/#")
    base = f"http://127.0.0.1:{port}"

    process = subprocess.Popen(
        [sys.executable, "-c", "from device.cli import main; main()", "run", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = wait_for_health(base, process)
        assert health["state"] == "running"

        def is_event(kind: str):
            def match(message) -> bool:
                if not message.topic.endswith("/events"):
                    return False
                event = json.loads(message.payload)
                return event["type"] == kind and event["after"]["label"] == "person"

            return match

        (new,) = recorder.wait_for(is_event("new"), timeout=60)
        recorder.wait_for(lambda m: m.topic.endswith("/detections"), timeout=30)
        recorder.wait_for(
            lambda m: m.topic.endswith("/stats") and json.loads(m.payload)["frames_processed"] > 0,
            timeout=30,
        )

        status, body = get(f"{base}/api/stats")
        stats = json.loads(body)
        assert status == 200
        assert stats["frames_processed"] > 0 and stats["detections"]["person"] > 0
        assert stats["outputs"]["mqtt"]["connected"] is True
        assert stats["outputs"]["mqtt"]["published"] > 0

        status, body = get(f"{base}/metrics")
        metrics = body.decode()
        assert status == 200
        person_line = next(
            line for line in metrics.splitlines()
            if line.startswith('edge_detections_total{label="person"}')
        )  # fmt: skip
        assert float(person_line.split()[-1]) > 0
        assert get(f"{base}/metrics", token=None)[0] == 401

        status, body = get(f"{base}/api/latest.jpg")
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert status == 200 and image.shape == (432, 768, 3)

        assert wait_until_files(snapshots, "*.jpg", 1)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate(timeout=10)

    try:
        assert process.returncode == 0, stderr[-3000:]
        recorder.wait_for(lambda m: m.topic.endswith("/available") and m.payload == "offline")
    finally:
        recorder.close()

    person = json.loads(new.payload)["after"]
    assert person["box"][2] > person["box"][0] and person["score"] >= 0.4
    assert 1 <= len(list(snapshots.glob("*.jpg"))) <= 3
    sidecar = json.loads(sorted(snapshots.glob("*.json"))[-1].read_text())
    assert sidecar["triggers"] and sidecar["triggers"][0]["label"] == "person"
    assert get(f"{base}/health", token=None)[0] == 0, "the HTTP server outlived the daemon"


def wait_until_files(folder, pattern: str, count: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.exists() and len(list(folder.glob(pattern))) >= count:
            return True
        time.sleep(0.1)
    return False
