"""The safe YOLOv5 checkpoint loader: real and custom files load, hostile and wrong ones do not."""

from __future__ import annotations

import copy
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from device.errors import ToolkitError
from toolkit.checkpoint import load_model, read_checkpoint, save_ultralytics_checkpoint
from toolkit.yolo import build_model, load_config

TINY_WIDTH = 0.125


def _tiny_model(nc: int = 3, **overrides) -> nn.Module:
    torch.manual_seed(1)
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = TINY_WIDTH
    cfg.update(overrides)
    return build_model(cfg, nc=nc, names=[f"class{i}" for i in range(nc)])


def _same_output(a: nn.Module, b: nn.Module, size=(1, 3, 128, 160)) -> float:
    x = torch.rand(size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _globals_in(path: Path) -> set[str]:
    import io
    import pickletools

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {
        str(arg).replace(" ", ".")
        for op, arg, _ in pickletools.genops(io.BytesIO(data))
        if op.name == "GLOBAL"
    }


# --- real checkpoint ---------------------------------------------------------------------


@pytest.mark.realdata
def test_official_yolov5n_loads_without_yolov5_code(yolov5n_pt):
    model, checkpoint = load_model(yolov5n_pt)

    assert "models" not in sys.modules  # nothing imported the YOLOv5 repository
    assert checkpoint.model_class == "models.yolo.Model"
    assert checkpoint.weights_dtype == "float16"
    assert checkpoint.names[:3] == ["person", "bicycle", "car"] and len(checkpoint.names) == 80
    assert [int(s) for s in model.stride] == [8, 16, 32]
    assert sum(p.numel() for p in model.parameters()) == 1_872_157
    assert next(model.parameters()).dtype == torch.float32
    # The anchors arrive in stride units, as upstream stores them.
    assert model.detect.anchors[0, 0].tolist() == [1.25, 1.625]


# --- custom checkpoints round-trip -----------------------------------------------------------


@pytest.mark.parametrize("model_class", ["DetectionModel", "Model"])
def test_custom_classes_multiples_and_anchors_round_trip(tmp_path, model_class):
    anchors = [[8, 9, 15, 20, 30, 18], [28, 50, 60, 40, 55, 100], [100, 80, 150, 190, 350, 300]]
    # Neither multiple is an official one (depth 0.33-1.33, width 0.25-1.25 in steps).
    model = _tiny_model(nc=7, depth_multiple=0.5, width_multiple=0.1875, anchors=anchors)
    path = save_ultralytics_checkpoint(model, tmp_path / "best.pt", model_class=model_class)

    assert f"models.yolo.{model_class}" in _globals_in(path)
    assert {"models.common.C3", "models.common.Conv", "models.yolo.Detect"} <= _globals_in(path)

    loaded, checkpoint = load_model(path)
    assert checkpoint.names == [f"class{i}" for i in range(7)]
    assert checkpoint.architecture["depth_multiple"] == 0.5
    assert checkpoint.weights_dtype == "float16"
    assert torch.equal(loaded.detect.anchors, model.detect.anchors.half().float())
    # The saved weights are fp16, so compare with the model rounded the same way.
    assert _same_output(copy.deepcopy(model).half().float(), loaded) == 0.0


def test_training_checkpoint_extras_load(tmp_path):
    import numpy as np

    # What YOLOv5's train.py stores beside the model in last.pt / best.pt.
    model = _tiny_model()
    extra = {
        "best_fitness": np.float64(0.42),
        "opt": {"weights": "yolov5s.pt", "save_dir": "runs/train/exp", "imgsz": 640},
        "git": {"remote": "", "branch": "master", "commit": "abc"},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "epoch": 299,
    }
    path = save_ultralytics_checkpoint(model, tmp_path / "last.pt", extra=extra)

    loaded, checkpoint = load_model(path)
    assert checkpoint.extra["epoch"] == 299
    assert _same_output(copy.deepcopy(model).half().float(), loaded) == 0.0


def test_fp32_fused_checkpoint_with_leaky_relu_loads(tmp_path):
    model = _tiny_model(activation="nn.LeakyReLU(0.1)").fuse()
    path = save_ultralytics_checkpoint(model, tmp_path / "fused.pt", half=False)

    loaded, checkpoint = load_model(path)

    assert checkpoint.fused and checkpoint.weights_dtype == "float32"
    assert isinstance(loaded.model[0].act, nn.LeakyReLU)
    assert loaded.model[0].act.negative_slope == pytest.approx(0.1)
    assert _same_output(model, loaded) < 1e-6


def test_batch_norm_settings_come_from_the_checkpoint(tmp_path):
    model = _tiny_model()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-5  # as a checkpoint trained outside YOLOv5's recipe might carry
    path = save_ultralytics_checkpoint(model, tmp_path / "eps.pt", half=False)

    loaded, _ = load_model(path)

    assert {m.eps for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-5}
    assert _same_output(model, loaded) == 0.0


@pytest.mark.realdata
def test_yolov5n_batch_norms_use_eps_1e_3(yolov5n_pt):
    model, _ = load_model(yolov5n_pt)
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def test_conv_settings_that_disagree_with_the_architecture_are_refused(tmp_path):
    model = _tiny_model()
    model.model[1].conv.stride = (1, 1)  # the pickled layer no longer matches the yaml
    path = save_ultralytics_checkpoint(model, tmp_path / "odd.pt")

    with pytest.raises(ToolkitError, match=r"layer model\.1\.conv has stride \(1, 1\)"):
        load_model(path)


def test_pre_v6_blocks_focus_spp_bottleneckcsp_load(tmp_path):
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = TINY_WIDTH
    cfg["backbone"] = [
        [-1, 1, "Focus", [64, 3]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "BottleneckCSP", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 9, "BottleneckCSP", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 9, "BottleneckCSP", [512]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "SPP", [1024, [5, 9, 13]]],
        [-1, 3, "BottleneckCSP", [1024, False]],
    ]
    cfg["head"] = [
        row if row[2] != "C3" else [row[0], row[1], "BottleneckCSP", row[3]] for row in cfg["head"]
    ]
    torch.manual_seed(2)
    model = build_model(cfg, nc=2)
    path = save_ultralytics_checkpoint(model, tmp_path / "v3.pt", model_class="Model")

    assert {"models.common.Focus", "models.common.SPP", "models.common.BottleneckCSP"} <= (
        _globals_in(path)
    )
    loaded, _ = load_model(path)
    assert _same_output(copy.deepcopy(model).half().float(), loaded) == 0.0


def test_legacy_non_zip_format_loads(tmp_path):
    from toolkit.checkpoint import _UPSTREAM_NAMES, _pickle_module, _upstream_layout

    model = _tiny_model()
    path = tmp_path / "legacy.pt"
    torch.save(
        {"model": _upstream_layout(model, half=True), "epoch": 0},
        path,
        pickle_module=_pickle_module(_UPSTREAM_NAMES),
        pickle_protocol=2,
        _use_new_zipfile_serialization=False,
    )
    assert not zipfile.is_zipfile(path)

    loaded, checkpoint = load_model(path)
    assert checkpoint.model_class == "models.yolo.DetectionModel"
    assert _same_output(copy.deepcopy(model).half().float(), loaded) == 0.0


# --- hostile checkpoints ---------------------------------------------------------------------


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("payload", [_RunsShell, _Evaluates])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, payload, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"model": payload(marker), "epoch": 1}, path, _use_new_zipfile_serialization=zip_format
    )

    with pytest.raises(ToolkitError) as error:
        read_checkpoint(path)

    expected = "posix.system" if payload is _RunsShell else "builtins.eval"
    assert expected in str(error.value) and "Nothing was executed" in str(error.value)
    assert not marker.exists()


