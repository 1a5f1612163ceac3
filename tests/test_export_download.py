"""Official-name downloads against a local HTTP server this test starts on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

import toolkit.download as download
from device.errors import ToolkitError
from tests.cli_helpers import run_toolkit


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Default outputs go to the current folder: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


class _Files(BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []
    claim_extra_bytes: ClassVar[int] = 0  # advertise more than is sent, then hang up

    def do_GET(self) -> None:
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + self.claim_extra_bytes))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _server(files: dict[str, bytes], claim_extra_bytes: int = 0) -> Iterator[tuple[str, list]]:
    handler = type(
        "Handler",
        (_Files,),
        {"files": files, "requests": [], "claim_extra_bytes": claim_extra_bytes},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v7.0", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def pinned_tiny(tiny_pt, monkeypatch) -> bytes:
    """Serve the tiny checkpoint as 'yolov5n.pt', with its checksum pinned in place of the
    official one (so these tests need no real data)."""
    data = tiny_pt.read_bytes()
    monkeypatch.setitem(download.OFFICIAL_SHA256, "yolov5n.pt", hashlib.sha256(data).hexdigest())
    return data


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_download_lands_in_the_cache_once(pinned_tiny, tmp_path):
    cache = tmp_path / "cache"
    with _server({"/v7.0/yolov5n.pt": pinned_tiny}) as (url, requests):
        first = download.resolve_weights("yolov5n.pt", url=url, cache=cache)
        second = download.resolve_weights("yolov5n.pt", url=url, cache=cache)

    assert first == second == cache / "yolov5n.pt"
    assert first.read_bytes() == pinned_tiny
    assert requests == ["/v7.0/yolov5n.pt"]  # the second call used the cache
    assert _leftovers(cache) == ["yolov5n.pt"]


@pytest.mark.realdata
def test_real_yolov5n_matches_the_pinned_checksum(yolov5n_pt, tmp_path):
    with _server({"/v7.0/yolov5n.pt": yolov5n_pt.read_bytes()}) as (url, _):
        path = download.resolve_weights("yolov5n.pt", url=url, cache=tmp_path)
    assert path.stat().st_size == 4_062_133


def test_wrong_checksum_is_discarded(pinned_tiny, tmp_path):
    cache = tmp_path / "cache"
    served = {"/v7.0/yolov5n.pt": pinned_tiny + b"tampered"}
    with _server(served) as (url, _), pytest.raises(ToolkitError) as error:
        download.resolve_weights("yolov5n.pt", url=url, cache=cache)
    assert "has sha256" in str(error.value) and "it was discarded" in str(error.value)
    assert _leftovers(cache) == []


def test_damaged_cache_entry_is_downloaded_again(pinned_tiny, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "yolov5n.pt").write_bytes(b"half a file")
    with _server({"/v7.0/yolov5n.pt": pinned_tiny}) as (url, requests):
        path = download.resolve_weights("yolov5n.pt", url=url, cache=cache)
    assert path.read_bytes() == pinned_tiny and len(requests) == 1


def test_server_down_says_where_to_put_the_file(pinned_tiny, tmp_path):
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{_closed_port()}/v7.0"
    with pytest.raises(ToolkitError) as error:
        download.resolve_weights("yolov5n.pt", url=url, cache=cache)
    assert "Could not download" in str(error.value)
    assert f"put the file at {cache / 'yolov5n.pt'}" in str(error.value)
    assert _leftovers(cache) == []


def test_missing_on_server(pinned_tiny, tmp_path):
    with _server({}) as (url, _), pytest.raises(ToolkitError, match="HTTP 404"):
        download.resolve_weights("yolov5n.pt", url=url, cache=tmp_path / "cache")


def test_connection_dropped_mid_file(pinned_tiny, tmp_path):
    cache = tmp_path / "cache"
    served = {"/v7.0/yolov5n.pt": pinned_tiny}
    with _server(served, claim_extra_bytes=1000) as (url, _), pytest.raises(ToolkitError) as error:
        download.resolve_weights("yolov5n.pt", url=url, cache=cache)
    assert "stopped at" in str(error.value) and "connection closed" in str(error.value)
    assert _leftovers(cache) == []


def test_local_file_wins_over_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("yolov5n.pt").write_bytes(b"local")
    assert download.resolve_weights("yolov5n.pt", url="http://127.0.0.1:1/") == Path("yolov5n.pt")


def test_only_bare_official_names_download(tmp_path):
    assert not download.is_official_name("weights/yolov5n.pt")
    assert not download.is_official_name("yolov5n6.pt")
    assert download.is_official_name("yolov5x.pt")


def test_cli_exports_an_official_name_via_env_settings(pinned_tiny, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv(download.CACHE_ENV, str(cache))
    with _server({"/v7.0/yolov5n.pt": pinned_tiny}) as (url, requests):
        monkeypatch.setenv(download.BASE_URL_ENV, url)
        output = tmp_path / "n.onnx"
        result = run_toolkit(
            ["export", "-w", "yolov5n.pt", "-o", output, "--imgsz", "320"], monkeypatch, capsys
        )

    assert result.code == 0, result.err
    assert requests == ["/v7.0/yolov5n.pt"]
    assert output.is_file() and (cache / "yolov5n.pt").is_file()


class _Trickle(BaseHTTPRequestHandler):
    """Announces a file, then sends a byte every 20 ms (bounded: 3 s at most)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(150):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.02)
        except OSError:
            pass  # the client gave up, as it should

    def log_message(self, *args) -> None:
        pass


def test_trickling_server_is_given_up_not_waited_for(pinned_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_SECONDS", 0.5)
    cache = tmp_path / "cache"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v7.0"
        with pytest.raises(ToolkitError, match=r"is too slow \(\d+ bytes/s") as error:
            download.resolve_weights("yolov5n.pt", url=url, cache=cache)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert f"put the file at {cache / 'yolov5n.pt'}" in str(error.value)
    assert _leftovers(cache) == []


def test_redirect_loop_is_one_line(pinned_tiny, tmp_path):
    class Loop(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", self.path)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v7.0"
        with pytest.raises(ToolkitError, match="HTTP 302") as error:
            download.resolve_weights("yolov5n.pt", url=url, cache=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert "\n" not in str(error.value) and "infinite loop" in str(error.value)
