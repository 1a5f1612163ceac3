"""Calibration and evaluation data: real images in, preprocessed model inputs out.

A data source is one of:

- a folder of images (searched recursively),
- a video file (frames are sampled across its whole length),
- a YOLO-format dataset folder: ``images/`` beside ``labels/`` with one ``class cx cy w h``
  line per object, normalised to 0..1 (labels then give true mAP in the proof report).

``sample_split`` draws disjoint calibration and held-out samples with a seed, so the proof never
measures a model on the images it was calibrated on.  ``CalibrationReader`` feeds onnxruntime's
calibrator and turns each frame into a tensor with ``device.preprocess.preprocess``, the same
function the device runs, so the ranges are measured on exactly what the model will see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from device.contract import ModelInfo
from device.errors import ToolkitError
from device.preprocess import preprocess
from toolkit.evaluate import ImageBoxes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264"}
RECOMMENDED_CALIBRATION_SAMPLES = 32  # fewer gives ranges that miss real activations


@dataclass
class Sample:
    """One real image: its pixels, where it came from, and its labels if the source has them."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    name: str  # file name, or "video.mp4#frame" for a video frame
    labels: ImageBoxes | None = None  # ground truth in the image's pixels


@dataclass
class DataSource:
    """What a path holds: kind "images", "video" or "dataset", and its items."""

    path: Path
    kind: str
    items: list  # image paths, or frame indices of the video
    labels_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return self.labels_dir is not None


def open_source(path: str | Path) -> DataSource:
    """Recognise a folder of images, a video or a YOLO dataset, checking it is usable."""
    path = Path(path)
    if not path.exists():
        raise ToolkitError(
            f"Calibration data not found: {path}. Pass a folder of images, a video file or a "
            "YOLO dataset folder (images/ and labels/)."
        )
    if path.is_file():
        if path.suffix.lower() in VIDEO_SUFFIXES:
            return DataSource(path, "video", list(range(_video_frame_count(path))))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return DataSource(path, "images", [path])
        raise ToolkitError(
            f"Expected a folder of images, a video ({', '.join(sorted(VIDEO_SUFFIXES))}) or a "
            f"YOLO dataset folder, found the file {path} ('{path.suffix}')."
        )

    if (path / "images").is_dir() and (path / "labels").is_dir():
        images = _find_images(path / "images")
        return DataSource(path, "dataset", images, labels_dir=path / "labels")

    images = _find_images(path)
    return DataSource(path, "images", images)


def _find_images(folder: Path) -> list[Path]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        found = sorted(p.name for p in folder.iterdir())[:5]
        raise ToolkitError(
            f"Expected images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}, found "
            f"{found or 'an empty folder'}. Point to a folder of real images the camera would see."
        )
    return images


def _video_frame_count(path: Path) -> int:
    """Frames in a video, counted by decoding: container frame counts are often wrong."""
    capture = cv2.VideoCapture(str(path))
    try:
        count = 0
        while capture.grab():
            count += 1
    finally:
        capture.release()
    if count == 0:
        raise ToolkitError(
            f"Could not decode any frame of the video {path}. Check that it is a complete video "
            "file that ffmpeg can play, or extract frames into a folder of images."
        )
    return count


