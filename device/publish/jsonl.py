"""JSON lines output: one ``FrameResult.as_dict()`` per line, to stdout or a file.

A writer thread does the I/O so that a slow disk or a stalled pipe reader never holds up the
detection loop; the queue between them is bounded and overflow is counted, not buffered.  A
file can be rotated at a size limit (one ``.1`` backup kept) so a long-running device does not
fill its SD card.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel, ConfigDict, Field

from device.errors import ToolkitError
from device.publish.base import Sink
from device.stats import RuntimeStats
from device.types import FrameResult

log = logging.getLogger(__name__)

STDOUT = "-"
_STOP = object()


class JsonlConfig(BaseModel):
    """Where and how JSON lines are written."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Write one JSON line per frame")
    path: str = Field(STDOUT, min_length=1, description="File to write, or '-' for stdout")
    only_detections: bool = Field(False, description="Skip frames in which nothing was found")
    append: bool = Field(True, description="Append to an existing file instead of replacing it")
    max_megabytes: float | None = Field(
        None, gt=0, description="Rotate the file to <path>.1 at this size (None: never)"
    )
    queue_size: int = Field(
        1024, ge=1, le=1_000_000, description="Lines waiting for the writer; more are dropped"
    )


class JsonlSink(Sink):
    """Writes results as JSON lines from its own thread."""

    name = "jsonl"

    def __init__(self, config: JsonlConfig, stats: RuntimeStats | None = None) -> None:
        self.config = config
        self.stats = stats
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._stream: TextIO | None = None
        self._path = None if config.path == STDOUT else Path(config.path)
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self._rotation_failed = False

    def start(self) -> None:
        self._stream = self._open()
        self._thread = threading.Thread(target=self._run, name="jsonl-writer", daemon=True)
        self._thread.start()
        log.info("Writing JSON lines to %s", self._path or "stdout")

    def _open(self) -> TextIO:
        if self._path is None:
            return sys.stdout
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            return self._path.open("a" if self.config.append else "w", encoding="utf-8")
        except OSError as exc:
            raise ToolkitError(
                f"Cannot write JSON lines to {self._path}: {exc.strerror or exc}. Expected a file "
                "path in a writable folder (outputs.jsonl.path or --jsonl), or '-' for stdout."
            ) from None

    def publish(self, result: FrameResult) -> None:
        if self.config.only_detections and not result.detections:
            return
        try:
            self._queue.put_nowait(result.as_dict())
        except queue.Full:
            self.dropped += 1
            if self.stats is not None:
                self.stats.publish_dropped.labels(self.name).inc()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            # Drain what else is waiting so one flush covers many lines.
            while not self._queue.empty() and len(batch) < 256:
                batch.append(self._queue.get_nowait())
            lines = [json.dumps(i, separators=(",", ":")) for i in batch if i is not _STOP]
            if lines:
                try:
                    self._write(lines)
                except Exception as exc:  # a dead writer would leave close() waiting forever
                    self.errors += len(lines)
                    log.warning("JSON lines to %s failed: %s", self._path or "stdout", exc)
            if any(i is _STOP for i in batch):
                return

    def _write(self, lines: list[str]) -> None:
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except BrokenPipeError:
            if self._path is not None:
                raise
            self._reader_gone(len(lines))
        except (OSError, ValueError) as exc:
            self.errors += len(lines)
            if self.stats is not None:
                self.stats.publish_errors.labels(self.name).inc(len(lines))
            if self.errors == len(lines):  # log the first failure, not every line
                log.warning("Could not write JSON lines to %s: %s", self._path or "stdout", exc)
            return
        self.written += len(lines)
        if self.stats is not None:
            self.stats.published.labels(self.name).inc(len(lines))
        self._rotate_if_large()

    def _reader_gone(self, lost: int) -> None:
        """stdout's reader exited (``... --jsonl - | head -1``): stop like a Unix filter."""
        self.errors += lost
        if isinstance(self._stream, _Discard):
            return
        try:
            # Python's own flush of stdout at exit must not fail again on the dead pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # stdout is not a real file (replaced by a test or an embedding program)
        self._stream = _Discard()
        log.info("stdout was closed by its reader (broken pipe); stopping")
        if self.stop_daemon is not None:
            self.stop_daemon("stdout was closed by its reader")

    def _rotate_if_large(self) -> None:
        limit = self.config.max_megabytes
        if self._path is None or limit is None or self._rotation_failed:
            return
        backup = self._path.with_name(self._path.name + ".1")
        try:
            if self._stream.tell() < limit * 1e6:
                return
            # Renamed while still open: the lines written so far move with it.
            os.replace(self._path, backup)
        except OSError as exc:
            self._rotation_failed = True
            log.warning(
                "Could not rotate %s to %s (%s); writing on without a size limit. Expected a "
                "regular file whose folder has no directory named %s in the way.",
                self._path,
                backup.name,
                exc.strerror or exc,
                backup.name,
            )
            return
        self._stream.close()
        self._stream = self._path.open("w", encoding="utf-8")
        log.info("Rotated %s at %.1f MB", self._path, limit)

    def close(self) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=10)  # waits only while the writer drains a full queue
        except queue.Full:
            log.warning("JSON lines: the writer did not drain its queue; closing without it")
        self._thread.join(timeout=10)
        self._thread = None
        if self._path is not None and self._stream is not None:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
        elif self._stream is not None:
            self._stream.flush()
        log.info(
            "JSON lines: %d written%s",
            self.written,
            f", {self.dropped} dropped" if self.dropped else "",
        )

    def status(self) -> dict:
        return {
            "name": self.name,
            "path": str(self._path or STDOUT),
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
        }


class _Discard:
    """Where JSON lines go once stdout's reader has gone."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
