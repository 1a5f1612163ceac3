"""The demo data generator and the training loss behind the shipped demo model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts import demo_loss, demo_scenes
from toolkit.demo import DEMO_CLASS_NAMES, demo_val_dataset
from toolkit.yolo import build_model, load_config


def test_committed_val_set_is_what_the_generator_writes(tmp_path):
    committed = demo_val_dataset()
    regenerated = tmp_path / "val"
    demo_scenes.write_val_set(regenerated)

    for sub in ("labels", "images"):
        names = sorted(p.name for p in (committed / sub).iterdir())
        assert names == sorted(p.name for p in (regenerated / sub).iterdir())
        for name in names:
            same = (committed / sub / name).read_bytes() == (regenerated / sub / name).read_bytes()
            assert same, f"{sub}/{name} differs from scripts/demo_scenes.py's output"


def test_scene_labels_follow_the_geometry():
    rng = np.random.default_rng(3)
    image, labels = demo_scenes.render_scene(rng, (360, 640), max_objects=7)

    assert image.shape == (360, 640, 3) and image.dtype == np.uint8
    assert set(labels[:, 0].astype(int)) <= set(range(len(DEMO_CLASS_NAMES)))
    assert np.all((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1))
    # A circle's box is its diameter in both directions.
    outline = demo_scenes.regular_outline(0, np.array([100.0, 50.0]), 20.0, 0.3)
    box = demo_scenes.Shape(0, outline).box()
    assert box == pytest.approx([80, 30, 120, 70], abs=0.1)


def test_ciou_is_iou_for_concentric_boxes_of_one_shape_and_penalises_distance():
    a = torch.tensor([[5.0, 5.0, 4.0, 2.0]])
    b = torch.tensor([[5.0, 5.0, 2.0, 1.0]])
    assert demo_loss.bbox_ciou(a, b).item() == pytest.approx(0.25, abs=1e-5)
    # Disjoint boxes: IoU 0, so CIoU is minus distance² over the enclosing box's diagonal².
    far = torch.tensor([[9.0, 5.0, 2.0, 2.0]])
    near = torch.tensor([[1.0, 5.0, 2.0, 2.0]])
    assert demo_loss.bbox_ciou(near, far).item() == pytest.approx(-64 / 104, abs=1e-4)


def test_targets_go_to_their_cell_and_the_two_nearest_neighbours():
    model = build_model(load_config("yolov5n"), nc=4)
    criterion = demo_loss.YoloV5Loss(model.detect, demo_loss.LossWeights().scaled(4, 256))
    maps = [torch.zeros(1, 3, 256 // s, 256 // s, 9) for s in (8, 16, 32)]
    # One 24x24 px object centred at (98.4, 58.4) px: (12.3, 7.3) in the stride-8 grid, in the
    # left half of its cell in x and the top half in y.
    target = torch.tensor([[0, 2, 98.4 / 256, 58.4 / 256, 24 / 256, 24 / 256]])
    (image, anchor, gy, gx), boxes, classes, _ = criterion.build_targets(maps, target)[0]

    cells = {(int(y), int(x)) for y, x in zip(gy, gx, strict=True)}
    assert cells == {(7, 12), (7, 11), (6, 12)}
    assert set(classes.tolist()) == {2} and set(image.tolist()) == {0}
    # Anchors within 4x of 24 px at stride 8: 10x13, 16x30, 33x23 all qualify.
    assert sorted(set(anchor.tolist())) == [0, 1, 2] and len(anchor) == 9
    assert boxes[:, 2:].unique().tolist() == [3.0]  # 24 px / stride 8

    total, items = criterion([m.requires_grad_() for m in maps], target)
    assert math.isfinite(total.item()) and items.shape == (3,)