def sample_split(
    sources: Sequence[DataSource], calibration: int, held_out: int, *, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Disjoint random samples for calibration and for the held-out proof, drawn from all
    sources pooled (every image or video frame equally likely), decoded in source order.

    Calibration gets its share first; held-out takes up to ``held_out`` of the rest."""
    calibration_samples, held_samples = sample_splits(sources, [calibration, held_out], seed=seed)
    return calibration_samples, held_samples


def sample_splits(
    sources: Sequence[DataSource], counts: Sequence[int], *, seed: int
) -> list[list[Sample]]:
    """Disjoint random samples of the given sizes from all sources pooled, in the order of
    ``counts`` (each takes up to its count of what the earlier ones left)."""
    pooled = [(k, item) for k, source in enumerate(sources) for item in source.items]
    order = np.random.default_rng(seed).permutation(len(pooled))
    splits, start = [], 0
    for count in counts:
        picks = [pooled[i] for i in order[start : start + count]]
        splits.append(_load_picks(sources, picks))
        start += count
    return splits


def _load_picks(sources: Sequence[DataSource], picks: Sequence[tuple[int, object]]) -> list:
    samples = []
    for k, source in enumerate(sources):
        items = [item for index, item in picks if index == k]
        if items:
            samples += load_samples(source, sorted(items))
    return samples


def load_samples(source: DataSource, items: Sequence) -> list[Sample]:
    """Decode the chosen items of one source into samples (with labels for a dataset)."""
    if source.kind == "video":
        return _read_video_frames(source.path, items)
    samples = []
    for image_path in items:
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ToolkitError(
                f"Could not read the image {image_path}. Remove or replace the damaged file."
            )
        labels = _read_labels(source, image_path, image.shape[:2]) if source.labelled else None
        name = str(image_path.relative_to(source.path)) if source.path.is_dir() else image_path.name
        samples.append(Sample(image, name, labels))
    return samples


def _read_video_frames(path: Path, indices: Sequence[int]) -> list[Sample]:
    wanted = set(indices)
    last = max(wanted, default=-1)
    samples = []
    capture = cv2.VideoCapture(str(path))
    try:
        for index in range(last + 1):
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    samples.append(Sample(frame, f"{path.name}#{index}"))
    finally:
        capture.release()
    if len(samples) < len(wanted):
        raise ToolkitError(
            f"Expected {len(wanted)} frames from the video {path}, decoded {len(samples)}. "
            "The file may be truncated; re-encode it or extract frames into a folder."
        )
    return samples


def label_path(source: DataSource, image_path: Path) -> Path:
    """The YOLO label file of an image: images/<sub>/x.jpg -> labels/<sub>/x.txt."""
    relative = Path(image_path).relative_to(source.path / "images")
    return (source.labels_dir / relative).with_suffix(".txt")


def _read_labels(source: DataSource, image_path: Path, image_size: tuple[int, int]) -> ImageBoxes:
    """Ground truth of one image in its pixels; a missing label file means no objects."""
    path = label_path(source, image_path)
    if not path.exists() or not path.read_text().strip():  # an image without objects
        return ImageBoxes.empty()
    try:
        rows = np.loadtxt(path, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise ToolkitError(
            f"Could not read the YOLO label file {path}: {exc}. Expected one 'class cx cy w h' "
            "line per object with values normalised to 0..1."
        ) from exc
    if rows.size == 0:
        return ImageBoxes.empty()
    if rows.shape[1] != 5 or np.any(rows[:, 1:] < -0.01) or np.any(rows[:, 1:] > 1.01):
        raise ToolkitError(
            f"Expected 'class cx cy w h' lines normalised to 0..1 in {path}, found "
            f"{rows.shape[1]} columns with values {rows[:, 1:].min():.3g}..{rows[:, 1:].max():.3g}."
            " Polygon (segmentation) labels are not supported."
        )
    height, width = image_size
    cx, cy, w, h = rows[:, 1] * width, rows[:, 2] * height, rows[:, 3] * width, rows[:, 4] * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return ImageBoxes.from_arrays(boxes, rows[:, 0].astype(np.int64))


def check_labels_fit(samples: Sequence[Sample], info: ModelInfo, dataset: Path) -> None:
    """Reject a dataset whose class ids the model cannot predict."""
    used = {int(c) for s in samples if s.labels is not None for c in s.labels.classes}
    beyond = sorted(c for c in used if not 0 <= c < info.num_classes)
    if beyond:
        raise ToolkitError(
            f"The labels in {dataset} use class ids {beyond}, but the model has "
            f"{info.num_classes} classes (0..{info.num_classes - 1}). Use a dataset labelled "
            "for this model's classes, or leave out the labelled data."
        )
    names_file = dataset / "names.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if names != info.names[: len(names)] or len(names) != info.num_classes:
            raise ToolkitError(
                f"The dataset's class names ({dataset / 'names.txt'}: {len(names)} classes, "
                f"starting {names[:3]}) differ from the model's ({info.num_classes} classes, "
                f"starting {info.names[:3]}). Use a dataset labelled for this model."
            )


class CalibrationReader(CalibrationDataReader):
    """Feeds onnxruntime's calibrator one preprocessed frame at a time."""

    def __init__(self, samples: Sequence[Sample], info: ModelInfo) -> None:
        self.samples = list(samples)
        self.info = info
        self._iterator: Iterator[Sample] = iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self._iterator, None)
        if sample is None:
            return None
        tensor, _ = preprocess(sample.image, self.info)
        return {self.info.input_name: tensor}

    def rewind(self) -> None:
        self._iterator = iter(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve only samples[start:end]: onnxruntime calibrates in chunks this way."""
        self._iterator = iter(self.samples[start_index:end_index])
