"""The project's YOLOv5 architecture: official sizes, output contracts, block equivalences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from device.errors import ToolkitError
from toolkit.yolo import SPP, SPPF, build_model, load_config

# Parameter counts of the official v7.0 models, as Ultralytics' model summary prints them.
OFFICIAL_PARAMETERS = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "yolov5m": 21_190_557,
    "yolov5l": 46_563_709,
    "yolov5x": 86_749_405,
}


@pytest.mark.parametrize("name", ["yolov5n", "yolov5s", "yolov5m"])
def test_shipped_configs_have_the_official_sizes(name):
    model = build_model(load_config(name))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert len(model.names) == 80


@pytest.mark.parametrize("name", ["yolov5l", "yolov5x"])
def test_large_configs_have_the_official_sizes(name):
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = build_model(load_config(name))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[name]


def test_training_mode_gives_raw_maps_and_eval_mode_decoded_rows():
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = 0.125
    model = build_model(cfg, nc=4)
    x = torch.rand(2, 3, 96, 160)

    model.train()
    maps = model(x)
    assert [tuple(m.shape) for m in maps] == [
        (2, 3, 12, 20, 9),
        (2, 3, 6, 10, 9),
        (2, 3, 3, 5, 9),
    ]

    model.eval()
    with torch.no_grad():
        rows = model(x)
    assert rows.shape == (2, 3 * (240 + 60 + 15), 9)
    assert rows[..., 4:].min() >= 0 and rows[..., 4:].max() <= 1  # probabilities
    # First level, first anchor, cell (0, 0): centre within the first 8-pixel cell's reach.
    assert -4 <= rows[0, 0, 0] <= 12 and -4 <= rows[0, 0, 1] <= 12


def test_eval_decoding_matches_the_upstream_formula():
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = 0.125
    model = build_model(cfg, nc=2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        rows = model.eval()(x)
        model.detect.training = True  # raw maps, with the same (eval) batch norms
        raw = model(x)[1]  # stride 16: (1, 3, 4, 4, 7)

    level_start = 3 * 8 * 8
    cell = rows[0, level_start + 0 * 16 + 2 * 4 + 3]  # anchor 0, y=2, x=3
    t = raw[0, 0, 2, 3].detach().sigmoid()
    anchor = model.detect.anchors[1, 0] * 16
    assert torch.allclose(cell[0], (t[0] * 2 - 0.5 + 3) * 16, atol=1e-5)
    assert torch.allclose(cell[1], (t[1] * 2 - 0.5 + 2) * 16, atol=1e-5)
    assert torch.allclose(cell[2:4], (t[2:4] * 2) ** 2 * anchor, atol=1e-4)
    assert torch.allclose(cell[4:], t[4:], atol=1e-6)


def test_sppf_equals_spp_5_9_13_with_the_same_weights():
    torch.manual_seed(0)
    fast, classic = SPPF(16, 32, 5).eval(), SPP(16, 32, (5, 9, 13)).eval()
    classic.load_state_dict(fast.state_dict(), strict=False)
    classic.cv1.load_state_dict(fast.cv1.state_dict())
    classic.cv2.load_state_dict(fast.cv2.state_dict())
    x = torch.rand(1, 16, 20, 20)
    with torch.no_grad():
        assert torch.allclose(fast(x), classic(x), atol=1e-6)


def test_fuse_keeps_outputs():
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = 0.125
    model = build_model(cfg, nc=3)
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        before = model(x)
        after = model.fuse()(x)
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-4)


def test_unknown_block_and_activation_are_refused():
    cfg = load_config("yolov5n")
    cfg["backbone"][2] = [-1, 1, "C3TR", [128]]
    with pytest.raises(ToolkitError, match="block 'C3TR'"):
        build_model(cfg)

    cfg = load_config("yolov5n")
    cfg["activation"] = "__import__('os').system('true')"
    with pytest.raises(ToolkitError, match="Unsupported activation"):
        build_model(cfg)


def test_config_names_and_errors(tmp_path):
    assert load_config("yolov5s.yaml")["width_multiple"] == 0.5
    with pytest.raises(ToolkitError, match="No architecture config 'yolov5z'"):
        load_config("yolov5z")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: 3\n")
    with pytest.raises(ToolkitError, match="lacks"):
        load_config(bad)
