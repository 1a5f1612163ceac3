"""The systemd unit that runs the detector daemon on a device.

The unit never changes between releases: it starts ``<root>/current/start``, and a deploy
switches the ``current`` link.  The daemon tells systemd when it is ready and keeps petting
the watchdog (``Type=notify``, ``WatchdogSec=``); a hung or crashed daemon is restarted.

Sandboxing fits a camera daemon: an unprivileged user in the ``video`` group, only the video
devices allowed, the whole file system read-only except the release state directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from device.errors import ToolkitError

DEFAULT_UNIT_NAME = "edge-yolo"
# Character-device groups from /proc/devices that a camera pipeline opens: V4L2 nodes (USB
# cameras, the Pi's ISP), media controllers (libcamera), DMA heaps (libcamera's buffers).
CAMERA_DEVICES = (
    "char-video4linux",
    "char-media",
    "/dev/dma_heap/linux,cma",
    "/dev/dma_heap/system",
)
_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+$")


@dataclass(frozen=True)
class UnitSettings:
    """What varies between installations."""

    root: str
    user: str
    name: str = DEFAULT_UNIT_NAME
    group: str | None = None
    watchdog_sec: int = 30
    restart_sec: int = 5
    start_timeout_sec: int = 120
    stop_timeout_sec: int = 20
    writable_paths: tuple[str, ...] = field(default_factory=tuple)
    description: str = "Edge YOLO detector (edge-yolo-toolkit)"

    @property
    def unit_file_name(self) -> str:
        return f"{self.name}.service"

    @property
    def state_dir(self) -> str:
        return str(PurePosixPath(self.root) / "state")


def validate_settings(settings: UnitSettings) -> None:
    for path in (settings.root, *settings.writable_paths):
        if not PurePosixPath(path).is_absolute() or any(char.isspace() for char in path):
            raise ToolkitError(
                f"Expected an absolute path without spaces (it goes into the unit), got {path!r}."
            )
    if not _NAME.match(settings.name):
        raise ToolkitError(
            f"Expected a unit name of letters, digits and ':_.-', got {settings.name!r}."
        )
    if not settings.user or settings.user == "root" or not _NAME.match(settings.user):
        raise ToolkitError(
            f"Expected an unprivileged service user (e.g. pi), got {settings.user!r}: the "
            "detector needs no root rights; pass --service-user."
        )
    if settings.watchdog_sec < 5:
        raise ToolkitError(
            f"Expected WatchdogSec of at least 5 s, got {settings.watchdog_sec}: a model load "
            "or a camera reconnect can stall the loop for seconds."
        )


def render_unit(settings: UnitSettings) -> str:
    """The unit file text."""
    validate_settings(settings)
    root = PurePosixPath(settings.root)
    # "-": a missing extra directory must not stop the service from starting (status 226).
    writable = [settings.state_dir, *(f"-{path}" for path in settings.writable_paths)]
    protect_home = "read-only" if _under_home(root) else "yes"
    lines = [
        "[Unit]",
        f"Description={settings.description}",
        "Documentation=man:systemd.exec(5)",
        "After=network-online.target",
        "Wants=network-online.target",
        # Give up after 10 failed starts in 10 minutes rather than loop forever.
        "StartLimitIntervalSec=600",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={root / 'current' / 'start'}",
        f"WorkingDirectory={root / 'current'}",
        f"User={settings.user}",
        f"Group={settings.group or settings.user}",
        "SupplementaryGroups=video",
        "Restart=on-failure",
        f"RestartSec={settings.restart_sec}",
        f"WatchdogSec={settings.watchdog_sec}",
        f"TimeoutStartSec={settings.start_timeout_sec}",
        f"TimeoutStopSec={settings.stop_timeout_sec}",
        "Environment=PYTHONUNBUFFERED=1",
        f"Environment=EDGE_YOLO_STATE_DIR={settings.state_dir}",
        # Secrets the config names by *_env (MQTT password, HTTP token), kept off the bundle.
        f"EnvironmentFile=-{root / 'environment'}",
        "",
        "# Sandbox: read-only system, one writable state directory, camera devices only.",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={protect_home}",
        *[f"ReadWritePaths={path}" for path in writable],
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        *[f"DeviceAllow={device} rw" for device in CAMERA_DEVICES],
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        # AF_NETLINK: libcamera watches udev for hot-plugged cameras.
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        # No MemoryDenyWriteExecute: libffi (ctypes, cffi) may need writable+executable pages.
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def _under_home(path: PurePosixPath) -> bool:
    return path.parts[:2] in (("/", "home"), ("/", "root"))
