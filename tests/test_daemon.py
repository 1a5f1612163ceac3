"""The daemon end to end: real video decoding, real onnxruntime sessions, real signals and a
real notify socket.  Bounded by --max-frames or a signal; every wait has a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from device.config import load_config
from device.daemon import Daemon
from device.sdnotify import Notifier
from tests.conftest import realdata_file
from tests.constant_model import write_constant_model

REPO = Path(__file__).resolve().parent.parent
NAMES = ["person", "car"]
# cx, cy, w, h, obj, person, car in 640x640 input pixels: a person and a car.
ROWS = [[320, 320, 64, 128, 0.9, 0.9, 0.1], [100, 300, 80, 40, 0.8, 0.0, 1.0]]


@pytest.fixture
def constant_model(tmp_path):
    return write_constant_model(tmp_path / "constant.onnx", ROWS, NAMES)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        image = np.full((432, 768, 3), 40 * index, dtype=np.uint8)
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)
    return folder


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(0.2)
    yield path, server
    server.close()


def drain(server: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines += server.recv(4096).decode().split("\n")
        except TimeoutError:
            return lines


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "last line was cut off"
    return [json.loads(line) for line in text.splitlines()]


def daemon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "device.cli", "run", *args]


def test_daemon_runs_a_folder_to_the_end_and_writes_exact_results(
    tmp_path, constant_model, image_folder, notify_socket
):
    path, server = notify_socket
    out = tmp_path / "out.jsonl"
    config_file = tmp_path / "daemon.yaml"
    config_file.write_text(
        f"model: {{path: {constant_model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {image_folder}}}\n"
        "detect: {conf: 0.5, class_conf: {car: 0.85}}\n"
        f"outputs: {{jsonl: {{enabled: true, path: {out}}}, http: {{enabled: false}}}}\n"
    )

    daemon = Daemon(load_config(config_file), notifier=Notifier({"NOTIFY_SOCKET": str(path)}))
    assert daemon.run() == 0

    results = read_jsonl(out)
    assert [r["frame"] for r in results] == [0, 1, 2]
    assert all((r["width"], r["height"]) == (768, 432) for r in results)
    # The car (0.8) misses its own 0.85 threshold; the person maps back through the letterbox.
    assert results[0]["detections"] == [
        {"label": "person", "class_id": 0, "score": 0.81, "box": [345.6, 139.2, 422.4, 292.8]}
    ]
    messages = drain(server)
    assert "READY=1" in messages and "STOPPING=1" in messages
    assert daemon.health.status()["state"] == "stopped"


def test_sigint_stops_a_looping_source_cleanly(tmp_path, constant_model, image_folder):
    out = tmp_path / "out.jsonl"
    config_file = tmp_path / "daemon.yaml"
    config_file.write_text(
        f"model: {{path: {constant_model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {image_folder}, loop: true, fps: 50}}\n"
        f"outputs: {{jsonl: {{enabled: true, path: {out}}}, http: {{port: 0}}}}\n"
    )
    process = subprocess.Popen(
        daemon_command(str(config_file)), cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_lines(out, 10, process)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 0, stderr
    assert "Stopping: received SIGINT" in stderr
    assert "Source images closed" in stderr
    results = read_jsonl(out)
    assert len(results) >= 10
    assert [r["frame"] for r in results] == list(range(len(results)))


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"daemon exited early with {process.returncode}")
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} JSON lines after {timeout} s")


@pytest.mark.realdata
def test_daemon_finds_people_in_the_real_video(tmp_path, yolov5n_onnx):
    video = realdata_file("video/one-by-one-person-detection.mp4")
    out = tmp_path / "out.jsonl"
    command = daemon_command(
        "--model", str(yolov5n_onnx), "--source", str(video), "--max-frames", "90",
        "--classes", "person", "--jsonl", str(out), "--http-port", "0",
    )  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    results = read_jsonl(out)
    assert [r["frame"] for r in results] == list(range(90))  # a file: no frame skipped
    detections = [d for r in results for d in r["detections"]]
    frames_with_people = [r["frame"] for r in results if r["detections"]]
    # The first person walks in at about frame 60 of this video.
    assert len(frames_with_people) >= 20
    assert min(frames_with_people) >= 40
    assert {d["label"] for d in detections} == {"person"}
    assert all(d["score"] >= 0.25 for d in detections)
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 432
    # A walking person is taller than wide.
    tall = [d for d in detections if d["box"][3] - d["box"][1] > d["box"][2] - d["box"][0]]
    assert len(tall) >= 0.8 * len(detections)
    assert "reached --max-frames 90" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.realdata
def test_sigterm_mid_stream_exits_0_with_systemd_notifications(
    tmp_path, yolov5n_onnx, notify_socket
):
    video = realdata_file("video/one-by-one-person-detection.mp4")
    path, server = notify_socket
    out = tmp_path / "out.jsonl"
    config_file = tmp_path / "daemon.yaml"
    config_file.write_text(
        f"model: {{path: {yolov5n_onnx}}}\n"
        f"source: {{type: file, path: {video}, loop: true}}\n"
        f"outputs: {{jsonl: {{enabled: true, path: {out}}}, http: {{port: 0}}}}\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    process = subprocess.Popen(
        daemon_command(str(config_file)), cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_lines(out, 15, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 0, stderr
    messages = drain(server)
    assert messages[0] == "READY=1"
    assert "WATCHDOG=1" in messages
    assert "STOPPING=1" in messages
    assert "Stopping: received SIGTERM" in stderr
    assert "one-by-one-person-detection.mp4 closed" in stderr
    results = read_jsonl(out)  # flushed and whole
    assert len(results) >= 15


def test_daemon_drives_mqtt_http_and_snapshots_and_says_offline_on_sigterm(
    tmp_path, constant_model, image_folder, mqtt_broker, mqtt_prefix
):
    from tests.broker import MqttRecorder, free_port

    http_port = free_port()
    snapshots = tmp_path / "snaps"
    recorder = MqttRecorder(mqtt_broker, f"{mqtt_prefix}/#")
    # A looping folder, paced like a camera, so the daemon runs until it is told to stop.
    config_file = tmp_path / "daemon.yaml"
    config_file.write_text(
        f"model: {{path: {constant_model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {image_folder}, loop: true, fps: 20}}\n"
    )
    command = daemon_command(
        str(config_file), "--frame-policy", "every",
        "--mqtt-host", mqtt_broker.host, "--mqtt-port", str(mqtt_broker.port),
        "--mqtt-prefix", mqtt_prefix, "--http-port", str(http_port),
        "--snapshots", str(snapshots),
    )  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        recorder.wait_for(
            lambda m: m.topic == f"{mqtt_prefix}/available" and m.payload == "online", timeout=30
        )
        (event,) = recorder.wait_for(lambda m: m.topic == f"{mqtt_prefix}/events", timeout=30)
        health = http_json(http_port, "/health")
        stats = http_json(http_port, "/api/stats")
        wait_for_file(snapshots, "*.jpg", process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        recorder.wait_for(
            lambda m: m.topic == f"{mqtt_prefix}/available" and m.payload == "offline", timeout=10
        )
    finally:
        process.kill()
        recorder.close()

    assert process.returncode == 0, stderr
    assert json.loads(event.payload)["type"] == "new"
    assert json.loads(event.payload)["after"]["label"] in NAMES
    assert health["healthy"] is True and health["state"] == "running"
    assert stats["frames_processed"] > 0
    assert list(snapshots.glob("*.json"))


def http_json(port: int, path: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def wait_for_file(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"daemon exited early with {process.returncode}")
        if folder.exists() and list(folder.glob(pattern)):
            return
        time.sleep(0.05)
    pytest.fail(f"no {pattern} in {folder} after {timeout} s")


@pytest.mark.realdata
def test_daemon_on_a_live_h264_stream_keeps_up_and_stops_at_max_frames(tmp_path, yolov5n_onnx):
    from tests.stream_servers import ffmpeg_available, free_port, wait_listening

    if not ffmpeg_available():
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg)")
    video = realdata_file("video/one-by-one-person-detection.mp4")
    port = free_port()
    # Raw H.264 over TCP in real time, as 'rpicam-vid --inline --listen' serves it, starting
    # where the first person walks in.
    server = subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-ss", "7", "-i", str(video),
         "-t", "30", "-an", "-c:v", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264",
         f"tcp://127.0.0.1:{port}?listen=1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    command = daemon_command(
        "--model", str(yolov5n_onnx), "--source", f"tcp://127.0.0.1:{port}",
        "--max-frames", "25", "--jsonl", str(out), "--no-http",
    )  # fmt: skip
    try:
        wait_listening(port)
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
        server.wait(timeout=10)

    assert result.returncode == 0, result.stderr
    assert "newest frame only" in result.stderr  # a live source never queues stale frames
    results = read_jsonl(out)
    frames = [r["frame"] for r in results]
    assert len(frames) == 25 and frames == sorted(set(frames))
    labels = [d["label"] for r in results for d in r["detections"]]
    assert labels.count("person") >= 10


def test_startup_problems_exit_1_with_a_message_and_no_traceback(tmp_path, constant_model):
    junk_video = tmp_path / "broken.mp4"
    junk_video.write_bytes(b"\x00" * 4096)
    cases = [
        (["--model", str(tmp_path / "absent.onnx"), "--source", str(junk_video)],
         "Model file not found"),
        (["--model", str(constant_model), "--source", str(junk_video)], "broken.mp4"),
    ]  # fmt: skip
    for args, expected in cases:
        result = subprocess.run(
            daemon_command(*args, "--no-http"), cwd=REPO, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

        assert result.returncode == 1, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def folder_config(tmp_path, model, folder, outputs: str):
    path = tmp_path / "daemon.yaml"
    path.write_text(
        f"model: {{path: {model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {folder}}}\n"
        f"outputs: {outputs}\n"
    )
    return load_config(path)


def test_a_taken_port_stops_the_daemon_when_http_was_asked_for(
    tmp_path, constant_model, image_folder
):
    from device.errors import ToolkitError

    with busy_port() as holder:
        port = holder.getsockname()[1]
        outputs = f"{{http: {{port: {port}}}}}"
        config = folder_config(tmp_path, constant_model, image_folder, outputs)

        with pytest.raises(ToolkitError, match=f"cannot listen on 127.0.0.1:{port}"):
            Daemon(config, notifier=Notifier({})).run()


def test_a_taken_default_port_only_turns_http_off(
    tmp_path, constant_model, image_folder, monkeypatch
):
    import device.daemon
    from device.publish.config import HttpConfig
    from device.publish.http import HttpSink

    out = tmp_path / "out.jsonl"
    config = folder_config(
        tmp_path, constant_model, image_folder, f"{{jsonl: {{enabled: true, path: {out}}}}}"
    )
    real_build = device.daemon.build_sinks
    with busy_port() as holder:
        # The default HTTP settings, but on a port that is taken (8080 may be free or not).
        def build_with_taken_port(config, stats, health):
            sinks = [s for s in real_build(config, stats, health) if s.name != "http"]
            taken = HttpConfig(port=holder.getsockname()[1])
            return [*sinks, HttpSink(taken, stats, health=health)]

        monkeypatch.setattr(device.daemon, "build_sinks", build_with_taken_port)
        daemon = Daemon(config, notifier=Notifier({}))
        assert daemon.run() == 0

    assert [s.name for s in daemon.sinks] == ["jsonl"]
    assert len(read_jsonl(out)) == 3


def test_a_stuck_inference_stops_the_watchdog_pings_and_turns_health_red(
    tmp_path, constant_model, image_folder, notify_socket, monkeypatch
):
    import threading

    from device.infer import Detector

    path, server = notify_socket
    release = threading.Event()
    real_infer = Detector.infer

    calls = []

    def stuck_after_two(self, tensor):
        calls.append(1)
        if len(calls) > 2:
            release.wait(20)  # hangs like a wedged accelerator until the test lets go
        return real_infer(self, tensor)

    monkeypatch.setattr(Detector, "infer", stuck_after_two)
    config_file = tmp_path / "daemon.yaml"
    config_file.write_text(
        f"model: {{path: {constant_model}, intra_op_threads: 1}}\n"
        f"source: {{type: folder, path: {image_folder}, loop: true}}\n"
        "pipeline: {stall_timeout_s: 0.5, health_max_frame_age_s: 60}\n"
        "outputs: {http: {enabled: false}}\n"
    )
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    daemon = Daemon(load_config(config_file), notifier=notifier)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while "stuck" not in daemon.health.status()["reason"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status = daemon.health.status()
        drain(server)  # pings sent before the stall
        time.sleep(0.5)
        pings_while_stuck = drain(server).count("WATCHDOG=1")
    finally:
        daemon.stop("test over")
        release.set()
        runner.join(30)

    assert status["healthy"] is False
    assert status["reason"].startswith("stuck: inference for")
    assert pings_while_stuck == 0
    assert not runner.is_alive()


def test_one_stop_signalled_twice_at_once_is_not_taken_for_a_second_request(
    tmp_path, constant_model, image_folder, monkeypatch
):
    # 'timeout' sends SIGTERM to the daemon and then to its whole process group.
    config = folder_config(tmp_path, constant_model, image_folder, "{http: {enabled: false}}")
    daemon = Daemon(config, notifier=Notifier({}))
    daemon.pipeline = object()  # running: a signal asks for a clean stop
    import device.daemon as daemon_module

    clock = [1000.0]
    monkeypatch.setattr(daemon_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    daemon._on_signal(signal.SIGTERM, None)
    clock[0] += 0.001
    daemon._on_signal(signal.SIGTERM, None)  # the same stop, delivered again: no exit

    assert daemon._stop_reason == "received SIGTERM"
    clock[0] += 5.0
    with pytest.raises(SystemExit):  # a real second request, seconds later
        daemon._on_signal(signal.SIGINT, None)
