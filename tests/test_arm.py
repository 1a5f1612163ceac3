"""The device runtime under emulated aarch64 (a Pi 4 and a Pi 5), compared with x86.

This host side builds (or reuses) the emulated environment of scripts/arm/arm_env.py, makes
x86 references (models, input tensors, onnxruntime outputs, detections, daemon JSON lines) in a
temporary directory, and runs tests/arm inside the emulated Python once per imitated CPU, both
CPUs at once.  Emulated timings mean nothing: nothing here measures speed.

Tolerances, and what was measured with onnxruntime 1.32 (host: AMD EPYC with AVX-512 VNNI):

- FP32: obj/cls columns within 1e-4 (measured 1e-5), boxes within 1e-4 of the input size
  (measured 2.3e-3 px at 640); the same detections.
- Static INT8 (QDQ), both presets: ARM's integer kernels and x86's may round differently, and
  the differences grow through the network.  Whether they do depends on the calibrated scales:
  the x86 preset came out bit-identical at 320, yet at 640 (other scales) single obj/cls values
  differed by up to 0.14; the arm64 preset differs by up to 0.11-0.21, box rows of unlikely
  anchors by up to 150 px.  DOMAIN.md's "~6e-3 on sigmoid outputs" holds for the bulk, not the
  maximum.  So the claims are: the mean obj/cls difference stays under 2.5e-3 (measured up to
  4.1e-4 x86 preset, 7.4-11e-4 arm64 preset), the 99th percentile under 0.03 (measured up to
  0.008 and 0.013-0.019), ARM's result is as close to the FP32 model as x86's (mean-error ratio
  under 1.25, measured 0.97-1.02), and confident detections (score >= 0.35) match: same class,
  IoU >= 0.5, score within 0.15 (measured worst: IoU 0.67 on a 0.4-score object, score gap
  0.11, over 8 real images at 640).
- Photos decode and letterbox bit-identically on ARM; video frames do not (up to 3 grey levels,
  see tests/arm/test_daemon.py).
- The Pi 4 (no dot product) and the Pi 5 compute identical INT8 outputs (FP32 too, measured).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REALDATA, REPO_ROOT, realdata_file

pytestmark = [pytest.mark.arm]

TINY_ATOL = 1e-5
FP32_TOLERANCE = {
    "elementwise": {"score_atol": 1e-4, "box_atol_fraction": 1e-4},
    "detections": {"min_iou": 0.99, "score_atol": 1e-3, "margin": 0.0},
}
INT8_TOLERANCE = {
    "statistics": {"score_mean_atol": 2.5e-3, "score_p99_atol": 0.03, "fp32_error_ratio": 1.25},
    "detections": {"min_iou": 0.5, "score_atol": 0.15, "margin": 0.1},
}
CALIBRATION_SAMPLES = 32
PROOF_SAMPLES = 8
DAEMON_FRAMES = 3
DAEMON_CLIP_START_S = 25  # people and a skateboard are in view from here on
ARM_SUITE_TIMEOUT_S = 900
OWN_ARM_MODULES = {
    f"tests.arm.{name}"
    for name in ("test_runtime", "test_models", "test_daemon", "test_device_check")
}


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
    manifest = {"models": {"tiny": _tiny_reference(refs)}, "runtime": _runtime_install(refs)}
    if (REALDATA / "models" / "yolov5n.pt").exists():
        from toolkit.export import export_model

        fp32 = export_model(
            realdata_file("models/yolov5n.pt"), refs / "yolov5n-320.onnx", imgsz=320
        )
        manifest["models"] |= _yolov5n_references(refs, fp32)
        manifest["video"] = _daemon_reference(refs, fp32)
    (refs / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return refs


def _runtime_install(refs: Path) -> dict:
    """The runtime wheel 'toolkit bundle' ships, installed as pip installs it on a board.

    Pure Python, so the host's pip unpacks it for the board; its dependencies are the emulated
    environment's, resolved from the same pyproject list.
    """
    from toolkit.bundle import build_runtime_wheel

    wheel = build_runtime_wheel(refs)
    target = refs / "runtime"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    command += ["--target", str(target), str(wheel)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return {"wheel": str(wheel), "path": str(target)}


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
    case = {
        "name": "random",
        "input": _save(refs / "tiny-input.npy", tensor),
        "output": _save(refs / "tiny-output.npy", output),
    }
    tolerance = {"elementwise": {"score_atol": TINY_ATOL, "box_atol_fraction": None}}
    return {"path": str(path), "precision": "fp32", "tolerance": tolerance, "cases": [case]}


def _yolov5n_references(refs: Path, fp32: Path) -> dict:
    """The exporter's FP32 model and its static INT8 versions, each run on x86 on real photos.

    The models are exported at 320: emulation runs yolov5n at 640 in 15-40 s a photo, at 320
    in a quarter of that, with the same operators and kernels.  (The 640 export was compared
    by hand on bus and zidane: obj/cls within 6e-6, boxes within 2.3e-3 px, same detections.)
    """
    photos = {"bus": realdata_file("images/bus.jpg"), "zidane": realdata_file("images/zidane.jpg")}
    references = {"fp32-320": _model_reference(refs, "fp32-320", fp32, photos, FP32_TOLERANCE)}
    for preset in ("x86", "arm64"):
        name = f"int8-{preset}-320"
        int8_path = _quantize(fp32, refs / name, preset)
        references[name] = _model_reference(
            refs, name, int8_path, photos, INT8_TOLERANCE, fp32_path=fp32
        )
    return references


def _quantize(fp32_path: Path, folder: Path, preset: str) -> Path:
    """Static INT8 QDQ as ``toolkit quantize --preset PRESET`` makes it, from real frames."""
    from toolkit.prove import QuantizeRequest, output_paths, quantize_and_prove

    folder.mkdir(exist_ok=True)
    request = QuantizeRequest(
        model=fp32_path,
        data=[realdata_file("coco8"), realdata_file("video/car-detection.mp4")],
        preset=preset,
        samples=CALIBRATION_SAMPLES,
        eval_samples=PROOF_SAMPLES,
        search=False,  # the preset's recipe as it is; the search is the quantizer's to test
        latency_runs=1,
        output_dir=folder,
    )
    quantize_and_prove(request)
    return output_paths(request, preset)["static"]


def _model_reference(
    refs: Path,
    name: str,
    model_path: Path,
    photos: dict[str, Path],
    tolerance: dict,
    *,
    fp32_path: Path | None = None,
) -> dict:
    """Each photo's x86 input tensor, output rows and detections, as the device computes them."""
    import cv2

    from device.infer import Detector, SessionConfig

    detector = Detector(model_path, session_config=SessionConfig(intra_op_threads=2))
    fp32 = (
        Detector(fp32_path, session_config=SessionConfig(intra_op_threads=2)) if fp32_path else None
    )
    cases = []
    for photo, path in photos.items():
        tensor, transform = detector.preprocess(cv2.imread(str(path)))
        rows = detector.infer(tensor)
        case = {
            "name": photo,
            "image": str(path),
            "input": _save(refs / f"{name}-{photo}-input.npy", tensor),
            "output": _save(refs / f"{name}-{photo}-output.npy", rows[np.newaxis]),
            "detections": [d.as_dict() for d in detector.postprocess(rows, transform)],
        }
        if fp32 is not None:
            fp32_rows = fp32.infer(tensor)[np.newaxis]
            case["fp32_output"] = _save(refs / f"{name}-{photo}-fp32.npy", fp32_rows)
        cases.append(case)
    return {
        "path": str(model_path),
        "precision": detector.info.precision,
        "preset": detector.info.quantization.preset if detector.info.quantization else "",
        "tolerance": tolerance,
        "cases": cases,
    }


