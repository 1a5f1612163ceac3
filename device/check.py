"""Is this board ready to run the detector?  One pass/warn/fail line per fact, with what to do.

This module uses the standard library only, and imports nothing from the rest of the package:
``toolkit deploy`` sends its source to ``python3 -`` on a device that may not have the runtime
installed yet.  Run it as ``toolkit-device check`` or ``python3 -m device.check``.

Everything that reads the machine (architecture, ``/proc/cpuinfo``, ``/dev``, ``/sys``, the
interpreters to probe) comes from ``CheckEnvironment`` so tests can describe any board.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

PASS, WARN, FAIL = "pass", "warn", "fail"
MIN_PYTHON = (3, 10)
ARM64_NAMES = ("aarch64", "arm64")
ARM32_NAMES = ("armv6l", "armv7l", "armv8l", "arm")
# Cortex parts seen on Raspberry Pi-class boards ("CPU part" in /proc/cpuinfo, implementer 0x41).
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd41": "Cortex-A78",
}
PROBE_TIMEOUT_S = 60


@dataclass
class CheckResult:
    """One checked fact: its status, what was found, and what to do when it is not a pass."""

    name: str
    status: str
    found: str
    advice: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class CheckEnvironment:
    """Where the checks look; every default reads the running machine."""

    machine: str = field(default_factory=platform.machine)
    pointer_bits: int = field(default_factory=lambda: struct.calcsize("P") * 8)
    python_version: tuple[int, int, int] = field(
        default_factory=lambda: tuple(sys.version_info[:3])
    )
    cpuinfo_path: Path = Path("/proc/cpuinfo")
    sys_dir: Path = Path("/sys")
    # The interpreter that runs (or will run) the detector; the probes import from it.
    runtime_python: str = field(default_factory=lambda: sys.executable)
    # The OS interpreter, whose dist-packages hold picamera2 on Raspberry Pi OS.
    system_python: str = "/usr/bin/python3"
    # True when deploy will install the runtime afterwards: a missing package is then expected.
    runtime_pending: bool = False
    disk_path: Path | None = None
    min_free_mb: float = 200.0
    min_onnxruntime: str = ""
    bundle_precisions: tuple[str, ...] = ()
    list_cameras_command: tuple[str, ...] = ("rpicam-hello", "--list-cameras")


def run_checks(env: CheckEnvironment | None = None) -> list[CheckResult]:
    """Every check, in the order a person would fix them."""
    env = env or CheckEnvironment()
    results = [check_architecture(env), check_python(env)]
    results.append(check_onnxruntime(env))
    results.append(check_numpy_picamera2(env))
    results.append(check_cpu_features(env))
    results.append(check_camera(env))
    if env.disk_path is not None:
        results.append(check_disk(env))
    return results


def check_architecture(env: CheckEnvironment) -> CheckResult:
    machine = env.machine.lower()
    if machine in ARM64_NAMES and env.pointer_bits == 64:
        return CheckResult("architecture", PASS, f"{env.machine}, 64-bit userland")
    if machine in ARM32_NAMES or (machine in ARM64_NAMES and env.pointer_bits == 32):
        return CheckResult(
            "architecture",
            FAIL,
            f"{env.machine} with a {env.pointer_bits}-bit userland (32-bit ARM OS)",
            "onnxruntime publishes no 32-bit ARM wheels: flash the 64-bit Raspberry Pi OS "
            "(Bookworm, arm64) and deploy again.",
        )
    if env.pointer_bits == 64:
        return CheckResult(
            "architecture", PASS, f"{env.machine}, 64-bit (not an ARM board: fine for testing)"
        )
    return CheckResult(
        "architecture",
        FAIL,
        f"{env.machine} with a {env.pointer_bits}-bit userland",
        "Use a 64-bit OS: onnxruntime has no 32-bit wheels.",
    )


def check_python(env: CheckEnvironment) -> CheckResult:
    found = ".".join(str(part) for part in env.python_version)
    if tuple(env.python_version[:2]) >= MIN_PYTHON:
        return CheckResult("python", PASS, f"Python {found}")
    wanted = ".".join(str(part) for part in MIN_PYTHON)
    return CheckResult(
        "python",
        FAIL,
        f"Python {found}",
        f"The runtime needs Python >= {wanted}: upgrade to Raspberry Pi OS Bookworm (Python 3.11).",
    )


def check_onnxruntime(env: CheckEnvironment) -> CheckResult:
    """Import onnxruntime in a child process, so an illegal-instruction crash is a message."""
    code = "import onnxruntime, sys; sys.stdout.write(onnxruntime.__version__)"
    outcome = _run_probe([env.runtime_python, "-c", code])
    if outcome.crashed_with:
        return CheckResult(
            "onnxruntime",
            FAIL,
            f"'import onnxruntime' in {env.runtime_python} crashed: {outcome.crashed_with}",
            "This onnxruntime build uses instructions this CPU lacks (seen with 1.21.0 on "
            "Pi 4). Install another version, e.g. pip install 'onnxruntime!=1.21.0'.",
        )
    if outcome.returncode != 0:
        if env.runtime_pending:
            return CheckResult(
                "onnxruntime",
                PASS,
                f"not installed in {env.runtime_python} yet; deploy installs it",
                data={"version": None},
            )
        return CheckResult(
            "onnxruntime",
            FAIL,
            f"not importable from {env.runtime_python}: {_last_line(outcome.stderr)}",
            "Install the runtime: pip install edge-yolo-toolkit (inside the venv the "
            "service uses), or deploy with 'toolkit deploy'.",
        )
    version = outcome.stdout.strip()
    too_old = env.min_onnxruntime and _version_tuple(version) < _version_tuple(env.min_onnxruntime)
    if too_old and env.runtime_pending:
        return CheckResult(
            "onnxruntime",
            PASS,
            f"onnxruntime {version} here; deploy installs >= {env.min_onnxruntime} in the venv",
            data={"version": version},
        )
    if too_old:
        return CheckResult(
            "onnxruntime",
            FAIL,
            f"onnxruntime {version}, but the model needs >= {env.min_onnxruntime}",
            f"pip install 'onnxruntime>={env.min_onnxruntime}', or export the model with a "
            "lower opset.",
            data={"version": version},
        )
    return CheckResult("onnxruntime", PASS, f"onnxruntime {version}", data={"version": version})


def check_numpy_picamera2(env: CheckEnvironment) -> CheckResult:
    """The OS's picamera2 is built against numpy 1.x: numpy 2 in the venv breaks its import."""
    has_picamera2 = _has_module(env.system_python, "picamera2")
    numpy_version = _module_version(env.runtime_python, "numpy")
    data = {"picamera2": has_picamera2, "numpy": numpy_version}
    if not has_picamera2:
        found = f"no system picamera2; numpy {numpy_version or 'not installed'}"
        return CheckResult(
            "numpy/picamera2", PASS, found + " (USB, file and network sources only)", data=data
        )
    if numpy_version is None:
        if env.runtime_pending:
            return CheckResult(
                "numpy/picamera2",
                PASS,
                "system picamera2 found; deploy installs numpy<2 next to it",
                data=data,
            )
        return CheckResult(
            "numpy/picamera2",
            FAIL,
            f"system picamera2 found, but numpy is not importable from {env.runtime_python}",
            "pip install 'numpy<2' in the venv (created with --system-site-packages).",
            data=data,
        )
    if _version_tuple(numpy_version) >= (2,):
        return CheckResult(
            "numpy/picamera2",
            FAIL,
            f"numpy {numpy_version} with the OS's picamera2, which is built against numpy 1.x",
            "pip install 'numpy<2' in the venv, or picamera2 fails to import.",
            data=data,
        )
    return CheckResult(
        "numpy/picamera2", PASS, f"numpy {numpy_version} with system picamera2", data=data
    )


