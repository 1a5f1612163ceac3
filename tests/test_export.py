"""toolkit export: real yolov5n proven on real photos, every option, and every refusal."""

from __future__ import annotations

import copy
import sys
import types

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from device.contract import model_info_from_metadata
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import preprocess
from tests.cli_helpers import run_toolkit
from toolkit import verify
from toolkit.checkpoint import load_model, save_ultralytics_checkpoint
from toolkit.export import ExportOptions, check_options, detect_tail, export_model
from toolkit.yolo import build_model, load_config


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Default outputs go to the current folder: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _info(path):
    return model_info_from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def _iou(a, b) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _detect(onnx_path, image_path):
    info = _info(onnx_path)
    frame = cv2.imread(str(image_path))
    tensor, transform = preprocess(frame, info)
    rows = _session(onnx_path).run(None, {"images": tensor})[0][0]
    config = PostprocessConfig(conf_threshold=0.25, iou_threshold=0.45)
    return postprocess(rows, transform, info.names, config)


def _assert_found(detections, label, box, min_iou=0.8):
    best = max(
        (_iou(box, (d.x1, d.y1, d.x2, d.y2)) for d in detections if d.label == label), default=0
    )
    assert best >= min_iou, f"no {label} near {box}: {[d.as_dict() for d in detections]}"


# --- the real model on real photos -----------------------------------------------------------


@pytest.mark.realdata
def test_yolov5n_onnx_matches_pytorch_on_bus(yolov5n_onnx, yolov5n_pt, bus_jpg):
    model, _ = load_model(yolov5n_pt)
    info = _info(yolov5n_onnx)
    tensor, _ = preprocess(cv2.imread(str(bus_jpg)), info)

    onnx_rows = _session(yolov5n_onnx).run(None, {"images": tensor})[0]
    with torch.no_grad():
        torch_rows = model(torch.from_numpy(tensor)).numpy()

    assert onnx_rows.shape == torch_rows.shape == (1, 25200, 85)
    tolerance = verify.TOLERANCES["fp32"]
    box_diff = np.abs(onnx_rows[..., :4] - torch_rows[..., :4])
    assert (box_diff <= tolerance.box_atol + tolerance.box_rtol * np.abs(torch_rows[..., :4])).all()
    assert np.abs(onnx_rows[..., 4:] - torch_rows[..., 4:]).max() <= tolerance.score_atol


@pytest.mark.realdata
def test_yolov5n_onnx_finds_people_and_the_bus(yolov5n_onnx, bus_jpg):
    detections = _detect(yolov5n_onnx, bus_jpg)

    assert {d.label for d in detections} == {"person", "bus"}
    assert sum(d.label == "bus" for d in detections) == 1
    _assert_found(detections, "bus", (71, 240, 810, 778))
    _assert_found(detections, "person", (219, 406, 350, 868))
    _assert_found(detections, "person", (54, 397, 208, 899))
    _assert_found(detections, "person", (674, 381, 810, 868))


@pytest.mark.realdata
def test_yolov5n_onnx_finds_the_two_men_on_zidane(yolov5n_onnx, zidane_jpg):
    detections = _detect(yolov5n_onnx, zidane_jpg)

    _assert_found(detections, "person", (747, 36, 1156, 714))
    _assert_found(detections, "person", (136, 174, 738, 720))
    _assert_found(detections, "tie", (438, 434, 506, 709), min_iou=0.6)
    # The reference (Ultralytics' own modules, BatchNorm eps 1e-3) scores the best man 0.79.
    assert max(d.score for d in detections if d.label == "person") > 0.75


@pytest.mark.realdata
@pytest.mark.slow
def test_yolov5n_fp16_finds_what_fp32_finds(yolov5n_onnx, yolov5n_pt, bus_jpg, tmp_path):
    half = export_model(yolov5n_pt, tmp_path / "half.onnx", half=True)

    # Detections near the 0.25 threshold may flip with fp16 rounding; clear ones must not.
    reference = [d for d in _detect(yolov5n_onnx, bus_jpg) if d.score >= 0.3]
    candidate = [d for d in _detect(half, bus_jpg) if d.score >= 0.3]

    assert _info(half).precision == "fp16"
    assert sorted(d.label for d in candidate) == sorted(d.label for d in reference)
    for detection in reference:
        box = (detection.x1, detection.y1, detection.x2, detection.y2)
        _assert_found(candidate, detection.label, box, min_iou=0.95)


# --- options, on a tiny random model -------------------------------------------------------


