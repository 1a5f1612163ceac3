"""The ``toolkit-device check`` and ``toolkit-device verify-bundle`` commands.

Registered on the ``toolkit-device`` app by importing this module (device/cli.py does).  The
work is in ``device.check`` and ``device.bundle``, which also run without this CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from device import check as device_check
from device.bundle import verify_bundle
from device.cli import app

CHECK_EXAMPLES = """
Examples:

  toolkit-device check

  toolkit-device check --json --root /opt/edge-yolo --min-onnxruntime 1.17

  toolkit-device check --cpuinfo saved-cpuinfo.txt --machine aarch64
"""

DIRECTORY = typer.Argument(..., help="Bundle directory (holding manifest.json).")
ROOT = typer.Option(None, help="Also check free space and write access here.")
CPUINFO = typer.Option(Path("/proc/cpuinfo"), help="cpuinfo file to read CPU features from.")


@app.command("check", epilog=CHECK_EXAMPLES)
def check_command(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    root: Path | None = ROOT,
    min_free_mb: float = typer.Option(200.0, help="Free space needed under --root, in MB."),
    min_onnxruntime: str = typer.Option("", help="Oldest onnxruntime the model runs on."),
    runtime_python: str | None = typer.Option(
        None, help="Interpreter to probe for onnxruntime and numpy (default: this one)."
    ),
    system_python: str = typer.Option(
        "/usr/bin/python3", help="OS interpreter whose packages hold picamera2."
    ),
    cpuinfo: Path = CPUINFO,
    machine: str | None = typer.Option(None, help="Architecture to assume (default: uname -m)."),
) -> None:
    """Check that this board can run the detector: one pass/warn/fail line each, with advice.

    Covers 64-bit ARM, Python, onnxruntime (imported in a child process, so a crash is a
    message), numpy vs the OS's picamera2, CPU features (INT8 or FP32), camera, disk space.
    Exit code 0 when nothing failed, 1 otherwise.
    """
    environment = device_check.CheckEnvironment(
        cpuinfo_path=cpuinfo,
        system_python=system_python,
        disk_path=root,
        min_free_mb=min_free_mb,
        min_onnxruntime=min_onnxruntime,
    )
    if machine:
        environment.machine = machine
    if runtime_python:
        environment.runtime_python = runtime_python
    results = device_check.run_checks(environment)
    report = device_check.report_json(results)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(device_check.format_report(results))
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("verify-bundle")
def verify_bundle_command(directory: Path = DIRECTORY) -> None:
    """Check every file of a bundle against its manifest's sha256; exit 1 on any mismatch."""
    verified = verify_bundle(directory)
    count = len(verified.manifest["files"])
    typer.echo(f"{directory}: release {verified.release_id}, {count} files match the manifest")
