"""The ``toolkit-device`` command: the detection daemon and its checks, on the board.

Each subcommand is one function below; add a new one with ``@app.command("name")``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from device.errors import ConfigError, ToolkitError

log = logging.getLogger(__name__)

app = typer.Typer(
    name="toolkit-device",
    help="Run YOLOv5 ONNX detection on a Raspberry Pi-class board: camera, stream, video file "
    "or image folder in; JSON lines, MQTT, HTTP and snapshots out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RUN_EXAMPLES = """
Examples:

  toolkit-device run daemon.yaml

  toolkit-device run --model yolov5n.onnx --source video.mp4 --jsonl - --max-frames 100

  toolkit-device run daemon.yaml --source /dev/video0 --conf 0.4 --classes person,car

  toolkit-device run -m yolov5n.onnx -s picamera --mqtt-host 192.168.1.10 --http-port 8080

A minimal daemon.yaml:

  model: {path: /opt/edge-yolo/yolov5n.onnx}
  source: {type: usb, device: /dev/video0}
  detect: {conf: 0.4, classes: [person]}
  outputs:
    jsonl: {enabled: true, path: /var/lib/edge-yolo/detections.jsonl}
"""


def configure_logging(level: str) -> None:
    """One format for every module; systemd's journal adds its own timestamps."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(
        level=level.upper(),
        format=fmt if under_journal else "%(asctime)s " + fmt,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


# Flags of 'run' and the config key each one sets: errors name the flag the user typed.
RUN_FLAGS = {
    "model.path": "--model",
    "model.intra_op_threads": "--threads",
    "model.allow_spinning": "--spinning",
    "source": "--source",
    "pipeline.max_frames": "--max-frames",
    "pipeline.max_fps": "--max-fps",
    "pipeline.frame_policy": "--frame-policy",
    "detect.conf": "--conf",
    "detect.iou": "--iou",
    "detect.max_detections": "--max-detections",
    "detect.classes": "--classes",
    "detect.class_agnostic": "--agnostic",
    "outputs.jsonl.enabled": "--jsonl",
    "outputs.jsonl.path": "--jsonl",
    "outputs.mqtt.enabled": "--mqtt-host",
    "outputs.mqtt.host": "--mqtt-host",
    "outputs.mqtt.port": "--mqtt-port",
    "outputs.mqtt.topic_prefix": "--mqtt-prefix",
    "outputs.http.enabled": "--http-port",
    "outputs.http.port": "--http-port",
    "outputs.http.host": "--http-host",
    "outputs.snapshots.enabled": "--snapshots",
    "outputs.snapshots.directory": "--snapshots",
    "log_level": "--log-level",
}


def run_overrides(**flags: Any) -> dict[str, Any]:
    """Config overrides (dotted key -> value) from the flags the user actually gave."""
    overrides: dict[str, Any] = {}
    simple = {
        "model": "model.path",
        "threads": "model.intra_op_threads",
        "max_frames": "pipeline.max_frames",
        "max_fps": "pipeline.max_fps",
        "frame_policy": "pipeline.frame_policy",
        "conf": "detect.conf",
        "iou": "detect.iou",
        "max_detections": "detect.max_detections",
        "mqtt_port": "outputs.mqtt.port",
        "mqtt_prefix": "outputs.mqtt.topic_prefix",
        "http_host": "outputs.http.host",
        "log_level": "log_level",
    }
    for flag, key in simple.items():
        if flags.get(flag) is not None:
            overrides[key] = flags[flag]
    if flags.get("spinning"):
        overrides["model.allow_spinning"] = True
    if flags.get("agnostic"):
        overrides["detect.class_agnostic"] = True
    if flags.get("source") is not None:
        overrides["source"] = _source_from_flag(flags["source"])
    if flags.get("classes") is not None:
        overrides["detect.classes"] = [c.strip() for c in flags["classes"].split(",") if c.strip()]
    if flags.get("jsonl") is not None:
        overrides.update({"outputs.jsonl.enabled": True, "outputs.jsonl.path": flags["jsonl"]})
    if flags.get("mqtt_host") is not None:
        overrides.update({"outputs.mqtt.enabled": True, "outputs.mqtt.host": flags["mqtt_host"]})
    if flags.get("http_port") is not None:
        overrides.update({"outputs.http.enabled": True, "outputs.http.port": flags["http_port"]})
    if flags.get("no_http"):
        overrides["outputs.http.enabled"] = False
    if flags.get("snapshots") is not None:
        overrides.update(
            {"outputs.snapshots.enabled": True, "outputs.snapshots.directory": flags["snapshots"]}
        )
    return overrides


def _source_from_flag(text: str) -> dict:
    from device.sources import source_config_from_string

    try:
        return source_config_from_string(text).model_dump()
    except ConfigError as exc:
        raise ConfigError(f"--source {text}: {exc}") from None


