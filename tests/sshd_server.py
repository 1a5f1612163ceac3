"""A real OpenSSH server on 127.0.0.1 for deploy tests: own host key, key auth only.

It runs as the current user with ``-D -e -f`` and its own sshd_config, under ``timeout`` so it
stops by itself even if the test run dies.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
LIFETIME_S = 900
PRIVSEP_DIR = Path("/run/sshd")


@dataclass
class SshServer:
    port: int
    client_key: Path
    known_hosts: Path
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def unavailable_reason() -> str | None:
    """Why the server cannot run here, or None."""
    for tool in (str(SSHD), "ssh", "ssh-keygen", "timeout"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-server openssh-client)"
    if not PRIVSEP_DIR.is_dir() and os.geteuid() != 0:
        return f"sshd needs {PRIVSEP_DIR}, which only root can create here"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


def known_hosts_line(port: int, host_key_pub: Path) -> str:
    key_type, key = host_key_pub.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {key_type} {key}\n"


def start_sshd(workdir: Path) -> SshServer:
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_ed25519")
    client_key = keygen(workdir / "client_ed25519")
    authorized = workdir / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)

    port = free_port()
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(known_hosts_line(port, host_key.with_suffix(".pub")))
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "MaxSessions 50\n"
        "MaxStartups 50\n"
        "LogLevel VERBOSE\n"
    )

    # sshd refuses to start without its privilege-separation directory.
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log_path = workdir / "sshd.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["timeout", str(LIFETIME_S), str(SSHD), "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    _wait_listening(port, process, log_path)
    return SshServer(port, client_key, known_hosts, process, log_path)


def _wait_listening(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"sshd did not listen on {port} within 10 s: {log_path.read_text()}")
