"""The device check on an imitated board: it must see the CPU the emulator imitates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
