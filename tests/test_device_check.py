"""toolkit-device check: each fact on described boards (cpuinfo, arch and interpreters injected)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device import check
from device.cli import app as device_app

PI5_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI4_CORE = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""


def cpuinfo(tmp_path: Path, core: str, board: str) -> Path:
    text = "\n".join(core.format(n=n) for n in range(4))
    path = tmp_path / f"cpuinfo-{board.split(' Model')[0].replace(' ', '-')}"
    path.write_text(f"{text}\nRevision\t: d04170\nModel\t\t: {board}\n")
    return path


def fake_python(tmp_path: Path, *, onnxruntime="1.20.1", numpy="1.26.4", picamera2=False) -> str:
    """An 'interpreter' answering the check's probes the way a described board would."""
    script = tmp_path / f"python-{onnxruntime}-{numpy}-{picamera2}"
    ort = {
        "crash": "kill -ILL $$",
        "missing": "echo \"ModuleNotFoundError: No module named 'onnxruntime'\" >&2; exit 1",
    }.get(onnxruntime, f"printf {onnxruntime}")
    script.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        f"  *find_spec*picamera2*) exit {0 if picamera2 else 1} ;;\n"
        f"  *onnxruntime*) {ort} ;;\n"
        f"  *numpy*) printf {numpy} ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return str(script)


def by_name(results: list[check.CheckResult]) -> dict[str, check.CheckResult]:
    return {result.name: result for result in results}


def board(tmp_path: Path, **overrides) -> check.CheckEnvironment:
    python = overrides.get("runtime_python") or fake_python(tmp_path)
    settings = {
        "machine": "aarch64",
        "pointer_bits": 64,
        "python_version": (3, 11, 2),
        "sys_dir": tmp_path / "sys",
        "runtime_python": python,
        "system_python": python,
        "list_cameras_command": (),
        **overrides,
    }
    if "cpuinfo_path" not in settings:
        settings["cpuinfo_path"] = cpuinfo(tmp_path, PI5_CORE, "Raspberry Pi 5 Model B Rev 1.0")
    return check.CheckEnvironment(**settings)


def test_pi5_with_dot_product_is_told_to_use_int8(tmp_path):
    results = by_name(check.run_checks(board(tmp_path)))

    assert results["architecture"].status == "pass"
    cpu = results["cpu"]
    assert cpu.data["recommended_precision"] == "int8"
    assert cpu.data["cores"] == 4
    assert "Cortex-A76" in cpu.found and "Raspberry Pi 5" in cpu.found
    assert "use INT8" in cpu.found


def test_pi4_without_dot_product_is_told_to_use_fp32_and_warned_about_an_int8_only_bundle(
    tmp_path,
):
    info = cpuinfo(tmp_path, PI4_CORE, "Raspberry Pi 4 Model B Rev 1.4")
    environment = board(tmp_path, cpuinfo_path=info, bundle_precisions=("int8",))

    cpu = by_name(check.run_checks(environment))["cpu"]

    assert cpu.data["recommended_precision"] == "fp32"
    assert "Cortex-A72" in cpu.found and "no asimddp" in cpu.found
    assert cpu.status == "warn" and "FP32 would be faster" in cpu.advice


@pytest.mark.parametrize(
    ("machine", "bits"), [("armv7l", 32), ("aarch64", 32)], ids=["armv7l", "arm64-kernel-32-bit-os"]
)
def test_32_bit_arm_fails_with_the_64_bit_os_advice(tmp_path, machine, bits):
    result = check.check_architecture(board(tmp_path, machine=machine, pointer_bits=bits))

    assert result.status == "fail"
    assert "64-bit Raspberry Pi OS" in result.advice


def test_old_python_fails(tmp_path):
    result = check.check_python(board(tmp_path, python_version=(3, 9, 2)))

    assert result.status == "fail" and "3.9.2" in result.found and ">= 3.10" in result.advice


def test_onnxruntime_crash_on_import_becomes_a_message(tmp_path):
    python = fake_python(tmp_path, onnxruntime="crash")

    result = check.check_onnxruntime(board(tmp_path, runtime_python=python))

    assert result.status == "fail"
    assert "SIGILL" in result.found and "crashed" in result.found
    assert "onnxruntime!=1.21.0" in result.advice


