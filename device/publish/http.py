"""HTTP output: health, Prometheus metrics, stats, the latest annotated frame and an MJPEG stream.

Endpoints (GET):

- ``/health``: the daemon's health report as JSON; 200 while ``healthy`` is true, else 503.
  Never needs the token, so watchdogs and container probes can call it.
- ``/metrics`` (also ``/api/metrics``): Prometheus text from the runtime's registry.
- ``/api/stats``: ``RuntimeStats.snapshot()`` plus ``health`` and ``http`` status, as JSON.
- ``/api/latest.json``: the newest frame's result (detections, timings) as JSON.
- ``/api/latest.jpg``: the newest frame with boxes and labels; ``?h=240`` scales it to a height.
- ``/api/stream.mjpg``: the same as an MJPEG (multipart/x-mixed-replace) stream, at most
  ``stream_fps`` frames a second per client and ``stream_max_clients`` clients (503 beyond).

With a token configured (``token`` or ``token_env``), every endpoint but ``/health`` wants
``Authorization: Bearer <token>`` or ``?token=<token>`` (for browsers and ``<img>`` tags) and
answers 401 otherwise. The server listens on 127.0.0.1 unless told otherwise.

JPEG encoding is lazy: ``publish()`` only keeps a reference to the newest result; the image is
drawn and encoded when a client asks, once per frame however many clients watch.

Wiring, for the daemon::

    sink = HttpSink(config.http, stats, health=daemon.health)  # health() -> {"healthy": bool, ...}
    sink.start()   # binds (ToolkitError if the port is taken), serves in a thread
    sink.url       # e.g. http://127.0.0.1:8080, with the real port when port is 0
    sink.publish(result)  # per frame, never blocks
    sink.close()   # ends streams, stops the server
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import cv2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from device.errors import ToolkitError
from device.publish.annotate import draw_detections, encode_jpeg
from device.publish.base import HealthProvider, Sink
from device.publish.config import HttpConfig
from device.stats import RuntimeStats
from device.types import FrameResult

log = logging.getLogger(__name__)

_BOUNDARY = "frame"
_STREAM_WAIT = 0.5  # seconds a stream waits for a new frame before checking for shutdown
_CLOSE_WAIT = 3.0  # seconds close() waits for open streams to notice the shutdown


class LatestFrame:
    """The newest result, drawn and encoded to JPEG only when someone asks, once per frame."""

    def __init__(self, quality: int) -> None:
        self.quality = quality
        self._changed = threading.Condition()
        self._result: FrameResult | None = None
        self._version = 0
        self._encode_lock = threading.Lock()
        self._jpeg: bytes = b""
        self._jpeg_version = -1

    def put(self, result: FrameResult) -> None:
        with self._changed:
            self._result = result
            self._version += 1
            self._changed.notify_all()

    def wake_all(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def result(self) -> tuple[int, FrameResult | None]:
        with self._changed:
            return self._version, self._result

    def wait_newer(self, version: int, timeout: float) -> bool:
        """True once a frame newer than ``version`` exists, False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._version > version, timeout=timeout)

    def jpeg(self) -> tuple[int, bytes] | None:
        """(version, JPEG bytes) of the newest annotated frame, or None before the first."""
        version, result = self.result()
        if result is None:
            return None
        with self._encode_lock:
            if self._jpeg_version != version:
                annotated = draw_detections(result.frame.image, result.detections)
                self._jpeg = encode_jpeg(annotated, self.quality)
                self._jpeg_version = version
            return self._jpeg_version, self._jpeg


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sink: HttpSink) -> None:
        self.sink = sink
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up is routine; anything else is a bug worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("HTTP: client %s went away: %s", client_address[0], error)
        else:
            log.exception("HTTP: request from %s failed", client_address[0])


