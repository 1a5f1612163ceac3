"""Snapshots to disk: an annotated JPEG and a JSON sidecar for frames holding chosen objects.

A frame is saved when it has a detection of a wanted label (``labels``, all when unset) scoring
at least ``min_score``, and at least ``min_interval`` seconds passed since the last snapshot.
Files are named ``<UTC time>_f<frame>_<labels>.jpg`` / ``.json`` so that names sort by time,
written to a temporary file and renamed into place (a crash never leaves half a file), JPEG
first, so a sidecar always has its image. Retention keeps at most ``max_files`` snapshots and
``max_megabytes`` on disk, deleting the oldest; it only ever deletes files with that naming
pattern, never anything else in the folder, and always keeps the newest snapshot.

Wiring, for the daemon::

    sink = SnapshotSink(config.snapshots, stats)
    sink.start()   # creates the folder (ToolkitError if it cannot), starts the writer thread
    sink.publish(result)  # per frame; cheap checks, the image goes to a bounded queue
    sink.close()   # writes what is queued, stops the writer
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from device.errors import ToolkitError
from device.publish.annotate import draw_detections, encode_jpeg
from device.publish.base import Sink
from device.publish.config import SnapshotConfig
from device.stats import RuntimeStats
from device.types import Detection, FrameResult

log = logging.getLogger(__name__)

SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{6}-\d{3}Z_f\d+_[\w.-]*\.(?:jpg|json)$")
_TEMP_NAME = re.compile(r"^\.\d{8}T\d{6}-\d{3}Z_.*\.tmp$")
_CLOSE_WAIT = 10.0  # seconds close() waits for queued snapshots to be written


class SnapshotSink(Sink):
    """Saves annotated frames with detections, within a size and count budget."""

    name = "snapshots"

    def __init__(self, config: SnapshotConfig, stats: RuntimeStats) -> None:
        self.config = config
        self.stats = stats
        self.directory = Path(config.directory)
        self._labels = set(config.labels) if config.labels is not None else None
        self._max_bytes = (
            int(config.max_megabytes * 1024 * 1024) if config.max_megabytes is not None else None
        )
        self._queue: queue.Queue[tuple[FrameResult, list[Detection]]] = queue.Queue(
            maxsize=config.queue_size
        )
        self._last_saved = float("-inf")
        self._kept: deque[tuple[str, int]] = deque()  # (stem, bytes of jpg + json), oldest first
        self._kept_bytes = 0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._failures_in_a_row = 0
        self._saved = stats.published.labels(self.name)
        self._dropped = stats.publish_dropped.labels(self.name)
        self._errors = stats.publish_errors.labels(self.name)

    def start(self) -> None:
        """Create the folder, index the snapshots already there, start the writer thread."""
        if self._worker is not None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ToolkitError(
                f"snapshots.directory: cannot create {self.directory} ({exc.strerror or exc}): "
                f"choose a folder the daemon's user can write"
            ) from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ToolkitError(
                f"snapshots.directory: {self.directory} exists but is not writable by this user: "
                f"fix its permissions or choose another folder"
            )

        self._index_existing()
        self._enforce_retention()
        self._worker = threading.Thread(target=self._run, name="snapshot-writer", daemon=True)
        self._worker.start()
        log.info(
            "Snapshots: saving to %s (kept: %d files, %.1f MB; limits: %s files, %s MB)",
            self.directory,
            len(self._kept),
            self._kept_bytes / 1e6,
            self.config.max_files,
            self.config.max_megabytes,
        )

    def publish(self, result: FrameResult) -> None:
        """Queue the frame when it triggers a snapshot; cheap checks only."""
        if self._worker is None or self._closed:
            return
        triggers = self._triggers(result.detections)
        if not triggers:
            return
        if result.frame.monotonic - self._last_saved < self.config.min_interval:
            return
        try:
            self._queue.put_nowait((result, triggers))
        except queue.Full:
            self._dropped.inc()
            return
        self._last_saved = result.frame.monotonic

    def close(self) -> None:
        """Write what is queued and stop the writer."""
        if self._worker is None or self._closed:
            return
        self._closed = True
        self._stop.set()
        self._worker.join(timeout=_CLOSE_WAIT)
        log.info("Snapshots: stopped (%d kept in %s)", len(self._kept), self.directory)

    def status(self) -> dict:
        return {
            "name": self.name,
            "directory": str(self.directory),
            "kept_files": len(self._kept),
            "kept_megabytes": round(self._kept_bytes / (1024 * 1024), 2),
        }

    def _triggers(self, detections: list[Detection]) -> list[Detection]:
        return [
            d
            for d in detections
            if d.score >= self.config.min_score
            and (self._labels is None or d.label in self._labels)
        ]

    def _run(self) -> None:
        while True:
            try:
                result, triggers = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                self._save(result, triggers)
            except OSError as exc:
                self._errors.inc()
                self._failures_in_a_row += 1
                # A full disk fails every frame: say it once, then now and then.
                if self._failures_in_a_row == 1 or self._failures_in_a_row % 100 == 0:
                    log.error(
                        "Snapshots: could not write to %s (%d failed in a row): %s",
                        self.directory,
                        self._failures_in_a_row,
                        exc,
                    )
                continue
            if self._failures_in_a_row:
                log.info("Snapshots: writing again after %d failures", self._failures_in_a_row)
                self._failures_in_a_row = 0

    def _save(self, result: FrameResult, triggers: list[Detection]) -> None:
        stem = self._unique_stem(result, triggers)

        image = result.frame.image
        if self.config.annotate:
            image = draw_detections(image, result.detections)
        jpeg = encode_jpeg(image, self.config.jpeg_quality)

        sidecar = result.as_dict()
        sidecar["image"] = f"{stem}.jpg"
        sidecar["triggers"] = [d.as_dict() for d in triggers]
        sidecar["saved_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        sidecar_bytes = json.dumps(sidecar, indent=2).encode()

        # Image first: a sidecar on disk always has its image.
        image_path = self.directory / f"{stem}.jpg"
        _atomic_write(image_path, jpeg)
        try:
            _atomic_write(self.directory / f"{stem}.json", sidecar_bytes)
        except OSError:
            # Not yet counted for retention, so an image left here would never be deleted.
            image_path.unlink(missing_ok=True)
            raise
        self._kept.append((stem, len(jpeg) + len(sidecar_bytes)))
        self._kept_bytes += len(jpeg) + len(sidecar_bytes)
        self._saved.inc()
        log.debug("Snapshots: saved %s.jpg", stem)

        self._enforce_retention()

    def _unique_stem(self, result: FrameResult, triggers: list[Detection]) -> str:
        moment = datetime.fromtimestamp(result.frame.timestamp, tz=timezone.utc)
        labels = "-".join(dict.fromkeys(_slug(d.label) for d in triggers))
        stem = (
            f"{moment:%Y%m%dT%H%M%S}-{moment.microsecond // 1000:03d}Z"
            f"_f{result.frame.index:06d}_{labels}"
        )
        candidate, suffix = stem, 1
        while (self.directory / f"{candidate}.jpg").exists():
            candidate = f"{stem}-{suffix}"
            suffix += 1
        return candidate

    def _index_existing(self) -> None:
        """Learn which snapshots a previous run left; remove its half-written temporaries."""
        sizes: dict[str, int] = {}
        for path in self.directory.iterdir():
            if _TEMP_NAME.match(path.name):
                path.unlink(missing_ok=True)
            elif SNAPSHOT_NAME.match(path.name) and path.is_file():
                sizes[path.stem] = sizes.get(path.stem, 0) + path.stat().st_size
        for stem in sorted(sizes):
            self._kept.append((stem, sizes[stem]))
            self._kept_bytes += sizes[stem]

    def _enforce_retention(self) -> None:
        """Delete the oldest snapshots beyond the count and size limits; keep the newest."""
        max_files, max_bytes = self.config.max_files, self._max_bytes
        while len(self._kept) > 1 and (
            (max_files is not None and len(self._kept) > max_files)
            or (max_bytes is not None and self._kept_bytes > max_bytes)
        ):
            stem, size = self._kept.popleft()
            self._kept_bytes -= size
            for ext in (".jpg", ".json"):
                (self.directory / f"{stem}{ext}").unlink(missing_ok=True)
            log.debug("Snapshots: deleted %s (retention)", stem)


def _slug(label: str) -> str:
    return re.sub(r"[^\w.]+", "_", label).strip("_") or "object"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file in the same folder, then rename over the target."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