def test_code_hidden_inside_a_yolov5_model_is_refused(tmp_path, monkeypatch):
    import toolkit.checkpoint as checkpoint_module

    marker = tmp_path / "pwned"
    upstream_state = checkpoint_module._upstream_state

    def with_payload(obj):
        state = upstream_state(obj)
        if type(obj).__name__ == "Conv":
            state["hook"] = _RunsShell(marker)  # travels inside a layer's pickled state
        return state

    monkeypatch.setattr(checkpoint_module, "_upstream_state", with_payload)
    path = save_ultralytics_checkpoint(_tiny_model(), tmp_path / "trojan.pt", half=False)
    monkeypatch.undo()
    assert "posix.system" in _globals_in(path)

    with pytest.raises(ToolkitError, match=r"posix\.system"):
        load_model(path)
    assert not marker.exists()


def test_code_beside_the_model_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    extra = {"opt": _RunsShell(marker)}
    path = save_ultralytics_checkpoint(_tiny_model(), tmp_path / "trojan.pt", extra=extra)

    with pytest.raises(ToolkitError, match=r"posix\.system"):
        load_model(path)
    assert not marker.exists()


def _save_with_fake_class(path: Path, monkeypatch, module: str, name: str) -> None:
    fake = types.ModuleType(module)
    cls = type(name, (), {"__module__": module})
    setattr(fake, name, cls)
    for depth in range(1, module.count(".") + 2):
        monkeypatch.setitem(sys.modules, ".".join(module.split(".")[:depth]), fake)
    torch.save({"model": cls(), "epoch": 3}, path)


