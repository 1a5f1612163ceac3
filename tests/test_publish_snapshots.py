"""Snapshots written to a real folder: filters, interval, retention, atomic files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.errors import ToolkitError
from device.publish.config import SnapshotConfig
from device.publish.snapshots import SnapshotSink
from device.stats import RuntimeStats
from device.types import Detection, Frame, FrameResult

WIDTH, HEIGHT = 320, 240
PERSON = Detection(40.0, 30.0, 160.0, 200.0, 0.9, 0, "person")
CAR = Detection(200.0, 100.0, 300.0, 180.0, 0.8, 2, "car")


def result(index: int, detections: list[Detection], monotonic: float) -> FrameResult:
    # Noise makes every JPEG a realistic, distinct size.
    image = np.random.default_rng(index).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame = Frame(image, index, 1_796_000_000.0 + index, monotonic, source="cam0")
    return FrameResult(frame, detections, {"inference": 0.03})


def run(directory: Path, frames: list[FrameResult], **settings) -> RuntimeStats:
    stats = RuntimeStats()
    # A queue longer than the test's frames: nothing is dropped however busy the machine is.
    config = SnapshotConfig(enabled=True, directory=directory, **{"queue_size": 32, **settings})
    with SnapshotSink(config, stats) as sink:
        for frame in frames:
            sink.publish(frame)
    return stats


def names(directory: Path, suffix: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == suffix)


def test_retention_keeps_the_newest_files(tmp_path):
    frames = [result(i, [PERSON], monotonic=float(i)) for i in range(7)]
    stats = run(tmp_path, frames, min_interval=0, max_files=3)

    jpegs, sidecars = names(tmp_path, ".jpg"), names(tmp_path, ".json")
    assert len(jpegs) == 3 and len(sidecars) == 3
    assert [name.split("_")[1] for name in jpegs] == ["f000004", "f000005", "f000006"]
    assert [Path(n).stem for n in jpegs] == [Path(n).stem for n in sidecars]
    assert stats.snapshot()["outputs"]["snapshots"]["published"] == 7

    sidecar = json.loads((tmp_path / sidecars[-1]).read_text())
    assert sidecar["image"] == jpegs[-1]
    assert sidecar["frame"] == 6
    assert sidecar["triggers"][0]["label"] == "person"
    image = cv2.imread(str(tmp_path / jpegs[-1]))
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_size_limit_deletes_oldest(tmp_path):
    frames = [result(i, [PERSON], monotonic=float(i)) for i in range(6)]
    one = len(cv2.imencode(".jpg", frames[0].frame.image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
    budget_mb = 2.5 * one / (1024 * 1024)  # room for two snapshots, not three
    run(tmp_path, frames, min_interval=0, max_files=None, max_megabytes=budget_mb)

    kept = names(tmp_path, ".jpg")
    assert [name.split("_")[1] for name in kept] == ["f000004", "f000005"]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= budget_mb * 1024 * 1024


def test_min_interval_and_label_filter(tmp_path):
    frames = [
        result(0, [PERSON], monotonic=10.0),  # saved
        result(1, [PERSON], monotonic=10.5),  # too soon
        result(2, [CAR], monotonic=12.0),  # not a wanted label
        result(3, [PERSON, CAR], monotonic=12.5),  # saved
        result(4, [Detection(0, 0, 9, 9, 0.2, 0, "person")], monotonic=20.0),  # score too low
        result(5, [PERSON], monotonic=21.0),  # saved
    ]
    run(tmp_path, frames, labels=["person"], min_interval=1.0, min_score=0.5)

    kept = names(tmp_path, ".jpg")
    assert [name.split("_")[1] for name in kept] == ["f000000", "f000003", "f000005"]
    assert kept[1].endswith("_person.jpg"), "only the triggering label belongs in the name"
    sidecar = json.loads((tmp_path / kept[1].replace(".jpg", ".json")).read_text())
    assert [d["label"] for d in sidecar["detections"]] == ["person", "car"]


def test_retention_counts_earlier_runs_and_spares_other_files(tmp_path):
    (tmp_path / "holiday.jpg").write_bytes(b"not ours")
    (tmp_path / "notes.json").write_text("{}")
    leftover = tmp_path / ".17960000000000_f000001_person.jpg.tmp"
    crashed = tmp_path / ".20261204T101010-000Z_f000009_person.jpg.tmp"
    leftover.write_bytes(b"x")
    crashed.write_bytes(b"half a jpeg")

    run(tmp_path, [result(i, [PERSON], float(i)) for i in range(3)], min_interval=0)
    run(
        tmp_path,
        [result(i, [PERSON], float(i)) for i in range(10, 13)],
        min_interval=0,
        max_files=4,
    )

    kept = names(tmp_path, ".jpg")
    assert "holiday.jpg" in kept and (tmp_path / "notes.json").exists()
    ours = [name.split("_")[1] for name in kept if name != "holiday.jpg"]
    assert ours == ["f000002", "f000010", "f000011", "f000012"]
    assert not crashed.exists(), "a half-written file from a crash was not removed"
    assert leftover.exists(), "a file not matching the snapshot pattern was removed"


def test_full_queue_drops_and_counts(tmp_path):
    stats = RuntimeStats()
    config = SnapshotConfig(enabled=True, directory=tmp_path, min_interval=0, queue_size=1)
    sink = SnapshotSink(config, stats)
    sink.start()
    try:
        for index in range(30):  # far faster than JPEG encoding and fsync
            sink.publish(result(index, [PERSON], float(index)))
    finally:
        sink.close()
    outputs = stats.snapshot()["outputs"]["snapshots"]
    assert outputs["dropped"] > 0
    assert outputs["published"] + outputs["dropped"] == 30
    assert len(names(tmp_path, ".jpg")) == outputs["published"]


def test_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = SnapshotConfig(enabled=True, directory=blocker / "snapshots")
    with pytest.raises(ToolkitError, match=r"snapshots\.directory: cannot create"):
        SnapshotSink(config, RuntimeStats()).start()


def test_a_full_disk_leaves_no_orphan_image_and_is_logged_once(tmp_path, monkeypatch, caplog):
    import device.publish.snapshots as snapshots

    real_write = snapshots._atomic_write

    def disk_full_for_sidecars(path, data):
        if path.suffix == ".json":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(snapshots, "_atomic_write", disk_full_for_sidecars)
    frames = [result(i, [PERSON], monotonic=float(i)) for i in range(5)]
    with caplog.at_level("INFO", logger="device.publish.snapshots"):
        stats = run(tmp_path, frames, min_interval=0)

    assert names(tmp_path, ".jpg") == [] and names(tmp_path, ".json") == []
    assert stats.snapshot()["outputs"]["snapshots"]["errors"] == 5
    failures = [r for r in caplog.records if "could not write" in r.getMessage()]
    assert len(failures) == 1
