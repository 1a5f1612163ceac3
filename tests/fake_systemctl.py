"""A stand-in for ``systemctl`` on a machine without a running systemd (the test "device").

It does what deploy asks of systemd, faithfully to the documented behaviour of the parts used:
``enable PATH`` links a unit file, ``restart`` starts the unit's ExecStart in its
WorkingDirectory with its Environment and, as ``Type=notify`` does, returns only once the
process sent ``READY=1`` to ``$NOTIFY_SOCKET`` (exit 0) or died first (exit 1).  The process
runs under ``timeout`` so it ends by itself; its output goes to ``<state>/<unit>.log``, which
``status`` prints.

Usage: python fake_systemctl.py --state DIR COMMAND [UNIT|PATH] [ignored flags]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LIFETIME_S = 600
START_TIMEOUT_S = 60


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("command")
    parser.add_argument("unit", nargs="?")
    args, _ = parser.parse_known_args()
    args.state.mkdir(parents=True, exist_ok=True)
    name = Path(args.unit).name.removesuffix(".service") if args.unit else ""
    commands = {
        "daemon-reload": lambda: 0,
        "enable": lambda: enable(args.state, Path(args.unit)),
        "restart": lambda: restart(args.state, name),
        "start": lambda: restart(args.state, name),
        "stop": lambda: stop(args.state, name),
        "is-active": lambda: is_active(args.state, name),
        "status": lambda: status(args.state, name),
    }
    if args.command not in commands:
        print(f"Unknown command verb {args.command}.", file=sys.stderr)
        return 1
    return commands[args.command]()


def enable(state: Path, unit_path: Path) -> int:
    if not unit_path.is_absolute() or not unit_path.is_file():
        print(f"Failed to enable unit: {unit_path}: No such file", file=sys.stderr)
        return 1
    link = state / unit_path.name
    link.unlink(missing_ok=True)
    link.symlink_to(unit_path)
    print(f"Created symlink {link} -> {unit_path}.")
    return 0


def read_unit(state: Path, name: str) -> dict:
    unit = state / f"{name}.service"
    if not unit.exists():
        raise SystemExit(f"Unit {name}.service not found.")
    settings: dict = {"Environment": []}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "Environment":
            settings["Environment"].append(value)
        else:
            settings[key] = value
    return settings


def restart(state: Path, name: str) -> int:
    stop(state, name)
    unit = read_unit(state, name)
    env = dict(os.environ)
    assignments = list(unit["Environment"])
    environment_file = Path(unit.get("EnvironmentFile", "-").lstrip("-") or "/nonexistent")
    if environment_file.is_file():  # optional with '-', as systemd reads it
        assignments += [line for line in environment_file.read_text().splitlines() if "=" in line]
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        env[key.strip()] = value.strip()
    notify_path = state / f"{name}.notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env["NOTIFY_SOCKET"] = str(notify_path)

    with open(state / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            ["timeout", str(LIFETIME_S), *unit["ExecStart"].split()],
            cwd=unit.get("WorkingDirectory") or "/",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (state / f"{name}.pid").write_text(str(process.pid))
    ready = wait_ready(notify, process)
    notify.close()
    notify_path.unlink(missing_ok=True)
    if ready:
        (state / f"{name}.result").write_text("active")
        return 0
    (state / f"{name}.result").write_text("failed")
    print(
        f"Job for {name}.service failed because the control process exited with error code.\n"
        f'See "systemctl status {name}.service" for details.',
        file=sys.stderr,
    )
    return 1


def wait_ready(notify: socket.socket, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    notify.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            message = notify.recv(4096).decode(errors="replace")
        except TimeoutError:
            message = ""
        if "READY=1" in message.splitlines():
            return True
        if process.poll() is not None:
            return False
    kill_group(process.pid)
    return False


def stop(state: Path, name: str) -> int:
    pid_file = state / f"{name}.pid"
    if pid_file.exists():
        kill_group(int(pid_file.read_text()))
        pid_file.unlink()
        (state / f"{name}.result").write_text("inactive")
    return 0


def kill_group(pid: int) -> None:
    """SIGTERM to the main process (timeout passes it on); SIGKILL to the group if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie of another parent still answers kill(0): read its state.
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split(") ", 1)[1][:1] != "Z"
    return done == 0


def is_active(state: Path, name: str) -> int:
    pid_file = state / f"{name}.pid"
    if pid_file.exists() and alive(int(pid_file.read_text())):
        print("active")
        return 0
    result = state / f"{name}.result"
    text = result.read_text() if result.exists() else "inactive"
    print("failed" if text == "active" else text)
    return 3


def status(state: Path, name: str) -> int:
    code = is_active(state, name)
    log = state / f"{name}.log"
    lines = log.read_text(errors="replace").splitlines()[-10:] if log.exists() else []
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
