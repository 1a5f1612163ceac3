"""The ``toolkit bundle``, ``toolkit deploy`` and ``toolkit status`` commands.

Registered on the ``toolkit`` app by importing this module (toolkit/cli.py does); each command
only turns flags into calls of ``toolkit.bundle`` and ``toolkit.deploy``.
"""

from __future__ import annotations

import functools
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import typer
from pydantic import ValidationError

from device.errors import ConfigError, ToolkitError
from toolkit.cli import app

BUNDLE_EXAMPLES = """
Examples:

  toolkit bundle out/cam.tar.gz --fp32 yolov5n.onnx --int8 yolov5n-int8.onnx --config daemon.yaml

  toolkit bundle out/cam --fp32 yolov5n.onnx --config daemon.yaml --arch aarch64 --no-runtime
"""

DEPLOY_EXAMPLES = """
Examples:

  toolkit deploy out/cam.tar.gz --host pi@192.168.1.20 --identity-file ~/.ssh/edge_ed25519

  toolkit deploy out/cam.tar.gz --inventory devices.yaml --parallel 4

  toolkit deploy --rollback --host pi@192.168.1.20

  toolkit deploy out/cam.tar.gz --inventory devices.yaml --check-only

The device user needs write access to --root (sudo install -d -o pi /opt/edge-yolo) and
passwordless 'sudo systemctl' (or another --service-manager).
"""

# Device options shared by deploy and status; None means "not given" (inventory value stays).
HOST = typer.Option(None, "--host", help="One device: [user@]host.")
INVENTORY = typer.Option(None, "--inventory", "-i", help="YAML file listing devices.")
LIMIT = typer.Option(None, "--limit", help="Only this inventory device (repeatable).")
PORT = typer.Option(None, "--port", help="SSH port (default 22).")
IDENTITY = typer.Option(None, "--identity-file", help="SSH private key.")
KNOWN_HOSTS = typer.Option(None, "--known-hosts", help="known_hosts file with the host key.")
SSH_CONFIG = typer.Option(None, "--ssh-config", help="ssh_config file (default ~/.ssh/config).")
CONNECT_TIMEOUT = typer.Option(None, "--connect-timeout", help="Seconds to connect (10).")
ROOT = typer.Option(None, "--root", help="Deploy directory on the device (/opt/edge-yolo).")
SERVICE_MANAGER = typer.Option(
    None, "--service-manager", help="Command managing the unit (default 'sudo systemctl')."
)
UNIT_NAME = typer.Option(None, "--unit-name", help="systemd unit name (edge-yolo).")
DEVICE_PYTHON = typer.Option(None, "--device-python", help="Device interpreter (python3).")
WRITABLE = typer.Option(
    None, "--writable", help="Directory the service may write, e.g. snapshots (repeatable)."
)


OUT = typer.Argument(..., help="Bundle directory, or an archive ending in .tar.gz.")
FP32 = typer.Option(None, "--fp32", help="FP32 ONNX model.")
INT8 = typer.Option(None, "--int8", help="INT8 ONNX model.")
CONFIG = typer.Option(
    None, "--config", help="Daemon YAML for 'toolkit-device run' (default: Pi camera)."
)
RUNTIME_WHEEL = typer.Option(
    None, help="Prebuilt wheel of this project (default: built from the source tree)."
)
BUNDLE = typer.Argument(None, help="Bundle directory or .tar.gz.")


def _device_overrides(**given) -> dict:
    """The flags the user gave; an empty repeatable option counts as not given."""
    return {key: value for key, value in given.items() if value is not None and value != []}


def select_devices(host: str | None, inventory: Path | None, limit: list[str] | None, **given):
    """The devices named by --host or --inventory, with the flags given applied to each."""
    from toolkit.inventory import DeviceSettings, load_inventory

    if (host is None) == (inventory is None):
        raise ToolkitError("Give exactly one of --host (one device) and --inventory (many).")
    if limit and inventory is None:
        raise ToolkitError("--limit selects devices of an --inventory; it needs one.")
    overrides = _device_overrides(**given)
    try:
        if host is not None:
            user, _, name = host.rpartition("@")
            overrides.setdefault("user", user or None)
            return [DeviceSettings(host=name, **overrides)]
        devices = load_inventory(inventory, limit=limit)
        return [
            DeviceSettings.model_validate({**device.model_dump(), **overrides})
            for device in devices
        ]
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"Invalid device options: {problems}") from None


