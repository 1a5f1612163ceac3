"""The ``toolkit`` command: export, quantize, prove, bundle and deploy YOLOv5 models."""

from __future__ import annotations

import logging
import sys

import typer

from device.errors import ToolkitError

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


def main() -> None:
    """Entry point: run the app, turning ToolkitError into a message and an exit code."""
    try:
        app()
    except ToolkitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
