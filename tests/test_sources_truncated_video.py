"""Video files cut short: real clips made with ffmpeg, cut as an interrupted copy cuts them, and
decoded for real.  A file that stops well before the frame count its header stores fails the
run after delivering every frame before the cut; a complete file, or one whose header does not
store a count, ends quietly."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from device.sources import SourceState, open_source
from device.sources.config import VideoFileConfig
from device.sources.container import frames_to_expect
from tests.constant_model import write_constant_model
from tests.source_helpers import drain
from tests.stream_servers import ffmpeg_available

REPO = Path(__file__).resolve().parent.parent
FRAMES = 50  # 2 s at 25 fps
TESTSRC = "testsrc=size=160x120:rate=25:duration=2"

pytestmark = pytest.mark.skipif(not ffmpeg_available(), reason="needs the ffmpeg program")


def ffmpeg(*args: str) -> None:
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(command, check=True, timeout=60)


def h264(path: Path, *extra: str) -> Path:
    """A 2 s H.264 clip of the moving test pattern, keyframe every second."""
    video = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-pix_fmt", "yuv420p"]
    ffmpeg("-f", "lavfi", "-i", TESTSRC, *extra, *video, str(path))
    return path


def cut_copy(path: Path, keep: float) -> Path:
    """The first ``keep`` share of the file's bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    cut = path.with_name(f"cut-{path.name}")
    cut.write_bytes(data[: int(len(data) * keep)])
    return cut


