"""The Pi camera path, proven against a picamera2 stand-in (tests/fakes/picamera2) that lays out
buffers as libcamera does: byte orders, padded strides, YUV420 shapes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from device.contract import ModelInfo
from device.errors import ToolkitError
from device.preprocess import preprocess
from device.sources import SourceState, open_source
from device.sources.config import PICAMERA_FORMATS, PiCameraConfig
from device.sources.picamera import frame_duration_us, picamera_array_to_bgr
from tests.source_helpers import assert_bgr_frame, read_frames, wait_for

FAKES = Path(__file__).parent / "fakes"
WIDTH, HEIGHT = 100, 64  # rows of 300 or 400 bytes, padded to 320 or 448; YUV stride 128
BYTES_PER_PIXEL = {"RGB888": 3, "BGR888": 3, "XRGB8888": 4, "XBGR8888": 4, "YUV420": 1, "YVU420": 1}


@pytest.fixture
def fake_picamera2(monkeypatch):
    for name in ("picamera2", "libcamera"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(FAKES))
    module = importlib.import_module("picamera2")
    module.reset()
    yield module
    for name in ("picamera2", "libcamera"):
        sys.modules.pop(name, None)


def camera_config(**settings) -> PiCameraConfig:
    defaults = {"width": WIDTH, "height": HEIGHT, "fps": 60, "read_timeout_s": 1.0}
    return PiCameraConfig(**{**defaults, **settings})


@pytest.mark.parametrize("fmt", PICAMERA_FORMATS)
def test_red_scene_reaches_the_model_input_as_red(fake_picamera2, fmt):
    with open_source(camera_config(format=fmt)) as source:
        frame = read_frames(source, 1)[0]
    camera = fake_picamera2.INSTANCES[-1]
    stride = camera.camera_config["main"]["stride"]
    assert stride > WIDTH * BYTES_PER_PIXEL[fmt], "the fake must pad rows for this test to bite"

    assert_bgr_frame(frame, HEIGHT, WIDTH)
    blue, green, red = (frame.image[..., c].astype(int) for c in range(3))
    assert red.min() > 230 and blue.max() < 30 and green.max() < 30

    info = ModelInfo(names=["thing"], input_size=(64, 64))
    assert info.preprocess.channel_order == "RGB"
    tensor, transform = preprocess(frame.image, info)
    top, left = transform.pad_top, transform.pad_left
    height, width = transform.resized_size
    inside = tensor[0, :, top : top + height, left : left + width]
    assert inside[0].min() > 0.9, "channel 0 of an RGB model input must carry red"
    assert inside[1].max() < 0.1 and inside[2].max() < 0.1


@pytest.mark.parametrize("fmt", PICAMERA_FORMATS)
def test_padded_strides_are_cropped_without_shearing_a_picture(fake_picamera2, fmt):
    rng = np.random.default_rng(0)
    picture = (rng.integers(0, 8, (HEIGHT // 2, WIDTH // 2, 3)) * 32).astype(np.uint8)
    fake_picamera2.SCENE_IMAGE = np.repeat(np.repeat(picture, 2, axis=0), 2, axis=1)
    expected_bgr = fake_picamera2.SCENE_IMAGE[..., ::-1].astype(int)

    camera = fake_picamera2.Picamera2(0)
    camera.configure(
        camera.create_video_configuration(main={"size": (WIDTH, HEIGHT), "format": fmt})
    )
    camera.start()
    array = camera.capture_array("main")
    camera.close()

    bgr = picamera_array_to_bgr(array, fmt, WIDTH, HEIGHT)
    assert bgr.shape == (HEIGHT, WIDTH, 3) and bgr.flags["C_CONTIGUOUS"]
    error = np.abs(bgr.astype(int) - expected_bgr)
    if fmt.startswith("YUV") or fmt.startswith("YVU"):
        # 4:2:0 chroma is shared by 2x2 blocks (the picture is made of such blocks) and
        # limited-range rounding costs a few levels.
        assert np.median(error) <= 3 and error.max() <= 40
    else:
        assert error.max() == 0


def test_frame_rate_is_set_on_the_camera_in_microseconds(fake_picamera2):
    with open_source(camera_config(fps=15)) as source:
        read_frames(source, 1)
    camera = fake_picamera2.INSTANCES[-1]
    assert frame_duration_us(15) == 66667
    assert {"FrameDurationLimits": (66667, 66667)} in camera.controls_set
    assert camera.camera_config["controls"]["FrameDurationLimits"] == (66667, 66667)
    assert camera.calls.index("set_controls") < camera.calls.index("start")


def test_yuv_formats_ask_for_the_colour_space_opencv_converts_from(fake_picamera2):
    with open_source(camera_config(format="YUV420")) as source:
        read_frames(source, 1)
    assert fake_picamera2.INSTANCES[-1].camera_config["colour_space"].name == "SMPTE170M"


def test_camera_is_stopped_and_closed_when_start_fails(fake_picamera2):
    fake_picamera2.FAULTS["start"] = RuntimeError("Failed to start media pipeline")
    with pytest.raises(ToolkitError, match="Failed to start media pipeline") as error:
        open_source(camera_config())
    assert "rpicam-hello --list-cameras" in str(error.value)
    camera = fake_picamera2.INSTANCES[-1]
    assert camera.calls[-2:] == ["stop", "close"] and not camera.is_open
    assert not fake_picamera2.BUSY, "the camera must be free for the next process"


def test_camera_is_stopped_and_closed_on_close_with_requests_released(fake_picamera2):
    source = open_source(camera_config())
    read_frames(source, 5)
    source.close()
    source.close()
    camera = fake_picamera2.INSTANCES[-1]
    assert "stop" in camera.calls and camera.calls[-1] == "close" and not camera.is_open
    assert not camera.outstanding


def test_stalled_camera_is_reopened_and_streams_again(fake_picamera2):
    fake_picamera2.FAULTS["stall_after"] = 3
    config = camera_config(read_timeout_s=0.3, reconnect={"initial_delay_s": 0.1})
    with open_source(config) as source:
        read_frames(source, 2)
        wait_for(lambda: source.state == SourceState.RECONNECTING, 5, "the stall to be noticed")
        assert "no frame from the camera" in source.status()["last_error"]
        first = fake_picamera2.INSTANCES[0]
        assert first.calls[-2:] == ["stop", "close"]

        fake_picamera2.FAULTS.clear()
        wait_for(lambda: source.state == SourceState.STREAMING, 5, "streaming again")
        frames = read_frames(source, 3)
        assert source.reconnects == 1
        assert frames[-1].index > frames[0].index
    assert all(not camera.outstanding for camera in fake_picamera2.INSTANCES)
    assert all(not camera.is_open for camera in fake_picamera2.INSTANCES)


def test_missing_picamera2_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails as if not installed
    with pytest.raises(ToolkitError) as error:
        open_source(camera_config())
    message = str(error.value)
    assert "sudo apt install python3-picamera2" in message
    assert "--system-site-packages" in message
    assert ("numpy<2" in message) == (int(np.__version__.split(".")[0]) >= 2)


def test_no_camera_and_wrong_number_and_busy_camera_are_explained(fake_picamera2):
    fake_picamera2.CAMERAS.clear()
    with pytest.raises(ToolkitError, match="libcamera found no camera"):
        open_source(camera_config())

    fake_picamera2.reset()
    with pytest.raises(
        ToolkitError, match=r"Expected camera number 1, found 1 camera\(s\) \(0: imx708\)"
    ):
        open_source(camera_config(camera=1))

    fake_picamera2.BUSY.add(0)
    with pytest.raises(ToolkitError, match="in use by another process"):
        open_source(camera_config())


def test_odd_sizes_are_rejected_in_the_settings():
    with pytest.raises(ValueError, match="must be even"):
        PiCameraConfig(width=641)
