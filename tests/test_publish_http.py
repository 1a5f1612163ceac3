"""The HTTP output: a real server on 127.0.0.1 and a free port, asked over real sockets."""

from __future__ import annotations

import http.client
import json
import threading
import time

import cv2
import numpy as np
import pytest

from device.errors import ToolkitError
from device.publish.config import HttpConfig
from device.publish.http import HttpSink
from device.stats import RuntimeStats
from device.types import Detection, Frame, FrameResult

WIDTH, HEIGHT = 640, 360
BOX = Detection(100.0, 80.0, 300.0, 280.0, 0.87, 0, "person")


def frame_image(index: int = 0) -> np.ndarray:
    """A smooth grey gradient, so that drawn boxes stand out after JPEG compression."""
    ramp = np.linspace(60, 180, WIDTH, dtype=np.float32)
    image = np.repeat(ramp[None, :, None], HEIGHT, axis=0).repeat(3, axis=2)
    return np.ascontiguousarray((image + index % 5).astype(np.uint8))


def result(index: int = 0) -> FrameResult:
    frame = Frame(frame_image(index), index, time.time(), time.monotonic(), source="cam0")
    return FrameResult(frame, [BOX], {"inference": 0.035, "end_to_end": 0.05})


class Server:
    """An HttpSink on a free port, with a health state the test can switch."""

    def __init__(self, **settings) -> None:
        self.healthy = True
        self.stats = RuntimeStats()
        config = HttpConfig(host="127.0.0.1", port=0, **settings)
        self.sink = HttpSink(config, self.stats, health=self.health)

    def health(self) -> dict:
        return {"healthy": self.healthy, "state": "running" if self.healthy else "stalled"}

    def get(
        self, path: str, headers: dict | None = None, method: str = "GET"
    ) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.sink.port, timeout=10)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture
def server():
    running = Server()
    running.sink.start()
    yield running
    running.sink.close()


