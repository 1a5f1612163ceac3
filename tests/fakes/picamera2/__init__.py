"""Test stand-in for picamera2, for machines without a Raspberry Pi camera.

It follows picamera2's documented behaviour where the runtime depends on it:

- ``Picamera2.global_camera_info()`` lists cameras as dicts with Model, Location, Rotation, Id;
  ``Picamera2(n)`` raises RuntimeError("Camera __init__ sequence did not complete.") when camera
  n is missing or busy.
- ``create_video_configuration`` defaults: XBGR8888 at 1280x720, 6 buffers, FrameDurationLimits
  (33333, 33333) us; only "format" and "size" are valid stream keys.
- ``configure`` rejects odd sizes and unknown formats, and fills in "stride" (rows padded to
  ``STRIDE_ALIGN`` bytes, as the ISP does) and "framesize".
- Buffers are laid out as libcamera delivers them: RGB888 bytes B,G,R; BGR888 R,G,B; XRGB8888
  B,G,R,A; XBGR8888 R,G,B,A (little-endian names); YUV420 planes Y, U, V with the chroma planes
  at half the stride (YVU420: V before U); the padding holds junk.
- ``CompletedRequest.make_array`` shapes them as picamera2's helpers do: RGB formats cropped to
  (h, w, 3 or 4), YUV420 left as (h * 3 / 2, stride) with the padding still in.
- ``capture_request(wait=False)`` returns a job; ``wait(job, timeout)`` raises TimeoutError when
  no frame comes (a stalled camera); requests must be released exactly once.

Tests steer it through the module globals: CAMERAS, SCENE_RGB, STRIDE_ALIGN, FAULTS, BUSY, and
read INSTANCES to see what was called.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError

import cv2
import numpy as np

CAMERAS: list[dict] = []
SCENE_RGB: tuple[int, int, int] = (255, 0, 0)
SCENE_IMAGE: np.ndarray | None = None  # an (h, w, 3) R,G,B picture to show instead of SCENE_RGB
STRIDE_ALIGN = 64
FAULTS: dict = {}  # "start": exception to raise; "stall_after": frames before the camera stalls
BUSY: set[int] = set()
INSTANCES: list[Picamera2] = []

_RGB_FORMATS = {"RGB888": 3, "BGR888": 3, "XRGB8888": 4, "XBGR8888": 4}
_YUV_FORMATS = ("YUV420", "YVU420")
_JUNK = 0x5A


def reset() -> None:
    """Back to one IMX708 camera seeing plain red, no faults."""
    global SCENE_RGB, SCENE_IMAGE, STRIDE_ALIGN
    CAMERAS[:] = [
        {
            "Model": "imx708",
            "Location": 2,
            "Rotation": 180,
            "Id": "/base/axi/pcie@120000/rp1/i2c@88000/imx708@1a",
        }
    ]
    SCENE_RGB = (255, 0, 0)
    SCENE_IMAGE = None
    STRIDE_ALIGN = 64
    FAULTS.clear()
    BUSY.clear()
    INSTANCES.clear()


reset()


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def render_buffer(stream: dict, frame_number: int) -> np.ndarray:
    """The 1-D buffer libcamera would fill for ``stream`` while the camera sees SCENE_RGB."""
    width, height = stream["size"]
    stride, fmt = stream["stride"], stream["format"]
    if SCENE_IMAGE is not None:
        rgb = cv2.resize(SCENE_IMAGE, (width, height), interpolation=cv2.INTER_NEAREST)
    else:
        rgb = np.empty((height, width, 3), np.uint8)
        rgb[:] = SCENE_RGB
        rgb[0, 0, 1] = frame_number % 4  # a little sensor noise: real frames are never identical

    if fmt in _RGB_FORMATS:
        channels = {"RGB888": rgb[..., ::-1], "BGR888": rgb}.get(fmt)
        if channels is None:
            alpha = np.full((height, width, 1), 255, np.uint8)
            order = rgb[..., ::-1] if fmt == "XRGB8888" else rgb
            channels = np.concatenate([order, alpha], axis=2)
        rows = np.full((height, stride), _JUNK, np.uint8)
        rows[:, : width * channels.shape[2]] = channels.reshape(height, -1)
        return rows.reshape(-1)

    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    luma = i420[: width * height].reshape(height, width)
    quarter = (width // 2) * (height // 2)
    u_plane = i420[width * height : width * height + quarter].reshape(height // 2, width // 2)
    v_plane = i420[width * height + quarter :].reshape(height // 2, width // 2)
    if fmt == "YVU420":
        u_plane, v_plane = v_plane, u_plane
    padded_luma = np.full((height, stride), _JUNK, np.uint8)
    padded_luma[:, :width] = luma
    planes = [padded_luma.reshape(-1)]
    for plane in (u_plane, v_plane):
        padded = np.full((height // 2, stride // 2), _JUNK, np.uint8)
        padded[:, : width // 2] = plane
        planes.append(padded.reshape(-1))
    return np.concatenate(planes)


def make_array(buffer: np.ndarray, stream: dict) -> np.ndarray:
    """picamera2's Helpers.make_array for the formats the runtime uses."""
    fmt = stream["format"]
    width, height = stream["size"]
    stride = stream["stride"]
    if fmt in _RGB_FORMATS:
        channels = _RGB_FORMATS[fmt]
        array = buffer
        if stride != width * channels:
            array = np.asarray(buffer.reshape(height, stride)[:, : width * channels], order="C")
        return array.reshape(height, width, channels)
    if fmt in _YUV_FORMATS:
        return buffer.reshape(height * 3 // 2, stride)
    raise RuntimeError("Format " + fmt + " not supported")


class CompletedRequest:
    def __init__(self, camera: Picamera2, frame_number: int) -> None:
        self.picam2 = camera
        self.config = copy.deepcopy(camera.camera_config)
        self.frame_number = frame_number
        self.ref_count = 1

    def make_buffer(self, name: str) -> np.ndarray:
        if self.ref_count <= 0:
            raise RuntimeError("request used after release")
        if self.config.get(name) is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        return render_buffer(self.config[name], self.frame_number)

    def make_array(self, name: str) -> np.ndarray:
        return make_array(self.make_buffer(name), self.config[name])

    def get_metadata(self) -> dict:
        return {"SensorTimestamp": int(time.monotonic() * 1e9), "FrameDuration": 33333}

    def release(self) -> None:
        self.ref_count -= 1
        if self.ref_count < 0:
            raise RuntimeError("CompletedRequest: lock now has negative ref_count")
        if self.ref_count == 0:
            self.picam2.outstanding.discard(self)


class Job:
    """A pending capture: completes when the camera's next frame is due, never if stalled."""

    def __init__(self, camera: Picamera2) -> None:
        self.camera = camera
        self.result = None

    def get_result(self, timeout: float | None = None) -> CompletedRequest:
        if self.result is None:
            self.result = self.camera._next_request(timeout)
        return self.result


class Picamera2:
    @staticmethod
    def global_camera_info() -> list[dict]:
        return [dict(camera, Num=index) for index, camera in enumerate(CAMERAS)]

    def __init__(self, camera_num: int = 0, tuning=None) -> None:
        INSTANCES.append(self)
        self.calls: list[str] = ["__init__"]
        self.camera_num = camera_num
        self.is_open = False
        self.started = False
        self.camera_config: dict | None = None
        self.controls: dict = {}
        self.controls_set: list[dict] = []
        self.outstanding: set[CompletedRequest] = set()
        self.frames = 0
        self._next_frame_at = 0.0
        self._lock = threading.Lock()
        if camera_num >= len(CAMERAS) or camera_num in BUSY:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        BUSY.add(camera_num)
        self.is_open = True

    def create_video_configuration(
        self,
        main=None,
        lores=None,
        raw=None,
        transform=None,
        colour_space=None,
        buffer_count=6,
        controls=None,
        display="main",
        encode="main",
        queue=True,
    ) -> dict:
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        stream = {"format": "XBGR8888", "size": (1280, 720)}
        for key, value in (main or {}).items():
            if key not in ("format", "size"):
                raise ValueError(
                    f"Bad key {key!r}: valid stream configuration keys are ('format', 'size')"
                )
            stream[key] = value
        width, height = stream["size"]
        stream["size"] = (width - width % 2, height - height % 2)
        all_controls = {"NoiseReductionMode": 1, "FrameDurationLimits": (33333, 33333)}
        all_controls.update(controls or {})
        return {
            "use_case": "video",
            "transform": transform,
            "colour_space": colour_space,
            "buffer_count": buffer_count,
            "queue": queue,
            "main": stream,
            "lores": lores,
            "raw": None,
            "controls": all_controls,
            "display": display,
            "encode": encode,
        }

    def configure(self, camera_config) -> None:
        self.calls.append("configure")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        config = copy.deepcopy(camera_config)
        stream = config["main"]
        fmt, size = stream["format"], stream["size"]
        if fmt not in _RGB_FORMATS and fmt not in _YUV_FORMATS:
            raise RuntimeError("Bad format " + fmt + " in stream main")
        if not isinstance(size, tuple) or len(size) != 2:
            raise RuntimeError("size in main stream should be (width, height)")
        if size[0] % 2 or size[1] % 2:
            raise RuntimeError("width and height should be even")
        width, height = size
        if fmt in _YUV_FORMATS:
            stream["stride"] = _align(width, STRIDE_ALIGN)
            stream["framesize"] = stream["stride"] * height * 3 // 2
        else:
            stream["stride"] = _align(width * _RGB_FORMATS[fmt], STRIDE_ALIGN)
            stream["framesize"] = stream["stride"] * height
        self.camera_config = config
        self.controls = dict(config["controls"])

    def camera_configuration(self) -> dict:
        return self.camera_config

    def stream_configuration(self, name: str = "main") -> dict:
        return self.camera_config[name]

    def set_controls(self, controls: dict) -> None:
        self.calls.append("set_controls")
        self.controls_set.append(dict(controls))
        self.controls.update(controls)

    def start(self, config=None, show_preview=False) -> None:
        self.calls.append("start")
        if config is not None:
            self.configure(config)
        if self.camera_config is None:
            raise RuntimeError("Camera has not been configured")
        if "start" in FAULTS:
            raise FAULTS["start"]
        self.started = True
        self._next_frame_at = time.monotonic()

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        if not self.is_open:
            return
        self.started = False  # close stops a running camera itself, as picamera2's does
        self.is_open = False
        BUSY.discard(self.camera_num)

    def capture_request(self, wait=None, signal_function=None):
        job = Job(self)
        return job.get_result() if wait is None or wait is True else job

    def capture_array(self, name: str = "main", wait=None, signal_function=None):
        request = self.capture_request()
        try:
            return request.make_array(name)
        finally:
            request.release()

    def wait(self, job: Job, timeout: float | None = None) -> CompletedRequest:
        return job.get_result(timeout=timeout)

    def _frame_duration_s(self) -> float:
        return self.controls.get("FrameDurationLimits", (33333, 33333))[0] / 1e6

    def _next_request(self, timeout: float | None) -> CompletedRequest:
        stall_after = FAULTS.get("stall_after")
        if not self.started or (stall_after is not None and self.frames >= stall_after):
            time.sleep(timeout if timeout is not None else 3600)
            raise FutureTimeoutError()
        with self._lock:
            delay = self._next_frame_at - time.monotonic()
            if timeout is not None and delay > timeout:
                time.sleep(timeout)
                raise FutureTimeoutError()
            if delay > 0:
                time.sleep(delay)
            self._next_frame_at = max(self._next_frame_at, time.monotonic())
            self._next_frame_at += self._frame_duration_s()
            self.frames += 1
            request = CompletedRequest(self, self.frames)
            self.outstanding.add(request)
        return request
