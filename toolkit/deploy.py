"""Deploy a bundle to devices over SSH, roll back, and report what each device runs.

``deploy_device`` reads as the list of its stages: check the device (read-only), upload the
bundle into a new release directory and verify it there, install the runtime, prepare the
release, install the unit, switch ``current`` and restart, wait for /health, and on failure
switch back to the previous release.  Until the switch, a failure removes what this run added,
so the device is left as it was.

The service manager is a command prefix (``sudo systemctl`` by default); tests give a script
that starts the unit's ExecStart as a background process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import device.bundle as device_bundle
import device.check as device_check
import device.releases as device_releases
from device.bundle import verify_bundle
from device.errors import ToolkitError
from toolkit.inventory import DeviceSettings
from toolkit.remote import Remote, RemoteCommandError, RemoteError
from toolkit.systemd_unit import UnitSettings, render_unit

log = logging.getLogger(__name__)

CHECK_SOURCE = Path(device_check.__file__).read_text()
VERIFY_SOURCE = Path(device_bundle.__file__).read_text()
RELEASES_SOURCE = Path(device_releases.__file__).read_text()
HEALTH_ROUND_S = 3.0
DEFAULT_HEALTH_URL = "http://127.0.0.1:8080/health"
PIP_TIMEOUT_S = 1800


class DeployError(ToolkitError):
    """A deploy that did not end with the new release running; ``outcome`` names how."""

    def __init__(self, message: str, *, outcome: str = "failed") -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class LocalBundle:
    """A verified bundle directory on the host."""

    path: Path
    manifest: dict
    manifest_sha256: str
    size_bytes: int

    @classmethod
    def load(cls, path: Path) -> LocalBundle:
        verified = verify_bundle(path)
        size = sum(entry["size"] for entry in verified.manifest["files"].values())
        return cls(Path(path), verified.manifest, verified.manifest_sha256, size)

    @property
    def release(self) -> str:
        return self.manifest["release"]

    @property
    def wheel(self) -> str | None:
        return self.manifest.get("runtime_wheel")

    @property
    def precisions(self) -> list[str]:
        return [model["precision"] for model in self.manifest["models"]]


@dataclass
class DeviceResult:
    """How one device ended."""

    device: str
    target: str
    outcome: str
    release: str | None = None
    previous: str | None = None
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("deployed", "rolled back on request", "ready")


@dataclass
class Health:
    ok: bool
    detail: str


@dataclass(frozen=True)
class Layout:
    """Paths under the deploy root on the device."""

    root: str

    def release(self, release_id: str) -> str:
        return f"{self.root}/releases/{release_id}"

    def incoming(self, release_id: str) -> str:
        return f"{self.root}/releases/.incoming-{release_id}"

    def venv(self, key: str) -> str:
        return f"{self.root}/venvs/{key}"

    def unit_file(self, unit_name: str) -> str:
        return f"{self.root}/{unit_name}.service"

    @property
    def state(self) -> str:
        return f"{self.root}/state"


def deploy_device(bundle: LocalBundle, device: DeviceSettings) -> DeviceResult:
    """Deploy ``bundle`` to one device; raises DeployError or RemoteError when it did not land."""
    started = time.monotonic()
    layout = Layout(device.root)
    check_deploy_arguments(bundle, device)
    with Remote(device.ssh) as remote:
        report = check_device(remote, device, bundle)
        unit = unit_settings(remote, device)
        with deploy_lock(remote, device, layout):
            previous = install_release(remote, device, layout, bundle, report, unit)
    return DeviceResult(
        device.name,
        device.ssh.label,
        "deployed",
        release=bundle.release,
        previous=previous,
        message="healthy",
        seconds=time.monotonic() - started,
    )


def install_release(
    remote: Remote,
    device: DeviceSettings,
    layout: Layout,
    bundle: LocalBundle,
    report: dict,
    unit: UnitSettings,
) -> str | None:
    """Upload, install, switch and prove the release; the release it replaced, if any."""
    state = read_state(remote, device)
    uploaded = upload_release(remote, device, layout, bundle, state)
    try:
        python = install_runtime(remote, device, layout, bundle, report)
        prepare_release(remote, device, layout, bundle, python, report)
        install_unit(remote, device, layout, unit)
    except ToolkitError:
        if uploaded:
            discard_release(remote, layout, bundle.release)
        raise
    fallback = _fallback(state, bundle.release)
    urls = {**recorded_health_urls(state), bundle.release: health_url(device, bundle)}
    activate(remote, device, layout, bundle.release, fallback, urls)
    prune_releases(remote, device, layout, state, bundle.release, python)
    return fallback


def check_only_device(bundle: LocalBundle, device: DeviceSettings) -> DeviceResult:
    """Run the device check for ``bundle`` and change nothing."""
    started = time.monotonic()
    check_deploy_arguments(bundle, device)
    with Remote(device.ssh) as remote:
        report = check_device(remote, device, bundle)
    warnings = [f"{c['name']}: {c['found']}" for c in report["checks"] if c["status"] == "warn"]
    precision = (report.get("recommended_precision") or "?").upper()
    return DeviceResult(
        device.name,
        device.ssh.label,
        "ready",
        message="; ".join([f"use {precision}", *warnings]),
        seconds=time.monotonic() - started,
    )


def rollback_device(device: DeviceSettings) -> DeviceResult:
    """Switch a device back to its previous release and restart it."""
    started = time.monotonic()
    layout = Layout(device.root)
    with Remote(device.ssh) as remote, deploy_lock(remote, device, layout):
        state = read_state(remote, device)
        if not state["previous"]:
            raise DeployError(
                f"{device.name}: no previous release to roll back to under {device.root} "
                f"(current: {state['current'] or 'none'}). Deploy a bundle instead."
            )
        urls = recorded_health_urls(state)
        activate(remote, device, layout, state["previous"], state["current"], urls)
    return DeviceResult(
        device.name,
        device.ssh.label,
        "rolled back on request",
        release=state["previous"],
        previous=state["current"],
        message="healthy",
        seconds=time.monotonic() - started,
    )


@contextlib.contextmanager
def deploy_lock(remote: Remote, device: DeviceSettings, layout: Layout):
    """One deploy or rollback per device at a time (mkdir is atomic); freed on every exit."""
    lock = shlex.quote(f"{layout.root}/.deploy-lock")
    owner = shlex.quote(f"{socket.gethostname()} pid {os.getpid()} since {time.ctime()}")
    script = (
        f"mkdir -p {shlex.quote(layout.root)} && mkdir {lock} 2>/dev/null "
        f"&& echo {owner} > {lock}/owner || {{ cat {lock}/owner 2>/dev/null; exit 75; }}"
    )
    done = remote.run(["sh", "-c", script], check=False, what="take the deploy lock")
    if done.returncode != 0:
        raise DeployError(
            f"{device.name}: another deploy is running on this device "
            f"({done.stdout.strip() or 'owner unknown'}). Wait for it; if it died, remove "
            f"{layout.root}/.deploy-lock on the device.",
            outcome="locked",
        )
    try:
        yield
    finally:
        with contextlib.suppress(ToolkitError):  # the connection may be what failed
            remote.run(["rm", "-rf", f"{layout.root}/.deploy-lock"], what="free the deploy lock")


def device_status(device: DeviceSettings) -> dict:
    """Which release the device runs, whether the service is active and /health answers."""
    with Remote(device.ssh) as remote:
        state = read_state(remote, device)
        active = _service_state(remote, device)
        current = _release_entry(state, state["current"])
        if state["current"] is None:
            # A fresh device: whatever answers on the default port is not ours.
            health = Health(False, f"nothing deployed under {device.root}")
        else:
            health = _probe_health(remote, device, _recorded_health_url(current), wait=0)
    return {
        "device": device.name,
        "target": device.ssh.label,
        "current": state["current"],
        "previous": state["previous"],
        "model": current.get("model") if current else None,
        "service": active,
        "healthy": health.ok,
        "health": health.detail,
        "releases": [entry["id"] for entry in state["releases"]],
    }


# --- stages ---------------------------------------------------------------------------------


def check_deploy_arguments(bundle: LocalBundle, device: DeviceSettings) -> None:
    """Combinations that cannot work, refused before connecting to anything."""
    if device.precision != "auto":
        choose_model(bundle, device.precision, None)
    if not bundle.wheel and not device.runtime_python:
        raise DeployError(
            f"{device.name}: the bundle carries no runtime wheel and no --runtime-python was "
            "given: rebuild the bundle without --no-runtime, or pass --runtime-python."
        )


def check_device(remote: Remote, device: DeviceSettings, bundle: LocalBundle) -> dict:
    """Run the device check (read-only); stop before any change if it fails."""
    needed_mb = bundle.size_bytes / 1e6 + device.min_free_mb
    args = [
        "--json",
        "--root",
        device.root,
        "--min-free-mb",
        f"{needed_mb:.1f}",
        "--min-onnxruntime",
        bundle.manifest["target"]["min_onnxruntime"],
        "--precisions",
        ",".join(bundle.precisions),
        "--system-python",
        device.device_python,
        "--runtime-python",
        device.runtime_python or device.device_python,
    ]
    if not device.runtime_python:
        args.append("--runtime-pending")
    report = _run_check(remote, device, args)
    if not report["ok"]:
        failed = [check for check in report["checks"] if check["status"] == "fail"]
        lines = [f"{check['name']}: {check['found']} -> {check['advice']}" for check in failed]
        raise DeployError(
            f"{device.name}: the device check failed, nothing was changed: " + "; ".join(lines)
        )
    for check in report["checks"]:
        if check["status"] == "warn":
            log.warning(
                "%s: %s: %s (%s)", device.name, check["name"], check["found"], check["advice"]
            )
    _warn_on_arch_mismatch(device, bundle, report)
    log.info("%s: device check passed", device.name)
    return report


def unit_settings(remote: Remote, device: DeviceSettings) -> UnitSettings:
    user = device.service_user or remote.run(["id", "-un"], what="id -un").stdout.strip()
    settings = UnitSettings(
        root=device.root,
        user=user,
        name=device.unit_name,
        watchdog_sec=device.watchdog_sec,
        writable_paths=tuple(device.writable_paths),
    )
    render_unit(settings)  # validates: refuses root, relative roots, bad names
    return settings


def read_state(remote: Remote, device: DeviceSettings) -> dict:
    done = remote.run_python_source(
        RELEASES_SOURCE, ["state", device.root], python=device.device_python, what="read state"
    )
    return json.loads(done.stdout)


def upload_release(
    remote: Remote, device: DeviceSettings, layout: Layout, bundle: LocalBundle, state: dict
) -> bool:
    """Put the bundle into releases/<id>, verified on the device; False if it was already there."""
    if any(entry["id"] == bundle.release for entry in state["releases"]):
        _verify_remote(remote, device, layout.release(bundle.release), bundle)
        log.info("%s: release %s already on the device, verified", device.name, bundle.release)
        return False

    incoming = layout.incoming(bundle.release)
    try:
        remote.run(["rm", "-rf", incoming], what="clear an interrupted upload")
        remote.upload_directory(bundle.path, incoming)
        _verify_remote(
            remote, device, incoming, bundle, then_move_to=layout.release(bundle.release)
        )
    except ToolkitError as exc:
        remote.run(["rm", "-rf", incoming], check=False, what="remove partial upload")
        if "No space left on device" in str(exc):
            raise DeployError(
                f"{device.name}: the device ran out of disk space while receiving the bundle "
                f"into {device.root}; the partial upload was removed. Free space and retry."
            ) from exc
        raise
    log.info("%s: uploaded release %s", device.name, bundle.release)
    return True


def install_runtime(
    remote: Remote, device: DeviceSettings, layout: Layout, bundle: LocalBundle, report: dict
) -> str:
    """The daemon's interpreter: a venv holding the bundle's wheel, or the one given."""
    if device.runtime_python:
        # The device check already probed this interpreter's onnxruntime and numpy.
        _require_device_package(remote, device, device.runtime_python)
        return device.runtime_python
    constraints = runtime_constraints(bundle, _has_system_picamera2(report))
    wheel_sha = bundle.manifest["files"][bundle.wheel]["sha256"]
    key = hashlib.sha256(f"{wheel_sha}\n{constraints}".encode()).hexdigest()[:16]
    venv = layout.venv(key)
    wheel = f"{layout.release(bundle.release)}/{bundle.wheel}"
    created = _create_venv(remote, device, venv, wheel, constraints)
    python = f"{venv}/bin/python"
    try:
        _require_runtime(remote, device, python)
    except ToolkitError:
        if created:
            remote.run(["rm", "-rf", venv], check=False, what="remove broken venv")
        raise
    return python


def prepare_release(
    remote: Remote,
    device: DeviceSettings,
    layout: Layout,
    bundle: LocalBundle,
    python: str,
    report: dict,
) -> None:
    """The release's start script, chosen model and deploy record; the state directory."""
    release_dir = layout.release(bundle.release)
    model = choose_model(bundle, device.precision, report.get("recommended_precision"))
    record = {
        "release": bundle.release,
        "python": python,
        "venv": python.rsplit("/bin/", 1)[0] if "/venvs/" in python else None,
        "model": model,
        "health_url": health_url(device, bundle),
        "manifest_sha256": bundle.manifest_sha256,
        "deployed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    script = "\n".join(
        [
            f"mkdir -p {shlex.quote(layout.state)}",
            f"cd {shlex.quote(release_dir)}",
            f"rm -f {device_releases.FAILED_MARKER}",  # a release deployed again gets a new try
            f"ln -sfn {shlex.quote(model)} .model.tmp && mv -T .model.tmp model.onnx",
            _write_file_command(
                "start", start_script(bundle.release, python, device.run_args), mode="755"
            ),
            _write_file_command("deploy.json", json.dumps(record, indent=2) + "\n"),
        ]
    )
    remote.run(["sh", "-ec", script], what="prepare release")
    log.info("%s: release %s runs %s with %s", device.name, bundle.release, model, python)


