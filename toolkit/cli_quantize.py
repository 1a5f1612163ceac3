"""``toolkit quantize``: the command-line face of toolkit.prove (options, table, exit code).

Registered on the ``toolkit`` app by importing this module (toolkit/cli.py does).
``quantize_after_export`` serves ``toolkit export --quantize``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from device.errors import ToolkitError
from toolkit.cli import app
from toolkit.prove import QuantizeRequest, quantize_and_prove
from toolkit.report import render_table


class Mode(str, Enum):
    static = "static"
    dynamic = "dynamic"


class Method(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class WeightRounding(str, Enum):
    error_feedback = "error-feedback"
    nearest = "nearest"


class Format(str, Enum):
    qdq = "qdq"
    qoperator = "qoperator"


class PresetName(str, Enum):
    auto = "auto"
    x86 = "x86"
    x86_vnni = "x86-vnni"
    arm64 = "arm64"


@app.command("quantize")
def quantize_command(
    model: Annotated[Path, typer.Argument(help="FP32 YOLOv5 ONNX (ours, or Ultralytics' export).")],
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            "--calib-data",
            "-d",
            help="Calibration images: folder, video or YOLO dataset. Repeatable.",
        ),
    ] = None,
    eval_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-data",
            help="Held-out images for the proof (a labelled YOLO dataset adds true mAP). "
            "Default: images of --data not used for calibration.",
        ),
    ] = None,
    mode: Annotated[
        list[Mode] | None,
        typer.Option("--mode", "-m", help="static (deploy this) and/or dynamic. Repeatable."),
    ] = None,
    preset: Annotated[
        PresetName, typer.Option("--preset", help="Target CPU; auto picks this host's.")
    ] = PresetName.auto,
    method: Annotated[Method, typer.Option("--method", help="Calibration method.")] = Method.minmax,
    quant_format: Annotated[
        Format, typer.Option("--format", help="Quantized graph format.")
    ] = Format.qdq,
    per_channel: Annotated[
        bool | None,
        typer.Option(
            "--per-channel/--per-tensor", help="Weight scales per output channel (preset)."
        ),
    ] = None,
    weight_rounding: Annotated[
        WeightRounding,
        typer.Option(
            "--weight-rounding",
            help="error-feedback (GPTQ, measured on the calibration images; QDQ only) or "
            "nearest (onnxruntime's own).",
        ),
    ] = WeightRounding.error_feedback,
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Calibration images to draw.")
    ] = 128,
    eval_samples: Annotated[
        int, typer.Option("--eval-samples", help="Held-out images to draw.")
    ] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed for drawing the samples.")] = 0,
    max_drop: Annotated[
        float,
        typer.Option("--max-drop", help="Allowed loss of recall or precision vs FP32 (0.03 = 3%)."),
    ] = 0.03,
    search: Annotated[
        bool,
        typer.Option(
            "--search/--no-search",
            help="Keep the worst layers float until within budget on validation images: "
            "--eval-data images the proof does not draw (16 or more, up to 96), else a fifth "
            "of --data set aside from calibration.",
        ),
    ] = True,
    latency_runs: Annotated[int, typer.Option("--latency-runs", help="Timed runs per model.")] = 50,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir", "-o", help="Where to write models and report (default: beside)."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit non-zero when a variant is outside the budget.")
    ] = False,
) -> None:
    """Quantize an FP32 YOLOv5 ONNX model to INT8 and prove it against FP32.

    Writes <model>-int8-<preset>.onnx (static), <model>-int8-dynamic.onnx and
    <model>-int8-report.json/.md beside the model: size, latency, agreement with FP32 on
    held-out images and, with a labelled dataset, mAP50 and mAP50-95.

    Examples:

      toolkit quantize yolov5n.onnx --data frames/

      toolkit quantize yolov5n.onnx --data site.mp4 --preset arm64 --mode static --mode dynamic

      toolkit quantize yolov5n.onnx --data calib/ --eval-data val/ --max-drop 0.02 --strict
    """
    request = QuantizeRequest(
        model=model,
        data=list(data or []),
        eval_data=list(eval_data or []),
        modes=tuple(dict.fromkeys(m.value for m in mode or [Mode.static])),
        preset=preset.value,
        calibrate_method=method.value,
        quant_format="QDQ" if quant_format is Format.qdq else "QOperator",
        per_channel=per_channel,
        weight_rounding=weight_rounding.value,
        samples=samples,
        eval_samples=eval_samples,
        seed=seed,
        max_drop=max_drop,
        search=search,
        latency_runs=latency_runs,
        output_dir=output_dir,
    )
    report = quantize_and_prove(request)
    typer.echo(render_table(report))
    check_strict(report, strict)


def check_strict(report, strict: bool) -> None:
    failed = report.failed
    if failed and strict:
        names = ", ".join(v.name for v in failed)
        raise ToolkitError(
            f"Outside the fidelity budget (--max-drop {report.settings['max_drop']}): {names}. "
            "Try more calibration images, --method entropy, or a larger --max-drop.",
            exit_code=3,
        )
    for variant in failed:
        typer.secho(f"warning: {variant.name} is outside the budget", fg="yellow", err=True)


def quantize_after_export(
    model: Path,
    modes: list[str],
    data: list[Path],
    *,
    eval_data: list[Path] = (),
    preset: str = "auto",
    max_drop: float = 0.03,
    strict: bool = False,
) -> None:
    """``toolkit export --quantize MODE --calib-data PATH``: quantize the fresh export."""
    request = QuantizeRequest(
        model=model,
        data=list(data),
        eval_data=list(eval_data),
        modes=tuple(dict.fromkeys(modes)),
        preset=preset,
        max_drop=max_drop,
    )
    report = quantize_and_prove(request)
    typer.echo(render_table(report))
    check_strict(report, strict)