def count_decoded(path: Path) -> tuple[int, int]:
    """(OpenCV's frame count, frames that really decode)."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    reported = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    decoded = 0
    while capture.read()[0]:
        decoded += 1
    capture.release()
    return reported, decoded


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """A complete MP4 (index at the front, as '-movflags +faststart' writes it) and a copy of
    it cut after half its bytes: the index still promises 50 frames."""
    folder = tmp_path_factory.mktemp("truncated")
    full = h264(folder / "clip.mp4", "-movflags", "+faststart")
    return {"full": full, "cut": cut_copy(full, 0.5)}


@pytest.fixture(scope="module")
def cut_frames(clips) -> int:
    """Frames that decode before the cut, checked independently of the source under test."""
    assert count_decoded(clips["full"]) == (FRAMES, FRAMES)
    reported, decoded = count_decoded(clips["cut"])
    assert reported == FRAMES, "the cut file's header should still declare the whole clip"
    assert 5 < decoded < FRAMES - 10, f"expected a clear shortfall, {decoded} frames decoded"
    return decoded


# The source on its own.


def test_complete_clip_ends_quietly(clips, caplog):
    caplog.set_level(logging.INFO)
    with open_source(VideoFileConfig(path=clips["full"])) as source:
        frames = drain(source)
    assert len(frames) == FRAMES and source.state == SourceState.ENDED
    assert source.status()["frames_expected"] == FRAMES and source.last_error == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_truncated_clip_fails_after_every_frame_before_the_cut(clips, cut_frames, caplog):
    with open_source(VideoFileConfig(path=clips["cut"])) as source:
        frames = drain(source)
        assert source.read(timeout=0.1) is None
    assert [f.index for f in frames] == list(range(cut_frames))
    assert source.state == SourceState.FAILED
    expected = f"stopped at frame {cut_frames} of the {FRAMES} its header declares"
    assert expected in source.last_error and "truncated or damaged" in source.last_error
    assert "ffmpeg -v error -i" in source.last_error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and expected in warnings[0]


def test_looping_truncated_clip_fails_on_its_first_pass(clips, cut_frames):
    with open_source(VideoFileConfig(path=clips["cut"], loop=True)) as source:
        frames = drain(source, limit=5 * FRAMES)
    assert len(frames) == cut_frames and source.loops == 0
    assert source.state == SourceState.FAILED
    assert "not looping a shortened clip" in source.last_error


def test_realtime_truncated_clip_counts_the_frames_it_skipped_over(clips, cut_frames):
    with open_source(VideoFileConfig(path=clips["cut"], realtime=True)) as source:
        first = source.read(timeout=2.0)
        time.sleep((cut_frames + 5) / 25)  # every frame up to the cut and beyond falls due
        rest = drain(source)
    assert first is not None and source.state == SourceState.FAILED
    assert 1 + len(rest) + source.frames_dropped == cut_frames
    assert f"stopped at frame {cut_frames} of the {FRAMES}" in source.last_error


@pytest.mark.parametrize("declared_extra, state", [(3, SourceState.ENDED), (4, SourceState.FAILED)])
def test_a_few_missing_frames_are_a_normal_end(clips, monkeypatch, declared_extra, state):
    # 50 frames declared give a tolerance of 3 (2 % would be 1): 3 short ends, 4 short fails.
    monkeypatch.setattr(
        "device.sources.video_file.frames_to_expect", lambda path, reported: 50 + declared_extra
    )
    with open_source(VideoFileConfig(path=clips["full"])) as source:
        frames = drain(source)
    assert len(frames) == FRAMES and source.state == state


def test_truncated_avi_fails_too(tmp_path):
    full = tmp_path / "clip.avi"
    ffmpeg("-f", "lavfi", "-i", TESTSRC, "-c:v", "mjpeg", str(full))
    cut = cut_copy(full, 0.5)
    reported, decoded = count_decoded(cut)
    assert reported == FRAMES and decoded < FRAMES - 10
    with open_source(VideoFileConfig(path=cut)) as source:
        frames = drain(source)
    assert len(frames) == decoded and source.state == SourceState.FAILED
    assert f"stopped at frame {decoded} of the {FRAMES}" in source.last_error


# Files OpenCV over-counts without being damaged: no judgement, or the right one.


def _mkv_with_longer_audio(folder: Path) -> Path:
    # OpenCV counts duration x fps here, and the duration is the audio's 3 s, not the video's 2.
    path = folder / "longer-audio.mkv"
    h264(path, "-f", "lavfi", "-i", "sine=duration=3", "-c:a", "aac")
    return path


def _fragmented_mp4_with_longer_audio(folder: Path) -> Path:
    path = folder / "fragmented.mp4"
    h264(
        path,
        *("-f", "lavfi", "-i", "sine=duration=3", "-c:a", "aac"),
        *("-movflags", "frag_keyframe+empty_moov"),
    )
    return path


def _mp4_cut_without_reencoding(folder: Path) -> Path:
    # Starts between keyframes: the frames back to the previous keyframe stay in the file,
    # counted by its sample table and hidden by its edit list.
    source = h264(folder / "long.mp4")
    path = folder / "copied-cut.mp4"
    ffmpeg("-ss", "0.6", "-i", str(source), "-c", "copy", str(path))
    return path


def _truncated_mkv(folder: Path) -> Path:
    # Matroska stores no frame count, so a cut one cannot be judged: it ends as it did before.
    full = folder / "clip.mkv"
    ffmpeg("-f", "lavfi", "-i", TESTSRC, "-c:v", "mjpeg", str(full))
    return cut_copy(full, 0.5)


@pytest.mark.parametrize(
    "make, expected",
    [
        (_mkv_with_longer_audio, None),
        (_fragmented_mp4_with_longer_audio, None),
        (_mp4_cut_without_reencoding, "decoded"),
        (_truncated_mkv, None),
    ],
    ids=["mkv-longer-audio", "fragmented-mp4", "mp4-copied-cut", "truncated-mkv"],
)
def test_files_whose_header_does_not_count_their_frames_end_quietly(
    tmp_path, caplog, make, expected
):
    path = make(tmp_path)
    reported, decoded = count_decoded(path)
    assert reported > decoded + 10, "the file should be one OpenCV over-counts"
    assert frames_to_expect(path, reported) == (decoded if expected == "decoded" else None)
    with open_source(VideoFileConfig(path=path)) as source:
        frames = drain(source)
    assert len(frames) == decoded and source.state == SourceState.ENDED
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_count_in_the_header_means_no_judgement(tmp_path):
    assert frames_to_expect(tmp_path / "any.mp4", 0) is None
    raw = tmp_path / "clip.h264"
    ffmpeg("-f", "lavfi", "-i", TESTSRC, "-c:v", "libx264", "-preset", "ultrafast", str(raw))
    assert frames_to_expect(raw, FRAMES) is None


# The daemon, end to end.


def run_daemon(tmp_path: Path, video: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    model = tmp_path / "constant.onnx"
    if not model.exists():
        write_constant_model(model, [[320, 320, 64, 128, 0.9, 0.9]], ["person"])
    out = tmp_path / f"{video.stem}.jsonl"
    command = [sys.executable, "-m", "device.cli", "run", "--model", str(model)]
    command += ["--source", str(video), "--jsonl", str(out), "--no-http", "--threads", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return result, lines


def test_daemon_exits_0_on_the_complete_clip_and_1_on_the_cut_one(tmp_path, clips, cut_frames):
    result, lines = run_daemon(tmp_path, clips["full"])
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and "error" not in result.stderr
    assert [line["frame"] for line in lines] == list(range(FRAMES))

    result, lines = run_daemon(tmp_path, clips["cut"])
    assert result.returncode == 1, result.stderr
    expected = f"stopped at frame {cut_frames} of the {FRAMES} its header declares"
    assert f"error: The source {clips['cut'].name} failed: decoding of" in result.stderr
    assert expected in result.stderr.split("error: ")[-1]
    assert result.stderr.rstrip().endswith(" -f null -'."), "one full stop at the end"
    assert "WARNING device.sources.base" in result.stderr and "Traceback" not in result.stderr
    # Every frame decoded before the cut was published before the run ended.
    assert [line["frame"] for line in lines] == list(range(cut_frames))