@app.command("run", epilog=RUN_EXAMPLES)
def run_command(
    config_file: Annotated[
        Path | None,
        typer.Argument(help="YAML config file; flags override its values.", show_default=False),
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="ONNX model file.")] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            "-s",
            help="picamera[:N], usb, /dev/videoN, N, rtsp://..., tcp://host:port, a video file "
            "or an image folder.",
        ),
    ] = None,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    max_fps: Annotated[
        float | None, typer.Option(help="Run the model at most this many times a second.")
    ] = None,
    conf: Annotated[
        float | None, typer.Option(help="Minimum score (objectness x class), 0..1.")
    ] = None,
    iou: Annotated[float | None, typer.Option(help="NMS overlap threshold, 0..1.")] = None,
    max_detections: Annotated[int | None, typer.Option(help="Most detections per frame.")] = None,
    classes: Annotated[
        str | None, typer.Option(help="Keep only these classes: comma-separated names or ids.")
    ] = None,
    agnostic: Annotated[bool, typer.Option("--agnostic", help="Class-agnostic NMS.")] = False,
    jsonl: Annotated[
        str | None, typer.Option(help="Write JSON lines to this file, or '-' for stdout.")
    ] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="Publish to this MQTT broker.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port.")] = None,
    mqtt_prefix: Annotated[str | None, typer.Option(help="MQTT topic prefix.")] = None,
    http_port: Annotated[
        int | None, typer.Option(help="Serve HTTP on this port (0: any free).")
    ] = None,
    no_http: Annotated[
        bool, typer.Option("--no-http", help="Do not serve HTTP (on by default, 127.0.0.1:8080).")
    ] = False,
    http_host: Annotated[
        str | None, typer.Option(help="Address the HTTP server listens on.")
    ] = None,
    snapshots: Annotated[
        Path | None, typer.Option(help="Save annotated snapshots to this folder.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="onnxruntime intra-op threads (0: all CPUs).")
    ] = None,
    spinning: Annotated[
        bool, typer.Option("--spinning", help="Let onnxruntime threads spin.")
    ] = False,
    frame_policy: Annotated[
        str | None,
        typer.Option(help="newest (skip to the newest frame), every (process all) or auto."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error.")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Same as --log-level debug.")
    ] = False,
) -> None:
    """Run the detection daemon until stopped (SIGTERM/SIGINT), the file ends or --max-frames.

    Exit codes: 0 done or stopped; 1 failure; 2 invalid configuration.
    """
    flags = {k: v for k, v in locals().items() if k != "config_file"}
    from device.bundle import verify_if_bundled
    from device.config import load_config
    from device.daemon import Daemon

    configure_logging("debug" if verbose else "info")  # the configured level once validated
    overrides = run_overrides(**flags)
    if config_file is None and "model.path" not in overrides:
        raise ConfigError("Give a config file, or at least --model and --source.")
    if config_file is not None:
        verify_if_bundled(config_file)  # a bundled config runs only from an intact bundle
    config = load_config(config_file, overrides, flag_names=RUN_FLAGS)
    configure_logging("debug" if verbose else config.log_level)

    daemon = Daemon(config)
    try:
        code = daemon.run()
    except KeyboardInterrupt:
        # A signal during startup: everything opened so far has been closed.
        log.info("Stopped during startup")
        code = 0
    if daemon.left_behind:
        # A thread still inside onnxruntime would crash the interpreter's teardown; every
        # output is closed and flushed by now, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


@app.command("check-config")
def check_config_command(
    config_file: Annotated[Path, typer.Argument(help="YAML config file to check.")],
    schema_only: Annotated[
        bool,
        typer.Option(
            "--schema-only",
            help="Check keys and values only, not the model file (for checking on a host "
            "before deployment).",
        ),
    ] = False,
) -> None:
    """Check a daemon config file without running anything; exit 0 when valid, 1 when not."""
    from device.config import load_config

    configure_logging("warning")
    try:
        config = load_config(config_file)
        if not schema_only:
            check_model_reference(config)
    except ToolkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None

    outputs = [name for name, section in config.outputs if getattr(section, "enabled", False)]
    typer.echo(
        f"{config_file}: OK (model {config.model.path}, source {config.source.type}, "
        f"outputs: {', '.join(outputs) or 'none'})"
    )


@app.command("example-config")
def example_config_command(
    source: Annotated[
        str, typer.Option(help="Source type to show: picamera, usb, stream, file or folder.")
    ] = "usb",
) -> None:
    """Print a complete daemon config with every default and what it means.

    toolkit-device example-config --source picamera > daemon.yaml
    """
    from device.config import example_yaml

    if source not in ("picamera", "usb", "stream", "file", "folder"):
        raise ConfigError(
            f"--source: expected picamera, usb, stream, file or folder, got {source!r}."
        )
    typer.echo(example_yaml(source), nl=False)


def check_model_reference(config) -> None:
    """The model file exists, loads, and has the classes the config names."""
    from device.daemon import postprocess_config
    from device.infer import read_model_info

    path = config.model.path
    if not path.is_file():
        raise ConfigError(
            f"model.path: {path} does not exist. Copy the model there, or use --schema-only "
            "to check the file's keys and values only."
        )
    info = read_model_info(path)
    postprocess_config(config, info.names)


# check and verify-bundle live in their own module and register themselves on ``app``.
from device import cli_checks  # noqa: E402, F401


def main() -> None:
    """Entry point: run the app, turning ToolkitError into a message and an exit code."""
    try:
        app()
    except ToolkitError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    # Through the package, so that the commands above land on the app that runs.
    from device.cli import main as package_main

    package_main()
