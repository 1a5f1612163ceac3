"""Synthetic scenes for the demo detector: simple shapes of a few classes on varied backgrounds.

Every scene is drawn from a ``numpy.random.Generator``, so a seed fixes it completely.  Labels are
computed from the geometry, not from pixels: a shape's box is the extent of its outline (clipped to
the image), in YOLO form ``class cx cy w h`` normalised to 0..1.

Run as a script to write the committed demo assets:

    .venv/bin/python scripts/demo_scenes.py val --out models/demo/val
    .venv/bin/python scripts/demo_scenes.py clip --out models/demo/shapes-clip.mp4
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

CLASS_NAMES = ("circle", "square", "triangle", "star")

VAL_SEED = 20261204
CLIP_SEED = 7
VAL_IMAGES = 100
VAL_JPEG_QUALITY = 70
CLIP_SIZE = (360, 640)  # (height, width)
CLIP_FPS = 10
CLIP_SECONDS = 10

# Frame shapes (height, width) the scenes are drawn at: the aspect ratios cameras and clips have.
FRAME_SHAPES = ((360, 640), (480, 640), (432, 768), (480, 480), (640, 480), (384, 512))

MIN_SIZE = 0.07  # shape diameter as a fraction of the frame's shorter side
MAX_SIZE = 0.42
MIN_CONTRAST = 90.0  # Euclidean BGR distance between a shape and the background under it
MIN_VISIBLE = 0.6  # a shape cut by the frame edge is kept if this much of its box remains


@dataclass(frozen=True)
class Shape:
    """One object of the scene: an outline in frame pixels and its class."""

    class_id: int
    outline: np.ndarray  # (N, 2) float32 x, y vertices; circles are dense polygons

    def box(self) -> np.ndarray:
        """The x1, y1, x2, y2 extent of the outline (not clipped)."""
        return np.concatenate([self.outline.min(axis=0), self.outline.max(axis=0)])


# Outlines


def regular_outline(class_id: int, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Vertices of a class's outline around ``center`` with circumradius ``radius``."""
    name = CLASS_NAMES[class_id]
    if name == "circle":
        turns = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        radii = np.full_like(turns, radius)
    elif name == "square":
        turns = np.arange(4) * (math.pi / 2) + math.pi / 4
        radii = np.full_like(turns, radius)
    elif name == "triangle":
        turns = np.arange(3) * (2 * math.pi / 3) - math.pi / 2
        radii = np.full_like(turns, radius)
    else:  # five-pointed star: alternate outer and inner vertices
        turns = np.arange(10) * (math.pi / 5) - math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    turns = turns + angle
    points = np.stack([np.cos(turns) * radii, np.sin(turns) * radii], axis=1)
    return (points + center).astype(np.float32)


# Backgrounds


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _smooth_noise(rng: np.random.Generator, size: tuple[int, int], cells: int) -> np.ndarray:
    """A (H, W) field in 0..1 that varies smoothly over about ``cells`` cells per side."""
    height, width = size
    coarse = rng.random((cells, max(2, round(cells * width / height)))).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _blend(field: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Colour a (H, W) field in 0..1 between two BGR colours."""
    return field[..., None] * (high - low) + low


def _gradient(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        field = xs * math.cos(angle) + ys * math.sin(angle)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        field = np.hypot(xs - cx, ys - cy)
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    return _blend(field, _random_color(rng), _random_color(rng))


def _noise(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    field = _smooth_noise(rng, size, int(rng.integers(3, 40)))
    return _blend(field, _random_color(rng), _random_color(rng))


def _texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Stripes, checks or waves at a random period and orientation."""
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 60)
    u = (xs * math.cos(angle) + ys * math.sin(angle)) / period
    v = (-xs * math.sin(angle) + ys * math.cos(angle)) / period
    kind = rng.integers(3)
    if kind == 0:
        field = (np.floor(u) % 2).astype(np.float32)
    elif kind == 1:
        field = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:
        field = 0.5 + 0.25 * (
            np.sin(2 * math.pi * u) + np.sin(2 * math.pi * v * rng.uniform(0.3, 2))
        )
    field = cv2.GaussianBlur(field, (0, 0), rng.uniform(0.5, 2.0))
    return _blend(field, _random_color(rng), _random_color(rng))


