"""The README's promises: its two quick-start commands work from a fresh clone, its config
examples pass the schema, and every flag it shows exists."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def fenced_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def quick_start_commands() -> list[str]:
    """The commands of the first two bash blocks after the 'Quick start' heading."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    blocks = [body for lang, body in FENCE.findall(section) if lang == "bash"][:2]
    return [block.strip() for block in blocks]


def example_command_lines() -> list[list[str]]:
    """Every 'toolkit ...' or 'toolkit-device ...' line of the README's bash blocks."""
    lines = []
    for block in fenced_blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith(("toolkit ", "toolkit-device ")):
                lines.append(shlex.split(command))
    return lines


def test_quick_start_has_two_one_line_commands():
    commands = quick_start_commands()

    assert commands == ["bash scripts/demo.sh", "bash .ci/run"]


def test_readme_examples_use_only_existing_flags():
    from device.cli import app as device_app
    from toolkit.cli import app as host_app

    runner = CliRunner()
    examples = example_command_lines()
    assert len(examples) >= 15

    for words in examples:
        app = host_app if words[0] == "toolkit" else device_app
        help_text = runner.invoke(app, [words[1], "--help"], terminal_width=200).output
        help_flags = set(re.findall(r"--[a-z0-9-]+|(?<![\w-])-[a-zA-Z]\b", help_text))
        used = [w.split("=")[0] for w in words[2:] if w.startswith("-") and w != "-"]
        missing = [flag for flag in used if flag not in help_flags]
        assert not missing, f"{' '.join(words)}: {missing} not in '{words[1]} --help'"


def test_readme_config_examples_pass_the_schema():
    from device.config import DaemonConfig

    blocks = fenced_blocks("yaml")
    assert blocks, "the README shows no config example"

    for block in blocks:
        DaemonConfig.model_validate(yaml.safe_load(block))


@pytest.mark.slow
def test_quick_start_from_a_fresh_clone(tmp_path):
    """Clone the repository and run the README's two commands exactly as written.

    The test command is narrowed to one fast test file through PYTEST_ADDOPTS, so that it
    proves the command (install, lint, pytest) without running this suite inside itself.
    """
    if os.environ.get("EDGE_README_CLONE_TEST") == "inner":
        pytest.skip("already inside the README clone test")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    env = {**os.environ, "EDGE_README_CLONE_TEST": "inner"}
    env.pop("VIRTUAL_ENV", None)
    demo, tests = quick_start_commands()

    main_job = run_shell(demo, clone, env, timeout=1500)

    assert main_job.returncode == 0, main_job.stdout[-4000:]
    assert "verified" in main_job.stdout.lower() or "max |diff|" in main_job.stdout.lower()
    assert "int8" in main_job.stdout.lower()
    detection_lines = [line for line in main_job.stdout.splitlines() if '"detections"' in line]
    assert len(detection_lines) == 40
    labels = {
        label for line in detection_lines for label in re.findall(r'"label":\s*"(\w+)"', line)
    }
    assert len(labels & {"circle", "square", "triangle", "star"}) >= 3, labels
    assert (clone / "out" / "demo" / "shapes-yolov5n.onnx").is_file()

    env["PYTEST_ADDOPTS"] = "tests/test_postprocess.py -q"
    suite = run_shell(tests, clone, env, timeout=1200)

    assert suite.returncode == 0, suite.stdout[-4000:]
    assert re.search(r"\d+ passed", suite.stdout)


def run_shell(command: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


# README examples that need what a test machine lacks, and where the same path is tested.
NEEDS_ELSEWHERE = {
    "--weights yolov5n.pt": "downloads: tests/test_export_download.py on a local server",
    "picamera": "Pi camera: tests/test_sources_picamera.py with a picamera2 stand-in",
    "/dev/video0": "USB camera: tests/test_sources_local.py",
    "tcp://": "network stream: tests/test_sources_stream.py, tests/test_daemon.py",
    "rtsp://": "network stream: tests/test_sources_stream.py",
    "run daemon.yaml": "Pi camera config: tests/test_device_config.py",
    "toolkit deploy": "needs an SSH host: tests/test_deploy.py against a local sshd",
    "toolkit status": "needs an SSH host: tests/test_deploy.py against a local sshd",
}


def runnable_examples() -> list[list[str]]:
    return [
        words
        for words in example_command_lines()
        if not any(marker in " ".join(words) for marker in NEEDS_ELSEWHERE)
    ]


def stage_example_files(folder: Path) -> None:
    """The files the README's examples name, made from the shipped demo assets."""
    from toolkit.demo import DEMO_VAL_DIR, DEMO_VIDEO, DEMO_WEIGHTS

    (folder / "runs/train/exp/weights").mkdir(parents=True)
    for name in ("runs/train/exp/weights/best.pt", "best.pt"):
        shutil.copy(DEMO_WEIGHTS, folder / name)
    for name in ("site.mp4", "clip.mp4"):
        shutil.copy(DEMO_VIDEO, folder / name)
    shutil.copytree(DEMO_VAL_DIR, folder / "val")
    shutil.copytree(DEMO_VAL_DIR / "images", folder / "site-frames")
    shutil.copy(sorted((DEMO_VAL_DIR / "images").glob("*.jpg"))[0], folder / "bus.jpg")
    # The README's config watches for people and cars; the demo model knows shapes.
    config = fenced_blocks("yaml")[0].replace("[person, car]", "[circle, square]")
    (folder / "daemon.yaml").write_text(config)


def run_example(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    module = "toolkit" if words[0] == "toolkit" else "device.cli"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *words[1:]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path):
    """Every example a test machine can run, in README order, on files named as in the
    README (made from the demo model and its data)."""
    stage_example_files(tmp_path)
    examples = runnable_examples()
    assert len(examples) >= 7

    for words in examples:
        if words[:2] == ["toolkit-device", "run"]:
            shutil.copy(tmp_path / "best.onnx", tmp_path / words[words.index("-m") + 1])

        result = run_example(words, tmp_path)

        # --strict may refuse a variant outside a tight budget: exit 3, saying so.
        strict_refusal = "--strict" in words and result.returncode == 3
        assert result.returncode == 0 or strict_refusal, f"{' '.join(words)}\n{result.stdout}"
        if strict_refusal:
            assert "budget (--max-drop" in result.stdout

    assert (tmp_path / "best-384x640.onnx").is_file()
    assert (tmp_path / "best-fp16.onnx").is_file()
    assert list(tmp_path.glob("best-int8-*.onnx"))
    assert (tmp_path / "best-int8-report.md").is_file()
    assert (tmp_path / "out" / "cam.tar.gz").is_file()
