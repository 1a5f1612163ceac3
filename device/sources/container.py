"""How many frames a complete video file decodes to, from its container's own header.

OpenCV reports a frame count for every file, but only some containers store one.  MP4/MOV keep
a sample table per track and AVI a frame count; for the others (Matroska, MPEG-TS, fragmented
MP4, ...) OpenCV multiplies the whole file's duration, audio included, by the frame rate, and a
perfectly good file whose audio runs longer than its video would look cut short.  A stored count
can also include frames the file never shows: an MP4 cut with 'ffmpeg -ss ... -c copy' keeps
the frames back to the previous keyframe and hides them with an edit list.  So the count is only
trusted where the header stores it, and scaled down by what the edit list hides.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Boxes an MP4/MOV file can start with (ISO base media file format).
_MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
_AVI_TOTAL_FRAMES_AT = 48  # dwTotalFrames in the 'avih' header that opens every AVI


def frames_to_expect(path: Path, reported: int) -> int | None:
    """Frames a complete decode of ``path`` delivers, given OpenCV's ``reported`` count, or None
    when the container does not store a count, so that no judgement is possible."""
    if reported <= 0:
        return None
    try:
        with path.open("rb") as file:
            head = file.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return reported if _avi_total_frames(file) > 0 else None
            if head[4:8] in _MP4_FIRST_BOXES:
                shown = _mp4_shown_share(file, path.stat().st_size)
                return None if shown is None else round(reported * shown)
    except OSError:
        return None
    return None


def _avi_total_frames(file: BinaryIO) -> int:
    """The AVI main header's frame count; 0 when a recorder stopped before writing it."""
    file.seek(_AVI_TOTAL_FRAMES_AT)
    data = file.read(4)
    return struct.unpack("<I", data)[0] if len(data) == 4 else 0


def _mp4_shown_share(file: BinaryIO, size: int) -> float | None:
    """The share of the first video track's samples its edit list shows (1.0 without one), or
    None when the file is fragmented or its header cannot be read."""
    moov = _find(file, 0, size, b"moov")
    if moov is None or _find(file, *moov, b"mvex") is not None:
        return None  # fragmented: the samples are counted in the fragments, not in the header
    mvhd = _find(file, *moov, b"mvhd")
    movie = _read_full_box(file, mvhd, ">IIII", ">QQIQ") if mvhd else None
    for trak in _boxes(file, *moov):
        if trak[0] != b"trak":
            continue
        track = _video_track_durations(file, trak[1:])
        if track is None:
            continue
        shown_units, media_seconds = track
        if media_seconds <= 0:
            return None
        if shown_units is None or movie is None or movie[2] == 0:
            return 1.0
        return min(1.0, shown_units / movie[2] / media_seconds)
    return None


def _video_track_durations(
    file: BinaryIO, trak: tuple[int, int]
) -> tuple[int | None, float] | None:
    """For a video track: how long its edit list shows it (in movie time units; None without an
    edit list) and how long its samples last (seconds).  None for any other track."""
    mdia = _find(file, *trak, b"mdia")
    hdlr = _find(file, *mdia, b"hdlr") if mdia else None
    handler = _read_full_box(file, hdlr, ">I4s", ">I4s") if hdlr else None
    if handler is None or handler[1] != b"vide":
        return None
    mdhd = _find(file, *mdia, b"mdhd")
    media = _read_full_box(file, mdhd, ">IIII", ">QQIQ") if mdhd else None
    if media is None or media[2] == 0:
        return None, 0.0
    media_seconds = media[3] / media[2]
    if _find(file, *trak, b"edts") is None:
        return None, media_seconds
    tkhd = _find(file, *trak, b"tkhd")
    header = _read_full_box(file, tkhd, ">IIIII", ">QQIIQ") if tkhd else None
    return (header[4] if header and header[4] else None), media_seconds


def _boxes(file: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, content start, end) of each box between ``start`` and ``end``; stops at the first
    one that does not parse."""
    offset = start
    while offset + 8 <= end:
        file.seek(offset)
        header = file.read(16)
        if len(header) < 8:
            return
        size, kind = struct.unpack(">I4s", header[:8])
        content = offset + 8
        if size == 1 and len(header) == 16:
            size, content = struct.unpack(">Q", header[8:])[0], offset + 16
        elif size == 0:
            size = end - offset  # the box runs to the end of its parent
        if size < content - offset:
            return
        yield kind, content, min(offset + size, end)
        offset += size


def _find(file: BinaryIO, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(content start, end) of the first ``kind`` box between ``start`` and ``end``."""
    for found, content, box_end in _boxes(file, start, end):
        if found == kind:
            return content, box_end
    return None


def _read_full_box(
    file: BinaryIO, box: tuple[int, int], version_0: str, version_1: str
) -> tuple | None:
    """The fields after a full box's version and flags, in the layout of its version."""
    file.seek(box[0])
    version_flags = file.read(4)
    if len(version_flags) < 4:
        return None
    layout = version_1 if version_flags[0] == 1 else version_0
    data = file.read(struct.calcsize(layout))
    if len(data) < struct.calcsize(layout) or box[0] + 4 + len(data) > box[1]:
        return None
    return struct.unpack(layout, data)