def install_unit(
    remote: Remote, device: DeviceSettings, layout: Layout, settings: UnitSettings
) -> None:
    """Write the unit next to the releases and link it into systemd (enable by path)."""
    unit_path = layout.unit_file(device.unit_name)
    directory, name = unit_path.rsplit("/", 1)
    manager = device.service_manager
    script = "\n".join(
        [
            f"cd {shlex.quote(directory)}",
            _write_file_command(name, render_unit(settings)),
            f"{manager} daemon-reload",
            f"{manager} enable {shlex.quote(unit_path)}",
        ]
    )
    try:
        remote.run(["sh", "-ec", script], what=f"install unit ({manager} daemon-reload, enable)")
    except RemoteCommandError as exc:
        hint = ""
        if "sudo" in manager and ("password" in exc.stderr or "terminal" in exc.stderr):
            hint = (
                " Deploy never types a password: allow the command without one, e.g. "
                f"echo '{device.user or settings.user} ALL=(root) NOPASSWD: /usr/bin/systemctl' | "
                "sudo tee /etc/sudoers.d/edge-yolo"
            )
        raise DeployError(f"{device.name}: installing the unit failed: {exc}.{hint}") from exc
    log.info("%s: unit %s installed and enabled", device.name, settings.unit_file_name)


def activate(
    remote: Remote,
    device: DeviceSettings,
    layout: Layout,
    release: str,
    fallback: str | None,
    urls: dict[str, str],
) -> None:
    """Switch to ``release`` and restart; if it is not healthy, switch back to ``fallback``."""
    switch_links(remote, layout, current=release, previous=fallback)
    health = restart_and_wait(remote, device, urls.get(release, DEFAULT_HEALTH_URL))
    if health.ok:
        log.info("%s: release %s is healthy", device.name, release)
        return

    _mark_failed(remote, layout, release, health.detail)
    if fallback is None:
        remote.run(f"{device.service_manager} stop {device.unit_name}", check=False)
        remote.run(["rm", "-f", f"{layout.root}/current"], check=False)
        raise DeployError(
            f"{device.name}: release {release} did not become healthy: {health.detail}. There "
            "is no previous release to return to, so the service was stopped.",
            outcome="failed, stopped",
        )
    log.warning("%s: release %s unhealthy, rolling back to %s", device.name, release, fallback)
    switch_links(remote, layout, current=fallback, previous=None)
    back = restart_and_wait(remote, device, urls.get(fallback, DEFAULT_HEALTH_URL))
    if back.ok:
        raise DeployError(
            f"{device.name}: release {release} did not become healthy: {health.detail}. "
            f"Rolled back to {fallback}, which is healthy again.",
            outcome="rolled back",
        )
    raise DeployError(
        f"{device.name}: release {release} did not become healthy ({health.detail}), and after "
        f"rolling back neither did {fallback} ({back.detail}). Check the device's logs.",
        outcome="rollback unhealthy",
    )


