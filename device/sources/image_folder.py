"""The images of one folder, in name order, read on the caller's thread."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2

from device.errors import ToolkitError
from device.sources.base import FrameSource, SourceState
from device.sources.config import ImageFolderConfig
from device.sources.opencv_capture import as_bgr
from device.types import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderSource(FrameSource):
    """Each image once (or round and round with ``loop``); unreadable files are skipped and
    counted as dropped."""

    def __init__(self, config: ImageFolderConfig) -> None:
        super().__init__()
        self.config = config
        self.folder = config.path.expanduser()
        self.name = config.name or self.folder.name
        self.images: list[Path] = []
        self.unreadable: list[str] = []
        self._next = 0
        self._delivered = 0
        self._last_delivery = 0.0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise ToolkitError(
                f"Expected a folder of images at {self.folder}, found "
                f"{'a file' if self.folder.exists() else 'nothing'}. Check source.path"
                f"{' (use source type file for a video)' if self.folder.is_file() else ''}."
            )
        self.images = list_images(self.folder)
        if not self.images:
            others = sorted(p.name for p in self.folder.iterdir())
            found = f"{len(others)} other entries ({', '.join(others[:5])}" + (
                ", ...)" if len(others) > 5 else ")"
            )
            raise ToolkitError(
                f"Expected images ({', '.join(IMAGE_SUFFIXES)}) in {self.folder}, found "
                f"{found if others else 'an empty folder'}. Copy images there or point "
                "source.path at the folder that holds them."
            )
        self._set_state(SourceState.STREAMING)
        log.info("source %s: %d images in %s", self.name, len(self.images), self.folder)

    def read(self, timeout: float) -> Frame | None:
        if self.finished or not self.images:
            return None
        if self.config.fps:
            wait = self._last_delivery + 1.0 / self.config.fps - time.monotonic()
            if wait > timeout:
                time.sleep(max(timeout, 0.0))
                return None
            if wait > 0:
                time.sleep(wait)
        while True:
            path = self._advance()
            if path is None:
                return None
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                break
            self._skip_unreadable(path)
            if self.finished:
                return None
        self._last_delivery = time.monotonic()
        self.frames_captured += 1
        frame = Frame(as_bgr(image), self._delivered, time.time(), self._last_delivery, self.name)
        self._delivered += 1
        return frame

    def _advance(self) -> Path | None:
        if self._next >= len(self.images):
            if not self.config.loop or len(self.unreadable) >= len(self.images):
                self._set_state(SourceState.ENDED)
                return None
            self._next = 0
        path = self.images[self._next]
        self._next += 1
        return path

    def _skip_unreadable(self, path: Path) -> None:
        if path.name not in self.unreadable:
            self.unreadable.append(path.name)
            log.warning("source %s: skipping %s, not a readable image", self.name, path.name)
        self.frames_dropped += 1
        self.last_error = f"unreadable image {path.name}"
        if len(self.unreadable) >= len(self.images):
            self._set_state(
                SourceState.FAILED,
                f"none of the {len(self.images)} files in {self.folder} could be decoded as an "
                "image; check them with an image viewer or re-export them as JPEG or PNG",
            )

    def close(self) -> None:
        """Nothing to release: images are read one at a time."""

    def status(self) -> dict:
        status = super().status()
        status.update(
            kind="folder", path=str(self.folder), images=len(self.images), position=self._next
        )
        return status