def test_missing_onnxruntime_fails_unless_deploy_installs_it(tmp_path):
    python = fake_python(tmp_path, onnxruntime="missing")

    missing = check.check_onnxruntime(board(tmp_path, runtime_python=python))
    pending = check.check_onnxruntime(board(tmp_path, runtime_python=python, runtime_pending=True))

    assert missing.status == "fail" and "No module named 'onnxruntime'" in missing.found
    assert pending.status == "pass" and "deploy installs it" in pending.found


def test_onnxruntime_older_than_the_model_needs_fails(tmp_path):
    python = fake_python(tmp_path, onnxruntime="1.14.1")

    result = check.check_onnxruntime(board(tmp_path, runtime_python=python, min_onnxruntime="1.17"))

    assert result.status == "fail" and "needs >= 1.17" in result.found


def test_old_onnxruntime_passes_when_deploy_installs_a_newer_one(tmp_path):
    python = fake_python(tmp_path, onnxruntime="1.14.1")
    environment = board(
        tmp_path, runtime_python=python, min_onnxruntime="1.17", runtime_pending=True
    )

    result = check.check_onnxruntime(environment)

    assert result.status == "pass" and "deploy installs >= 1.17" in result.found


def test_numpy_2_next_to_the_systems_picamera2_fails(tmp_path):
    python = fake_python(tmp_path, numpy="2.1.3", picamera2=True)

    result = check.check_numpy_picamera2(
        board(tmp_path, runtime_python=python, system_python=python)
    )

    assert result.status == "fail"
    assert "numpy 2.1.3" in result.found and "numpy<2" in result.advice


def test_numpy_1_next_to_picamera2_passes(tmp_path):
    python = fake_python(tmp_path, numpy="1.24.2", picamera2=True)

    result = check.check_numpy_picamera2(
        board(tmp_path, runtime_python=python, system_python=python)
    )

    assert result.status == "pass" and result.data == {"picamera2": True, "numpy": "1.24.2"}


def test_usb_camera_found_through_sysfs(tmp_path):
    node = tmp_path / "sys" / "class" / "video4linux" / "video0"
    driver = tmp_path / "sys" / "bus" / "usb" / "drivers" / "uvcvideo"
    driver.mkdir(parents=True)
    (node / "device").mkdir(parents=True)
    (node / "device" / "driver").symlink_to(driver)
    (node / "index").write_text("0\n")

    result = check.check_camera(board(tmp_path))

    assert result.status == "pass" and result.data["usb"] == ["/dev/video0"]


def test_no_camera_is_a_warning_not_a_failure(tmp_path):
    result = check.check_camera(board(tmp_path))

    assert result.status == "warn" and "file" in result.advice


def test_too_little_disk_fails(tmp_path):
    result = check.check_disk(board(tmp_path, disk_path=tmp_path / "opt", min_free_mb=1e12))

    assert result.status == "fail" and "need" in result.found and "Free space" in result.advice


def test_cli_json_report_on_an_injected_board(tmp_path):
    info = cpuinfo(tmp_path, PI4_CORE, "Raspberry Pi 4 Model B Rev 1.4")

    outcome = CliRunner().invoke(
        device_app, ["check", "--json", "--cpuinfo", str(info), "--machine", "aarch64"]
    )

    report = json.loads(outcome.stdout)
    assert report["recommended_precision"] == "fp32"
    names = [entry["name"] for entry in report["checks"]]
    assert names == ["architecture", "python", "onnxruntime", "numpy/picamera2", "cpu", "camera"]
    assert outcome.exit_code == (0 if report["ok"] else 1)


def test_check_runs_as_plain_source_without_the_package(tmp_path):
    """Deploy pipes device/check.py to python3 on devices without the runtime."""
    source = Path(check.__file__).read_text()

    done = subprocess.run(
        [sys.executable, "-I", "-", "--json", "--root", str(tmp_path)],
        input=source,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )

    report = json.loads(done.stdout)
    assert [c["name"] for c in report["checks"]][-1] == "disk"
    assert done.returncode in (0, 1)


def test_deploy_root_that_is_a_file_fails(tmp_path):
    blocker = tmp_path / "opt"
    blocker.write_text("not a directory")

    result = check.check_disk(board(tmp_path, disk_path=blocker))

    assert result.status == check.FAIL
    assert "is a file, not a directory" in result.found
