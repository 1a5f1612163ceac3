"""The proof report: one row per model variant, printed as a table and written as JSON and
Markdown next to the models.

Agreement columns compare each variant's detections with the FP32 model's on held-out images
(FP32 plays the ground truth: recall is the share of FP32 detections found, precision the share
of the variant's detections that FP32 also made).  True mAP columns appear only when the
held-out images come with YOLO labels.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class VariantRow:
    """What one model variant measured."""

    name: str
    path: str
    size_bytes: int
    latency_median_ms: float
    latency_p95_ms: float
    speedup: float  # FP32 median latency / this median latency
    recall: float  # vs FP32 detections
    precision: float
    map50_vs_fp32: float
    detections: int  # at the agreement confidence threshold, all held-out images
    map50: float | None = None  # vs labels, when labelled held-out data was given
    map50_95: float | None = None
    within_budget: bool | None = None  # None for FP32 itself
    float_layers: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)


@dataclass
class ProofReport:
    model: str
    host: dict
    settings: dict  # thresholds, budget, sample counts
    held_out: dict  # count, sources, labelled
    calibration: dict
    variants: list[VariantRow]
    search: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[VariantRow]:
        return [v for v in self.variants if v.within_budget is False]

    def to_dict(self) -> dict:
        return asdict(self)


def host_description() -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _budget(row: VariantRow) -> str:
    if row.within_budget is None:
        return "reference"
    return "ok" if row.within_budget else "OUTSIDE BUDGET"


def table_rows(report: ProofReport) -> tuple[list[str], list[list[str]]]:
    labelled = report.held_out.get("labelled", False)
    header = ["variant", "size MB", "median ms", "p95 ms", "speedup", "recall", "precision"]
    header += ["mAP50 vs FP32", "detections"]
    if labelled:
        header += ["mAP50", "mAP50-95"]
    header += ["budget", "float layers"]
    rows = []
    for v in report.variants:
        row = [
            v.name,
            f"{v.size_bytes / 1e6:.2f}",
            f"{v.latency_median_ms:.1f}",
            f"{v.latency_p95_ms:.1f}",
            f"{v.speedup:.2f}x",
            _fmt(v.recall),
            _fmt(v.precision),
            _fmt(v.map50_vs_fp32),
            str(v.detections),
        ]
        if labelled:
            row += [_fmt(v.map50), _fmt(v.map50_95)]
        row += [_budget(v), str(len(v.float_layers))]
        rows.append(row)
    return header, rows


def render_table(report: ProofReport) -> str:
    """A plain-text table for the terminal."""
    header, rows = table_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.append(_caption(report))
    return "\n".join(lines)


def _caption(report: ProofReport) -> str:
    s = report.settings
    held = report.held_out
    return (
        f"Held-out: {held['count']} images not used for calibration "
        f"({'labelled' if held.get('labelled') else 'unlabelled'}). Agreement with FP32 at IoU "
        f"{s['iou_threshold']}, confidence {s['conf_threshold']}; budget: recall and precision "
        f">= {1 - s['max_drop']:.2f}. mAP50 vs FP32 ranks every candidate (conf >= 0.001) "
        "against FP32's detections: whether the objects are still found at some threshold. "
        f"Latency on {report.host['cpu']} "
        f"({report.host['cpus']} CPUs), onnxruntime {report.host['onnxruntime']}, "
        f"{s['latency_runs']} runs interleaved."
    )


def render_markdown(report: ProofReport) -> str:
    header, rows = table_rows(report)
    lines = [f"# INT8 proof report: {Path(report.model).name}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", _caption(report), ""]

    calibration = report.calibration
    lines += [
        "## Calibration",
        "",
        f"- {calibration.get('count', 0)} samples from "
        f"{', '.join(calibration.get('sources', [])) or '-'}, seed {calibration.get('seed')}",
    ]
    for v in report.variants:
        if v.recipe:
            shown = {k: val for k, val in v.recipe.items() if val not in ("", []) and k not in
                     ("float_nodes", "float_layers")}  # fmt: skip
            recipe = ", ".join(f"{k}={val}" for k, val in shown.items())
            lines.append(f"- {v.name}: {recipe}; {len(v.recipe.get('float_nodes', []))} nodes "
                         "float (the Detect tail and any kept layers)")  # fmt: skip
        if v.float_layers:
            lines.append(f"  - kept in float by the budget search: {', '.join(v.float_layers)}")
    if report.search:
        lines += [
            "",
            "## Budget search",
            "",
            f"Measured on {calibration.get('validation_count', '?')} validation samples of "
            f"{calibration.get('validation_origin', 'the calibration sources')}, used neither "
            "to calibrate nor in the table above; the table's held-out verdict is the one that "
            "counts.",
            "",
            "| float layers | recall | precision |",
            "|---|---|---|",
        ]
        for step in report.search:
            lines.append(
                f"| {step['count']} | {_fmt(step['recall'])} | {_fmt(step['precision'])} |"
            )
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def write_report(report: ProofReport, json_path: Path, markdown_path: Path) -> None:
    """Write both files atomically (temp file, then rename)."""
    _write_atomic(json_path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    _write_atomic(markdown_path, render_markdown(report))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