def switch_links(remote: Remote, layout: Layout, *, current: str, previous: str | None) -> None:
    """Point ``current`` (and ``previous``) at releases, each in one atomic rename."""
    lines = [f"cd {shlex.quote(layout.root)}", _swap_link("current", f"releases/{current}")]
    if previous and previous != current:
        lines.append(_swap_link("previous", f"releases/{previous}"))
    else:
        lines.append("rm -f previous")
    remote.run(["sh", "-ec", "\n".join(lines)], what="switch current")


def restart_and_wait(remote: Remote, device: DeviceSettings, url: str) -> Health:
    """Restart the unit and wait for /health; when it fails, the reason is the daemon's own."""
    manager, unit = device.service_manager, device.unit_name
    done = remote.run(f"{manager} restart {unit}", check=False, timeout=300)
    if done.returncode != 0:
        output = _last_line(done.stderr or done.stdout)
        return Health(
            False, _failure_reason(remote, device, f"the service did not start ({output})")
        )

    deadline = time.monotonic() + device.health_timeout
    while True:
        wait = max(0.0, min(HEALTH_ROUND_S, deadline - time.monotonic()))
        health = _probe_health(remote, device, url, wait=wait)
        if health.ok:
            return health
        state = _service_state(remote, device)
        if state in ("failed", "inactive"):
            fallback = f"the service is {state} ({health.detail})"
            return Health(False, _failure_reason(remote, device, fallback))
        if time.monotonic() >= deadline:
            fallback = f"no healthy answer from {url} within {device.health_timeout:.0f} s"
            return Health(False, _failure_reason(remote, device, f"{fallback} ({health.detail})"))


