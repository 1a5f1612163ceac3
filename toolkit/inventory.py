"""Devices to deploy to: one from command-line flags, or many from an inventory YAML file.

::

    defaults:                       # any device key, applied to every device
      user: pi
      identity_file: ~/.ssh/edge_ed25519
      known_hosts: ~/.ssh/known_hosts
      root: /opt/edge-yolo
    devices:
      - name: gate
        host: 192.168.1.20
      - name: yard
        host: yard.local
        port: 2222
        precision: fp32
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from device.errors import ConfigError
from toolkit.remote import SshTarget

_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.-]+")
_SHELL_WORD = re.compile(r"[A-Za-z0-9/._+@:-]+")


class DeviceSettings(BaseModel):
    """Everything deploy needs to know about one device."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="Label in logs and the summary (default: the host)")
    host: str = Field(min_length=1, description="Host name or address of the device")
    user: str | None = Field(None, description="SSH user (default: from ~/.ssh/config)")
    port: int = Field(22, ge=1, le=65535, description="SSH port")
    identity_file: Path | None = Field(None, description="Private key to log in with")
    known_hosts: Path | None = Field(None, description="known_hosts file holding the host key")
    ssh_config: Path | None = Field(None, description="ssh_config file (default: ~/.ssh/config)")
    connect_timeout: float = Field(10.0, gt=0, le=300, description="Seconds to connect")
    root: str = Field("/opt/edge-yolo", description="Absolute deploy directory on the device")
    service_manager: str = Field(
        "sudo systemctl", min_length=1, description="Command that manages the service"
    )
    unit_name: str = Field("edge-yolo", description="systemd unit name, without .service")
    service_user: str | None = Field(
        None, description="Unprivileged user the service runs as (default: the SSH user)"
    )
    device_python: str = Field(
        "python3", description="Device interpreter for the checks and the runtime venv"
    )
    runtime_python: str | None = Field(
        None, description="Run the daemon with this interpreter; skip the venv and pip install"
    )
    pip_args: str = Field("", description="Extra pip install arguments (e.g. --no-index ...)")
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="Model to run; auto picks INT8 only where the CPU favours it"
    )
    run_args: str = Field(
        "", description="Extra 'toolkit-device run' flags for this device (e.g. --source usb)"
    )
    health_url: str | None = Field(
        None, description="Daemon health URL (default: the bundle's, or --http-port in run_args)"
    )
    health_timeout: float = Field(60.0, gt=0, le=3600, description="Seconds to become healthy")
    min_free_mb: float = Field(
        250.0, ge=0, description="Free disk space to keep beyond the bundle (runtime venv, logs)"
    )
    keep_releases: int = Field(3, ge=1, le=100, description="Healthy releases kept on the device")
    watchdog_sec: int = Field(30, ge=5, le=3600, description="systemd WatchdogSec of the unit")
    writable_paths: list[str] = Field(
        default_factory=list,
        description="Directories the sandboxed service may write besides <root>/state",
    )

    @model_validator(mode="after")
    def _defaults(self) -> DeviceSettings:
        if not self.name:
            self.name = self.host
        if not self.root.startswith("/"):
            raise ValueError(f"root must be an absolute path on the device, got {self.root!r}")
        return self

    # These go into commands run by the device's shell and into the unit file: checked here,
    # before any connection, so a typo or a hostile inventory cannot run anything.
    @field_validator("unit_name")
    @classmethod
    def _unit_name(cls, value: str) -> str:
        if not _UNIT_NAME.fullmatch(value):
            raise ValueError(
                f"expected a systemd unit name of letters, digits and ':_.-', got {value!r}"
            )
        return value

    @field_validator("root", "device_python", "runtime_python", "service_user")
    @classmethod
    def _shell_word(cls, value: str | None) -> str | None:
        if value is not None and not _SHELL_WORD.fullmatch(value):
            raise ValueError(
                f"expected a plain name or path (letters, digits and /._+@:-), got {value!r}"
            )
        return value

    @field_validator("writable_paths")
    @classmethod
    def _writable_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or not _SHELL_WORD.fullmatch(path):
                raise ValueError(f"expected absolute paths without spaces or quotes, got {path!r}")
        return value

    @property
    def ssh(self) -> SshTarget:
        return SshTarget(
            host=self.host,
            user=self.user,
            port=self.port,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            ssh_config=self.ssh_config,
            connect_timeout=self.connect_timeout,
        )


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: dict = Field(default_factory=dict, description="Keys applied to every device")
    devices: list[dict] = Field(min_length=1, description="One mapping per device")


def load_inventory(path: Path, *, limit: list[str] | None = None) -> list[DeviceSettings]:
    """The devices of an inventory file, defaults applied; ``limit`` keeps only those names."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"Cannot read the inventory {path}: {exc.strerror}.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"The inventory {path} is not valid YAML: {exc}") from exc
    try:
        inventory = Inventory.model_validate(document or {})
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc)) from exc
    devices = []
    for index, entry in enumerate(inventory.devices):
        try:
            devices.append(DeviceSettings.model_validate({**inventory.defaults, **entry}))
        except ValidationError as exc:
            raise ConfigError(_describe(path, exc, f"devices.{index}")) from exc
    names = [device.name for device in devices]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: device names must be unique, repeated: {duplicates}.")
    if limit:
        unknown = sorted(set(limit) - set(names))
        if unknown:
            raise ConfigError(f"{path}: no device named {unknown} (devices: {names}).")
        devices = [device for device in devices if device.name in limit]
    return devices


def _describe(path: Path, exc: ValidationError, prefix: str = "") -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        where = where or "(top level)"
        problems.append(f"{where}: {error['msg']} (found {error.get('input')!r})")
    return f"{path}: the inventory does not fit the schema: " + "; ".join(problems)
