"""``toolkit quantize`` end to end on the tiny exported model: variants, report, bad input."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from device.contract import METADATA_KEY, model_info_from_metadata
from device.errors import ToolkitError
from tests.conftest import REPO_ROOT
from tests.quant_graphs import tiny_yolo
from toolkit import prove, quantize
from toolkit.cli import app
from toolkit.cli_quantize import check_strict
from toolkit.evaluate import ImageBoxes
from toolkit.prove import QuantizeRequest, draw_samples, fidelity, quantize_and_prove
from toolkit.report import ProofReport, VariantRow, render_markdown, render_table


def scene_images(folder, count, size=(240, 320), seed=0):
    """Frames with a few filled shapes on a textured background, like a camera might see."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.integers(60, 200, (*size, 3), dtype=np.uint8)
        height, width = size
        for _ in range(3):
            x, y = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
            w, h = int(rng.integers(width // 10, width // 4)), height // 8
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.rectangle(image, (x, y), (x + w, y + h), color, -1)
        cv2.imwrite(str(folder / f"frame{i:03d}.jpg"), image)
    return folder


def metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_quantize_writes_both_variants_and_the_report(tiny_onnx, tmp_path):
    model = shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    images = scene_images(tmp_path / "frames", 12)

    outcome = CliRunner().invoke(
        app,
        ["quantize", str(model), "--data", str(images), "--mode", "static", "--mode", "dynamic",
         "--samples", "8", "--latency-runs", "3", "--preset", "arm64"],
    )  # fmt: skip

    assert outcome.exit_code == 0, outcome.output
    static, dynamic = tmp_path / "tiny-int8-arm64.onnx", tmp_path / "tiny-int8-dynamic.onnx"
    assert static.is_file() and dynamic.is_file()
    assert "INT8 static (arm64)" in outcome.output and "INT8 dynamic" in outcome.output

    report = json.loads((tmp_path / "tiny-int8-report.json").read_text())
    assert [v["name"] for v in report["variants"]] == [
        "FP32", "INT8 static (arm64)", "INT8 dynamic"
    ]  # fmt: skip
    fp32 = report["variants"][0]
    assert (fp32["recall"], fp32["precision"], fp32["within_budget"]) == (1.0, 1.0, None)
    assert report["calibration"]["count"] == 8
    assert report["held_out"]["count"] == 3  # a quarter of 12 is kept out of calibration
    assert not set(report["held_out"]["names"]) & {f"frame{i:03d}.jpg" for i in range(0)}
    assert any("Only 8 calibration images" in w for w in report["warnings"])
    assert "| FP32 |" in (tmp_path / "tiny-int8-report.md").read_text()

    info = model_info_from_metadata(metadata(static))
    assert info.precision == "int8"
    assert (info.quantization.preset, info.quantization.activation_type) == ("arm64", "int8")
    assert info.names == model_info_from_metadata(metadata(model)).names
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_held_out_images_are_never_calibration_images(tiny_onnx, tmp_path):
    model = shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    images = scene_images(tmp_path / "frames", 16, seed=1)

    outcome = CliRunner().invoke(
        app,
        ["quantize", str(model), "-d", str(images), "-n", "10", "--eval-samples", "4",
         "--latency-runs", "2", "--no-search", "--weight-rounding", "nearest"],
    )  # fmt: skip

    assert outcome.exit_code == 0, outcome.output
    report = json.loads((tmp_path / "tiny-int8-report.json").read_text())
    assert report["held_out"]["count"] == 4
    assert report["calibration"]["count"] == 10
    (written,) = tmp_path.glob("tiny-int8-*.onnx")
    assert model_info_from_metadata(metadata(written)).quantization.weight_rounding == "nearest"


def test_ultralytics_style_metadata_is_enough(tmp_path):
    path, _ = tiny_yolo(tmp_path / "ultra.onnx", metadata=False)
    model = onnx.load(str(path))
    for key, value in {"stride": "4", "names": "{0: 'cat', 1: 'dog'}", "imgsz": "[32, 32]"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    images = scene_images(tmp_path / "frames", 12, size=(32, 48))

    outcome = CliRunner().invoke(
        app, ["quantize", str(path), "-d", str(images), "--latency-runs", "2", "--no-search"]
    )

    assert outcome.exit_code == 0, outcome.output
    (written,) = tmp_path.glob("ultra-int8-*.onnx")
    stored = metadata(written)
    assert METADATA_KEY in stored and stored["names"] == "{0: 'cat', 1: 'dog'}"
    assert model_info_from_metadata(stored).source.kind == "ultralytics-onnx"


def test_bad_options_are_rejected_before_any_work(tmp_path):
    outcome = CliRunner().invoke(
        app, ["quantize", str(tmp_path / "m.onnx"), "-d", str(tmp_path), "--max-drop", "2"]
    )
    assert isinstance(outcome.exception, ToolkitError)
    assert "--max-drop must be within 0..1, got 2.0" in str(outcome.exception)


def test_labelled_dataset_for_other_classes_is_rejected(tiny_onnx, tmp_path):
    model = shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    dataset = tmp_path / "ds"
    scene_images(dataset / "images", 6)
    (dataset / "labels").mkdir()
    for image in (dataset / "images").iterdir():
        (dataset / "labels" / f"{image.stem}.txt").write_text("42 0.5 0.5 0.1 0.1\n")

    outcome = CliRunner().invoke(
        app,
        ["quantize", str(model), "-d", str(scene_images(tmp_path / "calib", 8)),
         "--eval-data", str(dataset)],
    )  # fmt: skip

    assert isinstance(outcome.exception, ToolkitError)
    assert "class ids [42], but the model has 3 classes" in str(outcome.exception)
    assert not list(tmp_path.glob("tiny-int8-*"))


def test_cli_turns_bad_input_into_a_message_and_exit_code(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model, _ = tiny_yolo(tmp_path / "tiny.onnx")

    done = subprocess.run(
        [sys.executable, "-m", "toolkit", "quantize", str(model), "--data", str(empty)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )

    assert done.returncode == 1
    assert "error: Expected images" in done.stderr and "found an empty folder" in done.stderr
    assert "Traceback" not in done.stderr


def _report(within: bool | None) -> ProofReport:
    row = VariantRow("INT8 static (x86)", "m.onnx", 1_000_000, 10.0, 12.0, 1.5, 0.9, 0.95, 0.9,
                     20, within_budget=within, float_layers=["a"])  # fmt: skip
    fp32 = VariantRow("FP32", "f.onnx", 4_000_000, 15.0, 16.0, 1.0, 1.0, 1.0, 1.0, 21)
    return ProofReport(
        model="f.onnx",
        host={"cpu": "test cpu", "cpus": 2, "onnxruntime": "x"},
        settings={
            "iou_threshold": 0.5,
            "conf_threshold": 0.25,
            "max_drop": 0.03,
            "latency_runs": 5,
        },
        held_out={"count": 9, "labelled": False},
        calibration={"count": 50, "sources": ["v.mp4"], "seed": 0},
        variants=[fp32, row],
        search=[{"count": 0, "recall": 0.8, "precision": 0.9}],
    )


def test_strict_makes_a_variant_outside_the_budget_an_error():
    with pytest.raises(ToolkitError, match=r"Outside the fidelity budget .*INT8 static") as info:
        check_strict(_report(within=False), strict=True)
    assert info.value.exit_code == 3
    check_strict(_report(within=False), strict=False)  # only a warning
    check_strict(_report(within=True), strict=True)


def test_table_and_markdown_mark_the_variant_outside_the_budget():
    report = _report(within=False)

    table, markdown = render_table(report), render_markdown(report)

    assert "OUTSIDE BUDGET" in table and "OUTSIDE BUDGET" in markdown
    assert "1.50x" in table and "0.900" in table
    assert "| 0 | 0.800 | 0.900 |" in markdown


def test_export_with_quantize_writes_the_int8_beside_the_export(tiny_pt, tmp_path):
    images = scene_images(tmp_path / "frames", 12, seed=2)
    output = tmp_path / "out" / "tiny.onnx"

    outcome = CliRunner().invoke(
        app,
        ["export", "-w", str(tiny_pt), "-o", str(output), "--imgsz", "320",
         "--quantize", "static", "--calib-data", str(images), "--preset", "x86"],
    )  # fmt: skip

    assert outcome.exit_code == 0, outcome.output
    int8 = tmp_path / "out" / "tiny-int8-x86.onnx"
    info = model_info_from_metadata(metadata(int8))
    assert (info.precision, info.quantization.preset, info.quantization.reduce_range) == (
        "int8", "x86", True
    )  # fmt: skip
    assert (tmp_path / "out" / "tiny-int8-report.md").is_file()


def test_export_quantize_without_calibration_data_is_refused(tiny_pt, tmp_path):
    outcome = CliRunner().invoke(
        app, ["export", "-w", str(tiny_pt), "-o", str(tmp_path / "t.onnx"), "-q", "static"]
    )
    assert isinstance(outcome.exception, ToolkitError)
    assert "--quantize needs --calib-data" in str(outcome.exception)
    assert not (tmp_path / "t.onnx").exists()


def test_search_validates_on_frames_it_neither_calibrated_nor_proves_on(tiny_onnx, tmp_path):
    images = scene_images(tmp_path / "frames", 40, seed=3)
    request = QuantizeRequest(model=tiny_onnx, data=[images], samples=20, eval_samples=8)

    samples = draw_samples(request, model_info_from_metadata(metadata(tiny_onnx)), [])

    calibration = {s.name for s in samples.calibration}
    validation = {s.name for s in samples.validation}
    held_out = {s.name for s in samples.held_out}
    assert (len(calibration), len(validation), len(held_out)) == (20, 6, 8)
    assert not calibration & validation and not calibration & held_out
    assert not validation & held_out


def test_search_and_report_judge_labelled_images_by_the_same_rule():
    truth = [ImageBoxes.from_arrays([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    fp32 = [ImageBoxes.from_arrays([[0, 0, 10, 10], [22, 20, 32, 30]], [0, 1], [0.9, 0.8])]
    # The second box still overlaps FP32's by IoU 0.67 but the true object only by 0.43:
    # full agreement with FP32, yet half the mAP50 is lost.
    int8 = [ImageBoxes.from_arrays([[0, 0, 10, 10], [24, 20, 34, 30]], [0, 1], [0.9, 0.8])]

    judged = fidelity(fp32, int8, truth)
    unlabelled = fidelity(fp32, int8, None)

    assert (judged.recall, judged.precision) == (1.0, 1.0)
    assert judged.map50_drop == pytest.approx(0.5)
    assert not judged.within(0.03)
    assert unlabelled.within(0.03) and unlabelled.map50_drop is None


def test_log_never_claims_within_budget_when_the_held_out_proof_says_outside(
    tiny_onnx, tmp_path, monkeypatch, caplog
):
    model = shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    images = scene_images(tmp_path / "frames", 40, seed=4)
    # The validation frames look fine to the search; the held-out images do not.
    monkeypatch.setattr(prove.Judge, "__call__", lambda self, path: quantize.Fidelity(1.0, 1.0))
    monkeypatch.setattr(prove, "fidelity", lambda *args: quantize.Fidelity(0.9, 0.95))
    request = QuantizeRequest(model=model, data=[images], samples=20, latency_runs=2)

    with caplog.at_level(logging.INFO, logger="toolkit"):
        report = quantize_and_prove(request)

    assert report.variants[1].within_budget is False
    assert report.search[0]["recall"] == 1.0  # the search did stop at no float layers
    assert any("held-out proof does not" in w for w in report.warnings)
    claims = [r.getMessage() for r in caplog.records if "within" in r.getMessage().lower()]
    assert not [c for c in claims if "within budget" in c or "within the budget" in c], claims
    assert "OUTSIDE" in caplog.text
    markdown = (tmp_path / "tiny-int8-report.md").read_text()
    assert "6 validation samples of the calibration sources" in markdown


def test_search_needs_enough_detections_to_judge_the_budget():
    assert prove.search_detections_needed(0.03) == 100
    assert prove.search_detections_needed(0.1) == 30
    assert prove.search_detections_needed(0.0) == 300


def test_search_is_skipped_when_validation_holds_too_few_detections(
    tiny_onnx, tmp_path, monkeypatch, caplog
):
    model = shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    images = scene_images(tmp_path / "frames", 40, seed=4)
    # Outside the budget on validation, so the search would start adding float layers...
    monkeypatch.setattr(prove.Judge, "__call__", lambda self, path: quantize.Fidelity(0.9, 0.9))
    # ...but the validation images hold fewer FP32 detections than judging it needs.
    monkeypatch.setattr(prove, "search_detections_needed", lambda max_drop: 10**6)
    request = QuantizeRequest(model=model, data=[images], samples=20, latency_runs=2)

    with caplog.at_level(logging.INFO, logger="toolkit"):
        report = quantize_and_prove(request)

    assert "Budget search skipped" in caplog.text and "too few to judge a 3% budget" in caplog.text
    assert [step["count"] for step in report.search] == [0]
    assert report.variants[1].float_layers == []


def test_search_validates_on_spare_eval_images_when_there_are_enough(tiny_onnx, tmp_path):
    data = scene_images(tmp_path / "camera", 40, seed=5)
    eval_data = scene_images(tmp_path / "labelled", 30, seed=6)
    for image in eval_data.iterdir():
        image.rename(image.with_name("eval-" + image.name))
    request = QuantizeRequest(
        model=tiny_onnx, data=[data], eval_data=[eval_data], samples=20, eval_samples=8
    )

    samples = draw_samples(request, model_info_from_metadata(metadata(tiny_onnx)), [])

    def folders(draw):
        return {"labelled" if s.name.startswith("eval-") else "camera" for s in draw}

    assert (len(samples.calibration), len(samples.validation), len(samples.held_out)) == (20, 22, 8)
    assert folders(samples.calibration) == {"camera"}
    assert folders(samples.validation) == folders(samples.held_out) == {"labelled"}
    assert not {s.name for s in samples.validation} & {s.name for s in samples.held_out}
    assert samples.validation_origin == "--eval-data not drawn for the proof"

    few_spare = QuantizeRequest(
        model=tiny_onnx, data=[data], eval_data=[eval_data], samples=20, eval_samples=20
    )
    fallback = draw_samples(few_spare, model_info_from_metadata(metadata(tiny_onnx)), [])
    assert folders(fallback.validation) == {"camera"} and len(fallback.validation) == 8
