"""Network streams, served on 127.0.0.1 by the test, decoded for real, cut mid-run and restored."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.errors import ToolkitError
from device.sources import SourceState, open_source
from device.sources.config import StreamConfig
from device.sources.stream import redact_url
from tests.conftest import REALDATA
from tests.source_helpers import assert_bgr_frame, read_frames, wait_for
from tests.stream_servers import (
    H264TcpServer,
    MjpegServer,
    RtspServer,
    ffmpeg_available,
    frame_number,
    free_port,
    make_h264_clip,
)

pytestmark = pytest.mark.skipif(not ffmpeg_available(), reason="needs the ffmpeg program")

FAST_RECONNECT = {"initial_delay_s": 0.2, "max_delay_s": 0.5}
QUICK_PROBE = {"analyzeduration": "500000", "probesize": "500000"}


@pytest.fixture(scope="module")
def h264_video(tmp_path_factory) -> Path:
    """One of the real 768x432 videos when present, else a generated H.264 clip."""
    real = sorted((REALDATA / "video").glob("*.mp4")) if (REALDATA / "video").is_dir() else []
    if real:
        return real[0]
    return make_h264_clip(tmp_path_factory.mktemp("clip") / "testsrc.mp4")


@pytest.fixture(scope="module")
def reference_frames(h264_video) -> set[bytes]:
    """Digests of the video's first 200 frames, decoded straight from the file."""
    capture = cv2.VideoCapture(str(h264_video), cv2.CAP_FFMPEG)
    digests = set()
    for _ in range(200):
        ok, image = capture.read()
        if not ok:
            break
        digests.add(image[::4, ::4].tobytes())
    capture.release()
    return digests


def stream_config(url: str, **settings) -> StreamConfig:
    defaults = {
        "url": url,
        "read_timeout_s": 2.0,
        "open_timeout_s": 5.0,
        "reconnect": FAST_RECONNECT,
        "ffmpeg_options": QUICK_PROBE,
    }
    return StreamConfig(**{**defaults, **settings})


def test_h264_over_tcp_is_cut_and_restored(h264_video, reference_frames):
    server = H264TcpServer(h264_video, free_port())
    server.start()
    try:
        with open_source(stream_config(server.url)) as source:
            before = read_frames(source, 5)
            assert source.state == SourceState.STREAMING
            height, width = before[0].image.shape[:2]
            assert_bgr_frame(before[0], height, width)
            decoded = [f.image[::4, ::4].tobytes() in reference_frames for f in before]
            assert all(decoded), "frames must be the video's own frames, decoded"

            server.stop()
            wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "the cut to be seen")
            assert "no frame from the stream" in source.status()["last_error"]
            captured_during_outage = source.frames_captured

            server.start()
            wait_for(lambda: source.state == SourceState.STREAMING, 15, "streaming again")
            after = read_frames(source, 5)
            assert source.reconnects == 1
            assert source.frames_captured > captured_during_outage
            assert after[0].index > before[-1].index
            assert all(f.image[::4, ::4].tobytes() in reference_frames for f in after)
            assert source.status()["reconnects"] == 1
    finally:
        server.stop()


def test_mjpeg_over_http_is_cut_and_restored(caplog):
    caplog.set_level(logging.DEBUG, logger="device.sources")
    server = MjpegServer(fps=25)
    server.start()
    try:
        with open_source(stream_config(server.url)) as source:
            before = read_frames(source, 5)
            assert_bgr_frame(before[0], 64, 96)

            server.cut()
            wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "the cut to be seen")
            time.sleep(0.5)  # a few failed attempts while the server is away
            assert source.state == SourceState.RECONNECTING
            assert source.reconnect_attempts >= 1

            server.restore()
            wait_for(lambda: source.state == SourceState.STREAMING, 10, "streaming again")
            after = read_frames(source, 15)
            assert source.reconnects == 1 and source.reconnect_attempts == 0
            assert frame_number(after[-1].image) > frame_number(before[-1].image)

        # State changes are logged at info, once each; nothing is logged per frame.
        changes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any("streaming -> reconnecting" in message for message in changes)
        assert any("reconnecting -> streaming" in message for message in changes)
        assert len(caplog.records) < 10 < source.frames_captured
    finally:
        server.cut()


