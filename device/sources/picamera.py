"""The Raspberry Pi camera through picamera2, imported only when this source is used.

picamera2 names formats by little-endian pixel words, so the bytes of an ``RGB888`` array are
B,G,R (what OpenCV wants) and those of ``BGR888`` are R,G,B; ``XRGB8888`` is B,G,R,A and
``XBGR8888`` R,G,B,A.  ``YUV420`` and ``YVU420`` arrays are (height * 3 / 2, stride): the Y plane,
then the two chroma planes with half the stride each.  Rows may be padded past the width (the
ISP aligns strides), so every conversion crops to the configured size.
"""

from __future__ import annotations

import importlib
import logging
from concurrent.futures import TimeoutError as FutureTimeoutError

import cv2
import numpy as np

from device.errors import ToolkitError
from device.sources.config import PiCameraConfig
from device.sources.live import LiveSource, SourceLost

log = logging.getLogger(__name__)

_YUV_TO_BGR = {"YUV420": cv2.COLOR_YUV2BGR_I420, "YVU420": cv2.COLOR_YUV2BGR_YV12}
# Channels per pixel, and the conversion from the array's byte order to B,G,R.
_RGB_TO_BGR = {
    "RGB888": (3, None),  # bytes B,G,R already
    "BGR888": (3, cv2.COLOR_RGB2BGR),  # bytes R,G,B
    "XRGB8888": (4, cv2.COLOR_BGRA2BGR),  # bytes B,G,R,A
    "XBGR8888": (4, cv2.COLOR_RGBA2BGR),  # bytes R,G,B,A
}


def import_picamera2():
    """The Picamera2 class, or a ToolkitError that says how to get it."""
    try:
        module = importlib.import_module("picamera2")
    except ImportError as exc:
        raise ToolkitError(_missing_picamera2_message(exc)) from exc
    except Exception as exc:  # e.g. numpy 2 breaking the OS build: AttributeError _ARRAY_API
        raise ToolkitError(_missing_picamera2_message(exc)) from exc
    return module.Picamera2


def _missing_picamera2_message(exc: BaseException) -> str:
    message = (
        f"The Pi camera source needs picamera2, which could not be imported ({exc}). It comes "
        "from Raspberry Pi OS, not from pip: 'sudo apt install python3-picamera2', and create the "
        "virtualenv with 'python3 -m venv --system-site-packages' so that it is visible."
    )
    if int(np.__version__.split(".")[0]) >= 2:
        message += (
            f" This environment has numpy {np.__version__}, but the system picamera2 is built "
            "against numpy 1.x: run \"pip install 'numpy<2'\" in the virtualenv."
        )
    return message


def frame_duration_us(fps: float) -> int:
    """libcamera's FrameDurationLimits unit: microseconds per frame."""
    return round(1_000_000 / fps)


def picamera_array_to_bgr(array: np.ndarray, fmt: str, width: int, height: int) -> np.ndarray:
    """A picamera2 array of stream format ``fmt`` to a BGR uint8 (height, width, 3) frame,
    cropping any stride padding."""
    if fmt in _YUV_TO_BGR:
        return cv2.cvtColor(_packed_yuv420(array, width, height), _YUV_TO_BGR[fmt])
    channels, to_bgr = _RGB_TO_BGR.get(fmt, (0, None))
    if not channels:
        raise SourceLost(f"unsupported picamera2 format {fmt}")
    if array.ndim != 3 or array.shape[2] != channels:
        raise SourceLost(f"expected a (h, w, {channels}) array for {fmt}, got {array.shape}")
    array = np.ascontiguousarray(array[:height, :width])
    return array if to_bgr is None else cv2.cvtColor(array, to_bgr)


