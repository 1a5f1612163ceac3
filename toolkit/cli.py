"""The ``toolkit`` command: export, quantize, prove, bundle and deploy YOLOv5 models."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from device.errors import ConfigError, ToolkitError

app = typer.Typer(
    name="toolkit",
    help="Export YOLOv5 checkpoints to ONNX, quantize them to INT8, prove them against their "
    "source, bundle them and deploy them to Raspberry Pi-class devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("export")
def export_command(
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help="YOLOv5 .pt checkpoint, or an official name (yolov5n.pt ... yolov5x.pt) to "
            "download. Default: the demo model in models/demo/.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="ONNX file to write. Default: <weights name>.onnx."),
    ] = None,
    imgsz: Annotated[
        str | None,
        typer.Option(
            "--imgsz",
            "--img-size",
            help="Input size: 640, or height,width. Default: 640; the demo model's own 256.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "--batch", help="Batch size of the input.")
    ] = 1,
    opset: Annotated[
        int, typer.Option("--opset", help="ONNX opset, 11..20 (17 loads in onnxruntime 1.14+).")
    ] = 17,
    dynamic: Annotated[
        bool, typer.Option("--dynamic", help="Variable batch size and input size.")
    ] = False,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", help="Variable batch size.")
    ] = False,
    dynamic_size: Annotated[
        bool, typer.Option("--dynamic-size", help="Variable input height and width.")
    ] = False,
    simplify: Annotated[
        bool, typer.Option("--simplify/--no-simplify", help="Simplify the graph with onnxslim.")
    ] = True,
    half: Annotated[
        bool, typer.Option("--half", help="FP16 inside; input and output stay float32.")
    ] = False,
    verify_image: Annotated[
        Path | None,
        typer.Option("--verify-image", help="Image to prove the export on. Default: synthetic."),
    ] = None,
    download_url: Annotated[
        str | None,
        typer.Option(
            "--download-url",
            envvar="EDGE_YOLO_WEIGHTS_URL",
            help="Base URL to download official weights from (a mirror).",
        ),
    ] = None,
    quantize: Annotated[
        list[str] | None,
        typer.Option(
            "--quantize", "-q", help="Also write INT8: static and/or dynamic. Repeatable."
        ),
    ] = None,
    calib_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--calib-data",
            help="Calibration images, video or YOLO dataset. Default with the demo model: "
            "the demo clip.",
        ),
    ] = None,
    eval_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-data",
            help="Held-out images for the INT8 proof; a labelled YOLO dataset adds true mAP. "
            "Default with the demo model: its validation set.",
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", help="INT8 target: auto, x86, x86-vnni, arm64.")
    ] = "auto",
    max_drop: Annotated[
        float, typer.Option("--max-drop", help="Allowed INT8 recall/precision loss vs FP32.")
    ] = 0.03,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail when an INT8 variant is outside the budget.")
    ] = False,
) -> None:
    """Export a YOLOv5 checkpoint to ONNX and prove it against PyTorch.

    Input 'images' (N,3,H,W float32 RGB 0..1), output 'output0' (N, anchors, 5 + classes).

    Names, strides and preprocessing go into the ONNX metadata.

    The file is written only after onnxruntime reproduces PyTorch on an image.

    Examples:

      toolkit export --weights yolov5n.pt

      toolkit export -w best.pt -o best.onnx --verify-image bus.jpg

      toolkit export -w best.pt --imgsz 384,640 --dynamic-batch --half

      toolkit export -w best.pt --quantize static --calib-data frames/
    """
    from toolkit import export
    from toolkit.download import default_weights

    options = export.ExportOptions(
        imgsz=export.parse_imgsz(imgsz or default_imgsz(weights)),
        batch_size=batch_size,
        opset=opset,
        dynamic_batch=dynamic or dynamic_batch,
        dynamic_size=dynamic or dynamic_size,
        simplify=simplify,
        half=half,
    )
    export.check_options(options)
    unknown_modes = [mode for mode in quantize or [] if mode not in ("static", "dynamic")]
    if unknown_modes:
        # Checked before the FP32 export, not minutes later by the quantizer.
        raise ConfigError(
            f"--quantize takes static and/or dynamic, got {unknown_modes}. Example: "
            "--quantize static --calib-data frames/."
        )
    if quantize and weights is None:
        calib_data, eval_data = demo_quantize_data(calib_data, eval_data)
    if quantize and not calib_data:
        raise ToolkitError(
            "--quantize needs --calib-data: a folder of images, a video or a YOLO dataset "
            "from the scene the model will watch."
        )
    result = export.run_export(
        weights or default_weights(),
        output,
        options,
        verify_image=verify_image,
        download_url=download_url,
    )
    typer.echo(export.describe(result))
    if quantize:
        from toolkit.cli_quantize import quantize_after_export

        quantize_after_export(
            result.path,
            quantize,
            calib_data,
            eval_data=eval_data or [],
            preset=preset,
            max_drop=max_drop,
            strict=strict,
        )


def default_imgsz(weights: str | None) -> int:
    """640 as upstream exports, but the size the demo model was trained at for the demo."""
    from toolkit.demo import DEMO_IMAGE_SIZE

    return DEMO_IMAGE_SIZE if weights is None else 640


def demo_quantize_data(
    calib_data: list[Path] | None, eval_data: list[Path] | None
) -> tuple[list[Path], list[Path]]:
    """Calibration and held-out data for the demo model, where the user gave none."""
    from toolkit.demo import demo_val_dataset, demo_video

    if not calib_data:
        calib_data = [demo_video()]
        typer.echo(f"Calibrating on the demo clip {calib_data[0]} (pass --calib-data for yours).")
    if not eval_data:
        eval_data = [demo_val_dataset()]
        typer.echo(f"Proving INT8 on the demo validation set {eval_data[0]}.")
    return calib_data, eval_data


# bundle, deploy and status live in their own module and register themselves on ``app``.
from toolkit import cli_deploy, cli_quantize  # noqa: E402, F401


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Entry point: run the app, turning ToolkitError into a message and an exit code."""
    # SIGTERM (kill, CI timeouts, systemd stop) unwinds like Ctrl-C, so every temporary file
    # (export drafts, partial downloads, bundle staging) is removed by its finally block.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except ToolkitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
