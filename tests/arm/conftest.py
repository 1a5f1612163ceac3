"""Tests that run inside an aarch64 Python: the emulated Pi of scripts/arm, or a real board.

They compare this machine's results with references made on x86 by tests/test_arm.py, which
writes them to a directory named by ``EDGE_ARM_REFS`` with a ``manifest.json``:

    {"models": {"<name>": {"path": "<onnx>", "precision": "fp32|int8", "tolerance": {...},
                           "cases": [{"name": "...", "input": "<npy>", "output": "<npy>",
                                      "image": "<jpg>", "detections": [...],
                                      "fp32_output": "<npy>"}]}},
     "video": {"model": "<onnx>", "source": "<mp4>", "frames": <int>, "x86_jsonl": "<file>",
               "command": ["PYTHON", ..., "OUTPUT", ...]}}

``image``, ``detections`` and ``fp32_output`` are optional; ``tolerance`` holds
``elementwise`` or ``statistics`` limits and a ``detections`` matching rule.

Paths are absolute host paths: qemu's ``-L`` root falls back to the host's files.  A test whose
reference is absent from the manifest skips, naming what is missing.  On x86 nothing here is
collected: these tests prove aarch64 behaviour only.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

if platform.machine().lower() not in ("aarch64", "arm64"):
    collect_ignore_glob = ["test_*.py"]


def load_manifest() -> dict:
    refs = os.environ.get("EDGE_ARM_REFS")
    if not refs:
        return {}
    return json.loads((Path(refs) / "manifest.json").read_text())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_case" not in metafunc.fixturenames:
        return
    params = []
    for name, model in load_manifest().get("models", {}).items():
        for case in model["cases"]:
            params.append(pytest.param((name, model, case), id=f"{name}-{case['name']}"))
    if not params:
        params = [pytest.param(None, marks=pytest.mark.skip(reason="no x86 references given"))]
    metafunc.parametrize("model_case", params)


@pytest.fixture(scope="session")
def manifest() -> dict:
    data = load_manifest()
    if not data:
        pytest.skip("EDGE_ARM_REFS is not set: run tests/test_arm.py on the host to make them")
    return data


@pytest.fixture
def imitated_dotprod() -> bool:
    """Whether the imitated CPU has the dot-product extension, as the launcher states it."""
    value = os.environ.get("EDGE_ARM_DOTPROD")
    if value is None:
        pytest.skip("EDGE_ARM_DOTPROD is not set: the launcher states the imitated CPU")
    return value == "1"