def _save(path: Path, array: np.ndarray) -> str:
    np.save(path, array)
    return str(path)


def _daemon_reference(refs: Path, model: Path) -> dict:
    """A real clip with people in view, and the JSON lines x86's daemon writes for it.

    The clip holds exactly the frames the daemon is asked for: with more, the pipeline starts
    on the next one, and emulated inference outlasts the daemon's 10 s wait at exit.
    """
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is needed to cut the daemon's video clip (apt-get install ffmpeg)")
    clip = refs / "people.mp4"
    video = realdata_file("video/one-by-one-person-detection.mp4")
    cut = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-ss", str(DAEMON_CLIP_START_S),
        "-i", str(video), "-frames:v", str(DAEMON_FRAMES), "-an",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-y", str(clip),
    ]  # fmt: skip
    subprocess.run(cut, check=True, timeout=60)

    jsonl = refs / "daemon-x86.jsonl"
    command = daemon_command(sys.executable, model, clip, jsonl)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, f"the x86 daemon failed: {done.stderr[-2000:]}"
    return {
        "model": str(model),
        "source": str(clip),
        "frames": DAEMON_FRAMES,
        "x86_jsonl": str(jsonl),
        "command": daemon_command("PYTHON", model, clip, Path("OUTPUT")),
    }


