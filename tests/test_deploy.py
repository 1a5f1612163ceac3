"""toolkit deploy / status over a real OpenSSH server on 127.0.0.1.

The "devices" are directories on this machine reached through sshd (own host key, key auth
only).  systemd is replaced by tests/fake_systemctl.py, which runs the unit's ExecStart like
Type=notify does; the daemon is the real ``toolkit-device run`` answering /health over HTTP.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from device.errors import ToolkitError
from tests import sshd_server
from tests.tiny_model import write_tiny_model, write_unloadable_model
from toolkit.bundle import BundleModel, build_bundle, build_runtime_wheel
from toolkit.deploy import (
    DeployError,
    LocalBundle,
    deploy_device,
    device_status,
    run_on_devices,
)
from toolkit.inventory import DeviceSettings
from toolkit.remote import RemoteError

pytestmark = pytest.mark.skipif(
    sshd_server.unavailable_reason() is not None, reason=str(sshd_server.unavailable_reason())
)

FAKE_SYSTEMCTL = Path(__file__).with_name("fake_systemctl.py")
TOOLKIT = [sys.executable, "-m", "toolkit"]
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = sshd_server.start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def bundles(workdir):
    """Bundles that share one runtime wheel, made on demand by name."""
    wheel = build_runtime_wheel(workdir / "wheel")
    frames = workdir / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        cv2.imwrite(str(frames / f"{index}.jpg"), rng.integers(0, 255, (64, 64, 3), np.uint8))
    good_source = {"type": "folder", "path": str(frames), "loop": True, "fps": 10}
    made: dict[str, Path] = {}

    def make(name: str, *, source: dict | None = None, broken_model: bool = False) -> Path:
        if name in made:
            return made[name]
        model = workdir / f"{name}.onnx"
        write_unloadable_model(model) if broken_model else write_tiny_model(model)
        config = workdir / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump(
                {"source": source or good_source, "outputs": {"http": {"enabled": True}}}
            )
        )
        made[name] = build_bundle(
            [BundleModel("fp32", model)],
            workdir / "bundles" / name,
            config=config,
            arch="x86_64",
            release=name,
            runtime_wheel=wheel,
            check_models=not broken_model,
            check_config=not broken_model,
        )
        return made[name]

    return make


class Devices:
    """Device roots on this machine behind the shared sshd; stops their daemons at the end."""

    def __init__(self, sshd: sshd_server.SshServer, base: Path) -> None:
        self.sshd = sshd
        self.base = base
        self.made: list[DeviceSettings] = []

    def make(self, name: str, **overrides) -> DeviceSettings:
        home = self.base / name
        root = home / "opt" / "edge-yolo"
        root.mkdir(parents=True)
        port = sshd_server.free_port()
        settings = {
            "name": name,
            "host": "127.0.0.1",
            "user": getpass.getuser(),  # sshd runs as this user and lets only it in
            "port": self.sshd.port,
            "identity_file": self.sshd.client_key,
            "known_hosts": self.sshd.known_hosts,
            "ssh_config": os.devnull,
            "root": str(root),
            "service_manager": f"{sys.executable} {FAKE_SYSTEMCTL} --state {home / 'systemd'}",
            "service_user": "edgeyolo",
            # The OS interpreter, as on a Pi: runs the stdlib-only check, verify and probes.
            "device_python": SYSTEM_PYTHON,
            "runtime_python": sys.executable,
            "run_args": f"--http-port {port}",
            "health_timeout": 20,
            "min_free_mb": 1,
            **overrides,
        }
        device = DeviceSettings(**settings)
        self.made.append(device)
        return device

    def stop_all(self) -> None:
        for device in self.made:
            command = [*device.service_manager.split(), "stop", device.unit_name]
            subprocess.run(command, capture_output=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def devices(sshd, workdir):
    made = Devices(sshd, workdir / "devices")
    yield made
    made.stop_all()


@pytest.fixture(scope="module")
def deployed(devices, bundles) -> DeviceSettings:
    """A device running release 'base', shared by the tests that must leave it as it was."""
    device = devices.make("steady")
    deploy_device(LocalBundle.load(bundles("base")), device)
    return device


# --- helpers --------------------------------------------------------------------------------


def root_of(device: DeviceSettings) -> Path:
    return Path(device.root)


def http_port(device: DeviceSettings) -> int:
    return int(device.run_args.split()[-1])


def get_health(device: DeviceSettings) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{http_port(device)}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under the deploy root with its link target or content hash (not state/)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if relative.startswith("state"):
                continue
            if path.is_symlink():
                seen[relative] = "-> " + os.readlink(path)
            elif path.is_file():
                seen[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                seen[relative] = "dir"
    return seen


def toolkit_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TOOLKIT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def device_flags(device: DeviceSettings) -> list[str]:
    return [
        "--host",
        f"{device.user}@{device.host}",
        "--port",
        str(device.port),
        "--identity-file",
        str(device.identity_file),
        "--known-hosts",
        str(device.known_hosts),
        "--ssh-config",
        os.devnull,
        "--root",
        device.root,
        "--service-manager",
        device.service_manager,
        "--device-python",
        device.device_python,
    ]


# --- a deploy lands, updates, rolls back on request -----------------------------------------


def test_deploy_lands_updates_and_rolls_back_on_request(devices, bundles):
    device = devices.make("main")
    root = root_of(device)

    first = deploy_device(LocalBundle.load(bundles("alpha")), device)

    assert first.outcome == "deployed" and first.release == "alpha" and first.previous is None
    assert os.readlink(root / "current") == "releases/alpha"
    release = root / "releases" / "alpha"
    manifest = json.loads((release / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == entry["sha256"]
    assert (release / manifest["runtime_wheel"]).is_file()
    assert os.access(release / "start", os.X_OK)
    assert f"exec {sys.executable} -m device.cli run config.yaml" in (release / "start").read_text()
    record = json.loads((release / "deploy.json").read_text())
    assert record["python"] == sys.executable and record["model"] == "model-fp32.onnx"
    assert record["health_url"] == f"http://127.0.0.1:{http_port(device)}/health"
    unit = root / "edge-yolo.service"
    assert "ExecStart=" + str(root / "current" / "start") in unit.read_text().splitlines()
    assert (root.parent.parent / "systemd" / "edge-yolo.service").resolve() == unit
    assert not list((root / "releases").glob(".incoming-*"))

    status, body = get_health(device)
    assert status == 200 and body["healthy"] is True

    second = deploy_device(LocalBundle.load(bundles("beta")), device)

    assert second.previous == "alpha"
    assert os.readlink(root / "current") == "releases/beta"
    assert os.readlink(root / "previous") == "releases/alpha"
    row = device_status(device)
    assert (row["current"], row["previous"], row["healthy"]) == ("beta", "alpha", True)
    assert row["service"] == "active"

    rolled = toolkit_cli("deploy", "--rollback", *device_flags(device))

    assert rolled.returncode == 0, rolled.stderr
    assert "rolled back on request" in rolled.stdout and "alpha" in rolled.stdout
    assert os.readlink(root / "current") == "releases/alpha"
    assert os.readlink(root / "previous") == "releases/beta"
    assert get_health(device)[0] == 200

    shown = toolkit_cli("status", "--json", *device_flags(device))

    assert shown.returncode == 0, shown.stderr
    [row] = json.loads(shown.stdout)
    assert (row["current"], row["healthy"], row["model"]) == ("alpha", True, "model-fp32.onnx")


# --- a release whose daemon cannot start is rolled back -------------------------------------


def test_bundle_with_a_broken_config_is_rolled_back_and_the_command_fails(deployed, bundles):
    bad = bundles("no-video", source={"type": "file", "path": "/nonexistent/cam.mp4"})

    done = toolkit_cli(
        "deploy",
        str(bad),
        *device_flags(deployed),
        "--service-user",
        "edgeyolo",
        "--runtime-python",
        sys.executable,
        "--run-args",
        deployed.run_args,
        "--min-free-mb",
        "1",
        "--health-timeout",
        "20",
    )

    assert done.returncode == 1
    assert "rolled back" in done.stdout
    assert "release no-video did not become healthy" in done.stderr
    assert "Expected a video file at /nonexistent/cam.mp4" in done.stderr
    assert "Rolled back to base, which is healthy again" in done.stderr
    root = root_of(deployed)
    assert os.readlink(root / "current") == "releases/base"
    assert (root / "releases" / "no-video" / "FAILED").is_file()
    assert get_health(deployed)[1]["healthy"] is True


def test_bundle_with_a_corrupt_model_is_rolled_back(deployed, bundles):
    bad = bundles("corrupt-model", broken_model=True)

    with pytest.raises(DeployError) as caught:
        deploy_device(LocalBundle.load(bad), deployed)

    assert caught.value.outcome == "rolled back"
    assert "could not load" in str(caught.value) and "no_such_weight" in str(caught.value)
    assert os.readlink(root_of(deployed) / "current") == "releases/base"
    assert get_health(deployed)[1]["healthy"] is True


# --- failures that must leave the device as it was -------------------------------------------


def assert_untouched(device: DeviceSettings, before: dict[str, str]) -> None:
    assert snapshot(root_of(device)) == before
    status, body = get_health(device)
    assert status == 200 and body["healthy"] is True


def test_unreachable_host_is_one_clear_message(deployed, bundles):
    before = snapshot(root_of(deployed))
    closed = deployed.model_copy(update={"port": sshd_server.free_port()})
    bundle = LocalBundle.load(bundles("gamma"))

    [result] = run_on_devices(lambda d: deploy_device(bundle, d), [closed], parallel=1)

    assert result.outcome == "unreachable"
    assert "connection refused, nothing listens for SSH on port" in result.message
    assert_untouched(deployed, before)


def test_refused_key_is_one_clear_message(deployed, tmp_path, bundles):
    before = snapshot(root_of(deployed))
    stranger = sshd_server.keygen(tmp_path / "stranger_ed25519")
    device = deployed.model_copy(update={"identity_file": stranger})

    with pytest.raises(RemoteError) as caught:
        deploy_device(LocalBundle.load(bundles("gamma")), device)

    assert caught.value.outcome == "ssh refused"
    assert "the device refused" in str(caught.value) and "ssh-copy-id" in str(caught.value)
    assert_untouched(deployed, before)


def test_changed_host_key_is_refused_with_what_to_do(deployed, tmp_path, bundles):
    before = snapshot(root_of(deployed))
    impostor = sshd_server.keygen(tmp_path / "impostor_host")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(
        sshd_server.known_hosts_line(deployed.port, impostor.with_suffix(".pub"))
    )
    device = deployed.model_copy(update={"known_hosts": known_hosts})

    with pytest.raises(RemoteError) as caught:
        deploy_device(LocalBundle.load(bundles("gamma")), device)

    message = str(caught.value)
    assert "host key changed" in message and "ssh-keygen -R" in message
    assert_untouched(deployed, before)


def tampered(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("loop: true", "loop: fals"))
    return copy


def test_checksum_mismatch_is_refused_on_the_host_before_any_connection(
    deployed, tmp_path, bundles
):
    before = snapshot(root_of(deployed))
    copy = tampered(bundles("gamma"), tmp_path)

    done = toolkit_cli("deploy", str(copy), *device_flags(deployed))

    assert done.returncode == 1
    assert "Refusing the bundle" in done.stderr and "config.yaml: sha256" in done.stderr
    assert_untouched(deployed, before)


def test_checksum_mismatch_is_refused_by_the_device(deployed, tmp_path, bundles):
    """A bundle damaged after the host's check (in transfer) is refused on the device."""
    before = snapshot(root_of(deployed))
    intact = LocalBundle.load(bundles("gamma"))
    damaged = LocalBundle(
        tampered(intact.path, tmp_path), intact.manifest, intact.manifest_sha256, intact.size_bytes
    )

    with pytest.raises(DeployError) as caught:
        deploy_device(damaged, deployed)

    message = str(caught.value)
    assert "the device refused the bundle, nothing was changed" in message
    assert "config.yaml: sha256" in message
    assert_untouched(deployed, before)