def _flat(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(_random_color(rng), (*size, 3)).astype(np.float32)


BACKGROUNDS = (_gradient, _noise, _texture, _flat)


def background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A float32 (H, W, 3) BGR background: one style, sometimes mixed with a second."""
    image = BACKGROUNDS[rng.integers(len(BACKGROUNDS))](rng, size)
    if rng.random() < 0.4:
        other = BACKGROUNDS[rng.integers(len(BACKGROUNDS))](rng, size)
        mix = _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
        image = image * mix + other * (1 - mix)
    return np.ascontiguousarray(image, dtype=np.float32)


# Clutter: marks that are not objects, so that the detector learns shape and not "any blob"


def _draw_lines(rng: np.random.Generator, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    for _ in range(rng.integers(1, 8)):
        points = rng.uniform((0, 0), (width, height), size=(int(rng.integers(2, 6)), 2))
        thickness = int(rng.integers(1, 5))
        color = _random_color(rng).tolist()
        cv2.polylines(image, [points.astype(np.int32)], False, color, thickness, cv2.LINE_AA)


def _draw_arcs(rng: np.random.Generator, image: np.ndarray) -> None:
    """Open arcs: circle-like strokes that never close."""
    height, width = image.shape[:2]
    for _ in range(rng.integers(1, 4)):
        center = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        axes = (int(rng.uniform(8, width / 4)), int(rng.uniform(8, height / 4)))
        start = rng.uniform(0, 360)
        sweep = rng.uniform(40, 240)
        color = _random_color(rng).tolist()
        thickness = int(rng.integers(1, 4))
        cv2.ellipse(
            image, center, axes, rng.uniform(0, 180), start, start + sweep, color, thickness
        )


def _draw_blobs(rng: np.random.Generator, image: np.ndarray) -> None:
    """Irregular smooth blobs: thresholded noise, filled with one colour."""
    size = image.shape[:2]
    field = _smooth_noise(rng, size, int(rng.integers(4, 12)))
    mask = field > rng.uniform(0.75, 0.9)
    image[mask] = _random_color(rng)


def _draw_dots(rng: np.random.Generator, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    for _ in range(rng.integers(5, 60)):
        center = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        radius = int(rng.integers(1, 4))
        cv2.circle(image, center, radius, _random_color(rng).tolist(), -1, cv2.LINE_AA)


CLUTTER = (_draw_lines, _draw_arcs, _draw_blobs, _draw_dots)


def add_clutter(rng: np.random.Generator, image: np.ndarray) -> None:
    for draw in CLUTTER:
        if rng.random() < 0.35:
            draw(rng, image)


# Shapes


def _overlaps(box: np.ndarray, placed: list[np.ndarray], limit: float = 0.3) -> bool:
    """Whether ``box`` hides more than ``limit`` of a placed box, or is hidden that much."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in placed:
        inter_w = min(box[2], other[2]) - max(box[0], other[0])
        inter_h = min(box[3], other[3]) - max(box[1], other[1])
        if inter_w <= 0 or inter_h <= 0:
            continue
        other_area = (other[2] - other[0]) * (other[3] - other[1])
        if inter_w * inter_h > limit * min(area, other_area):
            return True
    return False


def _visible_fraction(box: np.ndarray, size: tuple[int, int]) -> float:
    height, width = size
    clipped = np.clip(box, 0, [width, height, width, height])
    full = (box[2] - box[0]) * (box[3] - box[1])
    return float((clipped[2] - clipped[0]) * (clipped[3] - clipped[1]) / max(full, 1e-6))


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour far enough from the mean of the background under the shape."""
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        color = _random_color(rng)
        if np.linalg.norm(color - mean) >= MIN_CONTRAST:
            return color
    return np.where(mean > 127, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))


def _fill_pattern(
    rng: np.random.Generator, color: np.ndarray, region: tuple[int, int]
) -> np.ndarray | None:
    """A gradient or striped fill around ``color`` for the shape's box, or None for solid."""
    kind = rng.random()
    if kind < 0.6:
        return None
    height, width = region
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    if kind < 0.8:
        field = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    else:
        field = (np.floor(u / rng.uniform(3, 10)) % 2).astype(np.float32)
    second = np.clip(color + rng.uniform(-70, 70, 3), 0, 255)
    return _blend(field, color, second)


def draw_shape(rng: np.random.Generator, image: np.ndarray, shape: Shape) -> None:
    """Fill the shape's outline on ``image`` (float32 BGR) with an anti-aliased edge."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = shape.box()
    left, top = max(int(x1) - 2, 0), max(int(y1) - 2, 0)
    right, bottom = min(math.ceil(x2) + 2, width), min(math.ceil(y2) + 2, height)
    region = image[top:bottom, left:right]

    # Coverage mask at 4x sub-pixel precision, so small shapes keep true edges.
    mask = np.zeros(region.shape[:2], np.uint8)
    local = np.round((shape.outline - [left, top]) * 16).astype(np.int32)
    cv2.fillPoly(mask, [local], 255, cv2.LINE_AA, shift=4)
    alpha = mask.astype(np.float32)[..., None] / 255

    color = _contrasting_color(rng, region)
    fill = _fill_pattern(rng, color, region.shape[:2])
    if fill is None:
        fill = np.broadcast_to(color, region.shape)
    region[:] = region * (1 - alpha) + fill * alpha

    if rng.random() < 0.25:
        edge = np.clip(color * rng.uniform(0.2, 0.6), 0, 255).tolist()
        outline = np.round(shape.outline * 16).astype(np.int32)
        cv2.polylines(image, [outline], True, edge, int(rng.integers(1, 3)), cv2.LINE_AA, shift=4)


def random_shape(
    rng: np.random.Generator, size: tuple[int, int], placed: list[np.ndarray]
) -> Shape | None:
    """A shape that fits the frame well enough and does not hide a placed one, or None."""
    height, width = size
    short = min(height, width)
    for _ in range(10):
        class_id = int(rng.integers(len(CLASS_NAMES)))
        # Log-uniform sizes: small objects are as common as large ones.
        diameter = short * math.exp(rng.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE)))
        center = rng.uniform((-0.05 * width, -0.05 * height), (1.05 * width, 1.05 * height))
        outline = regular_outline(class_id, center, diameter / 2, rng.uniform(0, 2 * math.pi))
        shape = Shape(class_id, outline)
        box = shape.box()
        if _visible_fraction(box, size) < MIN_VISIBLE or _overlaps(box, placed):
            continue
        return shape
    return None


def yolo_labels(shapes: list[Shape], size: tuple[int, int]) -> np.ndarray:
    """(N, 5) float32 rows ``class cx cy w h``, boxes clipped to the frame and normalised."""
    height, width = size
    rows = []
    for shape in shapes:
        x1, y1, x2, y2 = np.clip(shape.box(), 0, [width, height, width, height])
        rows.append(
            [shape.class_id, (x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
             (x2 - x1) / width, (y2 - y1) / height]
        )  # fmt: skip
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


# Whole scenes


def finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-like degradations: blur, sensor noise, exposure; then to uint8."""
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.2))
    image = image * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25)
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(2, 10), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    max_objects: int = 7,
) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``size`` (height, width): a BGR uint8 image and its (N, 5) YOLO labels."""
    image = background(rng, size)
    add_clutter(rng, image)

    shapes: list[Shape] = []
    for _ in range(int(rng.integers(0, max_objects + 1))):
        shape = random_shape(rng, size, [s.box() for s in shapes])
        if shape is not None:
            draw_shape(rng, image, shape)
            shapes.append(shape)

    if rng.random() < 0.2:
        add_clutter(rng, image)  # marks over shapes too: partial occlusion by thin strokes
    return finish(rng, image), yolo_labels(shapes, size)


def random_frame_shape(rng: np.random.Generator) -> tuple[int, int]:
    return FRAME_SHAPES[rng.integers(len(FRAME_SHAPES))]


# Committed assets


def _atomic_dir(out: Path) -> Path:
    """A temporary sibling of ``out`` to write into before renaming it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def write_val_set(out: Path, *, count: int = VAL_IMAGES, seed: int = VAL_SEED) -> None:
    """A labelled validation set in YOLO layout: images/, labels/, names.txt, data.yaml."""
    staging = _atomic_dir(out)
    staging.chmod(0o755)
    (staging / "images").mkdir()
    (staging / "labels").mkdir()
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, labels = render_scene(rng, random_frame_shape(rng))
        stem = f"shapes_{index:04d}"
        params = [cv2.IMWRITE_JPEG_QUALITY, VAL_JPEG_QUALITY]
        cv2.imwrite(str(staging / "images" / f"{stem}.jpg"), image, params)
        lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
        (staging / "labels" / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    (staging / "names.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    (staging / "data.yaml").write_text(
        f"# Generated by scripts/demo_scenes.py val (seed {seed}); do not edit.\n"
        f"path: .\nval: images\nnc: {len(CLASS_NAMES)}\nnames: {list(CLASS_NAMES)}\n"
    )
    _replace(staging, out)
    log.info("wrote %d labelled images to %s", count, out)


def _replace(staging: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


# The clip: shapes drifting and turning over a slowly panning background.


@dataclass
class _Mover:
    class_id: int
    center: np.ndarray
    velocity: np.ndarray  # pixels per frame
    radius: float
    angle: float
    spin: float  # radians per frame
    color: np.ndarray


def _clip_movers(
    rng: np.random.Generator, size: tuple[int, int], scenery: np.ndarray, count: int
) -> list[_Mover]:
    """``count`` shapes, one class after another, placed apart, coloured against the scenery."""
    height, width = size
    movers: list[_Mover] = []
    while len(movers) < count:
        radius = min(height, width) * rng.uniform(0.07, 0.15)
        center = rng.uniform((radius, radius), (width - radius, height - radius))
        if any(np.hypot(*(center - m.center)) < radius + m.radius + 4 for m in movers):
            continue
        movers.append(
            _Mover(
                class_id=len(movers) % len(CLASS_NAMES),
                center=center,
                velocity=rng.uniform(-6, 6, 2),
                radius=radius,
                angle=rng.uniform(0, 2 * math.pi),
                spin=rng.uniform(-0.08, 0.08),
                color=_contrasting_color(rng, scenery),
            )
        )
    return movers


def _step(movers: list[_Mover], size: tuple[int, int]) -> None:
    """Move every shape one frame on, bouncing off the frame edges and off each other (as
    equal-mass discs), so that shapes in the clip never hide one another."""
    height, width = size
    for mover in movers:
        mover.center = mover.center + mover.velocity
        mover.angle += mover.spin
        for axis, limit in ((0, width), (1, height)):
            if not mover.radius <= mover.center[axis] <= limit - mover.radius:
                mover.velocity[axis] = -mover.velocity[axis]
                mover.center[axis] = np.clip(mover.center[axis], mover.radius, limit - mover.radius)

    for i, first in enumerate(movers):
        for second in movers[i + 1 :]:
            offset = second.center - first.center
            distance = float(np.hypot(*offset))
            if distance >= first.radius + second.radius or distance == 0:
                continue
            normal = offset / distance
            approach = float(np.dot(first.velocity - second.velocity, normal))
            if approach > 0:  # exchange the velocity components along the line of centres
                first.velocity = first.velocity - approach * normal
                second.velocity = second.velocity + approach * normal


def clip_frames(seed: int = CLIP_SEED, size: tuple[int, int] = CLIP_SIZE, frames: int = 100):
    """Yield (BGR uint8 frame, (N, 5) YOLO labels) for each frame of the demo clip."""
    rng = np.random.default_rng(seed)
    height, width = size
    margin = 80
    scenery = background(rng, (height + margin, width + margin))
    add_clutter(rng, scenery)
    movers = _clip_movers(rng, size, scenery, count=6)
    for index in range(frames):
        # Pan the background along a slow circle, so the frame is never static.
        phase = 2 * math.pi * index / frames
        dx = int(margin / 2 + margin / 2 * math.cos(phase) * 0.9)
        dy = int(margin / 2 + margin / 2 * math.sin(phase) * 0.9)
        image = scenery[dy : dy + height, dx : dx + width].copy()

        shapes = []
        for mover in movers:
            outline = regular_outline(mover.class_id, mover.center, mover.radius, mover.angle)
            shapes.append(Shape(mover.class_id, outline))
            _draw_solid(image, outline, mover.color)
        _step(movers, size)

        frame_noise = np.random.default_rng([seed, index]).normal(0, 3, image.shape)
        yield np.clip(image + frame_noise, 0, 255).astype(np.uint8), yolo_labels(shapes, size)


def _draw_solid(image: np.ndarray, outline: np.ndarray, color: np.ndarray) -> None:
    points = np.round(outline * 16).astype(np.int32)
    cv2.fillPoly(image, [points], color.tolist(), cv2.LINE_AA, shift=4)


def write_clip(out: Path, *, seed: int = CLIP_SEED, crf: int = 30) -> None:
    """Encode the clip as H.264 mp4 with ffmpeg, and its per-frame labels as JSON beside it."""
    height, width = CLIP_SIZE
    frames = CLIP_FPS * CLIP_SECONDS
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".mp4", dir=out.parent)
    os.close(fd)
    command = [
        "ffmpeg", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", str(CLIP_FPS),
        "-i", "-",
        "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-threads", "1", "-g", str(CLIP_FPS * 2), "-movflags", "+faststart",
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
        tmp_name,
    ]  # fmt: skip
    labels = []
    with subprocess.Popen(command, stdin=subprocess.PIPE) as encoder:
        for image, frame_labels in clip_frames(seed, CLIP_SIZE, frames):
            encoder.stdin.write(image.tobytes())
            labels.append(np.round(frame_labels, 6).tolist())
        encoder.stdin.close()
    if encoder.returncode != 0:
        os.unlink(tmp_name)
        raise SystemExit(f"ffmpeg failed with exit code {encoder.returncode}")
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, out)

    label_file = out.with_suffix(".labels.json")
    document = {
        "generator": f"scripts/demo_scenes.py clip (seed {seed})",
        "names": list(CLASS_NAMES),
        "size": [height, width],
        "fps": CLIP_FPS,
        "format": "per frame: list of [class, cx, cy, w, h] normalised to 0..1",
        "frames": labels,
    }
    tmp_labels = label_file.with_name(f".{label_file.name}.tmp")
    tmp_labels.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    os.replace(tmp_labels, label_file)
    log.info("wrote %d frames to %s and labels to %s", frames, out, label_file)


