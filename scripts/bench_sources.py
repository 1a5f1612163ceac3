"""What the frame sources cost and buy, next to their baselines, in one run (about 40 s).

1. Staleness: an HTTP MJPEG camera on 127.0.0.1 sends 30 frames/s of 640x480 while the reader
   takes 100 ms per frame (a detector at 10 frames/s).  Baseline: a plain OpenCV
   ``VideoCapture.read()`` loop, which is what detect.py does; it hands out ever older frames
   from the queue.  The StreamSource keeps only the newest.
2. Recovery: each network stream is cut for 3 s and restored; the time from restore to the first
   new frame with the default backoff (1 s doubling to 5 s), next to Frigate's fixed 10 s
   camera retry and Roboflow's 1 s.
3. Pi camera format conversion at 1280x720 (stride-padded buffers as libcamera lays them out,
   from the test stand-in), next to the ~50 ms per-frame budget of detect.py on yolov5n.

Usage: .venv/bin/python scripts/bench_sources.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fakes")]

from device.sources import SourceState, open_source  # noqa: E402
from device.sources.config import PICAMERA_FORMATS, StreamConfig  # noqa: E402
from device.sources.picamera import picamera_array_to_bgr  # noqa: E402
from tests.stream_servers import (  # noqa: E402
    H264TcpServer,
    MjpegServer,
    RtspServer,
    free_port,
    make_h264_clip,
)

READER_SECONDS_PER_FRAME = 0.1
BASELINE_FRAME_MS = 50.0  # detect.py, yolov5n ONNX, 768x432, 2-core x86
FRIGATE_RETRY_S = 10.0
ROBOFLOW_RETRY_S = 1.0


class NumberedCamera(MjpegServer):
    """640x480 frames whose top band carries the frame number as a grey level, the rest noise
    so that each JPEG is camera-sized (~100 kB)."""

    def __init__(self) -> None:
        super().__init__(fps=30, size=(640, 480))
        self.noise = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)

    def jpeg(self, number: int) -> bytes:
        image = self.noise.copy()
        image[:32] = number % 256
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def number_of(image: np.ndarray) -> int:
    return round(float(image[4:28].mean()))


def behind(camera: NumberedCamera, image: np.ndarray) -> int:
    return (camera.sent - number_of(image)) % 256


def staleness_plain_opencv(seconds: float) -> list[int]:
    camera = NumberedCamera()
    camera.start()
    capture = cv2.VideoCapture(camera.url, cv2.CAP_FFMPEG)
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ok, image = capture.read()
        if ok:
            lags.append(behind(camera, image))
        time.sleep(READER_SECONDS_PER_FRAME)
    capture.release()
    camera.cut()
    return lags


def staleness_stream_source(seconds: float) -> tuple[list[int], int]:
    camera = NumberedCamera()
    camera.start()
    lags = []
    with open_source(StreamConfig(url=camera.url)) as source:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = source.read(timeout=1.0)
            if frame is not None:
                lags.append(behind(camera, frame.image))
            time.sleep(READER_SECONDS_PER_FRAME)
        dropped = source.frames_dropped
    camera.cut()
    return lags, dropped


def recovery_seconds(server, config: StreamConfig, cut, restore) -> float:
    with open_source(config) as source:
        while source.read(timeout=1.0) is None:
            pass
        cut()
        while source.state != SourceState.RECONNECTING:
            time.sleep(0.01)
        time.sleep(3.0)
        restore()
        restored = time.monotonic()
        while source.state != SourceState.STREAMING:
            if time.monotonic() - restored > 30:
                return float("nan")
            time.sleep(0.01)
        return time.monotonic() - restored


def conversion_ms(fmt: str) -> float:
    import picamera2

    picamera2.reset()
    camera = picamera2.Picamera2(0)
    camera.configure(camera.create_video_configuration(main={"size": (1280, 720), "format": fmt}))
    camera.start()
    array = camera.capture_array("main")
    camera.close()
    costs = []
    for _ in range(30):
        started = time.perf_counter()
        picamera_array_to_bgr(array, fmt, 1280, 720)
        costs.append((time.perf_counter() - started) * 1000)
    return statistics.median(costs)


def main() -> None:
    print("1. Frames behind the camera, reader at 10 frames/s, camera at 30 frames/s (8 s)")
    plain = staleness_plain_opencv(8.0)
    newest, dropped = staleness_stream_source(8.0)
    print(f"{'reader':<34}{'median behind':>15}{'last behind':>13}{'ratio':>8}")
    baseline = statistics.median(plain)
    for name, lags in (("plain VideoCapture.read (baseline)", plain), ("StreamSource", newest)):
        ratio = statistics.median(lags) / max(baseline, 1)
        print(f"{name:<34}{statistics.median(lags):>15.0f}{lags[-1]:>13}{ratio:>8.2f}")
    print(f"   StreamSource dropped {dropped} stale frames instead of queueing them\n")

    print("2. Seconds from the stream's return to the first new frame (3 s outage)")
    clip = make_h264_clip(Path("/tmp") / f"bench_sources_{free_port()}.mp4", seconds=4)
    quick = {"ffmpeg_options": {"analyzeduration": "500000", "probesize": "500000"}}
    tcp = H264TcpServer(clip, free_port())
    tcp.start()
    mjpeg = MjpegServer()
    mjpeg.start()
    rtsp = RtspServer(clip)
    rtsp.start()
    rows = [
        ("tcp H.264", recovery_seconds(
            tcp, StreamConfig(url=tcp.url, **quick), tcp.stop, tcp.start)),
        ("http MJPEG", recovery_seconds(
            mjpeg, StreamConfig(url=mjpeg.url), mjpeg.cut, mjpeg.restore)),
        ("rtsp", recovery_seconds(
            rtsp, StreamConfig(url=rtsp.url, **quick), rtsp.cut, rtsp.restore)),
    ]  # fmt: skip
    tcp.stop()
    mjpeg.cut()
    rtsp.cut()
    clip.unlink(missing_ok=True)
    print(f"{'stream':<14}{'ours':>8}{'Frigate':>10}{'ratio':>8}{'Roboflow':>10}{'ratio':>8}")
    for name, seconds in rows:
        print(f"{name:<14}{seconds:>8.2f}{FRIGATE_RETRY_S:>10.1f}{seconds / FRIGATE_RETRY_S:>8.2f}"
              f"{ROBOFLOW_RETRY_S:>10.1f}{seconds / ROBOFLOW_RETRY_S:>8.2f}")  # fmt: skip
    print(
        "   (Frigate and Roboflow: their fixed retry interval, the worst case after a return;"
        "\n   ours: backoff 1 s doubling to max_delay_s = 5 s, so at most 5 s plus the open)\n"
    )

    print("3. Pi camera buffer to BGR frame, 1280x720, ms per frame (median of 30)")
    print(f"{'format':<10}{'ms':>8}{'budget ms':>11}{'ratio':>8}")
    for fmt in PICAMERA_FORMATS:
        ms = conversion_ms(fmt)
        print(f"{fmt:<10}{ms:>8.2f}{BASELINE_FRAME_MS:>11.0f}{ms / BASELINE_FRAME_MS:>8.3f}")


if __name__ == "__main__":
    main()
