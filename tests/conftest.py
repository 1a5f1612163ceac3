"""Shared fixtures: where the real data lives, and how tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REALDATA = Path(os.environ.get("EDGE_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))


def realdata_file(relative: str) -> Path:
    """A file under ../shared/realdata, or a skip saying it is absent."""
    path = REALDATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path} (see ../shared/realdata/SOURCES.md)")
    return path


@pytest.fixture
def yolov5n_pt() -> Path:
    return realdata_file("models/yolov5n.pt")


@pytest.fixture
def bus_jpg() -> Path:
    return realdata_file("images/bus.jpg")


@pytest.fixture
def zidane_jpg() -> Path:
    return realdata_file("images/zidane.jpg")
