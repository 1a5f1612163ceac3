"""The Pi camera path on aarch64 with the Pi's numpy 1.x and OpenCV: the tests of
tests/test_sources_picamera.py (byte orders, stride crops, YUV420, frame rate, stop/close, the
missing-picamera2 message), collected again inside the emulated board."""

from __future__ import annotations

from tests.test_sources_picamera import (  # noqa: F401 - pytest collects them from here too
    fake_picamera2,
    test_camera_is_stopped_and_closed_on_close_with_requests_released,
    test_camera_is_stopped_and_closed_when_start_fails,
    test_frame_rate_is_set_on_the_camera_in_microseconds,
    test_missing_picamera2_says_how_to_install_it,
    test_no_camera_and_wrong_number_and_busy_camera_are_explained,
    test_padded_strides_are_cropped_without_shearing_a_picture,
    test_red_scene_reaches_the_model_input_as_red,
    test_stalled_camera_is_reopened_and_streams_again,
    test_yuv_formats_ask_for_the_colour_space_opencv_converts_from,
)