def test_full_disk_by_free_space_threshold(deployed, bundles):
    before = snapshot(root_of(deployed))
    greedy = deployed.model_copy(update={"min_free_mb": 10**9})

    with pytest.raises(DeployError) as caught:
        deploy_device(LocalBundle.load(bundles("gamma")), greedy)

    message = str(caught.value)
    assert "the device check failed, nothing was changed" in message
    assert "disk: " in message and "MB free on" in message and "Free space" in message
    assert_untouched(deployed, before)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); threshold test covers it")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_on_a_real_64k_tmpfs(devices, bundles, tiny_tmpfs):
    """The bundle (~90 kB with its wheel) does not fit: refused before anything is written."""
    device = devices.make("small-disk", root=str(tiny_tmpfs / "edge-yolo"), min_free_mb=0)

    with pytest.raises(DeployError) as caught:
        deploy_device(LocalBundle.load(bundles("gamma")), device)

    assert "disk: " in str(caught.value) and "MB free on " + str(tiny_tmpfs) in str(caught.value)
    assert list(tiny_tmpfs.iterdir()) == [], "nothing written to the small disk"


# --- many devices ---------------------------------------------------------------------------


def test_parallel_deploy_from_an_inventory_reports_each_device(devices, bundles, sshd, workdir):
    east, west = devices.make("east"), devices.make("west")
    common = {
        key: str(value)
        for key, value in east.model_dump().items()
        if key in ("user", "port", "identity_file", "known_hosts", "ssh_config", "service_user")
    }
    common.update(
        {
            "runtime_python": sys.executable,
            "device_python": SYSTEM_PYTHON,
            "min_free_mb": 1,
            "health_timeout": 20,
        }
    )
    entries = [
        {"name": d.name, "host": d.host, "root": d.root, "service_manager": d.service_manager,
         "run_args": d.run_args}
        for d in (east, west)
    ]  # fmt: skip
    entries.append({"name": "gone", "host": "127.0.0.1", "port": sshd_server.free_port()})
    inventory = workdir / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"defaults": common, "devices": entries}))

    archive = workdir / "alpha.tar.gz"  # the archive form of a bundle, as copied around
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(bundles("alpha").iterdir()):
            tar.add(path, arcname=path.name)

    done = toolkit_cli("deploy", str(archive), "--inventory", str(inventory), "--parallel", "3")

    assert done.returncode == 1
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"east", "west", "gone"}
    assert "deployed" in rows["east"] and "alpha" in rows["east"]
    assert "deployed" in rows["west"] and "alpha" in rows["west"]
    assert "unreachable" in rows["gone"] and "connection refused" in done.stderr
    for device in (east, west):
        assert os.readlink(root_of(device) / "current") == "releases/alpha"
        assert get_health(device)[1]["healthy"] is True

    shown = toolkit_cli(
        "status", "--inventory", str(inventory), "--limit", "east", "--limit", "west"
    )

    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.count("alpha") == 2 and shown.stdout.count("healthy") == 2