def test_yolov8_checkpoint_is_refused_with_its_origin(tmp_path, monkeypatch):
    path = tmp_path / "yolov8n.pt"
    _save_with_fake_class(path, monkeypatch, "ultralytics.nn.tasks", "DetectionModel")
    monkeypatch.undo()

    with pytest.raises(ToolkitError) as error:
        read_checkpoint(path)
    assert "ultralytics.nn.tasks.DetectionModel" in str(error.value)
    assert "YOLOv8" in str(error.value)


def test_other_model_is_refused_as_not_yolov5(tmp_path, monkeypatch):
    path = tmp_path / "resnet.pt"
    _save_with_fake_class(path, monkeypatch, "torchvision.models.resnet", "ResNet")
    monkeypatch.undo()

    with pytest.raises(ToolkitError) as error:
        read_checkpoint(path)
    assert "'torchvision.models.resnet.ResNet', which is not part of a YOLOv5" in str(error.value)


def test_unsupported_yolov5_block_is_named(tmp_path, monkeypatch):
    path = tmp_path / "ghost.pt"
    _save_with_fake_class(path, monkeypatch, "models.common", "GhostConv")
    monkeypatch.undo()

    with pytest.raises(ToolkitError, match=r"'models\.common\.GhostConv'.*does not implement"):
        read_checkpoint(path)


# --- wrong files -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ToolkitError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path, tiny_pt):
    cut = tmp_path / "cut.pt"
    data = tiny_pt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ToolkitError, match="truncated or corrupt zip"):
        read_checkpoint(cut)


def test_corrupt_member_in_zip(tmp_path, tiny_pt):
    broken = tmp_path / "broken.pt"
    data = bytearray(tiny_pt.read_bytes())
    start = data.find(b"models.yolo")
    data[start : start + 11] = b"\x00" * 11  # inside data.pkl: CRC and pickle both break
    broken.write_bytes(bytes(data))
    with pytest.raises(ToolkitError, match="truncated or corrupt zip"):
        read_checkpoint(broken)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello, not a model\n", "not a torch checkpoint"),
        (b"\xff\xd8\xff\xe0 a jpeg", "not a torch checkpoint"),
        (b"\x08\x07\x12\x07pytorch", "ONNX"),
    ],
)
def test_not_a_torch_file(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(ToolkitError, match=message):
        read_checkpoint(path)


def test_plain_state_dict_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save(_tiny_model().state_dict(), path)
    with pytest.raises(ToolkitError, match=r"plain state_dict .* no architecture"):
        read_checkpoint(path)


def test_state_dict_under_model_key_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"model": _tiny_model().state_dict(), "epoch": 5}, path)
    with pytest.raises(ToolkitError, match="plain state_dict"):
        read_checkpoint(path)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.ReLU()), path)
    with pytest.raises(ToolkitError, match="TorchScript"):
        read_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = _tiny_model()
    path = save_ultralytics_checkpoint(model, tmp_path / "odd.pt")
    checkpoint = read_checkpoint(path)
    checkpoint.architecture["width_multiple"] = 0.25  # now every conv is wider than its weights

    from toolkit.checkpoint import build_from_checkpoint

    with pytest.raises(ToolkitError, match="do not fit the architecture"):
        build_from_checkpoint(checkpoint)


