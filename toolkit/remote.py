"""SSH transport to a device, through the system's OpenSSH client.

Why OpenSSH and not paramiko: it reads the user's ``~/.ssh/config`` (ProxyJump, per-host users
and keys), the agent, certificates and hardware keys exactly as a shell ``ssh`` does, checks host
keys with the same known_hosts logic, and needs no extra package. ``BatchMode=yes`` makes it fail
instead of prompting, ``StrictHostKeyChecking=yes`` refuses unknown or changed host keys.

One master connection per device (``ControlMaster``) carries every command of a deploy, so the
handshake happens once. The master is a child process we own and stop, not a forked daemon.
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from device.errors import ToolkitError

log = logging.getLogger(__name__)

SSH_FAILURE = 255  # OpenSSH's own exit status; any other status is the remote command's
_UNSAFE_CHARS = re.compile(r"[\s'\"`$;|&<>\\\x00-\x1f\x7f]")


class RemoteError(ToolkitError):
    """The device could not be reached (``unreachable``) or refused us (``ssh refused``)."""

    exit_code = 3

    def __init__(self, message: str, *, outcome: str = "unreachable") -> None:
        super().__init__(message)
        self.outcome = outcome


class RemoteCommandError(ToolkitError):
    """A command on the device exited non-zero."""

    def __init__(self, message: str, *, returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


@dataclass(frozen=True)
class SshTarget:
    """How to reach one device."""

    host: str
    user: str | None = None
    port: int = 22
    identity_file: Path | None = None
    known_hosts: Path | None = None
    ssh_config: Path | None = None
    connect_timeout: float = 10.0
    extra_options: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


class Remote:
    """Commands and uploads on one device over a shared SSH connection."""

    def __init__(self, target: SshTarget, *, ssh_binary: str = "ssh") -> None:
        self.target = target
        self.ssh_binary = ssh_binary
        self._control_dir: tempfile.TemporaryDirectory | None = None
        self._master: subprocess.Popen | None = None

    def __enter__(self) -> Remote:
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def connect(self) -> None:
        """Open the master connection; every failure to reach the device is raised here."""
        validate_target(self.target)
        if shutil.which(self.ssh_binary) is None:
            raise RemoteError(
                f"The OpenSSH client '{self.ssh_binary}' is not installed on this host: "
                "sudo apt install openssh-client.",
                outcome="failed",
            )
        self._control_dir = tempfile.TemporaryDirectory(prefix="tk-ssh-")
        socket_path = Path(self._control_dir.name) / "master"
        stderr_path = Path(self._control_dir.name) / "master.err"
        command = [
            *self._base_command(control="yes"),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            self.target.destination,
        ]
        with open(stderr_path, "wb") as stderr:
            self._master = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + self.target.connect_timeout + 5
        while not socket_path.exists():
            if self._master.poll() is not None or time.monotonic() > deadline:
                self._stop_master()
                raise ssh_failure(self.target, stderr_path.read_text())
            time.sleep(0.02)
        log.info("connected to %s", self.target.label)

    def close(self) -> None:
        self._stop_master()
        if self._control_dir is not None:
            self._control_dir.cleanup()
            self._control_dir = None

    def run(
        self,
        command: str | list[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 120,
        check: bool = True,
        what: str = "",
    ) -> subprocess.CompletedProcess:
        """Run ``command`` through the device's shell; a list is quoted word by word."""
        remote_command = command if isinstance(command, str) else shlex.join(command)
        log.debug("%s$ %s", self.target.label, remote_command)
        argv = [*self._base_command(control="no"), self.target.destination, remote_command]
        try:
            done = subprocess.run(
                argv,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RemoteError(
                f"{self.target.label}: {what or 'a command'} gave no answer within {timeout:.0f} s "
                f"({remote_command[:120]})."
            ) from exc
        result = subprocess.CompletedProcess(
            argv, done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )  # fmt: skip
        if done.returncode == SSH_FAILURE and _looks_like_ssh_failure(result.stderr):
            raise ssh_failure(self.target, result.stderr)
        if check and done.returncode != 0:
            detail = (result.stderr.strip() or result.stdout.strip())[-1500:]
            raise RemoteCommandError(
                f"{self.target.label}: {what or remote_command[:120]} failed "
                f"(exit {done.returncode}): {detail or 'no output'}",
                returncode=done.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result

    def run_python_source(
        self,
        source: str,
        args: list[str],
        *,
        python: str = "python3",
        timeout: float = 120,
        check: bool = True,
        what: str = "",
    ) -> subprocess.CompletedProcess:
        """Run a Python file's source on the device without copying it there first."""
        return self.run(
            [python, "-", *args], stdin=source.encode(), timeout=timeout, check=check, what=what
        )

    def upload_directory(self, local_dir: Path, remote_dir: str, *, timeout: float = 600) -> None:
        """Stream ``local_dir``'s contents into ``remote_dir`` (created) as one tar stream."""
        folder = shlex.quote(remote_dir)
        script = f"mkdir -p {folder} && tar --no-same-owner -x -C {folder} -f -"
        archive = io.BytesIO()  # bundles are tens of MB: one buffer keeps one error path
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for path in sorted(Path(local_dir).iterdir()):
                tar.add(path, arcname=path.name, filter=_anonymous)
        self.run(script, stdin=archive.getvalue(), timeout=timeout, what=f"upload to {remote_dir}")

    def _base_command(self, *, control: str) -> list[str]:
        target = self.target
        options = {
            "BatchMode": "yes",
            "StrictHostKeyChecking": "yes",
            "ConnectTimeout": str(int(max(1, target.connect_timeout))),
            "ServerAliveInterval": "15",
            "ServerAliveCountMax": "3",
            "ControlMaster": control,
        }
        if self._control_dir is not None:
            options["ControlPath"] = str(Path(self._control_dir.name) / "master")
        if target.identity_file is not None:
            options["IdentityFile"] = str(Path(target.identity_file).expanduser())
            options["IdentitiesOnly"] = "yes"
        if target.known_hosts is not None:
            options["UserKnownHostsFile"] = str(Path(target.known_hosts).expanduser())
            options["GlobalKnownHostsFile"] = "/dev/null"
        command = [self.ssh_binary, "-p", str(target.port)]
        if target.ssh_config is not None:
            command += ["-F", str(target.ssh_config)]
        for key, value in options.items():
            command += ["-o", f"{key}={value}"]
        for option in target.extra_options:
            command += ["-o", option]
        return command

    def _stop_master(self) -> None:
        if self._master is None:
            return
        if self._master.poll() is None:
            self._master.terminate()
            try:
                self._master.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._master.kill()
                self._master.wait()
        self._master = None


def validate_target(target: SshTarget) -> None:
    """Local mistakes, caught before any connection attempt."""
    if not target.host:
        raise RemoteError("Expected a host name or address for the device, got an empty one.")
    # ssh would read a leading '-' as one of its own options (-oProxyCommand=... runs a
    # command here), so a host or user from an inventory file must look like a name.
    for what, value in (("host", target.host), ("user", target.user)):
        if value is not None and (value.startswith("-") or _UNSAFE_CHARS.search(value)):
            raise RemoteError(
                f"Expected an SSH {what} name or address, got {value!r}: it starts with '-' or "
                "holds spaces, quotes or control characters. Check the --host/--inventory entry.",
                outcome="failed",
            )
    if not 0 < target.port < 65536:
        raise RemoteError(f"Expected an SSH port between 1 and 65535, got {target.port}.")
    if target.identity_file is not None and not Path(target.identity_file).expanduser().is_file():
        raise RemoteError(
            f"The identity file {target.identity_file} does not exist: check the path (it is "
            "the private key whose .pub is in the device's ~/.ssh/authorized_keys)."
        )
    if target.known_hosts is not None and not Path(target.known_hosts).expanduser().is_file():
        raise RemoteError(
            f"The known_hosts {target.known_hosts} does not exist: check the path (known_hosts "
            f"must list the device's host key; ssh-keyscan -p {target.port} {target.host} "
            "shows it)."
        )


def ssh_failure(target: SshTarget, stderr: str) -> RemoteError:
    """The error for an OpenSSH failure, classed as refused (keys) or unreachable (network)."""
    refused = any(
        marker in stderr
        for marker in ("HOST IDENTIFICATION", "Host key verification", "Permission denied")
    )
    return RemoteError(
        explain_ssh_failure(target, stderr), outcome="ssh refused" if refused else "unreachable"
    )


def explain_ssh_failure(target: SshTarget, stderr: str) -> str:
    """One clear sentence for each way OpenSSH fails to reach a device."""
    text = stderr.strip()
    known_hosts = target.known_hosts or "~/.ssh/known_hosts"
    host_key_name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return (
            f"{target.label}: the device's host key changed since it was recorded in "
            f"{known_hosts}; refusing to connect (this is what an impostor would look like). If "
            f"the device was reinstalled, check its new key on the console, then remove the old "
            f"one: ssh-keygen -R '{host_key_name}' -f {known_hosts}"
        )
    if "Host key verification failed" in text or "No host key is known" in text:
        return (
            f"{target.label}: the device's host key is not in {known_hosts}. Compare "
            f"'ssh-keyscan -p {target.port} {target.host}' with the key shown on the device "
            f"(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) and append it to {known_hosts}."
        )
    if "Permission denied" in text:
        key = target.identity_file or "your SSH key"
        return (
            f"{target.label}: the device refused {key} (key authentication only). Install the "
            f"public key on the device: ssh-copy-id -i {key}.pub {target.destination}"
        )
    if "Connection refused" in text:
        return (
            f"{target.label}: connection refused, nothing listens for SSH on port {target.port}. "
            "Check the address and port, and that the device runs sshd."
        )
    if "timed out" in text:
        return (
            f"{target.label}: no answer within {target.connect_timeout:.0f} s. Check that the "
            "device is powered and on the network."
        )
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        return f"{target.label}: the host name does not resolve. Check the spelling or use an IP."
    if "No route to host" in text or "Network is unreachable" in text:
        return f"{target.label}: no route to the device. Check the network it is on."
    last = text.splitlines()[-1] if text else "ssh exited without a message"
    return f"{target.label}: SSH failed: {last}"


def _looks_like_ssh_failure(stderr: str) -> bool:
    markers = (
        "ssh:", "Permission denied", "Host key verification failed", "Connection ",
        "REMOTE HOST IDENTIFICATION", "kex_exchange", "Could not resolve",
    )  # fmt: skip
    return any(marker in stderr for marker in markers)


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
