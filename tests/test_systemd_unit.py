"""The generated unit: systemd-analyze accepts it, and it holds what a camera daemon needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from device.errors import ToolkitError
from toolkit.systemd_unit import UnitSettings, render_unit

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)",
)


def deploy_root(tmp_path: Path) -> Path:
    """A root whose current/start exists and is executable, as verify requires of ExecStart."""
    root = tmp_path / "opt" / "edge-yolo"
    release = root / "releases" / "r1"
    release.mkdir(parents=True)
    (root / "state").mkdir()
    start = release / "start"
    start.write_text("#!/bin/sh\nexec true\n")
    start.chmod(0o755)
    (root / "current").symlink_to("releases/r1")
    return root


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    unit = tmp_path / "edge-yolo.service"
    unit.write_text(unit_text)
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path):
    root = deploy_root(tmp_path)

    done = verify(render_unit(UnitSettings(root=str(root), user="edgeyolo")), tmp_path)

    assert done.returncode == 0, done.stderr
    assert "edge-yolo.service" not in done.stderr, done.stderr


@needs_systemd_analyze
def test_verify_would_catch_a_missing_exec_start(tmp_path):
    """Proves the check above can fail: the same unit with no start script is rejected."""
    root = tmp_path / "nowhere"

    done = verify(render_unit(UnitSettings(root=str(root), user="edgeyolo")), tmp_path)

    assert done.returncode != 0
    assert "not executable" in done.stderr


def test_unit_runs_a_watched_sandboxed_camera_daemon(tmp_path):
    root = "/opt/edge-yolo"

    lines = render_unit(UnitSettings(root=root, user="pi", watchdog_sec=20)).splitlines()

    for expected in [
        "Type=notify",
        "ExecStart=/opt/edge-yolo/current/start",
        "WorkingDirectory=/opt/edge-yolo/current",
        "Restart=on-failure",
        "WatchdogSec=20",
        "User=pi",
        "Group=pi",
        "SupplementaryGroups=video",
        "DevicePolicy=closed",
        "DeviceAllow=char-video4linux rw",
        "DeviceAllow=char-media rw",
        "ProtectSystem=strict",
        "ReadWritePaths=/opt/edge-yolo/state",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "EnvironmentFile=-/opt/edge-yolo/environment",
        "WantedBy=multi-user.target",
    ]:
        assert expected in lines
    assert not any(line.startswith("PrivateDevices=yes") for line in lines)


def test_extra_writable_paths_are_opened_in_the_sandbox():
    unit = render_unit(UnitSettings(root="/opt/e", user="pi", writable_paths=("/var/lib/snaps",)))

    assert "ReadWritePaths=-/var/lib/snaps" in unit.splitlines()
    assert "ReadWritePaths=/opt/e/state" in unit.splitlines()


def test_root_under_home_keeps_home_readable():
    unit = render_unit(UnitSettings(root="/home/pi/edge-yolo", user="pi"))

    assert "ProtectHome=read-only" in unit.splitlines()
    assert "ReadWritePaths=/home/pi/edge-yolo/state" in unit.splitlines()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (UnitSettings(root="/opt/edge-yolo", user="root"), "unprivileged service user"),
        (UnitSettings(root="opt/edge-yolo", user="pi"), "absolute path without spaces"),
        (UnitSettings(root="/opt/my edge", user="pi"), "absolute path without spaces"),
        (UnitSettings(root="/opt/x", user="pi", name="a b"), "unit name"),
        (UnitSettings(root="/opt/x", user="pi", watchdog_sec=1), "WatchdogSec of at least 5"),
    ],
    ids=["root-user", "relative-root", "root-with-space", "bad-name", "short-watchdog"],
)
def test_unsafe_settings_are_refused(settings, message):
    with pytest.raises(ToolkitError, match=message):
        render_unit(settings)
