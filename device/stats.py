"""Runtime statistics, kept as Prometheus metrics in the daemon's own registry.

The pipeline records into ``RuntimeStats``; the HTTP output renders ``registry`` for
Prometheus and ``snapshot()`` as JSON, and MQTT publishes the snapshot periodically.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("capture", "preprocess", "inference", "postprocess", "publish", "end_to_end")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class RuntimeStats:
    """Counters, gauges and latency histograms for one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.started = time.time()
        self._lock = threading.Lock()
        self._frame_times: deque[float] = deque(maxlen=120)
        self._stage_last: dict[str, float] = {}

        self.frames_processed = Counter(
            "edge_frames_processed", "Frames run through the detector", registry=self.registry
        )
        self.frames_dropped = Gauge(
            "edge_frames_dropped",
            "Frames the source dropped to stay current",
            registry=self.registry,
        )
        self.frames_captured = Gauge(
            "edge_frames_captured", "Frames the source captured", registry=self.registry
        )
        self.source_reconnects = Gauge(
            "edge_source_reconnects", "Times the source reconnected", registry=self.registry
        )
        self.source_up = Gauge(
            "edge_source_up", "1 while the source delivers frames", registry=self.registry
        )
        self.detections = Counter(
            "edge_detections", "Objects detected", ["label"], registry=self.registry
        )
        self.fps = Gauge(
            "edge_fps", "Frames processed per second, recent average", registry=self.registry
        )
        self.stage_seconds = Histogram(
            "edge_stage_seconds",
            "Time spent in each pipeline stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_errors = Counter(
            "edge_publish_errors",
            "Results an output failed to deliver",
            ["sink"],
            registry=self.registry,
        )
        self.published = Counter(
            "edge_published",
            "Messages or files an output delivered",
            ["sink"],
            registry=self.registry,
        )
        self.publish_dropped = Counter(
            "edge_publish_dropped",
            "Results or messages an output dropped (queue full, broker gone)",
            ["sink"],
            registry=self.registry,
        )
        self.sink_connected = Gauge(
            "edge_sink_connected",
            "1 while an output is connected (MQTT broker, HTTP listening)",
            ["sink"],
            registry=self.registry,
        )
        self.uptime = Gauge("edge_uptime_seconds", "Seconds since start", registry=self.registry)
        self.uptime.set_function(lambda: time.time() - self.started)

    def record_frame(self, timings: dict[str, float], labels: list[str]) -> None:
        """Count one processed frame with its per-stage timings (seconds) and labels found."""
        now = time.monotonic()
        self.frames_processed.inc()
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        for label in labels:
            self.detections.labels(label).inc()
        with self._lock:
            self._frame_times.append(now)
            self._stage_last.update(timings)
            self.fps.set(self._recent_fps())

    def record_source(self, status: dict) -> None:
        """Mirror a FrameSource.status() into the gauges."""
        self.frames_captured.set(status.get("frames_captured", 0))
        self.frames_dropped.set(status.get("frames_dropped", 0))
        self.source_reconnects.set(status.get("reconnects", 0))
        self.source_up.set(1 if status.get("state") == "streaming" else 0)

    def _recent_fps(self) -> float:
        if len(self._frame_times) < 2:
            return 0.0
        span = self._frame_times[-1] - self._frame_times[0]
        return (len(self._frame_times) - 1) / span if span > 0 else 0.0

    def snapshot(self) -> dict:
        """A JSON-ready summary for /api/stats and MQTT."""
        with self._lock:
            fps = self._recent_fps()
            stages = {k: round(v * 1000, 2) for k, v in self._stage_last.items()}
        detections = {
            sample.labels["label"]: int(sample.value)
            for metric in self.detections.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        return {
            "uptime_seconds": round(time.time() - self.started, 1),
            "frames_processed": int(self.frames_processed._value.get()),
            "frames_captured": int(self.frames_captured._value.get()),
            "frames_dropped": int(self.frames_dropped._value.get()),
            "source_reconnects": int(self.source_reconnects._value.get()),
            "fps": round(fps, 2),
            "stage_ms_last": stages,
            "detections": detections,
            "outputs": self._outputs_snapshot(),
        }

    def _outputs_snapshot(self) -> dict:
        """Per-output delivered/dropped/error counts and connection state, keyed by sink name."""
        outputs: dict[str, dict] = {}
        fields = (
            (self.published, "published"),
            (self.publish_dropped, "dropped"),
            (self.publish_errors, "errors"),
            (self.sink_connected, "connected"),
        )
        for metric, field_name in fields:
            for family in metric.collect():
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    entry = outputs.setdefault(sample.labels["sink"], {})
                    value = sample.value
                    entry[field_name] = bool(value) if field_name == "connected" else int(value)
        return outputs
