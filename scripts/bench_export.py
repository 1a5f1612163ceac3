"""Benchmark `toolkit export` on yolov5n against Ultralytics' exporter.

Each run is a fresh process (as `python export.py` is), exporting yolov5n at 640, opset 17,
simplified with onnxslim; the table shows the median of the runs per stage. The baseline is
Ultralytics' own export.py on a 2-core x86 machine (about 2.2 s for the export step, which it
times from the start of the ONNX export to the end of simplification and metadata).

    .venv/bin/python scripts/bench_export.py [--weights PATH] [--runs 3]

Without --weights it uses ../shared/realdata/models/yolov5n.pt, or a random-weight yolov5n of
the same architecture when that is absent (export time does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_WEIGHTS = REPO.parent / "shared" / "realdata" / "models" / "yolov5n.pt"
BASELINE_EXPORT_SECONDS = 2.2  # Ultralytics export.py, yolov5n 640 opset 17 slimmed, 2-core x86
ALLOWED_RATIO = 2.0

_ONE_RUN = """
import json, sys, time
from pathlib import Path

def clocks():
    return time.perf_counter(), time.process_time()

timings = {}
def record(name, since):
    wall, cpu = clocks()
    timings[name] = wall - since[0]
    timings[name + "_cpu"] = cpu - since[1]
    return clocks()

mark = clocks()
from toolkit.checkpoint import load_model
from toolkit.export import ExportOptions, export_onnx, model_info
from toolkit.verify import verify_onnx
mark = record("imports", mark)
model, checkpoint = load_model(sys.argv[1])
mark = record("load", mark)
options = ExportOptions(imgsz=(640, 640), opset=17)
output = Path(sys.argv[2])
export_onnx(model, model_info(model, checkpoint, options), options, output)
mark = record("export", mark)
verify_onnx(output, model, model_info(model, checkpoint, options))
record("verify", mark)
timings["size_mb"] = output.stat().st_size / 1e6
print(json.dumps(timings))
"""


def random_yolov5n(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from toolkit.checkpoint import save_ultralytics_checkpoint
    from toolkit.yolo import build_model, load_config

    return save_ultralytics_checkpoint(build_model(load_config("yolov5n")), folder / "yolov5n.pt")


def one_run(weights: Path, output: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, str(weights), str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"export failed:\n{done.stderr}")
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    timings["process"] = wall
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = args.weights or (REAL_WEIGHTS if REAL_WEIGHTS.is_file() else None)
        source = str(weights) if weights else "random-weight yolov5n (real data absent)"
        weights = weights or random_yolov5n(folder)
        runs = [one_run(weights, folder / f"run{i}.onnx") for i in range(args.runs)]

    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    cpu_count = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"toolkit export, yolov5n 640 opset 17 onnxslim, {args.runs} fresh-process runs")
    print(f"weights: {source}; {cpu_count} CPUs, load average {load:.1f} at the end")
    print()
    print("| stage | toolkit wall (median s) | toolkit CPU (s) | Ultralytics (s) | ratio |")
    print("|---|---|---|---|---|")
    ratio = median["export"] / BASELINE_EXPORT_SECONDS
    rows = [
        ("export (trace + slim + metadata)", "export", f"{BASELINE_EXPORT_SECONDS:.1f}"),
        ("load checkpoint (safe unpickle + build)", "load", "-"),
        ("verify (checker + ORT vs PyTorch)", "verify", "not done"),
        ("imports (torch, onnx, onnxruntime)", "imports", "-"),
    ]
    for name, key, baseline in rows:
        shown = f"{ratio:.2f}x" if key == "export" else "-"
        wall, cpu = median[key], median[key + "_cpu"]
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {baseline} | {shown} |")
    print(f"| whole process (python start to exit) | {median['process']:.2f} | - | - | - |")
    if load > cpu_count:
        print()
        print(
            f"note: the machine was busy (load {load:.1f} on {cpu_count} CPUs), so wall times "
            "are inflated against the idle-machine baseline; rerun when idle."
        )
    print()
    print(f"ONNX size: {median['size_mb']:.1f} MB (Ultralytics: 7.6 MB)")
    verdict = "within" if ratio <= ALLOWED_RATIO else "OVER"
    print(f"export step: {ratio:.2f}x the baseline, {verdict} the {ALLOWED_RATIO:.0f}x budget")


if __name__ == "__main__":
    main()