def test_health_follows_the_daemon(server):
    status, headers, body = server.get("/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"healthy": True, "state": "running"}

    server.healthy = False
    status, _, body = server.get("/health")
    assert status == 503
    assert json.loads(body)["state"] == "stalled"


def test_health_answers_head_requests_with_its_status(server):
    status, _, body = server.get("/health", method="HEAD")
    assert (status, body) == (200, b"")

    server.healthy = False
    status, _, _ = server.get("/health", method="HEAD")
    assert status == 503

    status, headers, _ = server.get("/api/stats", method="HEAD")
    assert status == 405 and headers["Allow"] == "GET"


def test_health_provider_that_raises_is_unhealthy(server):
    def broken() -> dict:
        raise RuntimeError("loop thread gone")

    server.sink.health = broken
    status, _, body = server.get("/health")
    assert status == 503
    assert "loop thread gone" in json.loads(body)["error"]


def test_metrics_and_stats_carry_recorded_values(server):
    for _ in range(3):
        server.stats.record_frame({"inference": 0.04, "end_to_end": 0.05}, ["person", "car"])
    server.stats.record_source({"frames_captured": 7, "frames_dropped": 2, "state": "streaming"})

    status, headers, body = server.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "edge_frames_processed_total 3.0" in text
    assert 'edge_detections_total{label="person"} 3.0' in text
    assert 'edge_stage_seconds_count{stage="inference"} 3.0' in text
    assert "edge_frames_dropped 2.0" in text
    assert 'edge_sink_connected{sink="http"} 1.0' in text
    status, _, alias = server.get("/api/metrics")  # Frigate's path for the same text
    assert status == 200 and "edge_frames_processed_total 3.0" in alias.decode()

    status, _, body = server.get("/api/stats")
    stats = json.loads(body)
    assert status == 200
    assert stats["frames_processed"] == 3
    assert stats["frames_captured"] == 7 and stats["frames_dropped"] == 2
    assert stats["detections"] == {"person": 3, "car": 3}
    assert stats["stage_ms_last"]["inference"] == pytest.approx(40.0)
    assert stats["health"]["healthy"] is True
    assert stats["http"]["url"] == server.sink.url


def test_latest_frame_is_annotated_and_encoded_only_on_request(server):
    status, _, _ = server.get("/api/latest.jpg")
    assert status == 503, "no frame yet must say so, not serve an empty image"

    for index in range(50):
        server.sink.publish(result(index))
    assert server.sink.latest._jpeg_version == -1, "a frame was encoded without a request"

    status, headers, body = server.get("/api/latest.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (HEIGHT, WIDTH, 3)

    # The box edge is drawn in a saturated colour over a grey frame.
    edge = image[180, 100].astype(int)
    inside = image[180, 200].astype(int)
    assert np.ptp(edge) > 80, f"no box drawn at the left edge: pixel {edge}"
    assert np.ptp(inside) < 20, f"the inside of the box changed: pixel {inside}"

    status, _, body = server.get("/api/latest.jpg?h=180")
    small = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and small.shape == (180, 320, 3)
    assert server.get("/api/latest.jpg?h=5")[0] == 400

    status, _, body = server.get("/api/latest.json")
    latest = json.loads(body)
    assert latest["frame"] == 49
    assert latest["detections"][0]["box"] == [100.0, 80.0, 300.0, 280.0]


def read_mjpeg_parts(response: http.client.HTTPResponse, count: int) -> list[np.ndarray]:
    """Read ``count`` JPEG parts from a multipart/x-mixed-replace body."""
    images = []
    while len(images) < count:
        line = response.fp.readline()
        if not line:
            break
        if line.strip() != b"--frame":
            continue
        headers = {}
        while (line := response.fp.readline().strip()) != b"":
            key, value = line.decode().split(":", 1)
            headers[key.lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        data = response.fp.read(int(headers["content-length"]))
        images.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    return images


def feed_frames(sink: HttpSink, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        index = 0
        while not stop.is_set() and index < 400:  # bounded: at most 400 frames, ~20 s
            sink.publish(result(index))
            index += 1
            stop.wait(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_mjpeg_stream_yields_frames_and_ends_on_close():
    server = Server(stream_fps=20)
    server.sink.start()
    stop = threading.Event()
    feeder = feed_frames(server.sink, stop)
    connection = http.client.HTTPConnection("127.0.0.1", server.sink.port, timeout=10)
    try:
        connection.request("GET", "/api/stream.mjpg")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "multipart/x-mixed-replace; boundary=frame"

        images = read_mjpeg_parts(response, 3)
        assert len(images) == 3
        assert all(image.shape == (HEIGHT, WIDTH, 3) for image in images)
        assert server.sink.status()["stream_clients"] == 1

        server.sink.close()
        assert response.fp.read() is not None  # returns (EOF) instead of hanging
        assert server.sink.status()["stream_clients"] == 0
    finally:
        stop.set()
        feeder.join(timeout=5)
        connection.close()
        server.sink.close()


def test_stream_clients_are_limited():
    server = Server(stream_max_clients=1, stream_max_seconds=5)
    server.sink.start()
    server.sink.publish(result())
    first = http.client.HTTPConnection("127.0.0.1", server.sink.port, timeout=10)
    try:
        first.request("GET", "/api/stream.mjpg")
        response = first.getresponse()
        assert len(read_mjpeg_parts(response, 1)) == 1

        status, headers, body = server.get("/api/stream.mjpg")
        assert status == 503 and headers["Retry-After"] == "5"
        assert "already serving 1 streams" in json.loads(body)["error"]

        # A client that goes away frees its slot at the next frame it cannot be sent.
        response.close()
        first.close()
        for index in range(1, 100):
            server.sink.publish(result(index))
            if server.sink.status()["stream_clients"] == 0:
                break
            time.sleep(0.05)
        assert server.sink.status()["stream_clients"] == 0, "the slot of a gone client was kept"
        second = http.client.HTTPConnection("127.0.0.1", server.sink.port, timeout=10)
        second.request("GET", "/api/stream.mjpg")
        assert second.getresponse().status == 200
        second.close()
    finally:
        first.close()
        server.sink.close()


def test_token_is_required_everywhere_but_health():
    server = Server(token="s3cret-token")
    server.sink.start()
    server.sink.publish(result())
    try:
        for path in ("/metrics", "/api/stats", "/api/latest.jpg", "/api/stream.mjpg", "/"):
            status, headers, _ = server.get(path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert server.get("/api/stats", {"Authorization": "Bearer wrong"})[0] == 401
        assert server.get("/api/stats?token=wrong")[0] == 401

        assert server.get("/health")[0] == 200
        assert server.get("/api/stats", {"Authorization": "Bearer s3cret-token"})[0] == 200
        assert server.get("/api/latest.jpg?token=s3cret-token")[0] == 200
    finally:
        server.sink.close()


def test_token_from_environment(monkeypatch):
    monkeypatch.setenv("EDGE_TEST_HTTP_TOKEN", "from-env")
    server = Server(token_env="EDGE_TEST_HTTP_TOKEN")
    server.sink.start()
    try:
        assert server.get("/metrics")[0] == 401
        assert server.get("/metrics", {"Authorization": "Bearer from-env"})[0] == 200
    finally:
        server.sink.close()


def test_unknown_path_is_404(server):
    status, _, body = server.get("/api/nothing")
    assert status == 404 and "/api/nothing" in json.loads(body)["error"]


def test_a_failing_endpoint_answers_500_and_the_server_goes_on(server):
    broken = result()
    broken.frame.image = None  # as_dict() and drawing fail on it
    server.sink.publish(broken)
    status, _, body = server.get("/api/latest.json")
    assert status == 500 and "internal error" in json.loads(body)["error"]
    assert server.get("/health")[0] == 200


def test_port_in_use_is_a_clear_error(server):
    taken = HttpConfig(host="127.0.0.1", port=server.sink.port)
    with pytest.raises(ToolkitError, match=f"cannot listen on 127.0.0.1:{server.sink.port}"):
        HttpSink(taken, RuntimeStats()).start()


def test_close_releases_the_port():
    server = Server()
    server.sink.start()
    port = server.sink.port
    server.sink.close()
    again = HttpSink(HttpConfig(host="127.0.0.1", port=port), RuntimeStats())
    again.start()
    again.close()