# --- damaged or crafted architecture dicts -------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        lambda cfg: cfg["backbone"].__setitem__(0, [99, 1, "Conv", [64, 6, 2, 2]]),  # bad 'from'
        lambda cfg: cfg["backbone"].__setitem__(0, [-1, 1, "Conv", ["x" * 3, 6, 2]]),  # str arg
        lambda cfg: cfg.__setitem__("head", cfg["backbone"][:1]),  # no Detect layer
    ],
    ids=["from-out-of-range", "string-channels", "no-detect"],
)
def test_malformed_architecture_is_a_clear_error_not_a_traceback(tmp_path, damage):
    from toolkit.checkpoint import build_from_checkpoint

    checkpoint = read_checkpoint(save_ultralytics_checkpoint(_tiny_model(), tmp_path / "m.pt"))
    damage(checkpoint.architecture)

    with pytest.raises(ToolkitError, match="architecture dict is malformed"):
        build_from_checkpoint(checkpoint)


def test_huge_architecture_is_refused_before_allocating(tmp_path, monkeypatch):
    from toolkit.checkpoint import build_from_checkpoint

    checkpoint = read_checkpoint(save_ultralytics_checkpoint(_tiny_model(), tmp_path / "m.pt"))
    checkpoint.architecture["width_multiple"] = 4000.0  # terabytes if it were allocated
    monkeypatch.setattr(nn.Module, "to_empty", lambda *a, **k: pytest.fail("allocated"))

    with pytest.raises(ToolkitError, match="do not fit the architecture"):
        build_from_checkpoint(checkpoint)


def _save_with_state_change(path: Path, monkeypatch, change) -> Path:
    import toolkit.checkpoint as checkpoint_module

    upstream_state = checkpoint_module._upstream_state

    def changed(obj):
        state = upstream_state(obj)
        if type(obj).__name__ == "YoloV5":
            change(state)
        return state

    monkeypatch.setattr(checkpoint_module, "_upstream_state", changed)
    save_ultralytics_checkpoint(_tiny_model(), path, half=False)
    monkeypatch.undo()
    return path


@pytest.mark.parametrize("nc", [0, "80"])
def test_class_count_that_is_not_a_positive_integer_is_refused(tmp_path, monkeypatch, nc):
    def set_nc(state):
        state["yaml"] = {**state["yaml"], "nc": nc}
        state.pop("nc", None)

    path = _save_with_state_change(tmp_path / "nc.pt", monkeypatch, set_nc)
    with pytest.raises(ToolkitError, match=r"class count nc=.*expected an integer >= 1"):
        read_checkpoint(path)


def test_absurdly_deep_module_nesting_is_refused(tmp_path, monkeypatch):
    def nest(state):
        deep = inner = nn.Sequential()
        for _ in range(80):
            child = nn.Sequential()
            inner.add_module("a", child)
            inner = child
        state["_modules"] = {**state["_modules"], "deep": deep}

    path = _save_with_state_change(tmp_path / "deep.pt", monkeypatch, nest)
    with pytest.raises(ToolkitError, match="nests modules more than 64 deep"):
        read_checkpoint(path)
