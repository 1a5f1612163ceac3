"""The device runtime on aarch64: torch-free imports and models numerically equal to x86."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import platform
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HOST_ONLY_PACKAGES = ("torch", "torchvision", "onnx", "onnxslim", "toolkit")


def test_python_is_the_pis():
    assert platform.machine() == "aarch64"
    assert sys.version_info[:2] == (3, 11), "Raspberry Pi OS bookworm ships Python 3.11"
    # The OS's picamera2 is built against numpy 1.x; the device environment mirrors that.
    assert int(np.__version__.split(".")[0]) < 2, f"numpy {np.__version__}"


def test_device_package_imports_without_torch():
    for name in HOST_ONLY_PACKAGES[:-1]:
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the device env"

    import device

    modules = [info.name for info in pkgutil.walk_packages(device.__path__, "device.")]
    for name in modules:
        importlib.import_module(name)

    assert len(modules) >= 5, modules
    loaded = {name.split(".")[0] for name in sys.modules}
    assert not loaded & set(HOST_ONLY_PACKAGES), sorted(loaded & set(HOST_ONLY_PACKAGES))


def test_model_output_matches_x86(model_case):
    model, case = model_case
    session = _session(model["path"])
    tensor = np.load(case["input"])
    expected = np.load(case["output"])

    (output,) = session.run(None, {session.get_inputs()[0].name: tensor})

    assert output.shape == expected.shape
    assert output.dtype == expected.dtype
    difference = float(np.abs(output - expected).max())
    assert difference <= model["atol"], (
        f"{Path(model['path']).name} on {case['name']}: max |arm - x86| = {difference:.2e}, "
        f"tolerance {model['atol']:.0e}"
    )


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
