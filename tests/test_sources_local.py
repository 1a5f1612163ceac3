"""Video files, image folders, USB device handling and the factory, on real decoding."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from device.errors import ConfigError, ToolkitError
from device.sources import (
    SourceState,
    create_source,
    open_source,
    parse_source_config,
    source_config_from_string,
)
from device.sources.config import (
    ImageFolderConfig,
    PiCameraConfig,
    StreamConfig,
    UsbCameraConfig,
    VideoFileConfig,
)
from tests.conftest import REALDATA
from tests.source_helpers import assert_bgr_frame, drain, read_frames, wait_for
from tests.stream_servers import ffmpeg_available, make_h264_clip

needs_ffmpeg = pytest.mark.skipif(not ffmpeg_available(), reason="needs the ffmpeg program")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """30 frames of 320x240 H.264 at 15 fps."""
    if not ffmpeg_available():
        pytest.skip("needs the ffmpeg program to make a clip")
    return make_h264_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=2)


# Video files.


def test_video_file_delivers_every_frame_in_order_then_ends(clip):
    with open_source(VideoFileConfig(path=clip)) as source:
        frames = drain(source)
        assert source.state == SourceState.ENDED
        assert source.read(timeout=0.1) is None
    assert len(frames) == 30
    assert [f.index for f in frames] == list(range(30))
    assert_bgr_frame(frames[0], 240, 320)
    assert source.frames_dropped == 0 and source.status()["fps"] == 15.0


def test_video_file_loops(clip):
    with open_source(VideoFileConfig(path=clip, loop=True)) as source:
        frames = read_frames(source, 75)
        assert source.loops == 2 and source.state == SourceState.STREAMING
    assert np.array_equal(frames[0].image, frames[30].image)


def test_realtime_video_file_drops_what_a_slow_reader_misses(clip):
    with open_source(VideoFileConfig(path=clip, realtime=True)) as source:
        read_frames(source, 1)
        time.sleep(0.5)  # 7 or 8 frames fall due at 15 fps
        frame = read_frames(source, 1)[0]
        assert source.frames_dropped >= 5
        assert frame.index == 1


def test_undecodable_video_is_explained(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    with pytest.raises(ToolkitError) as error:
        open_source(VideoFileConfig(path=broken))
    message = str(error.value)
    assert f"Could not decode {broken}" in message
    assert "Expected a video FFmpeg can decode" in message and "ffprobe" in message


def test_missing_video_file_is_explained(tmp_path):
    with pytest.raises(ToolkitError, match=r"Expected a video file at .*, found nothing"):
        open_source(VideoFileConfig(path=tmp_path / "nope.mp4"))
    with pytest.raises(ToolkitError, match=r"found a folder.*source type folder"):
        open_source(VideoFileConfig(path=tmp_path))


@pytest.mark.realdata
def test_real_video_decodes_at_its_size():
    video = REALDATA / "video" / "car-detection.mp4"
    if not video.exists():
        pytest.skip(f"real data not present: {video} (see ../shared/realdata/SOURCES.md)")
    with open_source(VideoFileConfig(path=video)) as source:
        frames = read_frames(source, 3)
    assert_bgr_frame(frames[0], 432, 768)


# Image folders.


def write_image(path: Path, bgr: tuple[int, int, int]) -> None:
    cv2.imwrite(str(path), np.full((48, 64, 3), bgr, np.uint8))


def test_image_folder_in_name_order_skipping_unreadable_files(tmp_path):
    write_image(tmp_path / "b.png", (0, 255, 0))
    write_image(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(tmp_path / "d.png"), np.full((48, 64), 200, np.uint8))  # greyscale
    (tmp_path / "notes.txt").write_text("ignored")

    with open_source(ImageFolderConfig(path=tmp_path)) as source:
        frames = drain(source)
        assert source.state == SourceState.ENDED
        assert source.frames_dropped == 1 and "c.jpg" in source.last_error
    assert len(frames) == 3
    assert frames[0].image[0, 0].tolist() == [255, 0, 0]
    assert frames[1].image[0, 0].tolist() == [0, 255, 0]
    assert_bgr_frame(frames[2], 48, 64)


def test_image_folder_loops(tmp_path):
    write_image(tmp_path / "only.png", (1, 2, 3))
    with open_source(ImageFolderConfig(path=tmp_path, loop=True)) as source:
        assert len(read_frames(source, 5)) == 5


def test_empty_image_folder_is_explained(tmp_path):
    with pytest.raises(ToolkitError, match=r"Expected images .* found an empty folder"):
        open_source(ImageFolderConfig(path=tmp_path))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ToolkitError, match=r"found 1 other entries \(readme.txt\)"):
        open_source(ImageFolderConfig(path=tmp_path))
    with pytest.raises(ToolkitError, match=r"Expected a folder of images .* found nothing"):
        open_source(ImageFolderConfig(path=tmp_path / "missing"))


def test_folder_of_only_broken_images_fails(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    with open_source(ImageFolderConfig(path=tmp_path, loop=True)) as source:
        assert source.read(timeout=1.0) is None
        assert source.state == SourceState.FAILED and "could be decoded" in source.last_error


# USB / V4L2 devices.


def test_missing_usb_camera_is_explained(tmp_path):
    device = tmp_path / "video7"
    with pytest.raises(ToolkitError) as error:
        open_source(UsbCameraConfig(device=str(device)))
    message = str(error.value)
    assert f"No camera at {device}" in message and "video devices present" in message
    assert "v4l2-ctl --list-devices" in message


@needs_ffmpeg
def test_vanished_device_node_is_noticed_and_reconnected(clip, tmp_path):
    """The /dev node check, run on a stand-in node: a video file read through the FFmpeg
    backend (V4L2 needs real hardware).  Removing it is unplugging; putting it back, replugging."""
    node = tmp_path / "video0"
    shutil.copy(clip, node)
    config = UsbCameraConfig(
        device=str(node), backend="ffmpeg", frozen_after_s=0, reconnect={"initial_delay_s": 0.1}
    )
    with open_source(config) as source:
        read_frames(source, 3)
        node.unlink()
        wait_for(lambda: "No camera at" in source.last_error, 5, "the vanished node")
        assert source.state == SourceState.RECONNECTING
        reconnects = source.reconnects

        shutil.copy(clip, node)
        wait_for(lambda: source.reconnects > reconnects, 5, "the node to come back")
        read_frames(source, 3)
        assert source.status()["device"] == str(node)


# Factory and settings.


def test_command_line_words_pick_the_right_source(tmp_path):
    assert isinstance(source_config_from_string("picamera"), PiCameraConfig)
    assert source_config_from_string("picamera:1").camera == 1
    assert source_config_from_string("0").device_path == Path("/dev/video0")
    assert source_config_from_string("/dev/video2").device_path == Path("/dev/video2")
    assert parse_source_config({"type": "usb", "device": 1}).device_path == Path("/dev/video1")
    assert isinstance(source_config_from_string("rtsp://cam.local/stream1"), StreamConfig)
    assert isinstance(source_config_from_string("tcp://127.0.0.1:8888"), StreamConfig)
    assert isinstance(source_config_from_string(str(tmp_path)), ImageFolderConfig)
    config = source_config_from_string("clip.mp4", loop=True)
    assert isinstance(config, VideoFileConfig) and config.loop


def test_bad_settings_name_the_key_the_value_and_what_is_expected():
    with pytest.raises(ConfigError, match=r"source\.fps \(got -1\): Input should be greater"):
        parse_source_config({"type": "picamera", "fps": -1})
    with pytest.raises(ConfigError, match=r"source\.colour: Extra inputs are not permitted"):
        parse_source_config({"type": "usb", "colour": "red"})
    with pytest.raises(ConfigError, match=r"source\.url .*expected a URL starting with"):
        parse_source_config({"type": "stream", "url": "ftp://example/x"})
    with pytest.raises(ConfigError, match="does not match any of the expected tags"):
        parse_source_config({"type": "webcam"})


def test_creating_a_source_does_not_open_it(tmp_path):
    source = create_source(UsbCameraConfig(device=str(tmp_path / "video9")))
    assert source.state == SourceState.CONNECTING and source.status()["frames_captured"] == 0
    source.close()


def test_settings_describe_every_field():
    for model in (
        PiCameraConfig,
        UsbCameraConfig,
        StreamConfig,
        VideoFileConfig,
        ImageFolderConfig,
    ):
        for name, field in model.model_fields.items():
            if name != "type":
                assert field.description, f"{model.__name__}.{name} needs a description"


def test_an_unsupported_url_scheme_is_named_instead_of_read_as_a_file_path():
    with pytest.raises(ConfigError) as caught:
        source_config_from_string("ftp://127.0.0.1/cam.mp4")

    assert "ftp:// streams are not supported" in str(caught.value)
    assert "rtsp://" in str(caught.value)
