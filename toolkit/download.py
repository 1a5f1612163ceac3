"""Resolve ``--weights``: a local file, or an official YOLOv5 name fetched into the cache.

A bare official name (``yolov5n.pt`` ... ``yolov5x.pt``) that is not on disk is downloaded
from the YOLOv5 v7.0 release into ``$EDGE_YOLO_CACHE`` (default ``~/.cache/edge-yolo``):
streamed to a temporary file with a progress bar, its size checked against the server's
``Content-Length`` and its sha256 against the pinned value, then renamed into place.  The base
URL can be overridden (``EDGE_YOLO_WEIGHTS_URL`` or ``base_url=``), e.g. for a mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from device.errors import ToolkitError
from toolkit.demo import DEMO_WEIGHTS

log = logging.getLogger(__name__)

OFFICIAL_BASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
BASE_URL_ENV = "EDGE_YOLO_WEIGHTS_URL"
CACHE_ENV = "EDGE_YOLO_CACHE"
TIMEOUT_SECONDS = 30.0
# A server that trickles bytes never hits the socket timeout; below this rate, averaged over
# TIMEOUT_SECONDS, the download is given up (a 4 MB file would take over an hour).
MIN_BYTES_PER_SECOND = 1024
_CHUNK = 1 << 16

# sha256 of the v7.0 release assets. yolov5n.pt was checked against the file itself; the
# others are the published checksums of the same release.
OFFICIAL_SHA256 = {
    "yolov5n.pt": "4f180cf23ba0717ada0badd6c685026d73d48f184d00fc159c2641284b2ac0a3",
    "yolov5s.pt": "8b3b748c1e592ddd8868022e8732fde20025197328490623cc16c6f24d0782ee",
    "yolov5m.pt": "61d933360ba5a7733a36764996c800287d973889d875227f5beedd2473a97a56",
    "yolov5l.pt": "2f603b7354c25454d1270663a14d8ddc1eea98e5eebc1d84ce0c6e3150fa155f",
    "yolov5x.pt": "9f27a794fa0308e2606f90565164571d6f0a0ba18a3ce2e5e5d323b71c157859",
}


def default_weights() -> Path:
    """The demo model shipped in ``models/demo/``, used when no ``--weights`` is given."""
    if DEMO_WEIGHTS.is_file():
        log.info(
            "No --weights given: using the demo model %s (a small detector of synthetic "
            "shapes). Pass --weights for your own checkpoint or an official name like "
            "yolov5n.pt.",
            DEMO_WEIGHTS,
        )
        return DEMO_WEIGHTS
    raise ToolkitError(
        f"No --weights given and the demo model {DEMO_WEIGHTS} is not there. Pass --weights "
        "with a YOLOv5 .pt checkpoint, or an official name such as yolov5n.pt to download it."
    )


def cache_dir() -> Path:
    """Where downloaded weights live: ``$EDGE_YOLO_CACHE`` or ``~/.cache/edge-yolo``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edge-yolo"


def base_url() -> str:
    return os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL


def is_official_name(weights: str | Path) -> bool:
    """A bare official file name such as ``yolov5s.pt`` (no folder)."""
    text = str(weights)
    return text in OFFICIAL_SHA256 and Path(text).name == text


def resolve_weights(
    weights: str | Path, *, url: str | None = None, cache: Path | None = None
) -> Path:
    """A path to the weights on disk, downloading an official name into the cache if needed."""
    path = Path(weights).expanduser()
    if path.exists() or not is_official_name(weights):
        # Missing or damaged files get their message from the checkpoint loader.
        return path

    name = str(weights)
    cached = (cache or cache_dir()) / name
    expected = OFFICIAL_SHA256[name]
    if cached.is_file():
        if sha256_file(cached) == expected:
            log.info("Using cached %s", cached)
            return cached
        log.warning("Cached %s does not match its checksum; downloading it again", cached)
    return download(f"{(url or base_url()).rstrip('/')}/{name}", cached, expected)


def download(url: str, destination: Path, sha256: str | None = None) -> Path:
    """Fetch ``url`` to ``destination`` atomically, checking size and (if given) sha256."""
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolkitError(
            f"Cannot create the weights cache {destination.parent}: {exc.strerror}. "
            f"Set {CACHE_ENV} to a writable folder."
        ) from exc

    handle, name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    partial = Path(name)
    try:
        with os.fdopen(handle, "wb") as sink:
            digest, size = _fetch(url, sink, destination)
        _check_digest(url, digest, sha256, size)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    log.info("Downloaded %s (%.1f MB) to %s", destination.name, size / 1e6, destination)
    return destination


def _fetch(url: str, sink, destination: Path) -> tuple[str, int]:
    log.info("Downloading %s", url)
    digest = hashlib.sha256()
    received = 0
    expected_size = 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            expected_size = int(response.headers.get("Content-Length") or 0)
            with _progress(destination.name, expected_size) as advance:
                window = _RateWindow(url, destination)
                for chunk in iter(lambda: response.read1(_CHUNK), b""):
                    sink.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    advance(len(chunk))
                    window.check(len(chunk))
    except http.client.IncompleteRead as exc:
        raise ToolkitError(
            f"Download of {url} stopped at {received + len(exc.partial)} of {expected_size} "
            f"bytes (the connection closed early). Try again, or put the file at {destination}."
        ) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise ToolkitError(
            f"Could not download {url}: {_reason(exc)}. Without network access, put the "
            f"file at {destination} (or pass its path to --weights)."
        ) from exc
    if expected_size and received != expected_size:
        raise ToolkitError(
            f"Download of {url} stopped at {received} of {expected_size} bytes (the connection "
            f"closed early). Try again, or put the file at {destination}."
        )
    return digest.hexdigest(), received


class _RateWindow:
    """Gives up when fewer than MIN_BYTES_PER_SECOND arrived over the last TIMEOUT_SECONDS."""

    def __init__(self, url: str, destination: Path) -> None:
        self.url, self.destination = url, destination
        self.started, self.received = time.monotonic(), 0

    def check(self, size: int) -> None:
        self.received += size
        elapsed = time.monotonic() - self.started
        if elapsed < TIMEOUT_SECONDS:
            return
        rate = self.received / elapsed
        if rate < MIN_BYTES_PER_SECOND:
            raise ToolkitError(
                f"Download of {self.url} is too slow ({rate:.0f} bytes/s over {elapsed:.0f} s, "
                f"less than {MIN_BYTES_PER_SECOND}); it was given up. Try again later or another "
                f"mirror, or put the file at {self.destination}."
            )
        self.started, self.received = time.monotonic(), 0


def _check_digest(url: str, digest: str, expected: str | None, size: int) -> None:
    if expected and digest != expected:
        raise ToolkitError(
            f"The file from {url} ({size} bytes) has sha256 {digest}, expected {expected}; it "
            "was discarded. The mirror serves another file, or the download was corrupted."
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        text = str(exc.reason)
    else:
        text = str(exc)
    # urllib's redirect-loop reason spans lines; the message stays one line.
    return " ".join(text.split())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _progress(label: str, total: int):
    """A progress bar on an interactive terminal; nothing otherwise (logs say enough)."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(label, total=total or None)
        yield lambda n: progress.advance(task, n)
