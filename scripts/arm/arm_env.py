#!/usr/bin/env python3
"""An emulated Raspberry Pi (64-bit Raspberry Pi OS) Python on an x86 machine, for tests.

Builds, once, a Debian bookworm arm64 userland with Python 3.11 from Debian's packages, and the
device runtime's dependencies from PyPI's aarch64 wheels, then runs that Python under
``qemu-aarch64-static`` imitating a Pi 4 (Cortex-A72) or a Pi 5 (Cortex-A76).  No emulated
package manager runs: ``debootstrap --download-only`` fetches the .debs, ``dpkg-deb -x`` unpacks
them, and the host's pip installs the wheels for the aarch64 platform.

Everything lands under ``$EDGE_ARM_CACHE`` (default ``.cache/arm`` in the repository); each stage
is keyed by its inputs and skipped when its key is unchanged, so a second build is instant.

Emulated timings say nothing about a real board: use this for correctness only.

Usage:
    python scripts/arm/arm_env.py build
    python scripts/arm/arm_env.py python --cpu pi5 -- -c "import onnxruntime"
    python scripts/arm/arm_env.py test --cpu pi4 --cpu pi5 -- -k tiny
    .venv/bin/python -m pytest tests/test_arm.py   # also makes the x86 references
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("arm_env")

REPO_ROOT = Path(__file__).resolve().parents[2]
QEMU = "qemu-aarch64-static"
SUITE = "bookworm"
MIRROR = os.environ.get("EDGE_ARM_MIRROR", "http://deb.debian.org/debian")
DEBIAN_PACKAGES = ["python3"]
PYTHON = "/usr/bin/python3.11"
PYTHON_VERSION = "3.11"
# Bookworm's glibc is 2.36; older manylinux tags are accepted too.
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux2014_aarch64"]
# Raspberry Pi OS's picamera2 is built against numpy 1.x, so the device venv must stay below 2;
# opencv-python-headless 4.12 and later require numpy 2.
PI_CONSTRAINTS = ["numpy<2", "opencv-python-headless<4.12"]
TEST_TOOLS = ("pytest", "pytest-timeout")
# A release known to die with "Illegal instruction" on a Pi 4 (it needs more than ARMv8.0):
# installed apart, so tests can prove the device check turns that crash into a message.
CRASHING_ONNXRUNTIME = "onnxruntime==1.21.0"
DOWNLOAD_ATTEMPTS = 3
# What the guest takes from the Debian root; every other path is the host's.
GUEST_SYSTEM_DIRS = ("usr", "lib", "lib64", "bin", "sbin", "etc")
ARM_TESTS = REPO_ROOT / "tests" / "arm"


@dataclass(frozen=True)
class CpuProfile:
    """What /proc/cpuinfo says on a board; the kernel's text, one block per core."""

    qemu_cpu: str
    board: str
    part: str
    variant: str
    revision: str
    features: str

    @property
    def has_dotprod(self) -> bool:
        return "asimddp" in self.features.split()

    def cpuinfo(self, cores: int) -> str:
        blocks = [
            f"processor\t: {core}\n"
            "BogoMIPS\t: 108.00\n"
            f"Features\t: {self.features}\n"
            "CPU implementer\t: 0x41\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: {self.variant}\n"
            f"CPU part\t: {self.part}\n"
            f"CPU revision\t: {self.revision}\n"
            for core in range(cores)
        ]
        board = f"Revision\t: c03114\nSerial\t\t: 100000000000e1d0\nModel\t\t: {self.board}\n"
        return "\n".join([*blocks, board])


# Feature lists as printed by Raspberry Pi OS on the boards: the Pi 4's BCM2711 has neither the
# crypto nor the dot-product extension; the Pi 5's BCM2712 has both.
CPUS = {
    "cortex-a72": CpuProfile(
        qemu_cpu="cortex-a72",
        board="Raspberry Pi 4 Model B Rev 1.4",
        part="0xd08",
        variant="0x0",
        revision="3",
        features="fp asimd evtstrm crc32 cpuid",
    ),
    "cortex-a76": CpuProfile(
        qemu_cpu="cortex-a76",
        board="Raspberry Pi 5 Model B Rev 1.0",
        part="0xd0b",
        variant="0x4",
        revision="1",
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
        "asimdrdm lrcpc dcpop asimddp",
    ),
}
CPU_ALIASES = {"pi4": "cortex-a72", "pi5": "cortex-a76"}