def prune_releases(
    remote: Remote, device: DeviceSettings, layout: Layout, state: dict, release: str, python: str
) -> None:
    """Remove failed and old releases beyond ``keep_releases``, and venvs no release uses.

    ``state`` is the layout before this deploy; ``release`` is now current, its fallback previous.
    """
    older = [entry for entry in state["releases"] if entry["id"] != release]
    healthy = [entry["id"] for entry in older if not entry["failed"]] + [release]
    keep = set(healthy[-device.keep_releases :]) | {release, _fallback(state, release)}
    doomed = [entry["id"] for entry in state["releases"] if entry["id"] not in keep]
    used_venvs = {
        entry["deploy"].get("venv", "").rsplit("/", 1)[-1]
        for entry in state["releases"]
        if entry["id"] in keep and entry["deploy"].get("venv")
    }
    used_venvs.add(python.rsplit("/bin/", 1)[0].rsplit("/", 1)[-1])
    paths = [layout.release(old) for old in doomed]
    paths += [layout.venv(venv) for venv in state["venvs"] if venv not in used_venvs]
    if paths:
        remote.run(["rm", "-rf", *paths], what="prune old releases")
        log.info("%s: removed %s", device.name, ", ".join(p.rsplit("/", 1)[-1] for p in paths))


def discard_release(remote: Remote, layout: Layout, release: str) -> None:
    remote.run(["rm", "-rf", layout.release(release)], check=False, what="discard release")


