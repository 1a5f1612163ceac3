"""The daemon on aarch64, run from the installed runtime wheel: a real video clip in, the JSON
lines x86 wrote for it out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The aarch64 OpenCV wheel decodes the clip's frames up to 3 grey levels away from the host's
# (YUV to BGR conversion; mean 0.7 levels), which moved scores by up to 0.011 and boxes by up to
# 0.7 px on this clip with the FP32 model.  Detections near the threshold may come and go.
BOX_ATOL_PX = 2.0
SCORE_ATOL = 0.02
CONFIDENT = 0.3
DAEMON_TIMEOUT_S = 300


@pytest.fixture
def video(manifest) -> dict:
    if "video" not in manifest:
        pytest.skip("no daemon reference given (needs ../shared/realdata on the host)")
    return manifest["video"]


@pytest.fixture
def installed_runtime(manifest, tmp_path) -> dict:
    """Environment and working directory to run the runtime from its installed wheel, with
    the source tree out of reach: what a board runs after 'toolkit deploy'."""
    if "runtime" not in manifest:
        pytest.skip("no installed runtime wheel given")
    paths = os.environ["PYTHONPATH"].split(os.pathsep)
    dependencies = [path for path in paths if not (Path(path) / "device").is_dir()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([manifest["runtime"]["path"], *dependencies]))
    return {"env": env, "cwd": tmp_path}


def test_runtime_runs_from_its_wheel(installed_runtime, manifest):
    code = "import device.cli, device.daemon; print(device.cli.__file__)"

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
        **installed_runtime,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(manifest["runtime"]["path"]), done.stdout


def test_daemon_writes_the_x86_detections(video, installed_runtime, tmp_path):
    jsonl = tmp_path / "detections.jsonl"
    placeholders = {"PYTHON": sys.executable, "OUTPUT": str(jsonl)}
    command = [placeholders.get(arg, arg) for arg in video["command"]]

    done = subprocess.run(
        command, capture_output=True, text=True, timeout=DAEMON_TIMEOUT_S, check=False,
        **installed_runtime,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    with open(video["x86_jsonl"]) as reference:
        expected = [json.loads(line) for line in reference]
    assert [line["frame"] for line in lines] == list(range(video["frames"]))
    assert len(expected) == len(lines)
    assert sum(len(line["detections"]) for line in expected) > 0, "the clip should show people"
    for got, want in zip(lines, expected, strict=True):
        assert (got["width"], got["height"]) == (want["width"], want["height"])
        assert set(got["timings_ms"]) >= {"preprocess", "inference", "postprocess"}
        _check_same_detections(got["detections"], want["detections"], got["frame"])


def _check_same_detections(got: list[dict], want: list[dict], frame: int) -> None:
    for wanted, pool, side in ((want, got, "x86"), (got, want, "arm")):
        for detection in (d for d in wanted if d["score"] >= CONFIDENT):
            assert any(_close(detection, other) for other in pool), (
                f"frame {frame}: {detection} on {side} has no counterpart in {pool}"
            )


def _close(a: dict, b: dict) -> bool:
    box_gap = max(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True))
    same = a["label"] == b["label"] and box_gap <= BOX_ATOL_PX
    return same and abs(a["score"] - b["score"]) <= SCORE_ATOL
