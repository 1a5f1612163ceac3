"""The detection pipeline: three threads so that capture, pre- and post-processing overlap with
inference.

    capture + preprocess  --slot (1)-->  inference  --queue (2)-->  postprocess + publish

onnxruntime releases the GIL inside ``session.run`` and OpenCV while decoding and resizing, so
the next frame is read and letterboxed while the current one is inferred, and the previous one
is decoded into detections and handed to the outputs at the same time.  Inference never waits
for input unless the source is slower than the model.

Every hand-over is bounded: memory stays flat however long the daemon runs.  With
``newest_frame`` (live sources) a prepared frame waiting for inference is replaced by a newer
one and counted as dropped, so a result is at most one camera frame older than the moment
inference started on it; the price is letterboxing frames that are then replaced (a few ms each,
at the camera's rate), which ``max_fps`` does not reduce.  Otherwise (files) the capture thread
waits, so every frame is processed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from device.health import Health
from device.infer import Detector
from device.preprocess import LetterboxTransform
from device.publish.base import Sink
from device.sources.base import FrameSource, SourceState
from device.stats import RuntimeStats
from device.types import Frame, FrameResult

log = logging.getLogger(__name__)

_POLL = 0.2  # seconds a blocked thread waits before looking at the stop flag again
_END = None  # put into the queues after the last frame of a finite source


@dataclass
class _Job:
    frame: Frame
    tensor: np.ndarray
    transform: LetterboxTransform
    timings: dict[str, float] = field(default_factory=dict)
    rows: np.ndarray | None = None


class _StageClock:
    """When a stage started its current step, so the supervisor can see a stuck stage."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.busy_since: float | None = None

    def begin(self) -> float:
        self.busy_since = time.monotonic()
        return self.busy_since

    def end(self) -> float:
        started, self.busy_since = self.busy_since, None
        return time.monotonic() - (started or time.monotonic())


