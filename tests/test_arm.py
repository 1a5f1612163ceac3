"""The device runtime under emulated aarch64 (a Pi 4 and a Pi 5), compared with x86.

This host side builds (or reuses) the emulated environment of scripts/arm/arm_env.py, makes
x86 references (models, input tensors, onnxruntime outputs) in a temporary directory, and runs
tests/arm inside the emulated Python once per imitated CPU.  Emulated timings mean nothing:
nothing here measures speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.arm]

TINY_ATOL = 1e-5


def _load_arm_env():
    spec = importlib.util.spec_from_file_location(
        "arm_env", REPO_ROOT / "scripts" / "arm" / "arm_env.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["arm_env"] = module
    spec.loader.exec_module(module)
    return module


arm_env = _load_arm_env()


@pytest.fixture(scope="session")
def arm():
    """The built environment, or a skip naming what is missing to build it."""
    env = arm_env.ArmEnv(arm_env.cache_dir())
    built = (env.root / arm_env.PYTHON.lstrip("/")).exists()
    missing = arm_env.missing_tools(for_build=not built)
    if missing:
        pytest.skip(f"cannot emulate aarch64, missing: {', '.join(missing)}")
    if not built and os.geteuid() != 0:
        pytest.skip(
            f"no arm64 root at {env.root} and building one needs root: "
            "run 'sudo python3 scripts/arm/arm_env.py build' once"
        )
    return arm_env.build()


@pytest.fixture(scope="session")
def arm_refs(tmp_path_factory) -> Path:
    """x86 references for tests/arm, with the manifest described in tests/arm/conftest.py."""
    refs = tmp_path_factory.mktemp("arm-refs")
    models = {"tiny": _tiny_reference(refs)}
    (refs / "manifest.json").write_text(json.dumps({"models": models}, indent=2))
    return refs


def _tiny_reference(refs: Path) -> dict:
    """A small conv net built with onnx.helper, its input and its x86 output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 4).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"]),
        helper.make_node("Sigmoid", ["c2"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = refs / "tiny.onnx"
    onnx.save(model, path)

    tensor = rng.random((1, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": tensor})
    np.save(refs / "tiny_input.npy", tensor)
    np.save(refs / "tiny_output.npy", output)
    case = {"name": "random", "input": str(refs / "tiny_input.npy")}
    case["output"] = str(refs / "tiny_output.npy")
    return {"path": str(path), "atol": TINY_ATOL, "precision": "fp32", "cases": [case]}


@pytest.mark.slow
@pytest.mark.parametrize("cpu", sorted(arm_env.CPUS))
def test_arm_suite(arm, arm_refs, cpu, tmp_path):
    profile = arm_env.CPUS[cpu]
    report = tmp_path / "report.xml"

    result = arm.run_arm_tests(
        profile,
        [str(arm_env.ARM_TESTS), f"--junitxml={report}", "-q"],
        env={"EDGE_ARM_REFS": str(arm_refs)},
    )

    output = f"--- tests/arm on {cpu} ---\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, output
    outcomes = _outcomes(report)
    assert outcomes, output
    skipped = {name: reason for name, reason in outcomes.items() if reason is not None}
    assert not skipped, f"tests/arm skipped inside the emulator: {skipped}\n{output}"


def _outcomes(report: Path) -> dict[str, str | None]:
    """Each test case of a JUnit report, with its skip reason or None."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        skip = case.find("skipped")
        outcomes[case.get("name")] = None if skip is None else skip.get("message", "")
    return outcomes


def test_cpu_profiles_read_as_the_boards():
    from device.check import parse_cpuinfo, recommend_precision

    pi4 = parse_cpuinfo(arm_env.CPUS["cortex-a72"].cpuinfo(4))
    pi5 = parse_cpuinfo(arm_env.CPUS["cortex-a76"].cpuinfo(4))

    assert pi4["cores"] == pi5["cores"] == 4
    assert "Cortex-A72" in pi4["model"] and "Raspberry Pi 4" in pi4["model"]
    assert "Cortex-A76" in pi5["model"] and "Raspberry Pi 5" in pi5["model"]
    assert "asimddp" not in pi4["features"] and "asimddp" in pi5["features"]
    assert recommend_precision("aarch64", pi4["features"])[0] == "fp32"
    assert recommend_precision("aarch64", pi5["features"])[0] == "int8"


def test_arm_requirements_follow_pyproject():
    requirements = arm_env.device_requirements()

    names = {req.split("<")[0].split(">")[0].split("=")[0].split("!")[0] for req in requirements}
    assert {"onnxruntime", "numpy", "opencv-python-headless", "pytest"} <= names
    assert "torch" not in names and "onnx" not in names
    assert "numpy<2" in requirements
