"""A video file, read on the caller's thread: every frame in order, or paced like a camera."""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np

from device.errors import ToolkitError
from device.sources.base import FrameSource, SourceState
from device.sources.config import VideoFileConfig
from device.sources.container import frames_to_expect
from device.sources.live import SourceLost
from device.sources.opencv_capture import open_ffmpeg_capture, read_bgr, release_quietly
from device.types import Frame

log = logging.getLogger(__name__)

_OPEN_TIMEOUT_S = 30.0
_FALLBACK_FPS = 25.0
# A complete file can decode to slightly fewer frames than its header counts (a B-frame
# reordering delay, a last frame shorter than the rest, rounding of an edit list); a shortfall
# within this many frames, or this share of the count, is such a file's normal end.
_SHORT_END_FRAMES = 3
_SHORT_END_SHARE = 0.02


class VideoFileSource(FrameSource):
    """Frames of one video file; ENDED after the last one unless ``loop`` is set."""

    def __init__(self, config: VideoFileConfig) -> None:
        super().__init__()
        self.config = config
        self.path = config.path.expanduser()
        self.name = config.name or self.path.name
        self.fps = 0.0
        self.frame_count = 0  # as OpenCV reports it
        self.frames_expected: int | None = None  # per the file's header; None: it does not say
        self.loops = 0
        self._capture: cv2.VideoCapture | None = None
        self._first_frame: np.ndarray | None = None
        self._position = 0  # frames read from the file in the current pass
        self._started = 0.0  # monotonic time of position 0 in realtime mode
        self._delivered = 0

    def open(self) -> None:
        if self._capture is not None:
            return
        if not self.path.is_file():
            is_dir = self.path.is_dir()
            found = "a folder" if is_dir else "nothing"
            raise ToolkitError(
                f"Expected a video file at {self.path}, found {found}. Check source.path"
                f"{', or use source type folder for images' if is_dir else ''}."
            )
        self._capture = self._open_and_probe()
        self._started = time.monotonic()
        self._set_state(SourceState.STREAMING)
        log.info(
            "source %s: %s, %s at %.2f fps%s",
            self.name,
            self.path,
            self._length_text(),
            self.fps,
            ", looping" if self.config.loop else "",
        )

    def _open_and_probe(self) -> cv2.VideoCapture:
        """Open the file and decode its first frame, so an unreadable file fails here, clearly."""
        capture = open_ffmpeg_capture(
            str(self.path),
            open_timeout_s=_OPEN_TIMEOUT_S,
            read_timeout_s=_OPEN_TIMEOUT_S,
            options={},
        )
        try:
            if not capture.isOpened():
                raise SourceLost("OpenCV's FFmpeg backend could not open it")
            self._first_frame = read_bgr(capture, str(self.path))
        except SourceLost as exc:
            release_quietly(capture)
            size = self.path.stat().st_size
            self._set_state(SourceState.FAILED, str(exc), quiet=True)
            raise ToolkitError(
                f"Could not decode {self.path} ({size} bytes): {exc}. Expected a video FFmpeg can "
                "decode (mp4/mkv with H.264, MJPEG avi, ...). Check it with 'ffprobe "
                f"{self.path}', or convert it: 'ffmpeg -i {self.path.name} -c:v libx264 out.mp4'."
            ) from exc
        self.fps = capture.get(cv2.CAP_PROP_FPS) or _FALLBACK_FPS
        self.frame_count = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
        self.frames_expected = frames_to_expect(self.path, self.frame_count)
        self._position = 0
        return capture

    def read(self, timeout: float) -> Frame | None:
        if self._capture is None or self.finished:
            return None
        if self.config.realtime and not self._wait_until_due(timeout):
            return None
        image = self._next_image()
        if image is None:
            return None
        wall, mono = time.time(), time.monotonic()
        self.frames_captured += 1
        frame = Frame(image, self._delivered, wall, mono, source=self.name)
        self._delivered += 1
        return frame

    def _wait_until_due(self, timeout: float) -> bool:
        """Realtime pacing: sleep until the next frame is due (at most ``timeout``), and skip the
        frames whose time has passed, counting them as dropped."""
        due_index = int((time.monotonic() - self._started) * self.fps)
        skip = due_index - self._position
        for _ in range(max(skip, 0)):
            if self._capture is None or not self._capture.grab():
                break
            self._position += 1
            self.frames_dropped += 1
        wait = self._started + self._position / self.fps - time.monotonic()
        if wait > timeout:
            time.sleep(max(timeout, 0.0))
            return False
        if wait > 0:
            time.sleep(wait)
        return True

    def _next_image(self) -> np.ndarray | None:
        if self._first_frame is not None:
            image, self._first_frame = self._first_frame, None
            self._position += 1
            return image
        try:
            image = read_bgr(self._capture, str(self.path))
        except SourceLost:
            return self._at_end()
        self._position += 1
        return image

    def _at_end(self) -> np.ndarray | None:
        if self._stopped_early():
            # Checked on every pass: looping a shortened clip would hide the damage forever.
            self._set_state(SourceState.FAILED, self._truncation_message())
            return None
        if not self.config.loop or self._position == 0:
            self._set_state(SourceState.ENDED, f"{self._position} frames read")
            return None
        release_quietly(self._capture)
        self.loops += 1
        self._capture = self._open_and_probe()
        self._started = time.monotonic()
        return self._next_image()

    def _length_text(self) -> str:
        if self.frames_expected is not None:
            return f"{self.frames_expected} frames"
        if self.frame_count:
            return f"about {self.frame_count} frames (estimated from its duration)"
        return "length unknown"

    def _stopped_early(self) -> bool:
        """Whether decoding ended clearly before the frame the file's header says is its last."""
        expected = self.frames_expected
        if not expected:
            return False  # the header does not say, so there is nothing to judge by
        tolerance = max(_SHORT_END_FRAMES, _SHORT_END_SHARE * expected)
        return expected - self._position > tolerance

    def _truncation_message(self) -> str:
        read = self._position
        looping = "; not looping a shortened clip" if self.config.loop else ""
        return (
            f"decoding of {self.path} stopped at frame {read} of the {self.frames_expected} "
            "its header declares: the file is truncated or damaged (an interrupted copy or "
            f"download is the usual cause){looping}. "
            f"The {read} frames before that point were read. Copy the file again, or see where "
            f"it breaks with 'ffmpeg -v error -i {self.path} -f null -'."
        )

    def close(self) -> None:
        capture, self._capture = self._capture, None
        release_quietly(capture)

    def status(self) -> dict:
        status = super().status()
        status.update(
            kind="file",
            path=str(self.path),
            fps=round(self.fps, 3),
            loops=self.loops,
            frames_expected=self.frames_expected,
        )
        return status