class Pipeline:
    """Runs frames from one source through one detector to the outputs until told to stop,
    the source ends, or ``max_frames`` frames have been published."""

    def __init__(
        self,
        source: FrameSource,
        detector: Detector,
        sinks: Sequence[Sink],
        *,
        stats: RuntimeStats,
        health: Health,
        newest_frame: bool,
        max_frames: int | None = None,
        read_timeout: float = 0.5,
        max_fps: float | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.detector = detector
        self.sinks = list(sinks)
        self.stats = stats
        self.health = health
        self.newest_frame = newest_frame
        self.max_frames = max_frames
        self.read_timeout = read_timeout
        self.min_interval = 1.0 / max_fps if max_fps else 0.0
        self.on_done = on_done  # called once from the stage that finishes, e.g. to wake a waiter

        self.frames_published = 0
        self.frames_skipped = 0  # prepared frames replaced by newer ones (newest_frame only)
        self.outcome = ""  # "ended", "max_frames", "stopped", "source_failed" or "error"
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started_at = 0.0  # time.monotonic() at start()

        self._stop = threading.Event()
        self._to_infer: queue.Queue[_Job | None] = queue.Queue(maxsize=1)
        self._to_post: queue.Queue[_Job | None] = queue.Queue(maxsize=2)
        self._clocks = {n: _StageClock(n) for n in ("capture", "inference", "postprocess")}
        self._threads: list[threading.Thread] = []
        self._sink_failures: dict[str, int] = {}

    # Lifecycle

    def start(self) -> None:
        self.started_at = time.monotonic()
        for name, target in (
            ("capture", self._capture_loop),
            ("inference", self._inference_loop),
            ("postprocess", self._postprocess_loop),
        ):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        log.info(
            "Pipeline running: %s, %s%s%s",
            self.source.name,
            "newest frame only" if self.newest_frame else "every frame",
            f", at most {1 / self.min_interval:g} fps" if self.min_interval else "",
            f", stopping after {self.max_frames} frames" if self.max_frames else "",
        )

    def stop(self, outcome: str = "stopped") -> None:
        """Ask every stage to finish; the first reason given is kept."""
        self._finish(outcome)

    def join(self, timeout: float = 10.0) -> list[str]:
        """Wait for the stage threads; return the names of those still running."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def stalled(self, limit: float) -> list[tuple[str, float]]:
        """Stages busy with one step for longer than ``limit`` seconds, and for how long."""
        now = time.monotonic()
        stuck = []
        for clock in self._clocks.values():
            since = clock.busy_since
            if since is not None and now - since > limit:
                stuck.append((clock.name, now - since))
        return stuck

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def _finish(self, outcome: str, error: BaseException | None = None) -> None:
        if not self._stop.is_set():
            self.outcome = outcome
            self.error = error
            self._stop.set()
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def _guard(self, loop):
        def run() -> None:
            try:
                loop()
            except BaseException as exc:  # a dead stage must end the daemon, not hang it
                log.debug("Stage %s failed", threading.current_thread().name, exc_info=True)
                self._finish("error", exc)

        return run

    # Stages

    def _capture_loop(self) -> None:
        clock = self._clocks["capture"]
        while not self._stop.is_set():
            started = clock.begin()
            frame = self.source.read(self.read_timeout)
            read_seconds = time.monotonic() - started
            if frame is None:
                clock.end()
                if self.source.finished:
                    self._put_end()
                    return
                continue

            tensor, transform = self.detector.preprocess(frame.image)
            preprocess_seconds = clock.end() - read_seconds
            timings = {"capture": read_seconds, "preprocess": preprocess_seconds}
            self._hand_to_inference(_Job(frame, tensor, transform, timings))

    def _hand_to_inference(self, job: _Job) -> None:
        if self.newest_frame:
            try:
                self._to_infer.put_nowait(job)
            except queue.Full:
                # Replace the waiting frame: a live result should be as fresh as possible.
                try:
                    self._to_infer.get_nowait()
                    self.frames_skipped += 1
                except queue.Empty:
                    pass
                self._to_infer.put_nowait(job)
            return
        self._put_blocking(self._to_infer, job)

    def _put_end(self) -> None:
        self._put_blocking(self._to_infer, _END)

    def _put_blocking(self, target: queue.Queue, item) -> None:
        while not self._stop.is_set():
            try:
                target.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self, source: queue.Queue) -> tuple[bool, _Job | None]:
        """(True, job or _END) once something arrives; (False, None) once stopped."""
        while not self._stop.is_set():
            try:
                return True, source.get(timeout=_POLL)
            except queue.Empty:
                continue
        return False, None

    def _inference_loop(self) -> None:
        clock = self._clocks["inference"]
        # Due now: the first frame runs at once and the second one interval later, not also
        # at once (a schedule starting at 0 would let two frames through back to back).
        next_due = time.monotonic()
        inferred = 0
        while True:
            if self.max_frames and inferred >= self.max_frames:
                # Enough: a frame more would only be thrown away, after seconds on a slow board.
                self._put_blocking(self._to_post, _END)
                return
            if self.min_interval:
                # Throttled: wait first, then take the newest frame prepared meanwhile.
                if self._stop.wait(max(0.0, next_due - time.monotonic())):
                    return
                next_due = max(next_due + self.min_interval, time.monotonic())
            got, job = self._get(self._to_infer)
            if not got:
                return
            if job is _END:
                self._put_blocking(self._to_post, _END)
                return
            clock.begin()
            job.rows = self.detector.infer(job.tensor)
            job.timings["inference"] = clock.end()
            inferred += 1
            job.tensor = None  # the input is no longer needed; free it before the hand-over
            self._put_blocking(self._to_post, job)

    def _postprocess_loop(self) -> None:
        clock = self._clocks["postprocess"]
        while True:
            got, job = self._get(self._to_post)
            if not got:
                return
            if job is _END:
                failed = self.source.state == SourceState.FAILED
                self._finish("source_failed" if failed else "ended")
                return
            self._publish(job, clock)
            if self.max_frames and self.frames_published >= self.max_frames:
                self._finish("max_frames")
                return

    def record_source_status(self) -> None:
        """Mirror the source's state and counters into the stats; called per frame and by the
        daemon's supervisor, so that a lost source shows while no frame arrives."""
        source_status = self.source.status()
        source_status["frames_dropped"] += self.frames_skipped  # both are dropped to stay current
        self.stats.record_source(source_status)

    def _publish(self, job: _Job, clock: _StageClock) -> None:
        clock.begin()
        detections = self.detector.postprocess(job.rows, job.transform)
        job.timings["postprocess"] = clock.end()

        # End to end: from capture to detections ready, including every wait on the way.
        job.timings["end_to_end"] = time.monotonic() - job.frame.monotonic
        result = FrameResult(job.frame, detections, job.timings)
        clock.begin()
        for sink in self.sinks:
            self._publish_to(sink, result)
        # A new dict: outputs may still be reading the result's own from their threads.
        timings = {**job.timings, "publish": clock.end()}

        self.frames_published += 1
        self.stats.record_frame(timings, [d.label for d in detections])
        self.record_source_status()
        self.health.frame_done()
        log.debug(
            "frame %d: %d detections, inference %.1f ms",
            job.frame.index,
            len(detections),
            job.timings["inference"] * 1000,
        )

    def _publish_to(self, sink: Sink, result: FrameResult) -> None:
        try:
            sink.publish(result)
        except Exception as exc:  # one broken output must not stop detection or the others
            failures = self._sink_failures.get(sink.name, 0) + 1
            self._sink_failures[sink.name] = failures
            self.stats.publish_errors.labels(sink.name).inc()
            if failures == 1 or failures % 1000 == 0:
                log.warning("Output %s failed (%d times so far): %s", sink.name, failures, exc)