def test_slow_reader_gets_the_newest_frame_and_drops_are_counted():
    server = MjpegServer(fps=50)
    server.start()
    try:
        with open_source(stream_config(server.url)) as source:
            read_frames(source, 1)
            numbers = []
            for _ in range(4):
                time.sleep(0.25)  # a detector slower than the camera
                frame = read_frames(source, 1)[0]
                numbers.append(frame_number(frame.image))
                assert server.sent - frame_number(frame.image) <= 3, "an old frame was returned"
            assert source.frames_dropped >= 10
            assert all(later - earlier > 1 for earlier, later in itertools.pairwise(numbers))
    finally:
        server.cut()


def test_frozen_and_stalled_streams_count_as_lost():
    server = MjpegServer(fps=25)
    server.start()
    try:
        config = stream_config(server.url, frozen_after_s=0.6, read_timeout_s=1.0)
        with open_source(config) as source:
            read_frames(source, 3)
            server.mode = "frozen"
            wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "the freeze")
            assert "frozen: identical frames" in source.last_error

            server.mode = "live"
            wait_for(lambda: source.state == SourceState.STREAMING, 10, "streaming again")
            server.mode = "stalled"
            wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "the stall")
            assert source.reconnects == 1

            server.mode = "live"
            wait_for(lambda: source.state == SourceState.STREAMING, 10, "streaming again")
            assert source.reconnects == 2
    finally:
        server.cut()


def test_rtsp_is_cut_and_restored(h264_video, reference_frames):
    server = RtspServer(h264_video)
    server.start()
    try:
        with open_source(stream_config(server.url)) as source:
            before = read_frames(source, 5)
            assert all(f.image[::4, ::4].tobytes() in reference_frames for f in before)

            server.cut()
            wait_for(lambda: source.state == SourceState.RECONNECTING, 10, "the cut to be seen")

            server.restore()
            wait_for(lambda: source.state == SourceState.STREAMING, 15, "streaming again")
            read_frames(source, 5)
            assert source.reconnects == 1 and server.sessions == 2
    finally:
        server.cut()


def test_unreachable_stream_fails_clearly_or_retries_when_asked():
    url = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ToolkitError, match=r"Could not open the stream .* 'ffprobe'"):
        open_source(stream_config(url, open_timeout_s=1.0))

    config = stream_config(url, open_timeout_s=0.5, reconnect={**FAST_RECONNECT, "max_attempts": 2})
    source = open_source(config.model_copy(update={"reconnect": config.reconnect.model_copy(
        update={"retry_on_start": True})}))  # fmt: skip
    try:
        assert source.state == SourceState.RECONNECTING
        wait_for(lambda: source.state == SourceState.FAILED, 10, "giving up")
        assert "gave up after 2 attempts" in source.last_error
        assert source.read(timeout=0.1) is None and source.finished
    finally:
        source.close()


def test_passwords_never_reach_logs_or_status():
    assert redact_url("rtsp://admin:secret@10.0.0.5:554/stream1") == (
        "rtsp://admin:***@10.0.0.5:554/stream1"
    )
    assert redact_url("tcp://127.0.0.1:8888") == "tcp://127.0.0.1:8888"


def test_frames_are_bgr_contiguous_uint8():
    image = np.zeros((4, 6), np.uint16) + 65535
    from device.sources.opencv_capture import as_bgr

    bgr = as_bgr(image)
    assert bgr.shape == (4, 6, 3) and bgr.dtype == np.uint8 and bgr.min() == 255


def test_a_refused_stream_does_not_print_opencv_warnings():
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    code = (
        "import socket\n"
        "from device.sources.opencv_capture import open_ffmpeg_capture\n"
        "holder = socket.socket(); holder.bind(('127.0.0.1', 0))\n"  # bound, not listening
        "url = 'tcp://127.0.0.1:%d' % holder.getsockname()[1]\n"
        "capture = open_ffmpeg_capture(url, open_timeout_s=2, read_timeout_s=2, options={})\n"
        "print(capture.isOpened())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )

    assert done.stdout.strip() == "False", done.stderr
    assert "[ WARN" not in done.stderr, done.stderr