def check_cpu_features(env: CheckEnvironment) -> CheckResult:
    """Which precision is faster here: INT8 needs the ARM dot-product extension (or x86 VNNI)."""
    try:
        cpuinfo = parse_cpuinfo(env.cpuinfo_path.read_text(errors="replace"))
    except OSError as exc:
        return CheckResult(
            "cpu",
            WARN,
            f"cannot read {env.cpuinfo_path}: {exc.strerror}",
            "Use the FP32 model unless you have measured INT8 on this board.",
            data={"recommended_precision": "fp32"},
        )
    precision, reason = recommend_precision(env.machine, cpuinfo["features"])
    found = f"{cpuinfo['cores']} cores, {cpuinfo['model'] or env.machine}; {reason}"
    data = {"recommended_precision": precision, **cpuinfo}
    if env.bundle_precisions and precision not in env.bundle_precisions:
        return CheckResult(
            "cpu",
            WARN,
            found,
            f"The bundle has {'/'.join(env.bundle_precisions).upper()} only; "
            f"{precision.upper()} would be faster here: bundle that model too.",
            data=data,
        )
    return CheckResult("cpu", PASS, f"{found}: use {precision.upper()}", data=data)


def parse_cpuinfo(text: str) -> dict:
    """Cores, a model name and the feature flags common to every core."""
    blocks = [block for block in text.split("\n\n") if block.strip()]
    feature_sets, parts, names, board = [], [], [], ""
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        flags = fields.get("features", fields.get("flags"))
        if flags is None:
            board = fields.get("model", board)  # the Pi's trailing block names the board
            continue
        feature_sets.append(set(flags.split()))
        if "cpu part" in fields:
            parts.append(ARM_PARTS.get(fields["cpu part"].lower(), f"part {fields['cpu part']}"))
        if "model name" in fields:
            names.append(fields["model name"])
    features = set.intersection(*feature_sets) if feature_sets else set()
    cpu = ", ".join(sorted(set(parts))) or (names[0] if names else "")
    model = f"{board} ({cpu})" if board and cpu else board or cpu
    return {"cores": len(feature_sets), "model": model, "features": sorted(features)}