def test_non_square_fixed_batch(tiny_pt, tmp_path):
    path = export_model(tiny_pt, tmp_path / "wide.onnx", imgsz=(256, 320), batch_size=2)

    info = _info(path)
    assert info.input_size == (256, 320) and info.batch_size == 2 and not info.dynamic_size
    output = _session(path).run(None, {"images": np.zeros((2, 3, 256, 320), np.float32)})[0]
    assert output.shape == (2, 3 * (32 * 40 + 16 * 20 + 8 * 10), 8)


def test_dynamic_batch_and_size_match_pytorch_at_other_shapes(tiny_pt, tmp_path):
    path = export_model(
        tiny_pt, tmp_path / "dyn.onnx", imgsz=320, dynamic_batch=True, dynamic_size=True
    )
    model, _ = load_model(tiny_pt)
    session = _session(path)

    info = _info(path)
    assert info.dynamic_batch and info.dynamic_size
    x = torch.rand(3, 3, 192, 416, generator=torch.Generator().manual_seed(0))
    onnx_rows = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        torch_rows = model(x).numpy()
    assert onnx_rows.shape == (3, 3 * (24 * 52 + 12 * 26 + 6 * 13), 8)
    assert np.abs(onnx_rows - torch_rows).max() < 1e-3


def test_opset_and_no_simplify(tiny_pt, tiny_onnx, tmp_path):
    plain = export_model(tiny_pt, tmp_path / "plain.onnx", imgsz=320, opset=12, simplify=False)

    plain_model, slim_model = onnx.load(str(plain)), onnx.load(str(tiny_onnx))
    assert plain_model.opset_import[0].version == 12 == _info(plain).opset
    assert slim_model.opset_import[0].version == 17
    assert len(slim_model.graph.node) < len(plain_model.graph.node)


def test_half_keeps_float32_io(tiny_pt, tiny_onnx, tmp_path):
    path = export_model(tiny_pt, tmp_path / "half.onnx", imgsz=320, half=True)

    model = onnx.load(str(path))
    assert _info(path).precision == "fp16"
    assert {i.data_type for i in model.graph.initializer if len(i.dims) == 4} == {
        onnx.TensorProto.FLOAT16
    }
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The box decoding (grid and anchor constants) stays float32.
    tail = set(detect_tail(model.graph))
    tail_inputs = {i for n in model.graph.node if n.name in tail for i in n.input}
    constants = [t for t in model.graph.initializer if t.name in tail_inputs and len(t.dims) > 1]
    assert constants and {t.data_type for t in constants} == {onnx.TensorProto.FLOAT}
    assert path.stat().st_size < 0.6 * tiny_onnx.stat().st_size


def test_metadata_carries_the_contract(tiny_onnx, tiny_pt):
    metadata = {p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}
    info = model_info_from_metadata(metadata)

    assert metadata["names"] == "{0: 'circle', 1: 'square', 2: 'triangle'}"
    assert metadata["stride"] == "32" and metadata["imgsz"] == "[320, 320]"
    assert info.output_layout == "xywh_obj_cls" and info.preprocess.channel_order == "RGB"
    assert info.source.file == "tiny.pt" and len(info.source.sha256) == 64
    assert info.created and info.tools["edge-yolo-toolkit"]


# --- custom checkpoint through the command line ----------------------------------------------


