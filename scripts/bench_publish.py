"""What the outputs cost the detection loop, next to the per-frame budget of the reference.

Starts a real mosquitto on 127.0.0.1 (from tests/broker.py), the HTTP server on a free port and
a snapshot folder in a temporary directory, then times ``publish()`` of each output on a
768x432 frame with three detections, and the on-request work (annotate + JPEG encode) that the
HTTP output does instead of per frame. The baseline is Ultralytics YOLOv5 ``detect.py`` running
yolov5n ONNX on a 768x432 video on a 2-core x86 machine: about 50 ms a frame end to end
(20 frames/s), of which about 1 ms NMS (see the field notes).

Usage: .venv/bin/python scripts/bench_publish.py [--frames 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device.publish.config import HttpConfig, MqttConfig, SnapshotConfig
from device.publish.http import HttpSink
from device.publish.mqtt import MqttSink
from device.publish.snapshots import SnapshotSink
from device.stats import RuntimeStats
from device.types import Detection, Frame, FrameResult
from tests.broker import MosquittoBroker

BASELINE_FRAME_MS = 50.0  # detect.py, yolov5n ONNX, 768x432, 2-core x86: ~20 frames/s
BASELINE_NMS_MS = 1.0


def results(count: int) -> list[FrameResult]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (432, 768, 3), dtype=np.uint8)
    frames = []
    for index in range(count):
        shift = float(index % 50)
        detections = [
            Detection(100 + shift, 80, 220 + shift, 380, 0.88, 0, "person"),
            Detection(400 - shift, 200, 600 - shift, 330, 0.75, 2, "car"),
            Detection(650, 50, 700, 120, 0.41, 0, "person"),
        ]
        frame = Frame(image, index, time.time(), time.monotonic(), source="bench")
        frames.append(FrameResult(frame, detections, {"inference": 0.04}))
    return frames


def time_publish(sink, frames: list[FrameResult], pause: float = 0.0) -> list[float]:
    """Microseconds per publish() call; ``pause`` seconds between calls, not timed."""
    costs = []
    for result in frames:
        started = time.perf_counter()
        sink.publish(result)
        costs.append((time.perf_counter() - started) * 1e6)
        if pause:
            time.sleep(pause)
    return costs


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="frames to publish per output")
    args = parser.parse_args()
    frames = results(args.frames)
    rows = []

    with tempfile.TemporaryDirectory() as workdir:
        broker = MosquittoBroker(Path(workdir))
        broker.start()
        try:
            config = MqttConfig(
                enabled=True, host=broker.host, port=broker.port, detections="all", qos=1
            )
            stats = RuntimeStats()
            with MqttSink(config, stats) as sink:
                wait_until(lambda: sink.connected)
                # One frame a millisecond: 50 times the reference's frame rate.
                costs = time_publish(sink, frames, pause=0.001)
                rows.append(("mqtt publish() (events + per-frame, QoS 1)", costs))
                wait_until(lambda: sink.status()["inbox"] == 0 and sink.status()["backlog"] == 0)
            mqtt_out = stats.snapshot()["outputs"]["mqtt"]
        finally:
            broker.stop()

        http = HttpSink(HttpConfig(port=0), RuntimeStats())
        http.start()
        try:
            rows.append(("http publish() (keeps a reference)", time_publish(http, frames)))
            encodes = []
            for result in frames[:100]:
                http.publish(result)
                started = time.perf_counter()
                with urllib.request.urlopen(f"{http.url}/api/latest.jpg", timeout=10) as reply:
                    reply.read()
                encodes.append((time.perf_counter() - started) * 1e6)
            rows.append(("http GET latest.jpg (annotate + encode, on request)", encodes))
        finally:
            http.close()

        snap_config = SnapshotConfig(
            enabled=True, directory=Path(workdir) / "snaps", min_interval=1.0
        )
        with SnapshotSink(snap_config, RuntimeStats()) as snaps:
            rows.append(("snapshots publish() (min_interval 1 s)", time_publish(snaps, frames)))

    print(
        f"{len(frames)} frames of 768x432 with 3 detections; baseline: detect.py "
        f"{BASELINE_FRAME_MS:.0f} ms/frame, NMS {BASELINE_NMS_MS:.0f} ms\n"
    )
    print(f"| {'what':52} | median µs | p99 µs | median / frame budget | median / NMS |")
    print(f"|{'-' * 54}|-----------|--------|-----------------------|--------------|")
    for name, costs in rows:
        median = statistics.median(costs)
        p99 = sorted(costs)[int(len(costs) * 0.99) - 1]
        of_frame = median / (BASELINE_FRAME_MS * 1000)
        of_nms = median / (BASELINE_NMS_MS * 1000)
        print(f"| {name:52} | {median:9.1f} | {p99:6.0f} | {of_frame:21.5f} | {of_nms:12.4f} |")
    print(
        f"\nMQTT fed one frame a millisecond: delivered {mqtt_out.get('published', 0)} "
        f"messages, dropped {mqtt_out.get('dropped', 0)}"
    )


if __name__ == "__main__":
    main()