def recommend_precision(machine: str, features: list[str]) -> tuple[str, str]:
    flags = set(features)
    if machine.lower() in ARM64_NAMES + ARM32_NAMES:
        if "asimddp" in flags:
            return "int8", "has asimddp (dot product): INT8 runs faster than FP32"
        return "fp32", "no asimddp (dot product): INT8 can be slower than FP32 here"
    # Measured on a 2-core EPYC with VNNI: only one INT8 variant beat FP32, and it lost
    # detections; x86 is a test host here, not a target.
    return "fp32", "x86: INT8 is at best on par with FP32 and loses detections"


def check_camera(env: CheckEnvironment) -> CheckResult:
    """A CSI camera (libcamera lists it) or a USB camera (a uvcvideo capture node)."""
    csi = _list_csi_cameras(env.list_cameras_command)
    usb = _usb_capture_nodes(env.sys_dir)
    data = {"csi": csi, "usb": usb}
    if csi or usb:
        found = "; ".join(
            part
            for part in (
                f"CSI: {', '.join(csi)}" if csi else "",
                f"USB: {', '.join(usb)}" if usb else "",
            )
            if part
        )
        return CheckResult("camera", PASS, found, data=data)
    return CheckResult(
        "camera",
        WARN,
        "no CSI or USB camera found",
        "Connect a camera (CSI ribbon with the Pi off, or USB) if the config uses one; file "
        "and network sources work without.",
        data=data,
    )


def check_disk(env: CheckEnvironment) -> CheckResult:
    if env.disk_path.exists() and not env.disk_path.is_dir():
        return CheckResult(
            "disk",
            FAIL,
            f"{env.disk_path} is a file, not a directory",
            "Move the file away or deploy to another --root; the deploy root holds releases.",
        )
    path = _existing_parent(env.disk_path)
    free_mb = shutil.disk_usage(path).free / 1e6
    data = {"path": str(path), "free_mb": round(free_mb, 1), "needed_mb": env.min_free_mb}
    if free_mb < env.min_free_mb:
        return CheckResult(
            "disk",
            FAIL,
            f"{free_mb:.1f} MB free on {path}, need {env.min_free_mb:.1f} MB",
            "Free space on the device (old releases, logs, apt caches: sudo apt clean) "
            "and try again.",
            data=data,
        )
    if not os.access(path, os.W_OK):
        return CheckResult(
            "disk",
            FAIL,
            f"{path} is not writable by this user",
            f"Create the deploy root once: sudo install -d -o $USER {env.disk_path}",
            data=data,
        )
    return CheckResult("disk", PASS, f"{free_mb:.1f} MB free on {path}", data=data)