# --- many devices ---------------------------------------------------------------------------


def run_on_devices(action, devices: list[DeviceSettings], parallel: int) -> list[DeviceResult]:
    """Run ``action(device)`` on every device, ``parallel`` at a time; one result each."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda device: _guarded(action, device), devices))


def _guarded(action, device: DeviceSettings) -> DeviceResult:
    started = time.monotonic()
    try:
        return action(device)
    except (RemoteError, DeployError) as exc:
        outcome, message = exc.outcome, str(exc)
    except ToolkitError as exc:
        outcome, message = "failed", str(exc)
    return DeviceResult(
        device.name,
        device.ssh.label,
        outcome,
        message=message,
        seconds=time.monotonic() - started,
    )


def format_results(results: list[DeviceResult]) -> str:
    rows = [("DEVICE", "TARGET", "RESULT", "RELEASE", "TIME", "DETAIL")]
    for result in results:
        detail = result.message if len(result.message) < 160 else result.message[:157] + "..."
        rows.append(
            (
                result.device,
                result.target,
                result.outcome,
                result.release or "-",
                f"{result.seconds:.1f}s",
                detail,
            )
        )
    return _table(rows)


def format_status(rows: list[dict]) -> str:
    table = [("DEVICE", "TARGET", "CURRENT", "MODEL", "SERVICE", "HEALTH", "PREVIOUS")]
    for row in rows:
        if "error" in row:
            table.append((row["device"], row["target"], "-", "-", "-", row["error"], "-"))
            continue
        health = "healthy" if row["healthy"] else f"unhealthy: {row['health']}"
        table.append(
            (
                row["device"],
                row["target"],
                row["current"] or "-",
                row["model"] or "-",
                row["service"],
                health,
                row["previous"] or "-",
            )
        )
    return _table(table)


# --- helpers --------------------------------------------------------------------------------


def choose_model(bundle: LocalBundle, precision: str, recommended: str | None) -> str:
    """The bundled model file to run: the requested precision, or the one the CPU favours."""
    files = {model["precision"]: model["file"] for model in bundle.manifest["models"]}
    if precision != "auto":
        if precision not in files:
            raise DeployError(
                f"--precision {precision} was asked for, but the bundle has only "
                f"{', '.join(files)}: rebuild the bundle with --{precision}."
            )
        return files[precision]
    if recommended in files:
        return files[recommended]
    return bundle.manifest["default_model"]


def start_script(release: str, python: str, run_args: str = "") -> str:
    command = [python, "-m", "device.cli", "run", "config.yaml", *shlex.split(run_args)]
    return (
        "#!/bin/sh\n"
        f"# Written by 'toolkit deploy' for release {release}.\n"
        "# Runs from the release directory, so the config's relative model path resolves.\n"
        'cd "$(dirname "$(readlink -f "$0")")" || exit 1\n'
        f"exec {shlex.join(command)}\n"
    )


def health_url(device: DeviceSettings, bundle: LocalBundle) -> str:
    """The device's own health URL: given, implied by --http-port in run_args, or bundled."""
    bundled = bundle.manifest.get("health_url")
    if device.health_url:
        return device.health_url
    words = shlex.split(device.run_args)
    for index, word in enumerate(words):
        if word == "--http-port" and index + 1 < len(words):
            return f"http://127.0.0.1:{words[index + 1]}/health"
        if word.startswith("--http-port="):
            return f"http://127.0.0.1:{word.split('=', 1)[1]}/health"
    return bundled or "http://127.0.0.1:8080/health"


