"""The device runtime on aarch64: the Pi's Python and numpy, and imports free of host tools."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import platform
import sys

import numpy as np

# Export and quantization tools: never installed on a board.
HOST_ONLY_DEPENDENCIES = ("torch", "torchvision", "onnx", "onnxslim")


def test_python_is_the_pis():
    assert platform.machine() == "aarch64"
    assert sys.version_info[:2] == (3, 11), "Raspberry Pi OS bookworm ships Python 3.11"
    # The OS's picamera2 is built against numpy 1.x; the device environment mirrors that.
    assert int(np.__version__.split(".")[0]) < 2, f"numpy {np.__version__}"


def test_device_package_imports_without_torch():
    for name in HOST_ONLY_DEPENDENCIES:
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the device env"

    import device

    modules = [info.name for info in pkgutil.walk_packages(device.__path__, "device.")]
    for name in modules:
        importlib.import_module(name)

    assert len(modules) >= 5, modules
    # The host package ships in the same wheel; the runtime must not lean on it.
    host_side = {*HOST_ONLY_DEPENDENCIES, "toolkit"}
    loaded = {name.split(".")[0] for name in sys.modules}
    assert not loaded & host_side, sorted(loaded & host_side)
