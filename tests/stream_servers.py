"""Stream servers the source tests start on 127.0.0.1 and cut on purpose: ffmpeg serving raw
H.264 over TCP (what 'rpicam-vid --listen' serves), an HTTP MJPEG server, and a minimal RTSP
server relaying ffmpeg's RTP packets over the RTSP connection.  Every server stops by itself
after ``MAX_SECONDS`` even if a test forgets it."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

MAX_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LISTEN, _ESTABLISHED = "0A", "01"


def is_listening(port: int) -> bool:
    """Whether a server on ``port`` listens, or has already accepted its client (an ffmpeg
    'listen=1' server stops listening once a reconnecting source is in).  Read from the kernel's
    table, without connecting: a connection would use up that one client."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] in (_LISTEN, _ESTABLISHED):
                    return True
    return False


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port} after {timeout} s")
        time.sleep(0.02)


def make_h264_clip(path: Path, seconds: int = 6, size: str = "320x240", rate: int = 15) -> Path:
    """A short H.264 mp4 of ffmpeg's moving test pattern, keyframe every second."""
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc=size={size}:rate={rate}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-g", str(rate), "-pix_fmt", "yuv420p", str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


class _Process:
    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def _spawn(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


class H264TcpServer(_Process):
    """ffmpeg sending a video's H.264 as a raw Annex B stream to one TCP client, in real time,
    like 'rpicam-vid -t 0 --inline --listen -o tcp://0.0.0.0:PORT'."""

    def __init__(self, video: Path, port: int) -> None:
        super().__init__()
        self.video = video
        self.port = port
        self.url = f"tcp://127.0.0.1:{port}"

    def start(self) -> None:
        self._spawn(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
             "-i", str(self.video), "-t", str(MAX_SECONDS), "-an", "-c:v", "copy",
             "-bsf:v", "h264_mp4toannexb", "-f", "h264", f"{self.url}?listen=1"]
        )  # fmt: skip
        wait_listening(self.port)


class MjpegServer:
    """An HTTP server sending numbered frames as multipart/x-mixed-replace JPEGs, the way IP
    cameras and Frigate's debug stream do.  Frame n is a flat grey of level n % 256.

    ``mode`` steers it while running: "live" sends new frames, "frozen" repeats the last one,
    "stalled" keeps the connection open and sends nothing.  ``cut`` closes the server and every
    connection; ``restore`` listens again on the same port."""

    def __init__(self, fps: float = 25.0, size: tuple[int, int] = (96, 64)) -> None:
        self.fps = fps
        self.size = size
        self.mode = "live"
        self.sent = 0  # number of the last frame sent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._server: ThreadingHTTPServer | None = None
        self._connections: list[socket.socket] = []
        self._deadline = time.monotonic() + MAX_SECONDS

    def jpeg(self, number: int) -> bytes:
        width, height = self.size
        image = np.full((height, width, 3), number % 256, np.uint8)
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner._connections.append(self.connection)
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                owner._stream_to(self.wfile)

            def log_message(self, *args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _stream_to(self, out) -> None:
        server = self._server
        while self._server is server and time.monotonic() < self._deadline:
            if self.mode != "stalled":
                if self.mode == "live" or self.sent == 0:
                    self.sent += 1
                body = self.jpeg(self.sent)
                part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                try:
                    out.write(part % len(body) + body + b"\r\n")
                    out.flush()
                except OSError:
                    return
            time.sleep(1.0 / self.fps)

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    def restore(self) -> None:
        self.start()


def frame_number(image: np.ndarray) -> int:
    """The number MjpegServer drew into a frame (mod 256)."""
    return round(float(image.mean()))


class RtspServer:
    """A minimal RTSP server (OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN) for one client at a
    time, streaming over the RTSP connection itself (interleaved RTP, what FFmpeg asks for
    with rtsp_transport=tcp).  Each PLAY starts an ffmpeg that packetises the video as RTP to
    a local UDP port; the server forwards those packets to the client, so every session starts
    at a keyframe as a camera's would."""

    def __init__(self, video: Path) -> None:
        self.video = video
        self.port = free_port()
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.sessions = 0
        self._listener: socket.socket | None = None
        self._sdp = self._make_sdp()
        self._client: socket.socket | None = None
        self._deadline = time.monotonic() + MAX_SECONDS

    def _make_sdp(self) -> str:
        result = subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(self.video), "-an",
             "-c:v", "copy", "-frames:v", "1", "-f", "rtp", "-sdp_file", "/dev/stdout",
             "rtp://127.0.0.1:9"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        sdp = result.stdout[result.stdout.index("v=0") :]
        lines = [line for line in sdp.splitlines() if line and not line.startswith("SDP:")]
        lines = [re.sub(r"^c=IN IP4 .*", "c=IN IP4 0.0.0.0", line) for line in lines]
        return "\r\n".join([*lines, "a=control:track0"]) + "\r\n"

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(4)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()

    def restore(self) -> None:
        self.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener and time.monotonic() < self._deadline:
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            self._client = client
            with contextlib.suppress(OSError):
                self._serve(client)
            with contextlib.suppress(OSError):
                client.close()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(MAX_SECONDS)
        buffer = b""
        while self._client is client:
            while b"\r\n\r\n" not in buffer:
                chunk = client.recv(4096)
                if not chunk:
                    return
                buffer += chunk
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            method = lines[0].split()[0]
            cseq = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("CSeq"))
            if method == "OPTIONS":
                self._reply(client, cseq, "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN\r\n")
            elif method == "DESCRIBE":
                self._reply(
                    client, cseq,
                    f"Content-Base: {self.url}/\r\nContent-Type: application/sdp\r\n"
                    f"Content-Length: {len(self._sdp)}\r\n", self._sdp,
                )  # fmt: skip
            elif method == "SETUP":
                self._reply(
                    client, cseq,
                    "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 1;timeout=60\r\n",
                )  # fmt: skip
            elif method == "PLAY":
                self._reply(client, cseq, "Session: 1\r\n")
                self.sessions += 1
                self._relay(client)
                return
            else:
                self._reply(client, cseq, "Session: 1\r\n")
                return

    @staticmethod
    def _reply(client: socket.socket, cseq: str, headers: str, body: str = "") -> None:
        client.sendall(f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n{headers}\r\n{body}".encode())

    def _relay(self, client: socket.socket) -> None:
        """Forward ffmpeg's RTP packets as interleaved frames on channel 0."""
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(0.5)
        rtp_port = receiver.getsockname()[1]
        ffmpeg = _Process()  # one per session: a finished session must not stop the next one's
        ffmpeg._spawn(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1",
             "-i", str(self.video), "-t", str(MAX_SECONDS), "-an", "-c:v", "copy",
             "-f", "rtp", f"rtp://127.0.0.1:{rtp_port}?pkt_size=1200"]
        )  # fmt: skip
        try:
            while self._client is client and time.monotonic() < self._deadline:
                try:
                    packet = receiver.recv(65536)
                except TimeoutError:
                    continue
                client.sendall(b"$\x00" + len(packet).to_bytes(2, "big") + packet)
        finally:
            receiver.close()
            ffmpeg.stop()
