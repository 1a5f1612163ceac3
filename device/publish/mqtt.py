"""MQTT output through paho-mqtt 2.x.

Topics, under ``topic_prefix`` (default ``edge_yolo``):

- ``<prefix>/available``: ``online`` / ``offline``, retained; ``offline`` is also the last will,
  so the broker announces it when the device dies or loses the network.
- ``<prefix>/events``: one JSON message per object event, ``{"type": "new"|"update"|"end",
  "before": {...}, "after": {...}}``; the state holds id, label, class_id, source, score,
  top_score, box (x1, y1, x2, y2 frame pixels), area, start_time, frame_time, end_time, frames.
- ``<prefix>/objects/<label>``: retained count of that label's objects in view, on change.
- ``<prefix>/snapshot/<label>``: optional retained JPEG (``events.snapshot``) of the frame with
  the object's box, sent when an object is new and when a better-scoring view of it comes.
- ``<prefix>/detections``: optional per-frame ``FrameResult.as_dict()`` messages.
- ``<prefix>/stats``: ``RuntimeStats.snapshot()`` plus ``health``, every ``stats_interval`` s
  and on every (re)connect.

``publish()`` only puts a small summary of the frame (no image, unless object snapshots are
on; then the queue holds at most 8 frames) into a bounded in-memory queue; a worker thread
makes the messages and paho's own network thread sends them and reconnects with a growing
delay. While the broker is away, events and counts wait in a backlog of at most
``max_queued`` messages (oldest dropped); per-frame detections, stats and snapshots are
dropped, since they are stale by the time the broker is back. Every drop is
counted in ``edge_publish_dropped_total{sink="mqtt"}``.

Wiring, for the daemon::

    sink = MqttSink(config.mqtt, stats, health=daemon.health)  # health() -> dict
    sink.start()   # returns at once; connects in the background
    sink.publish(result)  # per frame, never blocks
    sink.close()   # ends objects in view, sends 'offline', disconnects
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device.errors import ConfigError
from device.publish.annotate import draw_detections, encode_jpeg
from device.publish.base import HealthProvider, Sink
from device.publish.config import MqttConfig
from device.publish.events import ObjectTracker
from device.stats import RuntimeStats
from device.types import Detection, FrameResult

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(f"{__name__}.paho")

_INBOX_SIZE = 256  # frames waiting for the worker; the loop is far slower than the worker
_INBOX_SIZE_WITH_IMAGES = 8  # when summaries hold frames (for snapshots), memory decides
_WORKER_TICK = 0.2  # seconds between the worker's housekeeping passes


@dataclass(frozen=True)
class MqttTopics:
    prefix: str

    @property
    def available(self) -> str:
        return f"{self.prefix}/available"

    @property
    def events(self) -> str:
        return f"{self.prefix}/events"

    @property
    def detections(self) -> str:
        return f"{self.prefix}/detections"

    @property
    def stats(self) -> str:
        return f"{self.prefix}/stats"

    def objects(self, label: str) -> str:
        return f"{self.prefix}/objects/{topic_level(label)}"

    def snapshot(self, label: str) -> str:
        return f"{self.prefix}/snapshot/{topic_level(label)}"


def topic_level(label: str) -> str:
    """A class name as one topic level: '/' would split it, '+' and '#' are wildcards, and a
    space ("cell phone") makes the topic awkward to subscribe to from a shell."""
    return re.sub(r"[\s/+#]+", "_", label.strip()) or "_"


@dataclass(frozen=True)
class _Outgoing:
    topic: str
    payload: str | bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class _FrameSummary:
    """What the worker needs from a frame: no image, so the queue stays small."""

    source: str
    timestamp: float
    detections: list[Detection]
    message: dict | None  # FrameResult.as_dict() when per-frame messages are on
    image: np.ndarray | None  # the frame, only when object snapshots are on


class MqttSink(Sink):
    """Publishes availability, object events, counts, detections and stats to a broker."""

    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        stats: RuntimeStats,
        health: HealthProvider | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.health = health
        self.topics = MqttTopics(config.topic_prefix)
        self.client_id = config.client_id or f"edge-yolo-{socket.gethostname()}-{os.getpid()}"

        inbox_size = _INBOX_SIZE_WITH_IMAGES if config.events.snapshot else _INBOX_SIZE
        self._inbox: queue.Queue[_FrameSummary] = queue.Queue(maxsize=inbox_size)
        self._backlog: deque[_Outgoing] = deque()
        self._tracker = ObjectTracker(config.events)
        self._sent_counts: dict[str, int] = {}
        self._last_detections_time = float("-inf")
        self._connected = threading.Event()
        self._reconnected = threading.Event()  # tells the worker to resend retained state
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._outage_logged = False

        self._dropped = stats.publish_dropped.labels(self.name)
        self._published = stats.published.labels(self.name)
        self._errors = stats.publish_errors.labels(self.name)
        self._connected_gauge = stats.sink_connected.labels(self.name)
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
        )
        # paho reports routine reconnect noise at error level; our own messages carry the
        # lifecycle, so paho's go to debug for diagnosis.
        client.on_log = _log_paho
        client.will_set(self.topics.available, "offline", qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=cfg.reconnect_min_delay, max_delay=cfg.reconnect_max_delay
        )
        client.connect_timeout = cfg.connect_timeout
        # A backstop: we only hand messages over while connected, so paho's queue stays short.
        client.max_queued_messages_set(cfg.max_queued)

        if cfg.username:
            client.username_pw_set(cfg.username, cfg.resolved_password())
        if cfg.tls is not None:
            self._configure_tls(client)

        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client

    def _configure_tls(self, client: paho.Client) -> None:
        tls = self.config.tls
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, key)
            if path is not None and not path.is_file():
                raise ConfigError(
                    f"mqtt.tls.{key}: expected a readable file, found nothing at {path}: "
                    f"fix the path or remove the setting"
                )
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
        )
        client.tls_insecure_set(tls.insecure)

    # Lifecycle.

    def start(self) -> None:
        """Begin connecting in the background and start the worker; returns at once."""
        if self._started:
            return
        self._started = True
        cfg = self.config
        log.info(
            "MQTT: publishing to %s:%d under %s/ as %s%s",
            cfg.host,
            cfg.port,
            cfg.topic_prefix,
            self.client_id,
            " (TLS)" if cfg.tls else "",
        )
        self._connected_gauge.set(0)
        self._client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)
        self._client.loop_start()
        self._worker = threading.Thread(target=self._run, name="mqtt-publisher", daemon=True)
        self._worker.start()

    def publish(self, result: FrameResult) -> None:
        """Queue one frame's summary for the worker; drops it (counted) when the queue is full."""
        if not self._started or self._closed:
            return
        message = result.as_dict() if self.config.detections != "off" else None
        summary = _FrameSummary(
            source=result.frame.source,
            timestamp=result.frame.timestamp,
            detections=list(result.detections),
            message=message,
            image=result.frame.image if self.config.events.snapshot else None,
        )
        try:
            self._inbox.put_nowait(summary)
        except queue.Full:
            self._dropped.inc()

    def close(self) -> None:
        """Flush what is queued, end objects in view, send 'offline' and disconnect."""
        if not self._started or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.config.close_timeout

        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=max(0.1, deadline - time.monotonic()))

        if self._connected.is_set():
            info = self._client.publish(self.topics.available, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("MQTT: could not confirm the 'offline' message: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected_gauge.set(0)
        log.info("MQTT: disconnected from %s:%d", self.config.host, self.config.port)

    def status(self) -> dict:
        return {
            "name": self.name,
            "broker": f"{self.config.host}:{self.config.port}",
            "connected": self._connected.is_set(),
            "backlog": len(self._backlog),
            "inbox": self._inbox.qsize(),
        }

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # paho callbacks, run in paho's network thread.

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # Said once: paho keeps retrying, and a wrong password stays wrong.
            if not self._outage_logged:
                log.warning(
                    "MQTT: broker %s:%d refused the connection: %s; check mqtt.username, the "
                    "password and the broker's ACL",
                    self.config.host,
                    self.config.port,
                    reason_code,
                )
                self._outage_logged = True
            return
        log.info("MQTT: connected to %s:%d", self.config.host, self.config.port)
        self._outage_logged = False
        client.publish(self.topics.available, "online", qos=1, retain=True)
        self._connected.set()
        self._reconnected.set()
        self._connected_gauge.set(1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self._connected_gauge.set(0)
        if not self._closed:
            log.warning("MQTT: lost the broker (%s); reconnecting in the background", reason_code)

    def _on_connect_fail(self, client, userdata) -> None:
        # Retries repeat every few seconds: say it once per outage, then only at debug.
        if not self._outage_logged:
            log.warning(
                "MQTT: cannot reach %s:%d; retrying every %g-%g s",
                self.config.host,
                self.config.port,
                self.config.reconnect_min_delay,
                self.config.reconnect_max_delay,
            )
            self._outage_logged = True
        else:
            log.debug("MQTT: connect attempt to %s:%d failed", self.config.host, self.config.port)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._published.inc()

    # The worker thread: turns frames into messages and hands them to paho.

    def _run(self) -> None:
        next_stats = time.monotonic() + self.config.stats_interval
        while True:
            try:
                summary = self._inbox.get(timeout=_WORKER_TICK)
            except queue.Empty:
                summary = None
                if self._stop.is_set():
                    break
            try:
                if summary is not None:
                    self._handle_frame(summary)
                else:
                    self._queue_events(self._tracker.expire(time.time()))
                if self._reconnected.is_set():
                    self._reconnected.clear()
                    self._resend_state()
                    next_stats = time.monotonic() + self.config.stats_interval
                elif self.config.stats_interval > 0 and time.monotonic() >= next_stats:
                    self._queue_stats()
                    next_stats = time.monotonic() + self.config.stats_interval
                self._flush()
            except Exception:  # one bad message must not end publishing
                log.exception("MQTT: failed to publish a message")
                self._errors.inc()

        self._queue_events(self._tracker.end_all())
        self._flush()

    def _handle_frame(self, summary: _FrameSummary) -> None:
        if self.config.events.enabled or self.config.counts:
            events = self._tracker.update(summary.source, summary.timestamp, summary.detections)
            self._queue_events(events)
            if summary.image is not None:
                self._queue_snapshots(events, summary.image)
        if summary.message is not None and self._wants_detections(summary):
            self._last_detections_time = summary.timestamp
            self._queue(self.topics.detections, summary.message, volatile=True)

    def _wants_detections(self, summary: _FrameSummary) -> bool:
        if self.config.detections == "with_objects" and not summary.detections:
            return False
        return summary.timestamp - self._last_detections_time >= self.config.detections_interval

    def _queue_events(self, events: list[dict]) -> None:
        if self.config.events.enabled:
            for event in events:
                self._queue(self.topics.events, event)
        if self.config.counts and events:
            self._queue_counts(self._tracker.counts())

    def _queue_counts(self, counts: dict[str, int]) -> None:
        for label in sorted(set(counts) | set(self._sent_counts)):
            count = counts.get(label, 0)
            if self._sent_counts.get(label) != count:
                self._sent_counts[label] = count
                self._queue(self.topics.objects(label), count, retain=True)

    def _queue_snapshots(self, events: list[dict], image: np.ndarray) -> None:
        """A JPEG of the frame with the object's box, for new objects and better views."""
        for event in events:
            after = event["after"]
            better = event["type"] == "update" and after["top_score"] > event["before"]["top_score"]
            if event["type"] != "new" and not better:
                continue
            if not self._connected.is_set():
                self._dropped.inc()  # stale once the broker is back: not worth encoding
                continue
            box = Detection(*after["box"], after["score"], after["class_id"], after["label"])
            annotated = draw_detections(image, [box])
            height = self.config.events.snapshot_height
            width = max(1, round(annotated.shape[1] * height / annotated.shape[0]))
            scaled = cv2.resize(annotated, (width, height), interpolation=cv2.INTER_AREA)
            jpeg = encode_jpeg(scaled, self.config.events.snapshot_quality)
            self._queue(self.topics.snapshot(after["label"]), jpeg, retain=True, volatile=True)

    def _queue_stats(self) -> None:
        payload = self.stats.snapshot()
        payload["outputs"].setdefault(self.name, {}).update(self.status())
        if self.health is not None:
            try:
                payload["health"] = self.health()
            except Exception as exc:  # the stats message is still worth sending
                payload["health"] = {"healthy": False, "error": str(exc)}
        self._queue(self.topics.stats, payload, volatile=True)

    def _resend_state(self) -> None:
        """After a (re)connect: counts again (a restarted broker forgot them), fresh stats."""
        for label, count in sorted(self._sent_counts.items()):
            self._queue(self.topics.objects(label), count, retain=True)
        if self.config.stats_interval > 0:
            self._queue_stats()

    def _queue(self, topic: str, payload, *, retain: bool = False, volatile: bool = False) -> None:
        """Add a message to the backlog; volatile ones are dropped while the broker is away."""
        if volatile and not self._connected.is_set():
            self._dropped.inc()
            return
        if not isinstance(payload, str | bytes):
            payload = json.dumps(payload, separators=(",", ":"))
        self._backlog.append(_Outgoing(topic, payload, self.config.qos, retain))
        while len(self._backlog) > self.config.max_queued:
            self._backlog.popleft()
            self._dropped.inc()

    def _flush(self) -> None:
        """Hand the backlog to paho, oldest first, while the broker is there."""
        while self._backlog and self._connected.is_set():
            message = self._backlog[0]
            info = self._client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                return  # keep it; the connection went away under us
            self._backlog.popleft()
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                self._dropped.inc()
            elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._errors.inc()
                log.debug("MQTT: publish to %s failed: %s", message.topic, info.rc)


def _log_paho(client, userdata, level, message) -> None:
    _paho_log.debug("paho: %s", message)