def _run_check(remote: Remote, device: DeviceSettings, args: list[str]) -> dict:
    done = remote.run_python_source(
        CHECK_SOURCE, args, python=device.device_python, check=False, what="device check"
    )
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise DeployError(
            f"{device.name}: the device check did not run with {device.device_python} "
            f"(exit {done.returncode}: {done.stderr.strip()[-300:] or 'no output'}). Install "
            "Python 3 on the device (sudo apt install python3 python3-venv) or pass "
            "--device-python."
        ) from None


def _verify_remote(
    remote: Remote,
    device: DeviceSettings,
    path: str,
    bundle: LocalBundle,
    *,
    then_move_to: str | None = None,
) -> None:
    """The device checks every checksum (and the manifest's own); only then is it moved."""
    verify = [device.device_python, "-", path, "--json"]
    verify += ["--manifest-sha256", bundle.manifest_sha256]
    command = shlex.join(verify)
    if then_move_to:
        command += " && " + shlex.join(["mv", "-T", path, then_move_to])
    done = remote.run(command, stdin=VERIFY_SOURCE.encode(), check=False, what="verify bundle")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[0])
    except (ValueError, IndexError):
        answer = {"ok": False, "error": done.stderr.strip()[-500:] or "no output"}
    if not answer["ok"]:
        raise DeployError(
            f"{device.name}: the device refused the bundle, nothing was changed: {answer['error']}"
        )
    if done.returncode != 0:
        raise DeployError(f"{device.name}: moving the release into place failed: {done.stderr}")


