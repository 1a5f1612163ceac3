"""The device check on an imitated board: it must see the CPU the emulator imitates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The check probes onnxruntime in a child process; emulated, that child starts slowly.
CHECK_TIMEOUT_S = 240


def test_check_reports_the_cpu_and_its_precision(imitated_dotprod):
    # 'toolkit-device check'; on the emulated board sys.executable is also the OS python.
    command = [sys.executable, "-m", "device.cli", "check", "--json"]
    command += ["--system-python", sys.executable]

    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
    )

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["ok"] is True
    assert checks["architecture"]["status"] == "pass"
    assert checks["onnxruntime"]["status"] == "pass", checks["onnxruntime"]
    cpu = checks["cpu"]
    assert ("asimddp" in cpu["data"]["features"]) is imitated_dotprod, cpu
    assert report["recommended_precision"] == ("int8" if imitated_dotprod else "fp32")
    core = {"cortex-a72": "Cortex-A72", "cortex-a76": "Cortex-A76"}.get(
        os.environ.get("EDGE_ARM_CPU", ""), "Cortex-A"
    )
    assert core in cpu["data"]["model"], cpu


def test_check_turns_an_onnxruntime_crash_into_a_message(imitated_dotprod):
    crashing = os.environ.get("EDGE_ARM_CRASHING_ORT", "")
    if not os.path.isdir(crashing):
        pytest.skip("no crashing onnxruntime build given (EDGE_ARM_CRASHING_ORT)")
    # onnxruntime 1.21.0 executes instructions beyond ARMv8.0: SIGILL on a Cortex-A72 (Pi 4).
    # This runs the stdlib-only module that 'toolkit deploy' sends to a board.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([crashing, os.environ["PYTHONPATH"]]))
    command = [sys.executable, "-m", "device.check", "--json", "--system-python", sys.executable]

    done = subprocess.run(
        command, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env, check=False
    )

    report = json.loads(done.stdout)
    onnxruntime = next(check for check in report["checks"] if check["name"] == "onnxruntime")
    if imitated_dotprod:
        assert done.returncode == 0, done.stdout + done.stderr
        assert onnxruntime["status"] == "pass"
        assert onnxruntime["data"]["version"] == "1.21.0"
    else:
        assert done.returncode == 1, done.stdout + done.stderr
        assert onnxruntime["status"] == "fail"
        assert "SIGILL" in onnxruntime["found"], onnxruntime
        assert "1.21.0" in onnxruntime["advice"]


def test_check_sent_to_a_fresh_board_before_deploy(imitated_dotprod, tmp_path):
    # 'toolkit deploy' pipes device/check.py into the OS's 'python3 -' before anything is
    # installed: nothing of the runtime or its dependencies may be importable.
    source = (Path(__file__).resolve().parents[2] / "device" / "check.py").read_text()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, "-", "--json", "--runtime-pending", "--root", str(tmp_path)]
    command += ["--system-python", sys.executable, "--runtime-python", sys.executable]

    done = subprocess.run(
        command, input=source, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
        env=env, cwd=tmp_path, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    # The camera check looks at the host's /dev and /sys: a webcam there would pass it.
    statuses = {name: check["status"] for name, check in checks.items() if name != "camera"}
    assert statuses == dict.fromkeys(
        ["architecture", "python", "onnxruntime", "numpy/picamera2", "cpu", "disk"], "pass"
    ), checks
    assert checks["camera"]["status"] in ("pass", "warn"), checks["camera"]
    assert "not installed" in checks["onnxruntime"]["found"], checks["onnxruntime"]
    assert report["recommended_precision"] == ("int8" if imitated_dotprod else "fp32")