def _packed_yuv420(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (height * 3 / 2, stride) planar YUV 4:2:0 array with padded rows, repacked without the
    padding, as OpenCV's I420/YV12 conversions expect."""
    if array.ndim != 2 or array.shape[0] != height * 3 // 2:
        raise SourceLost(f"expected a ({height * 3 // 2}, stride) YUV array, got {array.shape}")
    stride = array.shape[1]
    if stride == width:
        return np.ascontiguousarray(array)
    luma = array[:height, :width]
    chroma = array[height:].reshape(-1)
    plane = (height // 2) * (stride // 2)
    first = chroma[:plane].reshape(height // 2, stride // 2)[:, : width // 2]
    second = chroma[plane : 2 * plane].reshape(height // 2, stride // 2)[:, : width // 2]
    packed = np.concatenate([luma.reshape(-1), first.reshape(-1), second.reshape(-1)])
    return packed.reshape(height * 3 // 2, width)


class PiCameraSource(LiveSource):
    """A CSI camera; a stalled or failing camera is stopped, closed and opened again."""

    def __init__(self, config: PiCameraConfig) -> None:
        super().__init__(
            config.name or f"picamera{config.camera}",
            read_timeout_s=config.read_timeout_s,
            frozen_after_s=config.frozen_after_s,
            reconnect=config.reconnect,
        )
        self.config = config
        self.camera_model = ""
        self.stream: dict = {}  # the main stream as configured: format, size, stride
        self._picamera2_class = None
        self._camera = None
        self._pending = None  # a capture job that timed out; waited on again, never doubled

    def _connect(self) -> None:
        if self._picamera2_class is None:
            self._picamera2_class = import_picamera2()
        self.camera_model = self._find_camera()
        try:
            self._camera = self._picamera2_class(self.config.camera)
        except Exception as exc:
            raise SourceLost(
                f"Could not open camera {self.config.camera} ({self.camera_model}): {exc}. It is "
                "probably in use by another process (rpicam-*, another daemon, a stuck Python): "
                "stop it, or find it with 'sudo fuser /dev/media*'."
            ) from exc
        try:
            self._configure_and_start()
        except Exception as exc:
            raise SourceLost(
                f"Could not start camera {self.config.camera} ({self.camera_model}) with "
                f"{self.config.width}x{self.config.height} {self.config.format} at "
                f"{self.config.fps:g} fps: {exc}. Try a size and rate from "
                "'rpicam-hello --list-cameras'."
            ) from exc

    def _find_camera(self) -> str:
        cameras = self._picamera2_class.global_camera_info()
        if not cameras:
            raise SourceLost(
                "libcamera found no camera. Expected a CSI camera: check the ribbon cable "
                "(contacts facing the right way, power off while connecting), that "
                "'rpicam-hello --list-cameras' lists it, and 'camera_auto_detect=1' in "
                "/boot/firmware/config.txt."
            )
        if self.config.camera >= len(cameras):
            found = ", ".join(f"{i}: {c.get('Model', '?')}" for i, c in enumerate(cameras))
            raise SourceLost(
                f"Expected camera number {self.config.camera}, found {len(cameras)} camera(s) "
                f"({found}). Set source.camera to one of those numbers."
            )
        return str(cameras[self.config.camera].get("Model", "unknown"))

    def _configure_and_start(self) -> None:
        config = self.config
        duration = frame_duration_us(config.fps)
        controls = {"FrameDurationLimits": (duration, duration)}
        options = {}
        if config.format in _YUV_TO_BGR:
            # BT.601 limited range is what OpenCV's YUV to BGR conversion assumes.
            from libcamera import ColorSpace

            options["colour_space"] = ColorSpace.Smpte170m()
        video_config = self._camera.create_video_configuration(
            main={"size": (config.width, config.height), "format": config.format},
            buffer_count=config.buffer_count,
            controls=controls,
            **options,
        )
        self._camera.configure(video_config)
        self.stream = dict(self._camera.camera_config["main"])
        if tuple(self.stream.get("size", ())) != (config.width, config.height):
            log.info(
                "source %s: camera adjusted %dx%d to %s", self.name, config.width, config.height,
                self.stream.get("size"),
            )  # fmt: skip
        self._camera.set_controls(controls)
        self._camera.start()
        log.info(
            "source %s: camera %d (%s) started, %s %s stride %s, %g fps",
            self.name,
            config.camera,
            self.camera_model,
            self.stream.get("size"),
            self.stream.get("format"),
            self.stream.get("stride"),
            config.fps,
        )

    def _grab(self) -> np.ndarray:
        if self._camera is None:
            raise SourceLost("camera not open")
        job = self._pending or self._camera.capture_request(wait=False)
        try:
            request = self._camera.wait(job, timeout=self.read_timeout_s)
        except (FutureTimeoutError, TimeoutError):  # distinct classes before Python 3.11
            self._pending = job
            raise SourceLost(f"no frame from the camera for {self.read_timeout_s:g} s") from None
        self._pending = None
        try:
            array = request.make_array("main")
        finally:
            request.release()
        width, height = self.stream.get("size", (self.config.width, self.config.height))
        return picamera_array_to_bgr(
            array, self.stream.get("format", self.config.format), width, height
        )

    def _disconnect(self) -> None:
        camera, self._camera = self._camera, None
        self._pending = None
        if camera is None:
            return
        try:
            camera.stop()
        except Exception as exc:
            log.warning("source %s: stopping the camera failed: %s", self.name, exc)
        try:
            camera.close()
        except Exception as exc:
            log.warning("source %s: closing the camera failed: %s", self.name, exc)

    def status(self) -> dict:
        status = super().status()
        status.update(kind="picamera", camera=self.config.camera, model=self.camera_model)
        status["stream"] = {k: self.stream.get(k) for k in ("format", "size", "stride")}
        return status
