"""A real Mosquitto broker on 127.0.0.1 for tests, and a subscriber that records what it hears.

``MosquittoBroker`` writes a minimal config into a temporary folder and starts the system's
``mosquitto`` on a free port; it can be stopped and started again on the same port to test
reconnects. The fixtures in tests/conftest.py wrap it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), None
    )


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path


def make_tls_files(workdir: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl is not installed (apt-get install openssl)")
    ca, ca_key = workdir / "ca.crt", workdir / "ca.key"
    cert, key, request = workdir / "server.crt", workdir / "server.key", workdir / "server.csr"
    extensions = workdir / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=edge-yolo-test-ca"],
        ["openssl", "req", *new_key, "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1"],
        ["openssl", "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extensions],
    ]  # fmt: skip
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return TlsFiles(ca, cert, key)


class MosquittoBroker:
    """One mosquitto process; ``start``/``stop`` may be repeated, the port stays the same."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        tls: TlsFiles | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.host = HOST
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.process: subprocess.Popen | None = None

        lines = [f"listener {self.port} {HOST}"]
        if tls is not None:
            lines += [
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
            ]
        if users:
            password_file = workdir / "passwords"
            password_file.write_text("")
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password], check=True
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if os.geteuid() == 0:
            # As root, mosquitto switches to its own user, which cannot read a pytest tmp dir.
            lines += ["user root"]
        lines += ["persistence false", "log_dest stderr"]
        lines += [f"log_type {kind}" for kind in ("error", "warning", "notice", "information")]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass(frozen=True)
class Received:
    topic: str
    payload: str  # decoded as UTF-8, undecodable bytes replaced
    retain: bool
    data: bytes  # the payload as sent


class MqttRecorder:
    """A subscriber that keeps every message and can wait for one that matches."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.topic = topic
        self.messages: list[Received] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"the recorder could not subscribe to {topic}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._changed:
            self.messages.append(
                Received(
                    message.topic,
                    message.payload.decode(errors="replace"),
                    bool(message.retain),
                    bytes(message.payload),
                )
            )
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0, count: int = 1) -> list[Received]:
        """The first ``count`` messages matching ``predicate``; AssertionError after timeout."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: len([m for m in self.messages if predicate(m)]) >= count, timeout=timeout
            )
            matching = [m for m in self.messages if predicate(m)]
        assert found, (
            f"expected {count} matching message(s) on {self.topic} within {timeout} s, got "
            f"{len(matching)}; all received: {[(m.topic, m.payload[:80]) for m in self.messages]}"
        )
        return matching[:count]

    def on(self, topic: str) -> list[Received]:
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