class HttpSink(Sink):
    """Serves the runtime's state over HTTP from a thread of its own."""

    name = "http"

    def __init__(
        self,
        config: HttpConfig,
        stats: RuntimeStats,
        health: HealthProvider | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.health = health
        self.token = config.resolved_token()
        self.latest = LatestFrame(config.jpeg_quality)
        self.stopping = threading.Event()
        self.stream_slots = threading.Semaphore(config.stream_max_clients)
        self._streams = 0
        self._streams_changed = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._served = stats.published.labels(self.name)
        self._listening = stats.sink_connected.labels(self.name)

    def start(self) -> None:
        """Bind and serve in a background thread; raises ToolkitError if the port is taken."""
        if self._server is not None:
            return
        cfg = self.config
        try:
            self._server = _Server((cfg.host, cfg.port), self)
        except OSError as exc:
            raise ToolkitError(
                f"HTTP: cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc}): choose "
                f"another http.port or http.host, or stop the program that holds it"
            ) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="http-server",
            daemon=True,
        )
        self._thread.start()
        self._listening.set(1)

        if self.token is None and not _is_loopback(cfg.host):
            log.warning(
                "HTTP: listening on %s without a token: anyone on the network can watch the "
                "camera; set http.token_env",
                cfg.host,
            )
        log.info("HTTP: serving on %s%s", self.url, " (token required)" if self.token else "")

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def publish(self, result: FrameResult) -> None:
        """Keep a reference to the newest result; no copy, no encoding here."""
        self.latest.put(result)

    def close(self) -> None:
        """End the streams, stop serving, release the port."""
        if self._server is None or self.stopping.is_set():
            return
        self.stopping.set()
        self.latest.wake_all()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_WAIT)
        with self._streams_changed:
            self._streams_changed.wait_for(lambda: self._streams == 0, timeout=_CLOSE_WAIT)
        self._listening.set(0)
        log.info("HTTP: stopped serving on %s", self.url)

    def status(self) -> dict:
        return {"name": self.name, "url": self.url, "stream_clients": self._streams}

    def health_report(self) -> dict:
        """The daemon's health; a provider that raises counts as unhealthy."""
        if self.health is None:
            return {"healthy": True}
        try:
            report = dict(self.health())
        except Exception as exc:
            log.warning("HTTP: the health provider failed: %s", exc)
            return {"healthy": False, "error": f"health check failed: {exc}"}
        report["healthy"] = bool(report.get("healthy", False))
        return report

    def authorized(self, header: str | None, query_token: str | None) -> bool:
        if self.token is None:
            return True
        offered = query_token or ""
        if header and header.lower().startswith("bearer "):
            offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def count_served(self) -> None:
        self._served.inc()

    def stream_opened(self) -> None:
        with self._streams_changed:
            self._streams += 1

    def stream_closed(self) -> None:
        with self._streams_changed:
            self._streams -= 1
            self._streams_changed.notify_all()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-yolo"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # A client that stops reading must not hold a thread forever.
        self.timeout = self.server.sink.config.send_timeout
        super().setup()

    def do_HEAD(self) -> None:
        """Health checkers that ask with HEAD get /health's status code without its body."""
        path = urlsplit(self.path).path.rstrip("/") or "/"
        if path != "/health":
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", "GET")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        healthy = self.server.sink.health_report()["healthy"]
        self.send_response(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        sink = self.server.sink
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path.rstrip("/") or "/"

        if path == "/health":
            report = sink.health_report()
            status = HTTPStatus.OK if report["healthy"] else HTTPStatus.SERVICE_UNAVAILABLE
            self._send_json(report, status)
            return

        token = query.get("token", [None])[0]
        if not sink.authorized(self.headers.get("Authorization"), token):
            self._send_json(
                {"error": "a bearer token is required: Authorization: Bearer <token> or ?token="},
                HTTPStatus.UNAUTHORIZED,
                extra_headers={"WWW-Authenticate": 'Bearer realm="edge-yolo"'},
            )
            return

        routes = {
            "/": self._index,
            "/metrics": self._metrics,
            "/api/metrics": self._metrics,
            "/api/stats": self._stats,
            "/api/latest.json": self._latest_json,
            "/api/latest.jpg": self._latest_jpeg,
            "/api/stream.mjpg": self._stream,
        }
        handler = routes.get(path)
        if handler is None:
            self._send_json({"error": f"no such endpoint: {path}"}, HTTPStatus.NOT_FOUND)
            return
        try:
            handler(query)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            log.exception("HTTP: %s failed", path)
            self.close_connection = True
            self._send_json({"error": "internal error; see the daemon's log"}, HTTPStatus(500))

    def _index(self, query: dict) -> None:
        endpoints = [
            "/health",
            "/metrics",
            "/api/stats",
            "/api/latest.json",
            "/api/latest.jpg",
            "/api/stream.mjpg",
        ]
        self._send_json({"endpoints": endpoints})

    def _metrics(self, query: dict) -> None:
        self._send(generate_latest(self.server.sink.stats.registry), CONTENT_TYPE_LATEST)

    def _stats(self, query: dict) -> None:
        sink = self.server.sink
        payload = sink.stats.snapshot()
        payload["health"] = sink.health_report()
        payload["http"] = sink.status()
        self._send_json(payload)

    def _latest_json(self, query: dict) -> None:
        _, result = self.server.sink.latest.result()
        if result is None:
            self._no_frame_yet()
            return
        self._send_json(result.as_dict())

    def _latest_jpeg(self, query: dict) -> None:
        sink = self.server.sink
        height = _int_param(query, "h")
        if height is not None and not 16 <= height <= 4320:
            self._send_json(
                {"error": f"h: expected a height from 16 to 4320 pixels, got {height}"},
                HTTPStatus.BAD_REQUEST,
            )
            return
        encoded = sink.latest.jpeg()
        if encoded is None:
            self._no_frame_yet()
            return
        data = encoded[1]
        if height is not None:
            data = _scaled(sink.latest, height)
        self._send(data, "image/jpeg", extra_headers={"Cache-Control": "no-store"})
        sink.count_served()

    def _stream(self, query: dict) -> None:
        sink = self.server.sink
        if not sink.stream_slots.acquire(blocking=False):
            self._send_json(
                {"error": f"already serving {sink.config.stream_max_clients} streams; try later"},
                HTTPStatus.SERVICE_UNAVAILABLE,
                extra_headers={"Retry-After": "5"},
            )
            return
        sink.stream_opened()
        try:
            self._send_stream(sink)
        finally:
            sink.stream_closed()
            sink.stream_slots.release()
            self.close_connection = True

    def _send_stream(self, sink: HttpSink) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={_BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        log.info("HTTP: MJPEG stream opened for %s", self.client_address[0])

        period = 1.0 / sink.config.stream_fps
        limit = sink.config.stream_max_seconds
        started = time.monotonic()
        version = 0
        while not sink.stopping.is_set():
            if limit and time.monotonic() - started >= limit:
                break
            if not sink.latest.wait_newer(version, timeout=_STREAM_WAIT):
                continue
            encoded = sink.latest.jpeg()
            if encoded is None or sink.stopping.is_set():
                continue
            version, data = encoded
            sent_at = time.monotonic()
            part_header = (
                f"--{_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
            )
            self.wfile.write(part_header.encode() + data + b"\r\n")
            self.wfile.flush()
            sink.count_served()
            # Frames arriving during the pause are skipped: the client always gets the newest.
            sink.stopping.wait(max(0.0, period - (time.monotonic() - sent_at)))
        log.info("HTTP: MJPEG stream closed for %s", self.client_address[0])

    def _no_frame_yet(self) -> None:
        self._send_json(
            {"error": "no frame processed yet; retry in a moment"},
            HTTPStatus.SERVICE_UNAVAILABLE,
            extra_headers={"Retry-After": "1"},
        )

    def _send_json(
        self, payload: dict, status: HTTPStatus = HTTPStatus.OK, extra_headers: dict | None = None
    ) -> None:
        body = json.dumps(payload, indent=None, separators=(",", ":")).encode()
        self._send(body, "application/json", status, extra_headers)

    def _send(
        self,
        body: bytes,
        content_type: str,
        status: HTTPStatus = HTTPStatus.OK,
        extra_headers: dict | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        # The request line may hold the token in its query: log the path only.
        path = urlsplit(getattr(self, "path", "")).path
        log.debug(
            "HTTP: %s %s %s", getattr(self, "command", "-"), path, " ".join(map(str, args[1:]))
        )


def _int_param(query: dict, key: str) -> int | None:
    values = query.get(key)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        return -1  # rejected by the range check with the usual message


def _scaled(latest: LatestFrame, height: int) -> bytes:
    """The newest annotated frame resized to ``height``, aspect kept; encoded per request."""
    _, result = latest.result()
    annotated = draw_detections(result.frame.image, result.detections)
    scale = height / annotated.shape[0]
    width = max(1, round(annotated.shape[1] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return encode_jpeg(
        cv2.resize(annotated, (width, height), interpolation=interpolation), latest.quality
    )
