"""The threaded pipeline with a scripted source and a fixed-output model: ordering, frame
policies, bounds, failures.  No timing is asserted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from device.health import Health
from device.infer import Detector, SessionConfig
from device.pipeline import Pipeline
from device.publish.base import Sink
from device.sources.base import FrameSource, SourceState
from device.stats import RuntimeStats
from device.types import Frame
from tests.constant_model import write_constant_model

NAMES = ["person", "car"]
ROWS = [[320, 320, 64, 128, 0.9, 0.9, 0.1]]  # one person, in every frame


class ScriptedSource(FrameSource):
    """Delivers ``count`` frames, then ends (finite) or waits (live)."""

    def __init__(self, count: int, *, live: bool = False, gate: threading.Event | None = None):
        super().__init__()
        self.name = "scripted"
        self.count = count
        self.live = live
        self.gate = gate  # when set, each read waits for it (to hold the source still)
        self.closed = False

    def open(self) -> None:
        self._set_state(SourceState.STREAMING)

    def read(self, timeout: float) -> Frame | None:
        if self.gate is not None and not self.gate.wait(timeout):
            return None
        if self.frames_captured >= self.count:
            if not self.live:
                self._set_state(SourceState.ENDED)
            else:
                time.sleep(min(timeout, 0.01))
            return None
        index = self.frames_captured
        self.frames_captured += 1
        image = np.full((240, 320, 3), index % 256, dtype=np.uint8)
        return Frame(image, index, time.time(), time.monotonic(), self.name)

    def close(self) -> None:
        self.closed = True


class FailingSource(ScriptedSource):
    def read(self, timeout: float) -> Frame | None:
        if self.frames_captured >= 3:
            raise RuntimeError("camera on fire")
        return super().read(timeout)


class RecordingSink(Sink):
    name = "recording"

    def __init__(self, delay: float = 0.0) -> None:
        self.frames: list[int] = []
        self.labels: list[list[str]] = []
        self.delay = delay

    def publish(self, result) -> None:
        self.frames.append(result.frame.index)
        self.labels.append([d.label for d in result.detections])
        if self.delay:
            time.sleep(self.delay)


class BrokenSink(Sink):
    name = "broken"

    def publish(self, result) -> None:
        raise OSError("disk full")


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    model = write_constant_model(tmp_path_factory.mktemp("m") / "c.onnx", ROWS, NAMES)
    return Detector(model, session_config=SessionConfig(intra_op_threads=1))


def run(pipeline: Pipeline, timeout: float = 30.0) -> None:
    pipeline.start()
    assert pipeline.done.wait(timeout), "pipeline did not finish"
    assert pipeline.join(timeout) == []


def make(detector, source, sinks, **kwargs) -> Pipeline:
    return Pipeline(
        source,
        detector,
        sinks,
        stats=kwargs.pop("stats", RuntimeStats()),
        health=kwargs.pop("health", Health()),
        newest_frame=kwargs.pop("newest_frame", False),
        read_timeout=0.05,
        **kwargs,
    )


def test_every_frame_of_a_finite_source_is_published_in_order(detector):
    sink = RecordingSink()
    stats = RuntimeStats()
    pipeline = make(detector, ScriptedSource(25), [sink], stats=stats)
    run(pipeline)

    assert pipeline.outcome == "ended"
    assert sink.frames == list(range(25))
    assert all(labels == ["person"] for labels in sink.labels)
    snapshot = stats.snapshot()
    assert snapshot["frames_processed"] == 25
    assert snapshot["detections"] == {"person": 25}
    assert set(snapshot["stage_ms_last"]) >= {"capture", "preprocess", "inference", "end_to_end"}


def test_max_frames_stops_after_exactly_that_many(detector):
    sink = RecordingSink()
    pipeline = make(detector, ScriptedSource(1000), [sink], max_frames=7)
    run(pipeline)

    assert pipeline.outcome == "max_frames"
    assert sink.frames == list(range(7))


def test_newest_frame_policy_skips_frames_a_slow_consumer_cannot_take(detector):
    # The sink is slow, so frames pile up: only the newest waiting one may go through.
    sink = RecordingSink(delay=0.05)
    pipeline = make(detector, ScriptedSource(60), [sink], newest_frame=True)
    run(pipeline)

    assert pipeline.outcome == "ended"
    assert pipeline.frames_skipped > 0
    assert len(sink.frames) + pipeline.frames_skipped == 60
    assert sink.frames == sorted(sink.frames)
    assert sink.frames[-1] == 59  # the last frame is never the one thrown away


def test_every_frame_policy_waits_for_a_slow_consumer(detector):
    sink = RecordingSink(delay=0.02)
    pipeline = make(detector, ScriptedSource(20), [sink], newest_frame=False)
    run(pipeline)

    assert sink.frames == list(range(20))
    assert pipeline.frames_skipped == 0


def test_a_failing_output_is_counted_and_the_others_still_get_every_frame(detector):
    sink = RecordingSink()
    stats = RuntimeStats()
    pipeline = make(detector, ScriptedSource(10), [BrokenSink(), sink], stats=stats)
    run(pipeline)

    assert sink.frames == list(range(10))
    assert stats.snapshot()["outputs"]["broken"]["errors"] == 10


def test_a_failing_stage_ends_the_pipeline_with_its_error(detector):
    pipeline = make(detector, FailingSource(100), [RecordingSink()])
    run(pipeline)

    assert pipeline.outcome == "error"
    assert "camera on fire" in str(pipeline.error)


def test_stop_ends_a_live_source_that_never_finishes(detector):
    sink = RecordingSink()
    health = Health()
    health.set_state("running")
    pipeline = make(detector, ScriptedSource(5, live=True), [sink], health=health)
    pipeline.start()
    deadline = time.monotonic() + 30
    while len(sink.frames) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)

    pipeline.stop()
    assert pipeline.join(10) == []
    assert pipeline.outcome == "stopped"
    assert sink.frames == list(range(5))
    assert health.status()["frames"] == 5


def test_a_stage_waiting_for_input_is_not_reported_as_stalled(detector):
    gate = threading.Event()  # never set: the source has no frames
    pipeline = make(detector, ScriptedSource(5, gate=gate), [RecordingSink()])
    pipeline.start()
    time.sleep(0.2)

    assert pipeline.stalled(limit=1.0) == []
    pipeline.stop()
    assert pipeline.join(10) == []


def test_max_fps_spaces_out_inference(detector):
    sink = RecordingSink()
    pipeline = make(detector, ScriptedSource(6), [sink], max_fps=20.0)
    started = time.monotonic()
    run(pipeline)

    assert sink.frames == list(range(6))  # every frame of a file, only later
    # Six runs at most 20 a second cannot take less than five intervals.
    assert time.monotonic() - started >= 5 / 20


def test_max_fps_holds_back_the_second_frame_too(detector):
    sink = RecordingSink()
    pipeline = make(detector, ScriptedSource(10, live=True), [sink], max_fps=0.5)
    pipeline.start()
    deadline = time.monotonic() + 10
    while not sink.frames and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # far less than the 2 s interval

    assert sink.frames == [0]  # the second frame waits its turn instead of following at once
    pipeline.stop()
    assert pipeline.join(10) == []


class CountingDetector:
    """The real detector, counting (and slowing) inference like a small board."""

    def __init__(self, detector, delay: float) -> None:
        self.detector = detector
        self.delay = delay
        self.runs = 0

    def preprocess(self, image):
        return self.detector.preprocess(image)

    def infer(self, tensor):
        self.runs += 1
        time.sleep(self.delay)
        return self.detector.infer(tensor)

    def postprocess(self, rows, transform):
        return self.detector.postprocess(rows, transform)


def test_max_frames_runs_the_model_exactly_that_many_times(detector):
    counting = CountingDetector(detector, delay=0.05)
    sink = RecordingSink()
    pipeline = make(counting, ScriptedSource(100), [sink], max_frames=3)
    run(pipeline)

    assert sink.frames == [0, 1, 2]
    assert counting.runs == 3  # no fourth inference to throw away