# --- the runtime installed for real ---------------------------------------------------------


def base_python_has_runtime_deps() -> str | None:
    """The device's python3 must already hold the dependencies: tests hit no registry."""
    python = getattr(sys, "_base_executable", sys.executable)
    modules = "numpy, onnxruntime, cv2, pydantic, yaml, typer, paho.mqtt, prometheus_client"
    done = subprocess.run(
        [python, "-c", f"import {modules}"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"{python} lacks the runtime dependencies ({done.stderr.strip()[-120:]})"
    return None


@pytest.mark.slow
def test_runtime_venv_is_built_from_the_uploaded_wheel_and_reused(devices, bundles):
    reason = base_python_has_runtime_deps()
    if reason:
        pytest.skip(reason)
    python = getattr(sys, "_base_executable", sys.executable)
    device = devices.make(
        "venv", runtime_python=None, device_python=python, pip_args="--no-index --no-deps"
    )
    root = root_of(device)

    deploy_device(LocalBundle.load(bundles("alpha")), device)

    [venv] = list((root / "venvs").iterdir())
    assert (venv / ".complete").is_file()
    assert (venv / "constraints.txt").read_text() == "onnxruntime>=1.12\n"  # no picamera2 here
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1
    installed = list(venv.glob("lib/python3*/site-packages/device/daemon.py"))
    assert installed, "the project's runtime files are in the venv"
    record = json.loads((root / "current" / "deploy.json").read_text())
    assert record["python"] == f"{venv}/bin/python"
    assert get_health(device)[1]["healthy"] is True

    deploy_device(LocalBundle.load(bundles("beta")), device)

    assert [path.name for path in (root / "venvs").iterdir()] == [venv.name]
    assert get_health(device)[1]["healthy"] is True


def test_root_ssh_user_without_a_service_user_is_refused(devices, bundles):
    if getpass.getuser() != "root":
        pytest.skip("the SSH user here is not root; sshd only lets its own user in")
    device = devices.make("as-root", service_user=None)

    with pytest.raises(ToolkitError, match="unprivileged service user"):
        deploy_device(LocalBundle.load(bundles("alpha")), device)

    assert list(root_of(device).iterdir()) == []


def test_check_only_reports_readiness_and_changes_nothing(deployed, bundles):
    before = snapshot(root_of(deployed))

    done = toolkit_cli(
        "deploy",
        str(bundles("gamma")),
        "--check-only",
        *device_flags(deployed),
        "--runtime-python",
        sys.executable,
        "--min-free-mb",
        "1",
    )

    assert done.returncode == 0, done.stderr
    assert "ready" in done.stdout and "use FP32" in done.stdout
    assert_untouched(deployed, before)


def test_a_second_deploy_while_one_runs_is_refused(deployed, bundles):
    lock = root_of(deployed) / ".deploy-lock"
    lock.mkdir()
    (lock / "owner").write_text("ci-runner pid 4242 since now\n")
    before = snapshot(root_of(deployed))
    try:
        [result] = run_on_devices(
            lambda d: deploy_device(LocalBundle.load(bundles("gamma")), d), [deployed], 1
        )
        assert_untouched(deployed, before)
    finally:
        (lock / "owner").unlink()
        lock.rmdir()

    assert result.outcome == "locked"
    assert "another deploy is running" in result.message and "ci-runner pid 4242" in result.message


def test_first_release_that_cannot_start_stops_the_service_and_says_so(devices, bundles):
    device = devices.make("first-fails")

    with pytest.raises(DeployError) as caught:
        deploy_device(LocalBundle.load(bundles("corrupt-model", broken_model=True)), device)

    assert caught.value.outcome == "failed, stopped"
    assert "no previous release to return to, so the service was stopped" in str(caught.value)
    root = root_of(device)
    assert not (root / "current").is_symlink()
    assert (root / "releases" / "corrupt-model" / "FAILED").is_file()
    assert device_status(device)["service"] in ("inactive", "failed")


def test_status_of_a_fresh_device_says_nothing_is_deployed(devices):
    device = devices.make("fresh")

    row = device_status(device)

    assert row["current"] is None and row["healthy"] is False
    assert row["health"] == f"nothing deployed under {device.root}"