def format_report(results: list[CheckResult]) -> str:
    width = max(len(result.name) for result in results)
    lines = []
    for result in results:
        lines.append(f"{result.status.upper():4}  {result.name:{width}}  {result.found}")
        if result.advice and result.status != PASS:
            lines.append(f"{'':4}  {'':{width}}  -> {result.advice}")
    failed = sum(result.status == FAIL for result in results)
    lines.append("ready" if not failed else f"not ready: {failed} check(s) failed")
    return "\n".join(lines)


def report_json(results: list[CheckResult]) -> dict:
    cpu = next((result for result in results if result.name == "cpu"), None)
    return {
        "ok": not any(result.status == FAIL for result in results),
        "recommended_precision": cpu.data.get("recommended_precision") if cpu else None,
        "checks": [asdict(result) for result in results],
    }


@dataclass
class _ProbeOutcome:
    returncode: int
    stdout: str
    stderr: str
    crashed_with: str = ""


def _run_probe(command: list[str]) -> _ProbeOutcome:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return _ProbeOutcome(127, "", f"{command[0]} not found")
    except subprocess.TimeoutExpired:
        return _ProbeOutcome(124, "", f"no answer within {PROBE_TIMEOUT_S} s")
    crashed_with = ""
    if done.returncode < 0:
        try:
            crashed_with = (
                f"{signal.Signals(-done.returncode).name} ({signal.strsignal(-done.returncode)})"
            )
        except ValueError:
            crashed_with = f"signal {-done.returncode}"
    return _ProbeOutcome(done.returncode, done.stdout, done.stderr, crashed_with)


def _has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return _run_probe([python, "-c", code]).returncode == 0


def _module_version(python: str, module: str) -> str | None:
    code = f"import {module}, sys; sys.stdout.write({module}.__version__)"
    outcome = _run_probe([python, "-c", code])
    return outcome.stdout.strip() if outcome.returncode == 0 else None


def _list_csi_cameras(command: tuple[str, ...]) -> list[str]:
    if not command or shutil.which(command[0]) is None:
        return []
    outcome = _run_probe(list(command))
    # rpicam-hello prints "0 : imx708 [4608x2592 10-bit RGGB] (/base/...)" per camera.
    cameras = []
    for line in outcome.stdout.splitlines():
        index, sep, rest = line.strip().partition(" : ")
        if sep and index.isdigit():
            cameras.append(rest.split()[0])
    return cameras


def _usb_capture_nodes(sys_dir: Path) -> list[str]:
    nodes = []
    for node in sorted((sys_dir / "class" / "video4linux").glob("video*")):
        driver = node / "device" / "driver"
        if driver.exists() and driver.resolve().name == "uvcvideo":
            index_file = node / "index"
            index = index_file.read_text().strip() if index_file.exists() else "0"
            if index == "0":  # each UVC camera also has a metadata node with index 1
                nodes.append(f"/dev/{node.name}")
    return nodes


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(char for char in part if char.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
        if not part.isdigit():
            break
    return tuple(numbers)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device.check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", type=Path, help="check free space where releases will go")
    parser.add_argument("--min-free-mb", type=float, default=200.0)
    parser.add_argument("--min-onnxruntime", default="")
    parser.add_argument("--precisions", default="", help="comma list of the bundle's models")
    parser.add_argument("--runtime-python", default=sys.executable)
    parser.add_argument("--system-python", default="/usr/bin/python3")
    parser.add_argument("--runtime-pending", action="store_true")
    parser.add_argument("--cpuinfo", type=Path, default=Path("/proc/cpuinfo"))
    parser.add_argument("--machine", default=platform.machine())
    return parser


def environment_from_args(args: argparse.Namespace) -> CheckEnvironment:
    return CheckEnvironment(
        machine=args.machine,
        cpuinfo_path=args.cpuinfo,
        runtime_python=args.runtime_python,
        system_python=args.system_python,
        runtime_pending=args.runtime_pending,
        disk_path=args.root,
        min_free_mb=args.min_free_mb,
        min_onnxruntime=args.min_onnxruntime,
        bundle_precisions=tuple(p for p in args.precisions.split(",") if p),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_checks(environment_from_args(args))
    if args.json:
        print(json.dumps(report_json(results), indent=2))
    else:
        print(format_report(results))
    return 0 if report_json(results)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