def runtime_constraints(bundle: LocalBundle, system_picamera2: bool) -> str:
    """pip constraints for the runtime venv: the model's onnxruntime, numpy for picamera2."""
    lines = [f"onnxruntime>={bundle.manifest['target']['min_onnxruntime']}"]
    if system_picamera2:
        lines.append("numpy<2")  # the OS's picamera2 is built against numpy 1.x
    return "\n".join(lines) + "\n"


def _create_venv(
    remote: Remote, device: DeviceSettings, venv: str, wheel: str, constraints: str
) -> bool:
    """Create the venv unless a complete one exists; True when this call created it."""
    quoted_venv = shlex.quote(venv)
    constraint = f"-c {quoted_venv}/constraints.txt"
    script = "\n".join(
        [
            f"if [ -f {quoted_venv}/.complete ]; then echo reused; exit 0; fi",
            f"rm -rf {quoted_venv}",
            f"trap 'rm -rf {quoted_venv}' EXIT",  # any failure below leaves no half venv
            # Without pip of its own the venv uses the OS's (seen through system site-packages):
            # seconds instead of a minute of ensurepip on a Pi; ensurepip only if there is none.
            f"{device.device_python} -m venv --system-site-packages --without-pip {quoted_venv}",
            f"{quoted_venv}/bin/python -m pip --version >/dev/null 2>&1 "
            f"|| {quoted_venv}/bin/python -m ensurepip --default-pip >/dev/null",
            f"printf %s {shlex.quote(constraints)} > {quoted_venv}/constraints.txt",
            f"{quoted_venv}/bin/python -m pip install --disable-pip-version-check --no-input "
            f"--quiet {device.pip_args} {constraint} {shlex.quote(wheel)}",
            f"touch {quoted_venv}/.complete",
            "trap - EXIT",
            "echo created",
        ]
    )
    try:
        done = remote.run(["sh", "-ec", script], timeout=PIP_TIMEOUT_S, what="runtime install")
    except RemoteCommandError as exc:
        hint = (
            " Install python3-venv on the device (sudo apt install python3-venv)."
            if "ensurepip" in exc.stdout + exc.stderr
            else ""
        )
        raise DeployError(f"{device.name}: installing the runtime failed: {exc}{hint}") from exc
    created = done.stdout.strip().endswith("created")
    log.info("%s: runtime venv %s %s", device.name, venv, "created" if created else "reused")
    return created


def _require_runtime(remote: Remote, device: DeviceSettings, python: str) -> None:
    """A new venv must import a working onnxruntime, numpy that fits, and the runtime."""
    args = ["--json", "--runtime-python", python, "--system-python", device.device_python]
    report = _run_check(remote, device, args)
    failed = [
        check
        for check in report["checks"]
        if check["name"] in ("onnxruntime", "numpy/picamera2") and check["status"] == "fail"
    ]
    if failed:
        lines = [f"{check['name']}: {check['found']} -> {check['advice']}" for check in failed]
        raise DeployError(f"{device.name}: the runtime is not usable: " + "; ".join(lines))
    _require_device_package(remote, device, python)


