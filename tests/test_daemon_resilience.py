"""The daemon as a process, riding out failures it will meet in the field: the camera stream
drops and comes back, the MQTT broker restarts.  Real parts throughout (an HTTP MJPEG server
decoded by FFmpeg, a real mosquitto, real onnxruntime); every wait has a deadline and every
process is killed on the way out."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.constant_model import write_constant_model

REPO = Path(__file__).resolve().parent.parent
NAMES = ["person", "car"]
# cx, cy, w, h, obj, person, car in 640x640 input pixels: one person on every frame.
ROWS = [[320, 320, 64, 128, 0.9, 0.9, 0.1]]
DEADLINE = 20.0  # seconds any one condition may take on a loaded 2-core machine


@pytest.fixture
def constant_model(tmp_path):
    return write_constant_model(tmp_path / "constant.onnx", ROWS, NAMES)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        image = np.full((96, 128, 3), 60 * index, dtype=np.uint8)
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)
    return folder


def start_daemon(config_file: Path, log_file: Path) -> subprocess.Popen:
    # stderr to a file: a pipe nobody reads during the run could fill up and block the daemon.
    with open(log_file, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "device.cli", "run", str(config_file)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def stop_daemon(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


def get_json(port: int, path: str) -> tuple[int, dict]:
    """(HTTP status, JSON body); /health answers 503 with a body when unhealthy."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = DEADLINE):
    """Poll ``condition`` (returning a truthy value when met) until the deadline; fail if the
    daemon dies meanwhile.  Connection errors count as 'not yet' (the server may be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"daemon exited with {process.returncode} while waiting for {what}")
        try:
            value = condition()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout} s")


def frames_processed(port: int) -> int:
    return get_json(port, "/api/stats")[1]["frames_processed"]


def stream_setup(tmp_path: Path, model: Path):
    """(HTTP port, MJPEG camera not yet started, daemon config reading it)."""
    from tests.stream_servers import MjpegServer, free_port

    http_port = free_port()
    camera = MjpegServer(fps=20)
    config_file = tmp_path / "daemon.yaml"
    # Short timeouts so that a loss is noticed, and reported, within seconds.
    config_file.write_text(
        f"model: {{path: {model}, intra_op_threads: 1}}\n"
        f"source: {{type: stream, url: '{camera.url}', read_timeout_s: 2, open_timeout_s: 5,\n"
        "  reconnect: {initial_delay_s: 0.2, max_delay_s: 0.5}}\n"
        "pipeline: {health_max_frame_age_s: 3}\n"
        f"outputs: {{http: {{port: {http_port}}}}}\n"
    )
    return http_port, camera, config_file


def test_stream_cut_and_restored_the_daemon_reconnects_in_the_same_process(
    tmp_path, constant_model
):
    http_port, camera, config_file = stream_setup(tmp_path, constant_model)
    log_file = tmp_path / "daemon.log"
    camera.start()
    process = start_daemon(config_file, log_file)
    try:
        pid = process.pid
        wait_until(lambda: frames_processed(http_port) >= 10, process, "10 frames")
        healthy_before = wait_until(
            lambda: (r := get_json(http_port, "/health"))[0] == 200 and r, process, "HTTP 200"
        )

        camera.cut()
        unhealthy = wait_until(
            lambda: (r := get_json(http_port, "/health"))[0] == 503 and r, process, "HTTP 503"
        )
        stats_down = get_json(http_port, "/api/stats")[1]
        metrics_down = http_text(http_port, "/metrics")

        camera.restore()
        stats_back = wait_until(
            lambda: (
                (s := get_json(http_port, "/api/stats")[1])["frames_processed"]
                >= stats_down["frames_processed"] + 10
                and s
            ),
            process,
            "10 more frames after the restore",
        )
        healthy_after = wait_until(
            lambda: (r := get_json(http_port, "/health"))[0] == 200 and r, process, "HTTP 200"
        )
        metrics_back = http_text(http_port, "/metrics")
        alive_before_stop = process.poll() is None and process.pid == pid

        exit_code = stop_daemon(process)
    finally:
        process.kill()
        process.wait(timeout=10)
        camera.cut()
    log = log_file.read_text()

    assert exit_code == 0, log
    assert alive_before_stop  # one process throughout: the daemon itself recovered
    assert healthy_before[0] == 200 and healthy_before[1]["state"] == "running"
    assert stats_down["source_reconnects"] == 0

    # The loss: /health turns red, naming the missing frames; no restart happened.
    _, report = unhealthy
    assert report["healthy"] is False and report["state"] == "running"
    assert "no frame for" in report["reason"]
    assert metric_value(metrics_down, "edge_source_reconnects") == 0

    # The recovery: exactly one reconnect, frames flowing and counted again, green again.
    assert stats_back["source_reconnects"] == 1
    assert metric_value(metrics_back, "edge_source_reconnects") == 1
    assert metric_value(metrics_back, "edge_source_up") == 1
    assert stats_back["detections"]["person"] == stats_back["frames_processed"]
    assert healthy_after[1]["healthy"] is True
    assert healthy_after[1]["frames"] > stats_down["frames_processed"]

    # The source's own account of it, logged once per change.
    assert "streaming -> reconnecting" in log
    assert "connected again, waiting for frames" in log
    assert "reconnecting -> streaming" in log
    assert "Stopping: received SIGTERM" in log
    assert "Traceback" not in log


def http_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def test_source_up_metric_drops_to_0_while_the_stream_is_lost(tmp_path, constant_model):
    http_port, camera, config_file = stream_setup(tmp_path, constant_model)
    log_file = tmp_path / "daemon.log"
    camera.start()
    process = start_daemon(config_file, log_file)
    try:
        wait_until(lambda: frames_processed(http_port) >= 5, process, "5 frames")
        camera.cut()
        wait_until(lambda: get_json(http_port, "/health")[0] == 503, process, "HTTP 503")
        # By now the source has said 'streaming -> reconnecting' (read_timeout_s 2 < 3).
        wait_until(lambda: "-> reconnecting" in log_file.read_text(), process, "the loss logged")
        source_up = metric_value(http_text(http_port, "/metrics"), "edge_source_up")
        exit_code = stop_daemon(process)
    finally:
        process.kill()
        process.wait(timeout=10)
        camera.cut()

    assert exit_code == 0, log_file.read_text()
    assert source_up == 0


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled metric in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the /metrics output")


def test_broker_restart_detection_goes_on_and_publishing_resumes(
    tmp_path, constant_model, image_folder, private_mqtt_broker, mqtt_prefix
):
    from tests.broker import MqttRecorder, free_port

    broker = private_mqtt_broker
    http_port = free_port()
    config_file = tmp_path / "daemon.yaml"
    # A looping folder paced like a camera, so the daemon runs until it is told to stop.
    config_file.write_text(
        f"model: {{path: {constant_model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {image_folder}, loop: true, fps: 20}}\n"
        "outputs:\n"
        f"  http: {{port: {http_port}}}\n"
        f"  mqtt: {{enabled: true, host: {broker.host}, port: {broker.port},\n"
        f"    topic_prefix: '{mqtt_prefix}', stats_interval: 0.5, keepalive: 5,\n"
        "    reconnect_min_delay: 0.2, reconnect_max_delay: 1, close_timeout: 5}\n"
    )
    available = f"{mqtt_prefix}/available"
    stats_topic = f"{mqtt_prefix}/stats"
    log_file = tmp_path / "daemon.log"
    before = MqttRecorder(broker, f"{mqtt_prefix}/#")
    after = None
    process = start_daemon(config_file, log_file)
    try:
        before.wait_for(lambda m: m.topic == available and m.payload == "online", DEADLINE)
        before.wait_for(lambda m: m.topic == stats_topic, DEADLINE)

        broker.stop()
        disconnected_at = wait_until(
            lambda: (
                not mqtt_output(http_port).get("connected", True)
                and (True, frames_processed(http_port))
            ),
            process,
            "the MQTT output to notice the broker is gone",
        )[1]
        # Detection does not wait for the broker: frames keep coming while it is away.
        while_down = wait_until(
            lambda: (n := frames_processed(http_port)) >= disconnected_at + 20 and n,
            process,
            "20 frames with the broker down",
        )
        still_down = not mqtt_output(http_port).get("connected", True)

        # The restarted broker kept nothing (no persistence): whatever a new subscriber hears,
        # the daemon sent after the restart, the retained 'online' included.
        broker.start()
        after = MqttRecorder(broker, f"{mqtt_prefix}/#")
        after.wait_for(lambda m: m.topic == available and m.payload == "online", DEADLINE)
        (fresh_stats,) = after.wait_for(
            lambda m: (
                m.topic == stats_topic and json.loads(m.payload)["frames_processed"] > while_down
            ),
            DEADLINE,
        )
        reconnected = wait_until(
            lambda: mqtt_output(http_port).get("connected"), process, "MQTT connected again"
        )

        exit_code = stop_daemon(process)
        after.wait_for(lambda m: m.topic == available and m.payload == "offline", 10)
    finally:
        process.kill()
        process.wait(timeout=10)
        before.close()
        if after is not None:
            after.close()
    log = log_file.read_text()

    assert exit_code == 0, log
    assert still_down  # the counts above were made with no broker to talk to
    assert reconnected is True
    stats = json.loads(fresh_stats.payload)
    assert stats["health"]["healthy"] is True
    assert stats["detections"]["person"] == stats["frames_processed"]
    assert stats["outputs"]["mqtt"]["published"] > 0
    assert "Traceback" not in log


def mqtt_output(port: int) -> dict:
    return get_json(port, "/api/stats")[1]["outputs"].get("mqtt", {})