class ArmEnvError(RuntimeError):
    """A build or run step failed; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_ARM_CACHE", REPO_ROOT / ".cache" / "arm")).resolve()


def resolve_cpu(name: str) -> CpuProfile:
    key = CPU_ALIASES.get(name, name)
    if key not in CPUS:
        choices = ", ".join([*CPUS, *CPU_ALIASES])
        raise ArmEnvError(f"Unknown CPU '{name}': expected one of {choices}.")
    return CPUS[key]


def device_requirements() -> list[str]:
    """The device runtime's dependencies (pyproject's base list), the Pi's caps, test tools."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ArmEnvError(
            "Reading pyproject.toml needs Python 3.11 or later on the host."
        ) from None
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dev = project.get("optional-dependencies", {}).get("dev", [])
    tools = [req for req in dev if req.split(">")[0].split("=")[0].strip() in TEST_TOOLS]
    return [*project["dependencies"], *PI_CONSTRAINTS, *tools]


def missing_tools(*, for_build: bool) -> list[str]:
    """Host tools that are absent, each with the Debian package that provides it."""
    needed = {QEMU: "qemu-user-static"}
    if for_build:
        needed |= {"debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in needed.items() if not which(tool)]


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


@dataclass(frozen=True)
class ArmEnv:
    """A built environment: the Debian root, the wheels, one view per imitated CPU."""

    cache: Path

    @property
    def root(self) -> Path:
        return self.cache / "root"

    @property
    def site(self) -> Path:
        return self.cache / "site"

    @property
    def crashing_onnxruntime(self) -> Path:
        """A directory holding only CRASHING_ONNXRUNTIME, to put first on PYTHONPATH."""
        return self.cache / "crashing-onnxruntime"

    def view(self, cpu: CpuProfile) -> Path:
        return self.cache / "cpu" / cpu.qemu_cpu

    def python(self, cpu: CpuProfile) -> Path:
        """A host script that starts the emulated Python; also the guest's sys.executable."""
        return self.view(cpu) / "python3"

    def environ(self, cpu: CpuProfile, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PYTHON", "QEMU_", "VIRTUAL_ENV"))
        }
        env |= {
            "QEMU_CPU": cpu.qemu_cpu,
            "PYTHONPATH": os.pathsep.join([str(self.site), str(REPO_ROOT)]),
            "PYTHONNOUSERSITE": "1",
            "EDGE_ARM_CPU": cpu.qemu_cpu,
            "EDGE_ARM_DOTPROD": "1" if cpu.has_dotprod else "0",
            "EDGE_ARM_CRASHING_ORT": str(self.crashing_onnxruntime),
        }
        return env | (extra or {})

    def run_python(
        self,
        cpu: CpuProfile,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run the emulated Python with ``args``; the working directory is the repository."""
        log.debug("emulated python on %s: %s", cpu.qemu_cpu, " ".join(args))
        return subprocess.run(
            [str(self.python(cpu)), *args],
            env=self.environ(cpu, env),
            cwd=REPO_ROOT,
            capture_output=capture,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_python(
        self, cpu: CpuProfile, args: Sequence[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start the emulated Python in the background; stdout and stderr are piped, merged."""
        return subprocess.Popen(
            [str(self.python(cpu)), *args],
            env=self.environ(cpu, env),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run_arm_tests(
        self,
        cpu: CpuProfile,
        pytest_args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        capture: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run pytest on tests/arm (or the tests named in ``pytest_args``) inside."""
        args = arm_pytest_args(pytest_args)
        return self.run_python(cpu, args, env=env, timeout=timeout, capture=capture)


def arm_pytest_args(pytest_args: Sequence[str] = ()) -> list[str]:
    """The emulated Python's arguments to run pytest on tests/arm with ``pytest_args``."""
    # The suite's own conftest may import host-only tools (torch, onnx): stop at tests/arm.
    names_tests = any(Path(REPO_ROOT, arg.split("::")[0]).exists() for arg in pytest_args)
    return [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--confcutdir",
        str(ARM_TESTS),
        "--rootdir",
        str(REPO_ROOT),
        "-ra",
        *pytest_args,
        *([] if names_tests else [str(ARM_TESTS)]),
    ]


def build(*, force: bool = False) -> ArmEnv:
    """Build (or reuse) the arm64 root, the aarch64 wheels and the per-CPU views."""
    problems = missing_tools(for_build=False)
    if problems:
        raise ArmEnvError(f"Missing host tools: {', '.join(problems)}.")

    env = ArmEnv(cache_dir())
    env.cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(env.cache):
        started = time.monotonic()
        _build_root(env, force=force)
        _install_wheels(env.site, device_requirements(), force=force)
        _install_wheels(env.crashing_onnxruntime, [CRASHING_ONNXRUNTIME], force=force, deps=False)
        for cpu in CPUS.values():
            _write_view(env, cpu)
        log.info("arm64 environment ready in %.0f s at %s", time.monotonic() - started, env.cache)
    return env


@contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stage_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _is_current(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text().strip() == key


def _build_root(env: ArmEnv, *, force: bool) -> None:
    """Debian's arm64 Python 3.11, unpacked from the packages debootstrap downloads."""
    key = _stage_key(SUITE, MIRROR, DEBIAN_PACKAGES, "minbase")
    stamp = env.cache / "root.stamp"
    if not force and _is_current(stamp, key) and (env.root / PYTHON.lstrip("/")).exists():
        log.info("arm64 root up to date: %s", env.root)
        return

    problems = missing_tools(for_build=True)
    if problems:
        raise ArmEnvError(f"Missing host tools to build the arm64 root: {', '.join(problems)}.")
    if os.geteuid() != 0:
        raise ArmEnvError(
            "debootstrap needs root to build the arm64 root once; run "
            "'sudo python3 scripts/arm/arm_env.py build' (later runs need no root)."
        )

    debs = _download_debs(env.cache / "debootstrap")
    with _staged(env.root, stamp, key) as staging:
        log.info("unpacking %d arm64 packages", len(debs))
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(staging)], what=f"unpacking {deb.name}")
        _precompile_stdlib(staging)
    log.info("arm64 root built: %s", env.root)


@contextmanager
def _staged(target: Path, stamp: Path, key: str) -> Iterator[Path]:
    """A scratch directory that replaces ``target`` (and stamps it) only if the block succeeds,
    so an interrupted build leaves the previous stage or nothing, never half of one."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stamp.unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    stamp.write_text(key)


def _download_debs(workdir: Path) -> list[Path]:
    """The .debs of a minimal bookworm with python3, fetched with retries."""
    archives = workdir / "var" / "cache" / "apt" / "archives"
    command = [
        which("debootstrap") or "debootstrap",
        "--download-only",
        "--arch=arm64",
        "--variant=minbase",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        SUITE,
        str(workdir),
        MIRROR,
    ]
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        log.info("downloading arm64 packages from %s (attempt %d)", MIRROR, attempt)
        # debootstrap refuses a target that holds a previous partial run's state.
        shutil.rmtree(workdir / "debootstrap", ignore_errors=True)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return sorted(archives.glob("*.deb"))
        tail = _tail(result.stdout + result.stderr)
        log.warning("debootstrap failed (exit %d): %s", result.returncode, tail)
        if attempt < DOWNLOAD_ATTEMPTS:
            time.sleep(5 * attempt)
    raise ArmEnvError(
        f"Could not download Debian {SUITE} arm64 packages from {MIRROR} after "
        f"{DOWNLOAD_ATTEMPTS} attempts; last output:\n{tail}\n"
        "Check that the mirror is reachable, or set EDGE_ARM_MIRROR to another Debian mirror."
    )


def _precompile_stdlib(root: Path) -> None:
    # Debian compiles .pyc in a postinst script that never runs here; compiling them on the
    # host (same 3.11 bytecode) saves every emulated start from compiling the stdlib.
    stdlib = root / "usr" / "lib" / f"python{PYTHON_VERSION}"
    if sys.version_info[:2] != (3, 11):
        log.info("host python is not 3.11: the emulated python compiles its stdlib itself")
        return
    command = [sys.executable, "-m", "compileall", "-q", "-j0", "-s", str(root), "-p", "/"]
    _run([*command, str(stdlib)], what="precompiling the arm64 stdlib", check=False)


def _install_wheels(
    target: Path, requirements: list[str], *, force: bool, deps: bool = True
) -> None:
    """aarch64 wheels for ``requirements`` in ``target``, installed by the host's pip."""
    key = _stage_key(requirements, WHEEL_PLATFORMS, PYTHON_VERSION, deps)
    stamp = target.with_name(target.name + ".stamp")
    if not force and _is_current(stamp, key) and target.is_dir():
        log.info("aarch64 wheels up to date: %s", target)
        return

    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-warn-conflicts",
        "--retries=5",
        "--timeout=60",
        *platforms,
        "--only-binary=:all:",
        f"--python-version={PYTHON_VERSION}",
        "--implementation=cp",
        f"--abi=cp{PYTHON_VERSION.replace('.', '')}",
        *([] if deps else ["--no-deps"]),
        *requirements,
    ]
    log.info("installing aarch64 wheels: %s", " ".join(requirements))
    with _staged(target, stamp, key) as staging:
        _run(
            [*command, "--target", str(staging)],
            what="installing the aarch64 wheels",
            hint="Every requirement needs an aarch64 cp311 wheel on PyPI; check the message "
            "above for the one without, and the package index's reachability.",
        )
    log.info("aarch64 wheels installed in %s: %s", target.name, _installed_versions(target))


def _installed_versions(site: Path) -> str:
    names = sorted(path.name.removesuffix(".dist-info") for path in site.glob("*.dist-info"))
    return ", ".join(name.replace("-", "==", 1) for name in names)


def _write_view(env: ArmEnv, cpu: CpuProfile) -> None:
    """A root for one CPU: links to the shared root's system dirs, plus its own /proc/cpuinfo.

    Under ``qemu -L ROOT`` the guest's ``/proc/cpuinfo`` is ``ROOT/proc/cpuinfo`` when that file
    exists.  onnxruntime's CPU probe crashes on the host's x86 text, and the device check reads
    the features from it, so each imitated CPU gets its board's text.  Only the system dirs are
    linked: a linked /tmp or /root would shadow the host paths the tests hand to the guest (and
    os.path.realpath would follow the link away from them).
    """
    rootfs = env.view(cpu) / "root"
    rootfs.mkdir(parents=True, exist_ok=True)
    for entry in rootfs.iterdir():
        if entry.is_symlink() and entry.name not in GUEST_SYSTEM_DIRS:
            entry.unlink()
    for name in GUEST_SYSTEM_DIRS:
        link = rootfs / name
        if (env.root / name).exists() and not link.is_symlink():
            link.symlink_to(env.root / name)
    (rootfs / "proc").mkdir(exist_ok=True)
    _write_atomic(rootfs / "proc" / "cpuinfo", cpu.cpuinfo(os.cpu_count() or 1))

    # The guest cannot exec aarch64 binaries without binfmt_misc, which containers rarely have:
    # its sys.executable is this host script (qemu's -0 sets argv[0]), so a subprocess started
    # with sys.executable is emulated too, on the same CPU.
    qemu = which(QEMU) or QEMU
    script = (
        "#!/bin/sh\n"
        "# qemu writes a core file into the working directory when the guest crashes (tests\n"
        "# crash it on purpose): none.\n"
        "ulimit -c 0\n"
        f'exec "{qemu}" -L "{rootfs}" -0 "{env.python(cpu)}" "{rootfs}{PYTHON}" "$@"\n'
    )
    _write_atomic(env.python(cpu), script, mode=0o755)


def _write_atomic(path: Path, text: str, *, mode: int = 0o644) -> None:
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _run(
    command: Sequence[str], *, what: str, hint: str = "", check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 and check:
        raise ArmEnvError(
            f"Failed {what} (exit {result.returncode}): {_tail(result.stdout + result.stderr)}"
            + (f"\n{hint}" if hint else "")
        )
    return result


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def smoke_test(env: ArmEnv, cpu: CpuProfile) -> str:
    """Import the runtime's native dependencies on ``cpu``; the versions, or an error."""
    code = (
        "import platform, numpy, cv2, onnxruntime; "
        "print(platform.machine(), 'numpy', numpy.__version__, 'opencv', cv2.__version__, "
        "'onnxruntime', onnxruntime.__version__)"
    )
    result = env.run_python(cpu, ["-c", code], timeout=300)
    if result.returncode != 0:
        raise ArmEnvError(
            f"The emulated python on {cpu.qemu_cpu} could not import the runtime's dependencies "
            f"(exit {result.returncode}): {_tail(result.stderr)}\n"
            f"Rebuild with 'python scripts/arm/arm_env.py build --force'."
        )
    return result.stdout.strip()


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build_cmd = commands.add_parser("build", help="build or reuse the environment")
    build_cmd.add_argument("--force", action="store_true", help="rebuild every stage")

    for name, summary in (
        ("python", "run the emulated python with the given arguments"),
        ("test", "run pytest on tests/arm (or the given pytest arguments) inside"),
    ):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument(
            "--cpu",
            action="append",
            help="cortex-a72 (pi4) or cortex-a76 (pi5); repeat for several (test default: both)",
        )
        sub.add_argument(
            "--refs", type=Path, help="x86 reference directory for tests/arm (EDGE_ARM_REFS)"
        )
        sub.add_argument("args", nargs=argparse.REMAINDER, help="arguments after --")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        env = build(force=getattr(args, "force", False))
        if args.command == "build":
            for cpu in CPUS.values():
                log.info("%s: %s", cpu.qemu_cpu, smoke_test(env, cpu))
            return 0

        extra = [arg for arg in args.args if arg != "--"] if args.args else []
        default_cpus = list(CPUS) if args.command == "test" else ["cortex-a76"]
        cpus = [resolve_cpu(name) for name in args.cpu or default_cpus]
        refs = {"EDGE_ARM_REFS": str(args.refs.resolve())} if args.refs else {}
        worst = 0
        for cpu in cpus:
            if args.command == "python":
                result = env.run_python(cpu, extra, env=refs, capture=False, timeout=3600)
            else:
                log.info("tests/arm on %s (%s)", cpu.qemu_cpu, cpu.board)
                result = env.run_arm_tests(cpu, extra, env=refs, capture=False, timeout=3600)
            worst = max(worst, result.returncode)
        return worst
    except ArmEnvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