@app.command("bundle", epilog=BUNDLE_EXAMPLES)
def bundle_command(
    out: Path = OUT,
    fp32: Path | None = FP32,
    int8: Path | None = INT8,
    config: Path | None = CONFIG,
    default_precision: str | None = typer.Option(
        None, help="Model run when deploy does not choose: fp32 or int8 (default fp32)."
    ),
    arch: str = typer.Option("aarch64", help="Target architecture recorded in the manifest."),
    release: str | None = typer.Option(None, help="Release id (default: UTC time + hash)."),
    runtime_wheel: Path | None = RUNTIME_WHEEL,
    no_runtime: bool = typer.Option(False, "--no-runtime", help="Leave the runtime wheel out."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at OUT."),
) -> None:
    """Pack model(s), daemon config, runtime wheel and a checksummed manifest for devices."""
    from toolkit.bundle import BundleModel, build_bundle

    models = [BundleModel(p, path) for p, path in (("fp32", fp32), ("int8", int8)) if path]
    build_bundle(
        models, out, config=config, default_precision=default_precision, arch=arch,
        release=release, runtime_wheel=runtime_wheel, include_runtime=not no_runtime,
        force=force,
    )  # fmt: skip
    typer.echo(f"bundle written: {out}")


@app.command("deploy", epilog=DEPLOY_EXAMPLES)
def deploy_command(
    bundle: Path | None = BUNDLE,
    rollback: bool = typer.Option(False, "--rollback", help="Return to the previous release."),
    check_only: bool = typer.Option(
        False, "--check-only", help="Run the device check for BUNDLE and change nothing."
    ),
    parallel: int = typer.Option(4, min=1, help="Devices deployed at once."),
    host: str | None = HOST,
    inventory: Path | None = INVENTORY,
    limit: list[str] | None = LIMIT,
    port: int | None = PORT,
    identity_file: Path | None = IDENTITY,
    known_hosts: Path | None = KNOWN_HOSTS,
    ssh_config: Path | None = SSH_CONFIG,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    root: str | None = ROOT,
    service_manager: str | None = SERVICE_MANAGER,
    unit_name: str | None = UNIT_NAME,
    device_python: str | None = DEVICE_PYTHON,
    service_user: str | None = typer.Option(
        None, help="Unprivileged user the service runs as (default: the SSH user)."
    ),
    runtime_python: str | None = typer.Option(
        None, help="Device interpreter that already has the runtime: skip venv and pip."
    ),
    pip_args: str | None = typer.Option(
        None, help="Extra pip install arguments, e.g. '--no-index --find-links /opt/wheels'."
    ),
    precision: str | None = typer.Option(
        None, help="auto (INT8 only where the CPU has dot product), fp32 or int8."
    ),
    run_args: str | None = typer.Option(
        None, help="Extra 'toolkit-device run' flags, e.g. '--source usb --http-port 8081'."
    ),
    health_url: str | None = typer.Option(None, help="Health URL on the device itself."),
    health_timeout: float | None = typer.Option(None, help="Seconds to become healthy (60)."),
    min_free_mb: float | None = typer.Option(
        None, help="Free MB to keep beyond the bundle (250: room for the runtime venv)."
    ),
    keep_releases: int | None = typer.Option(None, help="Healthy releases kept (3)."),
    watchdog_sec: int | None = typer.Option(None, help="WatchdogSec of the unit (30)."),
    writable_paths: list[str] | None = WRITABLE,
) -> None:
    """Deploy a bundle over SSH: check, upload, install, switch, wait for /health or roll back."""
    flags = dict(locals())
    from toolkit import deploy
    from toolkit.bundle import open_bundle

    devices = select_devices(
        **{
            k: v
            for k, v in flags.items()
            if k not in ("bundle", "rollback", "check_only", "parallel")
        }
    )
    if rollback == (bundle is not None):
        raise ToolkitError("Give a BUNDLE to deploy, or --rollback without one.")
    if rollback and check_only:
        raise ToolkitError("--check-only checks a device for a BUNDLE; it has no --rollback form.")

    with tempfile.TemporaryDirectory(prefix="toolkit-deploy-") as workdir:
        if rollback:
            action = deploy.rollback_device
        else:
            local = deploy.LocalBundle.load(open_bundle(bundle, Path(workdir)))
            stage = deploy.check_only_device if check_only else deploy.deploy_device
            action = functools.partial(stage, local)
        results = deploy.run_on_devices(action, devices, parallel)

    typer.echo(deploy.format_results(results))
    for result in results:
        if not result.ok:
            typer.secho(f"error: {result.message}", fg=typer.colors.RED, err=True)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


@app.command("status")
def status_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    parallel: int = typer.Option(8, min=1, help="Devices asked at once."),
    host: str | None = HOST,
    inventory: Path | None = INVENTORY,
    limit: list[str] | None = LIMIT,
    port: int | None = PORT,
    identity_file: Path | None = IDENTITY,
    known_hosts: Path | None = KNOWN_HOSTS,
    ssh_config: Path | None = SSH_CONFIG,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    root: str | None = ROOT,
    service_manager: str | None = SERVICE_MANAGER,
    unit_name: str | None = UNIT_NAME,
    device_python: str | None = DEVICE_PYTHON,
) -> None:
    """Show which release each device runs, its service state and whether /health answers."""
    flags = dict(locals())
    from toolkit import deploy

    devices = select_devices(**{k: v for k, v in flags.items() if k not in ("as_json", "parallel")})

    def ask(device) -> dict:
        try:
            return deploy.device_status(device)
        except ToolkitError as exc:
            return {"device": device.name, "target": device.ssh.label, "error": str(exc)}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        rows = list(pool.map(ask, devices))
    typer.echo(json.dumps(rows, indent=2) if as_json else deploy.format_status(rows))
    if any("error" in row or not row["healthy"] for row in rows):
        raise typer.Exit(1)
