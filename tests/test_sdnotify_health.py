"""sd_notify against a real unix datagram socket, and the health rules."""

from __future__ import annotations

import os
import socket

import pytest

from device.health import Health
from device.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield path, server
    server.close()


def receive(server: socket.socket) -> list[str]:
    return server.recv(4096).decode().split("\n")


def test_ready_status_watchdog_and_stopping_arrive_as_datagrams(notify_socket):
    path, server = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})

    assert notifier.ready(status="detecting on cam")
    assert receive(server) == ["READY=1", "STATUS=detecting on cam"]
    assert notifier.watchdog()
    assert receive(server) == ["WATCHDOG=1"]
    assert notifier.status("12 frames,\n 3.0 fps")
    assert receive(server) == ["STATUS=12 frames, 3.0 fps"]
    assert notifier.stopping()
    assert receive(server) == ["STOPPING=1"]
    notifier.close()


def test_abstract_socket_names_are_supported():
    name = f"edge-yolo-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert receive(server) == ["READY=1"]
    finally:
        server.close()


def test_without_systemd_every_call_is_a_quiet_no_op():
    notifier = Notifier({})

    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.watchdog_interval is None


def test_a_vanished_socket_does_not_raise(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    pid = str(os.getpid())

    assert Notifier({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": pid}).watchdog_interval == 5.0
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_health_is_ok_only_while_running_with_recent_frames():
    clock = FakeClock()
    health = Health(max_frame_age=10, clock=clock)
    assert health.status()["healthy"] is False  # starting

    health.set_state("running")
    assert health.ok  # just started: the first frame has 10 s to arrive
    clock.now += 11
    status = health.status()
    assert status["healthy"] is False
    assert status["reason"] == "no frame for 11.0 s (limit 10 s)"

    health.frame_done()
    clock.now += 4
    assert health.status() == {
        "healthy": True,
        "state": "running",
        "reason": "",
        "frames": 1,
        "last_frame_age": 4.0,
    }

    health.set_problem("stuck: inference for 31 s")
    assert health.status()["healthy"] is False
    assert health.status()["reason"] == "stuck: inference for 31 s"
    health.set_problem("")
    assert health.ok

    health.set_state("stopping", "received SIGTERM")
    assert health.status()["healthy"] is False
    assert health.status()["reason"] == "received SIGTERM"
