"""Calibration data: folders, videos and YOLO datasets in; clear errors for bad input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import device.preprocess
from device.contract import ModelInfo
from device.errors import ToolkitError
from toolkit import calibrate

INFO = ModelInfo(names=["cat", "dog"], input_size=(64, 64))


def write_images(folder, count, size=(48, 64), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def write_video(path, frames, size=(48, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((*size, 3), i * 20 % 256, dtype=np.uint8))
    writer.release()
    return path


def test_folder_of_images_is_found_recursively(tmp_path):
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "a" / "deeper", 2, seed=1)
    (tmp_path / "a" / "notes.txt").write_text("not an image")

    source = calibrate.open_source(tmp_path / "a")

    assert (source.kind, len(source), source.labelled) == ("images", 5, False)


def test_split_is_disjoint_seeded_and_decoded(tmp_path):
    write_images(tmp_path / "imgs", 20)
    source = calibrate.open_source(tmp_path / "imgs")

    calib, held = calibrate.sample_split([source], 12, 5, seed=3)
    calib_again, _ = calibrate.sample_split([source], 12, 5, seed=3)
    calib_other, _ = calibrate.sample_split([source], 12, 5, seed=4)

    assert (len(calib), len(held)) == (12, 5)
    assert not {s.name for s in calib} & {s.name for s in held}
    assert [s.name for s in calib] == [s.name for s in calib_again]
    assert [s.name for s in calib] != [s.name for s in calib_other]
    assert calib[0].image.shape == (48, 64, 3) and calib[0].image.dtype == np.uint8


def test_video_frames_are_sampled_across_the_file(tmp_path):
    video = write_video(tmp_path / "clip.mp4", 15)

    source = calibrate.open_source(video)
    calib, held = calibrate.sample_split([source], 6, 4, seed=0)

    assert (source.kind, len(source)) == ("video", 15)
    assert len(calib) == 6 and len(held) == 4
    assert all(s.name.startswith("clip.mp4#") for s in calib + held)
    index = int(calib[0].name.split("#")[1])
    # Frames were written with grey level 20 x index (mp4v is lossy: allow a little).
    assert abs(float(calib[0].image.mean()) - index * 20 % 256) < 6


def test_yolo_dataset_labels_become_pixel_boxes(tmp_path):
    (path,) = write_images(tmp_path / "ds" / "images" / "val", 1, size=(50, 100))
    labels = tmp_path / "ds" / "labels" / "val"
    labels.mkdir(parents=True)
    (labels / f"{path.stem}.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.2 0.2\n")

    source = calibrate.open_source(tmp_path / "ds")
    (sample,) = calibrate.load_samples(source, source.items)

    assert source.kind == "dataset" and source.labelled
    assert sample.labels.classes.tolist() == [1, 0]
    np.testing.assert_allclose(sample.labels.boxes, [[40, 15, 60, 35], [0, 0, 20, 10]])


def test_image_without_label_file_has_no_objects(tmp_path):
    write_images(tmp_path / "ds" / "images", 1)
    (tmp_path / "ds" / "labels").mkdir()
    source = calibrate.open_source(tmp_path / "ds")

    (sample,) = calibrate.load_samples(source, source.items)

    assert len(sample.labels) == 0


def test_reader_uses_the_device_preprocess_function(tmp_path):
    assert calibrate.preprocess is device.preprocess.preprocess
    image = np.random.default_rng(0).integers(0, 256, (30, 80, 3), dtype=np.uint8)
    reader = calibrate.CalibrationReader([calibrate.Sample(image, "x")], INFO)

    feed = reader.get_next()

    np.testing.assert_array_equal(feed["images"], device.preprocess.preprocess(image, INFO)[0])
    assert reader.get_next() is None
    reader.set_range(0, 1)
    assert reader.get_next() is not None


# ---------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(ToolkitError, match="Calibration data not found"):
        calibrate.open_source(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolkitError, match="found an empty folder"):
        calibrate.open_source(tmp_path / "empty")


def test_folder_without_images_names_what_it_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    with pytest.raises(ToolkitError, match=r"found \['readme.txt'\]"):
        calibrate.open_source(tmp_path / "docs")


def test_unreadable_image(tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 2)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    source = calibrate.open_source(folder)

    with pytest.raises(ToolkitError, match=r"Could not read the image .*broken.jpg"):
        calibrate.load_samples(source, source.items)


def test_video_that_cannot_be_decoded(tmp_path):
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    with pytest.raises(ToolkitError, match="Could not decode any frame of the video"):
        calibrate.open_source(video)


def test_unsupported_file_type(tmp_path):
    notes = tmp_path / "frames.csv"
    notes.write_text("1,2,3")
    with pytest.raises(ToolkitError, match=r"found the file .*frames.csv \('.csv'\)"):
        calibrate.open_source(notes)


def test_label_file_with_polygons_is_rejected(tmp_path):
    (path,) = write_images(tmp_path / "ds" / "images", 1)
    (tmp_path / "ds" / "labels").mkdir()
    (tmp_path / "ds" / "labels" / f"{path.stem}.txt").write_text("0 0.1 0.1 0.2 0.2 0.3 0.3\n")
    source = calibrate.open_source(tmp_path / "ds")

    with pytest.raises(ToolkitError, match="Expected 'class cx cy w h' lines"):
        calibrate.load_samples(source, source.items)


def test_labels_for_other_classes_are_rejected(tmp_path):
    (path,) = write_images(tmp_path / "ds" / "images", 1)
    (tmp_path / "ds" / "labels").mkdir()
    (tmp_path / "ds" / "labels" / f"{path.stem}.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    source = calibrate.open_source(tmp_path / "ds")
    samples = calibrate.load_samples(source, source.items)

    with pytest.raises(ToolkitError, match=r"class ids \[7\], but the model has 2 classes"):
        calibrate.check_labels_fit(samples, INFO, source.path)


def test_dataset_names_that_differ_from_the_model_are_rejected(tmp_path):
    write_images(tmp_path / "ds" / "images", 1)
    (tmp_path / "ds" / "labels").mkdir()
    (tmp_path / "ds" / "names.txt").write_text("person\nbicycle\ncar\n")
    source = calibrate.open_source(tmp_path / "ds")

    with pytest.raises(ToolkitError, match=r"class names .* differ from the model's"):
        calibrate.check_labels_fit(calibrate.load_samples(source, source.items), INFO, source.path)
