"""JSON lines output, and the device runtime's promise to stay free of torch and host code."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device.errors import ToolkitError
from device.publish.jsonl import JsonlConfig, JsonlSink
from device.stats import RuntimeStats
from device.types import Detection, Frame, FrameResult

REPO = Path(__file__).resolve().parent.parent


def result(index: int, detections: list[Detection] | None = None) -> FrameResult:
    frame = Frame(np.zeros((48, 64, 3), np.uint8), index, 1700000000.0 + index, 0.0, "cam")
    return FrameResult(frame, detections or [], {"inference": 0.0125})


PERSON = Detection(1.0, 2.0, 30.5, 40.25, 0.87654, 0, "person")


def test_every_result_becomes_one_line_in_order(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    stats = RuntimeStats()
    sink = JsonlSink(JsonlConfig(enabled=True, path=str(out)), stats)
    with sink:
        for index in range(5):
            sink.publish(result(index, [PERSON] if index == 2 else []))

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[2] == {
        "source": "cam",
        "frame": 2,
        "timestamp": 1700000002.0,
        "width": 64,
        "height": 48,
        "detections": [
            {"label": "person", "class_id": 0, "score": 0.8765, "box": [1.0, 2.0, 30.5, 40.2]}
        ],
        "timings_ms": {"inference": 12.5},
    }
    assert stats.snapshot()["outputs"]["jsonl"]["published"] == 5


def test_only_detections_skips_empty_frames_and_append_keeps_old_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"old": true}\n')
    sink = JsonlSink(JsonlConfig(enabled=True, path=str(out), only_detections=True))
    with sink:
        for index in range(4):
            sink.publish(result(index, [PERSON] if index % 2 else []))

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"old": True}
    assert [line["frame"] for line in lines[1:]] == [1, 3]


def test_replace_mode_starts_a_fresh_file(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("stale\n")
    with JsonlSink(JsonlConfig(enabled=True, path=str(out), append=False)) as sink:
        sink.publish(result(0))

    assert [json.loads(line)["frame"] for line in out.read_text().splitlines()] == [0]


def test_the_file_is_rotated_at_its_size_limit(tmp_path):
    out = tmp_path / "out.jsonl"
    config = JsonlConfig(enabled=True, path=str(out), max_megabytes=0.001)  # 1000 bytes
    with JsonlSink(config) as sink:
        for index in range(30):
            sink.publish(result(index))
            time.sleep(0.002)  # let the writer see lines in several batches

    rotated = tmp_path / "out.jsonl.1"
    assert rotated.exists()
    frames = [json.loads(line)["frame"] for line in rotated.read_text().splitlines()]
    frames += [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    assert frames == list(range(frames[0], 30))  # nothing lost after the last rotation


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    stats = RuntimeStats()
    sink = JsonlSink(JsonlConfig(enabled=True, path=str(tmp_path / "o.jsonl"), queue_size=2), stats)
    # Not started: nothing drains the queue, so the third result has no room.
    for index in range(3):
        sink.publish(result(index))

    assert sink.dropped == 1
    assert stats.snapshot()["outputs"]["jsonl"]["dropped"] == 1


def test_stdout_is_the_default(tmp_path):
    code = (
        "import numpy as np\n"
        "from device.publish.jsonl import JsonlConfig, JsonlSink\n"
        "from device.types import Frame, FrameResult\n"
        "frame = Frame(np.zeros((4, 4, 3), np.uint8), 7, 0.0, 0.0, 'x')\n"
        "with JsonlSink(JsonlConfig(enabled=True)) as sink:\n"
        "    sink.publish(FrameResult(frame, []))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["frame"] == 7


def test_the_device_runtime_imports_neither_torch_nor_host_code():
    code = (
        "import sys\n"
        "import device.cli, device.daemon, device.pipeline, device.infer, device.config\n"
        "import device.publish.jsonl, device.sdnotify, device.health\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'toolkit'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_an_unwritable_path_is_explained(tmp_path):
    sink = JsonlSink(JsonlConfig(enabled=True, path=str(tmp_path)))  # a folder, not a file
    with pytest.raises(ToolkitError, match=r"Cannot write JSON lines to .*: Is a directory"):
        sink.start()


def test_stdout_closed_by_its_reader_asks_the_daemon_to_stop_without_a_traceback():
    code = (
        "import sys, threading\n"
        "import numpy as np\n"
        "from device.publish.jsonl import JsonlConfig, JsonlSink\n"
        "from device.types import Frame, FrameResult\n"
        "stopped = threading.Event()\n"
        "sink = JsonlSink(JsonlConfig(enabled=True))\n"
        "sink.stop_daemon = lambda reason: stopped.set()\n"
        "sink.start()\n"
        "for index in range(20000):\n"
        "    frame = Frame(np.zeros((4, 4, 3), np.uint8), index, 0.0, 0.0, 'x')\n"
        "    sink.publish(FrameResult(frame, []))\n"
        "    if stopped.wait(0.001):\n"
        "        break\n"
        "sink.close()\n"
        "print('stopped' if stopped.is_set() else 'never stopped', file=sys.stderr)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = child.stdout.readline()
    child.stdout.close()  # like 'toolkit-device run --jsonl - | head -1'
    try:
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()

    assert json.loads(first)["frame"] == 0
    assert child.returncode == 0, stderr
    assert stderr.strip().endswith("stopped"), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr


def test_a_rotation_that_cannot_happen_keeps_writing_and_close_returns(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.1").mkdir()  # the backup name is taken by a folder
    config = JsonlConfig(enabled=True, path=str(out), max_megabytes=0.001, queue_size=4)
    sink = JsonlSink(config)
    sink.start()
    for index in range(40):
        sink.publish(result(index))
        time.sleep(0.002)
    closer = threading.Thread(target=sink.close, daemon=True)
    closer.start()
    closer.join(timeout=30)

    assert not closer.is_alive(), "close() hung after the writer met a rotation error"
    frames = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    assert len(frames) + sink.dropped == 40  # every line written or counted as dropped
    assert frames[0] == 0 and frames == sorted(frames)
    assert sink.errors == 0
