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
started = time.perf_counter()
from toolkit.export import ExportOptions, run_export
imported = time.perf_counter() - started
result = run_export(sys.argv[1], sys.argv[2], ExportOptions(imgsz=(640, 640), opset=17))
timings = dict(result.timings, imports=imported, size_mb=result.path.stat().st_size / 1e6)
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
    cpu = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"toolkit export, yolov5n 640 opset 17 onnxslim, {args.runs} fresh-process runs")
    print(f"weights: {source}; {cpu} CPUs, load average {load:.1f} at the end")
    print()
    print("| stage | toolkit (median s) | Ultralytics export.py (s) | ratio |")
    print("|---|---|---|---|")
    ratio = median["export"] / BASELINE_EXPORT_SECONDS
    rows = [
        ("export (trace + slim + metadata)", median["export"], f"{BASELINE_EXPORT_SECONDS:.1f}"),
        ("load checkpoint (safe unpickle + build)", median["load"], "-"),
        ("verify (checker + ORT vs PyTorch)", median["verify"], "not done"),
        ("python + torch imports", median["imports"], "-"),
        ("whole process", median["process"], "-"),
    ]
    for name, seconds, baseline in rows:
        shown = f"{ratio:.2f}x" if baseline not in ("-", "not done") else "-"
        print(f"| {name} | {seconds:.2f} | {baseline} | {shown} |")
    print()
    print(f"ONNX size: {median['size_mb']:.1f} MB (Ultralytics: 7.6 MB)")
    verdict = "within" if ratio <= ALLOWED_RATIO else "OVER"
    print(f"export step: {ratio:.2f}x the baseline, {verdict} the {ALLOWED_RATIO:.0f}x budget")


if __name__ == "__main__":
    main()