def write_preview(out: Path, *, seed: int = 0, count: int = 16) -> None:
    """A contact sheet of training-style scenes with their boxes, to look at the generator."""
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        image, labels = render_scene(rng, (360, 480))
        for c, x, y, w, h in labels:
            p1 = (int((x - w / 2) * 480), int((y - h / 2) * 360))
            p2 = (int((x + w / 2) * 480), int((y + h / 2) * 360))
            cv2.rectangle(image, p1, p2, (0, 255, 0), 1)
            cv2.putText(image, CLASS_NAMES[int(c)], p1, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0))
        tiles.append(image)
    rows = [np.hstack(tiles[i : i + 4]) for i in range(0, count, 4)]
    cv2.imwrite(str(out), np.vstack(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    val = commands.add_parser("val", help="write the labelled validation set")
    val.add_argument("--out", type=Path, default=Path("models/demo/val"))
    val.add_argument("--count", type=int, default=VAL_IMAGES)
    val.add_argument("--seed", type=int, default=VAL_SEED)
    clip = commands.add_parser("clip", help="write the demo clip and its labels")
    clip.add_argument("--out", type=Path, default=Path("models/demo/shapes-clip.mp4"))
    clip.add_argument("--seed", type=int, default=CLIP_SEED)
    preview = commands.add_parser("preview", help="write a contact sheet of scenes with boxes")
    preview.add_argument("--out", type=Path, default=Path("/tmp/shapes-preview.jpg"))
    preview.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "val":
        write_val_set(args.out, count=args.count, seed=args.seed)
    elif args.command == "clip":
        write_clip(args.out, seed=args.seed)
    else:
        write_preview(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