def test_custom_model_round_trips_through_the_cli(tmp_path, monkeypatch, capsys):
    torch.manual_seed(3)
    cfg = load_config("yolov5s")
    cfg.update(depth_multiple=0.5, width_multiple=0.1875)
    cfg["anchors"] = [
        [9, 11, 16, 28, 31, 22],
        [30, 60, 60, 44, 58, 117],
        [115, 92, 155, 199, 370, 320],
    ]
    names = ["bolt", "nut", "washer", "screw", "spring"]
    model = build_model(cfg, nc=5, names=names)
    weights = save_ultralytics_checkpoint(model, tmp_path / "best.pt")
    output = tmp_path / "out" / "parts.onnx"

    result = run_toolkit(
        ["export", "-w", weights, "-o", output, "--imgsz", "224,288"], monkeypatch, capsys
    )

    assert result.code == 0, result.err
    assert "agrees with PyTorch" in result.out and "max |diff|" in result.out
    info = _info(output)
    assert info.names == names and info.input_size == (224, 288)
    x = torch.rand(1, 3, 224, 288, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = copy.deepcopy(model).half().float().eval()(x).numpy()
    actual = _session(output).run(None, {"images": x.numpy()})[0]
    assert np.abs(actual - expected).max() < 5e-3


# --- failures leave nothing behind ---------------------------------------------------------


def test_failed_verification_exits_non_zero_and_leaves_no_file(
    tiny_pt, tmp_path, monkeypatch, capsys
):
    strict = verify.Tolerance(box_atol=0.0, box_rtol=0.0, score_atol=0.0)
    monkeypatch.setitem(verify.TOLERANCES, "fp32", strict)
    output = tmp_path / "out" / "model.onnx"

    result = run_toolkit(
        ["export", "-w", tiny_pt, "-o", output, "--imgsz", "320"], monkeypatch, capsys
    )

    assert result.code != 0
    assert "Verification failed" in result.err and "DIFFERS" in result.err
    assert list(output.parent.iterdir()) == []


def _fake_class_checkpoint(path, monkeypatch, module, name):
    fake = types.ModuleType(module)
    cls = type(name, (), {"__module__": module})
    setattr(fake, name, cls)
    for depth in range(1, module.count(".") + 2):
        monkeypatch.setitem(sys.modules, ".".join(module.split(".")[:depth]), fake)
    torch.save({"model": cls()}, path)
    monkeypatch.undo()


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "corrupt zip",
        "text file",
        "yolov8",
        "state_dict",
        "unwritable",
        "bad size",
        "bad opset",
        "bad image",
        "huge size",
        "huge batch",
    ],
)
def test_bad_input_gives_one_message_and_no_file(case, tiny_pt, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "model.pt"
    output = tmp_path / "out" / "model.onnx"
    args = ["export", "-w", weights, "-o", output]
    expected = {
        "missing": "not found",
        "corrupt zip": "truncated or corrupt zip",
        "text file": "not a torch checkpoint",
        "yolov8": "ultralytics.nn.tasks.DetectionModel",
        "state_dict": "plain state_dict",
        "unwritable": "Cannot write to the output folder",
        "bad size": "not a multiple of the model's stride 32 (use 608 or 640)",
        "bad opset": "opset must be within 11..20",
        "bad image": "Cannot read the verification image",
        "huge size": "above the largest supported 4096",
        "huge batch": "batch size 100000 is above 64",
    }[case]
    if case == "corrupt zip":
        weights.write_bytes(tiny_pt.read_bytes()[:-200])
    elif case == "text file":
        weights.write_text("definitely not a model\n")
    elif case == "yolov8":
        _fake_class_checkpoint(weights, monkeypatch, "ultralytics.nn.tasks", "DetectionModel")
    elif case == "state_dict":
        torch.save(load_model(tiny_pt)[0].state_dict(), weights)
    elif case == "unwritable":
        weights = tiny_pt
        (tmp_path / "blocker").write_text("a file where a folder should be")
        output = tmp_path / "blocker" / "model.onnx"
        args = ["export", "-w", weights, "-o", output]
    elif case == "bad size":
        args += ["--imgsz", "630"]
    elif case == "bad opset":
        args += ["--opset", "9"]
    elif case in ("huge size", "huge batch"):
        weights = tiny_pt  # the size alone would need 120 GB for the example input
        args = ["export", "-w", weights, "-o", output]
        args += ["--imgsz", "100000"] if case == "huge size" else ["--batch", "100000"]
    elif case == "bad image":
        weights = tiny_pt
        args = ["export", "-w", weights, "-o", output, "--verify-image", tmp_path / "none.jpg"]

    result = run_toolkit(args, monkeypatch, capsys)

    assert result.code != 0
    assert expected in result.err
    assert result.err.count("error:") == 1 and "Traceback" not in result.err
    assert not output.exists()
    if output.parent.is_dir():
        assert not any(p.suffix == ".onnx" for p in output.parent.iterdir())


def test_out_of_memory_is_a_message_and_keeps_the_old_file(tiny_pt, tmp_path, monkeypatch, capsys):
    import toolkit.export as export_module

    def exhausted(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    output = tmp_path / "model.onnx"
    output.write_bytes(b"the previous, working model")
    monkeypatch.setattr(export_module, "export_onnx", exhausted)

    result = run_toolkit(["export", "-w", tiny_pt, "-o", output], monkeypatch, capsys)

    assert result.code != 0
    assert "Ran out of memory exporting at batch 1 x 640x640" in result.err
    assert "Traceback" not in result.err
    assert output.read_bytes() == b"the previous, working model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_options_are_checked_before_any_work():
    with pytest.raises(Exception, match=r"batch size must be at least 1.*opset must be within"):
        check_options(ExportOptions(batch_size=0, opset=30))


# --- the default model ---------------------------------------------------------------------


def test_without_weights_the_demo_model_is_used(tiny_pt, tmp_path, monkeypatch, capsys, caplog):
    import toolkit.download as download
    import toolkit.export as export

    calls = []
    monkeypatch.setattr(download, "DEMO_WEIGHTS", tiny_pt)
    monkeypatch.setattr(export, "run_export", lambda weights, *a, **k: calls.append(weights))
    monkeypatch.setattr(export, "describe", lambda result: "")
    caplog.set_level("INFO")

    result = run_toolkit(["export", "--imgsz", "320"], monkeypatch, capsys)

    assert result.code == 0, result.err
    assert calls == [tiny_pt]
    assert "using the demo model" in caplog.text


def test_without_weights_and_without_demo_model(tmp_path, monkeypatch, capsys):
    import toolkit.download as download

    monkeypatch.setattr(download, "DEMO_WEIGHTS", tmp_path / "models/demo/shapes-yolov5n.pt")
    result = run_toolkit(["export"], monkeypatch, capsys)

    assert result.code != 0
    assert "No --weights given" in result.err and "shapes-yolov5n.pt" in result.err


# --- four detection levels (P6 models such as yolov5n6) ---------------------------------


def _p6_config() -> dict:
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = 0.125
    cfg["anchors"] = [
        [19, 27, 44, 40, 38, 94],
        [96, 68, 86, 152, 180, 137],
        [140, 301, 303, 264, 238, 542],
        [436, 615, 739, 380, 925, 792],
    ]
    cfg["backbone"] = [
        *cfg["backbone"][:7],
        [-1, 1, "Conv", [768, 3, 2]],
        [-1, 3, "C3", [768]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 3, "C3", [1024]],
        [-1, 1, "SPPF", [1024, 5]],
    ]
    up = [-1, 1, "nn.Upsample", ["None", 2, "nearest"]]
    cfg["head"] = [
        [-1, 1, "Conv", [768, 1, 1]], up, [[-1, 8], 1, "Concat", [1]], [-1, 3, "C3", [768, False]],
        [-1, 1, "Conv", [512, 1, 1]], up, [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
        [-1, 1, "Conv", [256, 1, 1]], up, [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]],
        [-1, 1, "Conv", [256, 3, 2]], [[-1, 20], 1, "Concat", [1]], [-1, 3, "C3", [512, False]],
        [-1, 1, "Conv", [512, 3, 2]], [[-1, 16], 1, "Concat", [1]], [-1, 3, "C3", [768, False]],
        [-1, 1, "Conv", [768, 3, 2]], [[-1, 12], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
        [[23, 26, 29, 32], 1, "Detect", ["nc", "anchors"]],
    ]  # fmt: skip
    return cfg


def test_four_level_p6_model_exports_with_stride_64(tmp_path, monkeypatch, capsys):
    torch.manual_seed(4)
    weights = save_ultralytics_checkpoint(build_model(_p6_config(), nc=2), tmp_path / "p6.pt")

    refused = run_toolkit(
        ["export", "-w", weights, "-o", tmp_path / "no.onnx", "--imgsz", "288"], monkeypatch, capsys
    )
    path = export_model(weights, tmp_path / "p6.onnx", imgsz=256)

    assert refused.code != 0 and "stride 64 (use 256 or 320)" in refused.err
    assert not (tmp_path / "no.onnx").exists()
    info = _info(path)
    assert info.stride == 64 and info.strides == [8, 16, 32, 64]
    output = _session(path).run(None, {"images": np.zeros((1, 3, 256, 256), np.float32)})[0]
    assert output.shape == (1, 3 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4), 7)


_SLOW_VERIFY_EXPORT = """
import sys, time
import toolkit.verify
from toolkit import cli

def stalled(*args, **kwargs):
    print("draft written", flush=True)
    time.sleep(60)

toolkit.verify.verify_onnx = stalled
sys.argv = ["toolkit", "export", "-w", sys.argv[1], "-o", sys.argv[2], "--imgsz", "320"]
cli.main()
"""


def test_sigterm_mid_export_leaves_no_draft(tiny_pt, tmp_path):
    import signal
    import subprocess

    output = tmp_path / "model.onnx"
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_VERIFY_EXPORT, str(tiny_pt), str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "draft written"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert list(tmp_path.iterdir()) == []


def test_unknown_quantize_mode_is_refused_before_the_export(tiny_pt, tmp_path, monkeypatch, capsys):
    output = tmp_path / "model.onnx"
    args = ["export", "-w", tiny_pt, "-o", output, "--quantize", "int4", "--calib-data", tmp_path]

    result = run_toolkit(args, monkeypatch, capsys)

    assert result.code != 0
    assert "--quantize takes static and/or dynamic, got ['int4']" in result.err
    assert not output.exists()