def _require_device_package(remote: Remote, device: DeviceSettings, python: str) -> None:
    probe = remote.run([python, "-c", "import device.cli"], check=False, what="import runtime")
    if probe.returncode != 0:
        raise DeployError(
            f"{device.name}: {python} cannot import the device runtime "
            f"({_last_line(probe.stderr)}): install the project's wheel into it, or drop "
            "--runtime-python to let deploy build a venv."
        )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _probe_health(remote: Remote, device: DeviceSettings, url: str, *, wait: float) -> Health:
    done = remote.run_python_source(
        RELEASES_SOURCE,
        ["health", url, "--wait", f"{wait:.1f}"],
        python=device.device_python,
        check=False,
        timeout=wait + 30,
        what="health probe",
    )
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        return Health(False, f"health probe failed: {done.stderr.strip()[-200:]}")
    if answer["ok"]:
        return Health(True, f"HTTP {answer['status']}")
    detail = answer.get("error") or f"HTTP {answer.get('status')}"
    if answer.get("body"):
        detail += f": {answer['body'][:200]}"
    return Health(False, detail)


def _service_state(remote: Remote, device: DeviceSettings) -> str:
    done = remote.run(f"{device.service_manager} is-active {device.unit_name}", check=False)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def _failure_reason(remote: Remote, device: DeviceSettings, fallback: str) -> str:
    """The daemon's last error line from the service log, else ``fallback``; where to look."""
    command = f"{device.service_manager} status {device.unit_name} --no-pager --lines=20"
    done = remote.run(command, check=False)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "Job for" not in line]
    where = f" (log: {command} on the device)"
    if errors:
        return errors[-1].split("error: ", 1)[-1].rstrip(".") + where
    return fallback + where


def _recorded_health_url(entry: dict | None) -> str:
    return ((entry or {}).get("deploy") or {}).get("health_url") or DEFAULT_HEALTH_URL


def recorded_health_urls(state: dict) -> dict[str, str]:
    """The health URL each release on the device was deployed with."""
    return {entry["id"]: _recorded_health_url(entry) for entry in state["releases"]}


def _release_entry(state: dict, release: str | None) -> dict | None:
    return next((entry for entry in state["releases"] if entry["id"] == release), None)


def _mark_failed(remote: Remote, layout: Layout, release: str, reason: str) -> None:
    script = f"cd {shlex.quote(layout.release(release))}\n" + _write_file_command(
        device_releases.FAILED_MARKER, reason + "\n"
    )
    remote.run(["sh", "-ec", script], check=False, what="mark release failed")


def _fallback(state: dict, release: str) -> str | None:
    if state["current"] and state["current"] != release:
        return state["current"]
    return state["previous"] if state["previous"] != release else None


def _has_system_picamera2(report: dict) -> bool:
    for check in report["checks"]:
        if check["name"] == "numpy/picamera2":
            return bool(check["data"].get("picamera2"))
    return False


def _warn_on_arch_mismatch(device: DeviceSettings, bundle: LocalBundle, report: dict) -> None:
    arch = next(c for c in report["checks"] if c["name"] == "architecture")["found"].split(",")[0]
    target = bundle.manifest["target"]["arch"]
    if arch != target:
        log.warning(
            "%s: the bundle targets %s, the device is %s (the bundle is portable Python and "
            "ONNX, so this only matters for speed expectations)",
            device.name,
            target,
            arch,
        )


def _swap_link(name: str, target: str) -> str:
    return f"ln -sfn {shlex.quote(target)} .{name}.tmp && mv -T .{name}.tmp {name}"


def _write_file_command(name: str, text: str, *, mode: str = "644") -> str:
    """Shell lines writing ``text`` to ``name`` atomically (temp file, then rename)."""
    quoted = shlex.quote(name)
    return (
        f"cat > .{quoted}.tmp <<'TOOLKIT_EOF'\n{text.rstrip(chr(10))}\nTOOLKIT_EOF\n"
        f"chmod {mode} .{quoted}.tmp && mv -f .{quoted}.tmp {quoted}"
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(str(cell).ljust(width) for cell, width in cells).rstrip())
    return "\n".join(lines)
