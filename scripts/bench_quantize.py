"""Benchmark: our static INT8 recipe against FP32 and the peer (Ultralytics-style) recipe.

Exports yolov5n at 640 from ../shared/realdata, calibrates on frames of the two real videos,
and measures on held-out images (the photos, coco8, and video frames not used for calibration):
median latency on this machine, and agreement with FP32's detections at IoU 0.5, conf 0.25.
All models run interleaved in one process, so load from other processes falls on all alike.

Targets: ours >= 1.4x faster than FP32, recall and precision vs FP32 >= 0.97.

    .venv/bin/python scripts/bench_quantize.py [--samples 100] [--held-video 200] [--naive]
        [--threads 2,1]

Latency is measured once per thread count given (0 means one per CPU, the device's default);
the first count is the one the targets are judged at.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from device.infer import default_threads  # noqa: E402
from device.preprocess import preprocess  # noqa: E402
from toolkit import calibrate, evaluate, prove, quantize  # noqa: E402

REALDATA = REPO.parent / "shared" / "realdata"
VIDEOS = ["video/car-detection.mp4", "video/one-by-one-person-detection.mp4"]

PEER = quantize.Recipe(
    preset=quantize.Preset("peer", "int8", "int8", False, "Ultralytics-style"),
    op_types=("Conv", "Gemm", "MatMul"),
    per_channel=False,
    trim_silu_inputs=False,
    weight_rounding="nearest",
)
NAIVE = quantize.Recipe(
    preset=quantize.Preset("naive", "int8", "int8", False, "every node"),
    per_channel=False,
    trim_silu_inputs=False,
    weight_rounding="nearest",
)


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not REALDATA.is_dir():
        print(f"skipped: real data not present at {REALDATA}")
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-quantize.") as folder:
        folder = Path(folder)
        fp32 = export(args, folder)
        model, info = quantize.load_fp32_model(fp32)
        tail = quantize.find_detect_tail(model, info)
        calibration, validation, held_out = draw(args)
        print(
            f"calibration: {len(calibration)} video frames; search validation: "
            f"{len(validation)} other video frames; held-out: {len(held_out)} images "
            f"(photos, coco8, {args.held_video} unused video frames)"
        )

        variants = {"FP32": fp32}
        timings = {}
        started = time.perf_counter()
        peer_path = folder / "peer.onnx"
        quantize.static_quantize(fp32, peer_path, calibration, info, PEER, float_nodes=[])
        variants["peer (S8S8 QDQ, Conv only)"] = peer_path
        timings["peer"] = time.perf_counter() - started

        if args.naive:
            naive_path = folder / "naive.onnx"
            quantize.static_quantize(fp32, naive_path, calibration, info, NAIVE, float_nodes=[])
            variants["naive (every node)"] = naive_path

        preset = quantize.resolve_preset(args.preset)
        recipe = quantize.preset_recipe(preset, calibrate_method=args.method)
        plain_path = folder / f"plain-{preset.name}.onnx"
        groups = quantize.layer_groups(model, tail)
        quantize.static_quantize(
            fp32, plain_path, calibration, info, recipe,
            float_nodes=quantize.float_nodes_for(recipe, tail, groups),
        )  # fmt: skip
        variants[f"ours, no search ({preset.name})"] = plain_path

        started = time.perf_counter()
        ours_path = folder / f"ours-{preset.name}.onnx"
        request = prove.QuantizeRequest(model=fp32, data=[], max_drop=args.max_drop)
        variant, steps = prove.make_static(
            request, model, info, tail, recipe, calibration, validation, ours_path
        )
        variants[f"ours ({preset.name})"] = ours_path
        timings["ours"] = time.perf_counter() - started

        threads = [int(t) for t in args.threads.split(",")]
        rows = measure(variants, held_out, info, args.runs, threads)
        print_table(rows, variant.float_layers, steps, timings)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        ours = rows[-1]
        faithful = ours["recall"] >= 0.97 and ours["precision"] >= 0.97
        for count, speedup in ours["speedup_by_threads"].items():
            met = faithful and speedup >= 1.4
            print(
                f"targets at {thread_label(count)} (>=1.4x, recall and precision >= 0.97): "
                f"{'MET' if met else 'MISSED'}"
            )
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="calibration video frames")
    parser.add_argument("--held-video", type=int, default=200, help="held-out video frames")
    parser.add_argument(
        "--validation", type=int, default=150, help="video frames the budget search measures on"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--max-drop", type=float, default=0.03)
    parser.add_argument("--runs", type=int, default=60, help="latency runs per model")
    parser.add_argument(
        "--threads", default="0,1", help="comma-separated inference thread counts to time"
    )
    parser.add_argument("--naive", action="store_true", help="also quantize every node")
    parser.add_argument("--model", type=Path, help="an FP32 ONNX instead of exporting")
    parser.add_argument("--json", help="write the rows here")
    return parser.parse_args()


def export(args: argparse.Namespace, folder: Path) -> Path:
    if args.model:
        return args.model
    from toolkit.export import export_model

    return export_model(REALDATA / "models/yolov5n.pt", folder / "yolov5n.onnx", imgsz=640)


def draw(args: argparse.Namespace):
    videos = [calibrate.open_source(REALDATA / v) for v in VIDEOS]
    calibration, held_video, validation = calibrate.sample_splits(
        videos, [args.samples, args.held_video, args.validation], seed=args.seed
    )
    photos = calibrate.open_source(REALDATA / "images")
    coco8 = calibrate.open_source(REALDATA / "coco8" / "images")
    held = calibrate.load_samples(photos, photos.items) + calibrate.load_samples(coco8, coco8.items)
    return calibration, validation, held + held_video


def measure(variants: dict[str, Path], held_out, info, runs: int, threads: list[int]) -> list[dict]:
    tensor, _ = preprocess(held_out[0].image, info)
    paths = list(variants.values())
    timings = {t: evaluate.measure_latency(paths, tensor, runs=runs, threads=t) for t in threads}
    latencies = timings[threads[0]]
    images = [s.image for s in held_out]
    reference = evaluate.detect_samples(variants["FP32"], images, conf_threshold=0.25)
    rows = []
    for index, (name, path) in enumerate(variants.items()):
        found = evaluate.detect_samples(path, images, conf_threshold=0.25)
        result = evaluate.agreement(reference, found, 0.5)
        median, p95 = latencies[index]
        rows.append(
            {
                "variant": name,
                "size_mb": path.stat().st_size / 1e6,
                "median_ms": median,
                "p95_ms": p95,
                "speedup": latencies[0][0] / median,
                "speedup_by_threads": {
                    t: timing[0][0] / timing[index][0] for t, timing in timings.items()
                },
                "recall": result.recall,
                "precision": result.precision,
                "detections": result.candidate,
            }
        )
    peer = next(r for r in rows if r["variant"].startswith("peer"))
    for row in rows:
        row["vs_peer"] = peer["median_ms"] / row["median_ms"]
    return rows


def print_table(rows: list[dict], float_layers, steps, timings) -> None:
    counts = list(rows[0]["speedup_by_threads"])
    thread_columns = "".join(f" {thread_label(t):>8}" for t in counts[1:])
    header = f"{'variant':34} {'MB':>5} {'median':>8} {'p95':>8} {'vs FP32':>8} {'vs peer':>8}"
    header += f"{thread_columns} {'recall':>7} {'prec.':>7} {'dets':>5}"
    print(f"latency and 'vs' columns at {thread_label(counts[0])}; vs FP32 also at other counts")
    print(header)
    for r in rows:
        others = "".join(f" {r['speedup_by_threads'][t]:7.2f}x" for t in counts[1:])
        print(
            f"{r['variant']:34} {r['size_mb']:5.2f} {r['median_ms']:7.1f}ms {r['p95_ms']:7.1f}ms "
            f"{r['speedup']:7.2f}x {r['vs_peer']:7.2f}x{others} {r['recall']:7.3f} "
            f"{r['precision']:7.3f} {r['detections']:5d}"
        )
    print(f"ours kept {len(float_layers)} layers float: {', '.join(float_layers) or '-'}")
    for step in steps:
        print(f"  search: {step['count']} float -> recall {step['recall']:.3f}, "
              f"precision {step['precision']:.3f}")  # fmt: skip
    print("quantize seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def thread_label(threads: int) -> str:
    return f"{threads or default_threads()} thr"


if __name__ == "__main__":
    raise SystemExit(main())