def daemon_command(python: str, model: Path, source: Path, jsonl: Path) -> list[str]:
    """``toolkit-device run`` for a bounded number of frames, JSON lines to a file."""
    return [
        python, "-m", "device.cli", "run", "--model", str(model), "--source", str(source),
        "--jsonl", str(jsonl), "--max-frames", str(DAEMON_FRAMES), "--threads", "1",
        "--frame-policy", "every", "--http-port", "0", "--log-level", "warning",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def arm_runs(arm, arm_refs, tmp_path_factory) -> dict:
    """tests/arm on each imitated CPU, all at once: returncode, output, report, saved outputs."""
    runs = {}
    for name, cpu in arm_env.CPUS.items():
        workdir = tmp_path_factory.mktemp(f"arm-{name}")
        (workdir / "outputs").mkdir()
        report = workdir / "report.xml"
        args = arm_env.arm_pytest_args([str(arm_env.ARM_TESTS), f"--junitxml={report}", "-q"])
        env = {"EDGE_ARM_REFS": str(arm_refs), "EDGE_ARM_OUT": str(workdir / "outputs")}
        runs[name] = {"process": arm.start_python(cpu, args, env=env), "workdir": workdir}
    for run in runs.values():
        try:
            run["output"], _ = run["process"].communicate(timeout=ARM_SUITE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            run["process"].kill()
            run["output"], _ = run["process"].communicate()
            run["output"] += f"\n(killed after {ARM_SUITE_TIMEOUT_S} s)"
        run["returncode"] = run["process"].returncode
        run["report"] = run["workdir"] / "report.xml"
        run["outputs"] = run["workdir"] / "outputs"
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("cpu", sorted(arm_env.CPUS))
def test_arm_suite(arm_runs, cpu):
    run = arm_runs[cpu]
    output = f"--- tests/arm on {cpu} ({arm_env.CPUS[cpu].board}) ---\n{run['output']}"

    assert run["returncode"] == 0, output
    outcomes = _outcomes(run["report"])
    assert len(outcomes) >= 5, output
    # This suite's own tests may skip only for want of ../shared/realdata on the host.
    unexplained = {
        name: reason
        for (module, name), reason in outcomes.items()
        if reason is not None and module in OWN_ARM_MODULES and "realdata" not in reason
    }
    assert not unexplained, f"tests/arm skipped inside the emulator: {unexplained}\n{output}"


def _outcomes(report: Path) -> dict[tuple[str, str], str | None]:
    """Each test case of a JUnit report by (module, name), with its skip reason or None."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        skip = case.find("skipped")
        key = (case.get("classname", ""), case.get("name"))
        outcomes[key] = None if skip is None else skip.get("message", "")
    return outcomes


@pytest.mark.slow
def test_pi4_and_pi5_compute_the_same(arm_runs):
    """The A72 lacks the dot-product kernels the A76 uses; the results must not depend on it."""
    pi4 = arm_runs["cortex-a72"]["outputs"]
    pi5 = arm_runs["cortex-a76"]["outputs"]
    saved = sorted(path.name for path in pi4.glob("*.npy"))
    assert saved, "tests/arm saved no outputs"
    assert saved == sorted(path.name for path in pi5.glob("*.npy"))

    for name in saved:
        a, b = np.load(pi4 / name), np.load(pi5 / name)
        difference = float(np.abs(a - b).max())
        # Integer kernels are exact whichever instructions compute them.
        limit = 0.0 if "int8" in name else 1e-4 * max(a.max(), 1.0)
        assert difference <= limit, f"{name}: max |pi4 - pi5| = {difference:.2e}"


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


def test_build_reuses_what_it_built(arm):
    before = {path: path.stat().st_ino for path in (arm.root, arm.site, arm.crashing_onnxruntime)}

    again = arm_env.build()

    assert again == arm
    assert {path: path.stat().st_ino for path in before} == before


def test_unreachable_mirror_fails_with_what_to_do(monkeypatch, tmp_path):
    if arm_env.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip("needs debootstrap, run as root")
    # A closed local port: the download fails at once, without touching any other host.
    monkeypatch.setattr(arm_env, "MIRROR", "http://127.0.0.1:9/debian")
    monkeypatch.setattr(arm_env, "DOWNLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(arm_env.time, "sleep", lambda seconds: None)

    with pytest.raises(arm_env.ArmEnvError) as raised:
        arm_env._download_debs(tmp_path / "debootstrap")

    message = str(raised.value)
    assert "http://127.0.0.1:9/debian" in message and "after 2 attempts" in message
    assert "EDGE_ARM_MIRROR" in message


def test_missing_emulator_is_named_with_its_package(monkeypatch):
    monkeypatch.setattr(arm_env, "which", lambda tool: None)

    with pytest.raises(arm_env.ArmEnvError, match=r"qemu-aarch64-static \(apt-get install "):
        arm_env.build()


def test_a_failed_stage_leaves_the_previous_one(tmp_path):
    target, stamp = tmp_path / "site", tmp_path / "site.stamp"
    target.mkdir()
    (target / "old").write_text("previous build")
    stamp.write_text("old-key")

    with pytest.raises(arm_env.ArmEnvError), arm_env._staged(target, stamp, "new-key") as scratch:
        (scratch / "half").write_text("interrupted")
        raise arm_env.ArmEnvError("pip failed")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "site.stamp"]
    assert (target / "old").read_text() == "previous build"
    assert stamp.read_text() == "old-key"

    with arm_env._staged(target, stamp, "new-key") as scratch:
        (scratch / "new").write_text("complete")

    assert [p.name for p in target.iterdir()] == ["new"]
    assert stamp.read_text() == "new-key"
