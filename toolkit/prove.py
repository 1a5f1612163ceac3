"""``toolkit quantize``: write INT8 variants of an FP32 YOLOv5 ONNX model and prove them.

The run reads as its stages: check the request, load the model, draw calibration and held-out
samples, quantize each requested variant (searching for the fewest float layers that fit the
fidelity budget), measure every variant against FP32 on the held-out samples, write the report.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from device.contract import ModelInfo
from device.errors import ToolkitError
from device.preprocess import preprocess
from toolkit import calibrate, evaluate, quantize
from toolkit.calibrate import Sample
from toolkit.evaluate import ImageBoxes
from toolkit.report import ProofReport, VariantRow, host_description, write_report

log = logging.getLogger(__name__)

MODES = ("static", "dynamic")
AGREEMENT_IOU = 0.5
AGREEMENT_CONF = 0.25
SEARCH_SAMPLES = 96  # frames the budget search measures on
MIN_EVAL_VALIDATION = 16  # spare --eval-data images worth validating the search on
RANKING_SAMPLES = 6  # frames for the per-layer error (all activations are kept in memory)


@dataclass
class QuantizeRequest:
    """What the user asked for; checked once by ``check_request`` before any work."""

    model: Path
    data: list[Path]
    eval_data: list[Path] = field(default_factory=list)
    modes: tuple[str, ...] = ("static",)
    preset: str = "auto"
    calibrate_method: str = "minmax"
    quant_format: str = "QDQ"
    per_channel: bool | None = None  # None: the preset's choice
    weight_rounding: str = "error-feedback"
    samples: int = 128
    eval_samples: int = 64
    seed: int = 0
    max_drop: float = 0.03
    search: bool = True
    latency_runs: int = 50
    output_dir: Path | None = None


@dataclass
class Variant:
    name: str
    path: Path
    info: ModelInfo
    float_layers: list[str] = field(default_factory=list)
    search: quantize.Fidelity | None = None  # the budget search's verdict on validation


def check_request(request: QuantizeRequest) -> None:
    """Reject impossible option combinations up front, naming the values."""
    problems = []
    unknown = [m for m in request.modes if m not in MODES]
    if unknown or not request.modes:
        problems.append(f"--mode must be among {', '.join(MODES)}, got {list(request.modes)}")
    if request.calibrate_method not in quantize.CALIBRATION_METHODS:
        methods = ", ".join(quantize.CALIBRATION_METHODS)
        problems.append(f"--method must be one of {methods}, got '{request.calibrate_method}'")
    if request.weight_rounding not in quantize.WEIGHT_ROUNDINGS:
        roundings = ", ".join(quantize.WEIGHT_ROUNDINGS)
        problems.append(
            f"--weight-rounding must be one of {roundings}, got '{request.weight_rounding}'"
        )
    if request.quant_format not in ("QDQ", "QOperator"):
        problems.append(f"--format must be QDQ or QOperator, got '{request.quant_format}'")
    if request.preset != "auto" and request.preset not in quantize.PRESETS:
        problems.append(
            f"--preset must be auto or one of {', '.join(quantize.PRESETS)}, got '{request.preset}'"
        )
    if not request.data and not request.eval_data:
        problems.append("--data is required: real images, a video or a YOLO dataset")
    if "static" in request.modes and not request.data:
        problems.append("static INT8 needs calibration images: pass --data")
    if request.samples < 1:
        problems.append(f"--samples must be at least 1, got {request.samples}")
    if request.eval_samples < 1:
        problems.append(f"--eval-samples must be at least 1, got {request.eval_samples}")
    if not 0.0 <= request.max_drop < 1.0:
        problems.append(f"--max-drop must be within 0..1, got {request.max_drop}")
    if request.latency_runs < 1:
        problems.append(f"--latency-runs must be at least 1, got {request.latency_runs}")
    if problems:
        raise ToolkitError("Invalid quantize options: " + "; ".join(problems) + ".")


def output_paths(request: QuantizeRequest, preset_name: str) -> dict[str, Path]:
    folder = request.output_dir or request.model.parent
    stem = request.model.stem
    return {
        "static": folder / f"{stem}-int8-{preset_name}.onnx",
        "dynamic": folder / f"{stem}-int8-dynamic.onnx",
        "json": folder / f"{stem}-int8-report.json",
        "markdown": folder / f"{stem}-int8-report.md",
    }


def quantize_and_prove(request: QuantizeRequest) -> ProofReport:
    """The whole ``toolkit quantize`` run; returns the report it also wrote."""
    check_request(request)
    model, info = quantize.load_fp32_model(request.model)
    tail = quantize.find_detect_tail(model, info)
    preset = quantize.resolve_preset(request.preset)
    paths = output_paths(request, preset.name)
    warnings: list[str] = []

    if "static" in request.modes and preset.name != quantize.host_preset():
        message = (
            f"Preset {preset.name} targets another CPU than this host "
            f"({quantize.host_preset()}): the latencies in the report are this host's, not the "
            "target's. Agreement and mAP carry over (within ~1e-2 on scores)."
        )
        log.warning(message)
        warnings.append(message)

    samples = draw_samples(request, info, warnings)
    fp32_held = _detections(request.model, samples.held_out)

    variants: list[Variant] = []
    search_steps: list[dict] = []
    if "static" in request.modes:
        recipe = quantize.preset_recipe(
            preset,
            calibrate_method=request.calibrate_method,
            quant_format=request.quant_format,
            per_channel=request.per_channel,
            weight_rounding=request.weight_rounding,
        )
        variant, search_steps = make_static(
            request, model, info, tail, recipe, samples.calibration, samples.validation,
            paths["static"],
        )  # fmt: skip
        variants.append(variant)
    if "dynamic" in request.modes:
        dynamic_info = quantize.dynamic_quantize(request.model, paths["dynamic"], info)
        variants.append(Variant("INT8 dynamic", paths["dynamic"], dynamic_info))

    report = prove(request, info, variants, samples.held_out, fp32_held, samples.labelled)
    report.calibration = {
        "count": len(samples.calibration),
        "validation_count": len(samples.validation),
        "validation_origin": samples.validation_origin,
        "sources": [str(p) for p in request.data],
        "seed": request.seed,
        "method": request.calibrate_method,
    }
    report.search = search_steps
    warnings += search_disagreements(variants, report, len(samples.validation), request.max_drop)
    report.warnings = warnings
    write_report(report, paths["json"], paths["markdown"])
    log.info("Wrote %s and %s", paths["json"], paths["markdown"])
    return report


@dataclass
class Samples:
    """Three disjoint draws: calibration sets the ranges, validation (never calibrated on nor
    proven on) steers the budget search, held-out proves the result."""

    calibration: list[Sample]
    validation: list[Sample]
    held_out: list[Sample]
    labelled: bool  # whether the held-out images have labels
    validation_origin: str = "the calibration sources"


def validation_count(available: int) -> int:
    """Frames of the calibration sources set aside for the budget search: a fifth, at most
    SEARCH_SAMPLES, so calibration keeps the larger share."""
    return min(SEARCH_SAMPLES, available // 5)


def draw_samples(request: QuantizeRequest, info: ModelInfo, warnings: list[str]) -> Samples:
    """Calibration, validation and held-out samples, pairwise disjoint."""
    sources = [calibrate.open_source(p) for p in request.data]
    eval_sources = [calibrate.open_source(p) for p in request.eval_data]
    total = sum(len(s) for s in sources)
    searching = "static" in request.modes and request.search

    validation_origin = "the calibration sources"
    if eval_sources:
        # Images of --eval-data that the proof does not draw resemble the proof's more than
        # calibration frames do: the search validates on them when there are enough.
        spare = sum(len(s) for s in eval_sources) - request.eval_samples
        from_eval = searching and spare >= MIN_EVAL_VALIDATION
        held_out, validation = calibrate.sample_split(
            eval_sources,
            request.eval_samples,
            min(spare, SEARCH_SAMPLES) if from_eval else 0,
            seed=request.seed,
        )
        validation_size = validation_count(total) if searching and not from_eval else 0
        calibration_size = min(request.samples, total - validation_size)
        calibration, from_data = calibrate.sample_splits(
            sources, [calibration_size, validation_size], seed=request.seed
        )
        if from_eval:
            validation_origin = "--eval-data not drawn for the proof"
        else:
            validation = from_data
    else:
        # A small folder still keeps a quarter of itself out of calibration for the proof.
        held_size = min(request.eval_samples, max(1, total // 4))
        validation_size = validation_count(total - held_size) if searching else 0
        calibration_size = min(request.samples, max(total - held_size - validation_size, 0))
        calibration, held_out, validation = calibrate.sample_splits(
            sources, [calibration_size, held_size, validation_size], seed=request.seed
        )
        eval_sources = sources

    if "static" in request.modes and not calibration:
        raise ToolkitError(
            f"Found only {total} image(s) in {request.data}: none left "
            "for calibration after holding some out. Add images or pass --eval-data."
        )
    if not held_out:
        raise ToolkitError("No held-out images to prove the models on. Pass --eval-data.")
    if "static" in request.modes and len(calibration) < quantize.MIN_CALIBRATION_SAMPLES:
        message = (
            f"Only {len(calibration)} calibration images; at least "
            f"{quantize.MIN_CALIBRATION_SAMPLES} real frames give ranges that hold up. "
            "Expect a larger accuracy drop."
        )
        log.warning(message)
        warnings.append(message)
    if searching and not validation:
        message = (
            f"Only {total} image(s) in {request.data}: none left to validate the budget search "
            "on, so no layers are kept float. Add images to --data (a fifth, up to "
            f"{SEARCH_SAMPLES}, is set aside for the search)."
        )
        log.warning(message)
        warnings.append(message)

    labelled = all(s.labelled for s in eval_sources)
    if labelled:
        for source in eval_sources:
            calibrate.check_labels_fit(held_out, info, source.path)
    log.info(
        "Calibration: %d samples; search validation: %d samples of %s; held-out: %d samples%s",
        len(calibration),
        len(validation),
        validation_origin,
        len(held_out),
        " with labels" if labelled else "",
    )
    return Samples(calibration, validation, held_out, labelled, validation_origin)


def make_static(
    request: QuantizeRequest,
    model,
    info: ModelInfo,
    tail: quantize.DetectTail,
    recipe: quantize.Recipe,
    calibration: list[Sample],
    validation: list[Sample],
    output_path: Path,
) -> tuple[Variant, list[dict]]:
    """Quantize, then keep the fewest worst layers float until the budget holds on the
    validation samples (never the calibration ones: those would flatter every candidate)."""
    groups = quantize.layer_groups(model, tail)
    base_float = quantize.float_nodes_for(recipe, tail, groups)
    name = f"INT8 static ({recipe.preset.name})"

    with tempfile.TemporaryDirectory(prefix="toolkit-quantize.") as folder:
        cache = Path(folder) / "calibration.json"
        info_out = quantize.static_quantize(
            request.model, output_path, calibration, info, recipe,
            float_nodes=base_float, seed=request.seed, calibration_cache=cache,
        )  # fmt: skip
        if not request.search or not validation:
            return Variant(name, output_path, info_out), []

        judge = Judge(request.model, validation)
        baseline = judge(output_path)
        if baseline.within(request.max_drop):
            log.info(
                "Budget search: no extra float layers needed on %d validation samples (%s); "
                "the held-out proof has the last word",
                len(validation),
                baseline.describe(),
            )
            return Variant(name, output_path, info_out, search=baseline), [_step([], baseline)]
        needed = search_detections_needed(request.max_drop)
        if judge.reference_count < needed:
            log.warning(
                "Budget search skipped: its %d validation samples hold %d FP32 detections, too "
                "few to judge a %.0f%% budget (at least %d, so that one detection is a third of "
                "it or less). Float layers chosen on so few would follow noise. Pass more --data "
                "like what the camera will see.",
                len(validation),
                judge.reference_count,
                request.max_drop * 100,
                needed,
            )
            return Variant(name, output_path, info_out, search=baseline), [_step([], baseline)]

        ranking = quantize.rank_layers(
            request.model, output_path, spread(calibration, RANKING_SAMPLES), info, groups
        )
        trial_path = Path(folder) / "trial.onnx"

        def evaluate_layers(layers: list[str]) -> quantize.Fidelity:
            if not layers:
                return baseline
            extra = [node for layer in layers for node in groups[layer]]
            quantize.static_quantize(
                request.model, trial_path, calibration, info, recipe,
                float_nodes=base_float + extra, seed=request.seed, calibration_cache=cache,
                announce=False,
            )  # fmt: skip
            return judge(trial_path)

        result = quantize.search_float_layers(ranking, evaluate_layers, request.max_drop)
        extra = [node for layer in result.chosen for node in groups[layer]]
        info_out = quantize.static_quantize(
            request.model, output_path, calibration, info, recipe,
            float_nodes=base_float + extra, seed=request.seed, calibration_cache=cache,
        )  # fmt: skip
        info_out.quantization.float_layers = list(result.chosen)  # type: ignore[union-attr]
        quantize._write_metadata(output_path, info_out)
        steps = [_step(s.float_layers, s.fidelity) for s in result.steps]
        chosen = next(s.fidelity for s in result.steps if s.float_layers == result.chosen)
        variant = Variant(name, output_path, info_out, list(result.chosen), search=chosen)
        return variant, steps


def search_detections_needed(max_drop: float) -> int:
    """FP32 detections the validation samples must hold for the search to judge ``max_drop``:
    enough that one detection more or less is at most a third of the budget."""
    return math.ceil(3 / max(max_drop, 0.01))


class Judge:
    """Measures candidates against FP32 on fixed samples, by the rule the report uses."""

    def __init__(self, fp32_path: Path, samples: list[Sample]) -> None:
        self.images = [s.image for s in samples]
        self.reference = _detections(fp32_path, samples)
        self.reference_count = sum(len(d.above(AGREEMENT_CONF)) for d in self.reference)
        labelled = all(s.labels is not None for s in samples)
        self.truth = [s.labels for s in samples] if labelled else None

    def __call__(self, model_path: Path) -> quantize.Fidelity:
        candidate = evaluate.detect_samples(
            model_path, self.images, conf_threshold=evaluate.MAP_CONF_THRESHOLD
        )
        return fidelity(self.reference, candidate, self.truth)


def fidelity(
    reference: list[ImageBoxes], candidate: list[ImageBoxes], truth: list[ImageBoxes] | None
) -> quantize.Fidelity:
    """Agreement with FP32 at the deployment threshold and, with labels, the loss of true
    mAP50: the one rule behind both the budget search and the report's budget column."""
    agreement = evaluate.agreement(
        [d.above(AGREEMENT_CONF) for d in reference],
        [d.above(AGREEMENT_CONF) for d in candidate],
        AGREEMENT_IOU,
    )
    map50_drop = None
    if truth is not None:
        fp32_map50 = evaluate.mean_average_precision(truth, reference)
        if not math.isnan(fp32_map50):
            map50_drop = fp32_map50 - evaluate.mean_average_precision(truth, candidate)
    return quantize.Fidelity(agreement.recall, agreement.precision, map50_drop)


def spread(samples: list[Sample], count: int) -> list[Sample]:
    """Up to ``count`` samples evenly spaced over the list (which is in source order, so a
    prefix would come from the first source only)."""
    if len(samples) <= count:
        return list(samples)
    return [samples[i] for i in np.linspace(0, len(samples) - 1, count).round().astype(int)]


def _step(layers: list[str], measured: quantize.Fidelity) -> dict:
    return {"count": len(layers), "layers": layers, **asdict(measured)}


def _detections(model_path: Path, samples: list[Sample]) -> list[ImageBoxes]:
    return evaluate.detect_samples(
        model_path, [s.image for s in samples], conf_threshold=evaluate.MAP_CONF_THRESHOLD
    )


def prove(
    request: QuantizeRequest,
    info: ModelInfo,
    variants: list[Variant],
    held_out: list[Sample],
    fp32_detections: list[ImageBoxes],
    labelled: bool,
) -> ProofReport:
    """Size, latency, agreement with FP32 and (with labels) true mAP of every model."""
    models = [Variant("FP32", request.model, info), *variants]
    tensor, _ = preprocess(held_out[0].image, info)
    latencies = evaluate.measure_latency(
        [m.path for m in models], tensor, runs=request.latency_runs
    )
    truth = [s.labels for s in held_out] if labelled else None

    rows = []
    for model, (median, p95) in zip(models, latencies, strict=True):
        detections = (
            fp32_detections if model.path == request.model else _detections(model.path, held_out)
        )
        rows.append(
            _row(model, detections, fp32_detections, truth, median, p95, latencies[0][0], request)
        )
    return ProofReport(
        model=str(request.model),
        host=host_description(),
        settings={
            "iou_threshold": AGREEMENT_IOU,
            "conf_threshold": AGREEMENT_CONF,
            "max_drop": request.max_drop,
            "latency_runs": request.latency_runs,
            "preset": request.preset,
        },
        held_out={
            "count": len(held_out),
            "sources": [str(p) for p in (request.eval_data or request.data)],
            "labelled": labelled,
            "names": [s.name for s in held_out],
        },
        calibration={},
        variants=rows,
    )


def search_disagreements(
    variants: list[Variant], report: ProofReport, validated: int, max_drop: float
) -> list[str]:
    """Say so when the search's validation samples and the held-out proof disagree: the
    report's verdict stands, and the user should know the search was misled."""
    messages = []
    rows = {row.name: row for row in report.variants}
    for variant in variants:
        row = rows[variant.name]
        searched_ok = variant.search is not None and variant.search.within(max_drop)
        if searched_ok and row.within_budget is False:
            message = (
                f"{variant.name}: the budget search met the budget on {validated} validation "
                f"samples ({variant.search.describe()}) but the held-out proof does not "
                f"(recall {row.recall:.3f}, precision {row.precision:.3f}), so it is OUTSIDE "
                "the budget. The validation samples were too few or unlike the held-out "
                "images: pass more --data like what the camera will see, or raise --max-drop."
            )
            log.warning(message)
            messages.append(message)
        elif row.within_budget is not None:
            verdict = "within the budget" if row.within_budget else "OUTSIDE the budget"
            log.info("%s is %s on the held-out images", variant.name, verdict)
    return messages


def _row(
    model: Variant,
    detections: list[ImageBoxes],
    fp32_detections: list[ImageBoxes],
    truth: list[ImageBoxes] | None,
    median: float,
    p95: float,
    fp32_median: float,
    request: QuantizeRequest,
) -> VariantRow:
    reference = [d.above(AGREEMENT_CONF) for d in fp32_detections]
    confident = [d.above(AGREEMENT_CONF) for d in detections]
    agreement = evaluate.agreement(reference, confident, AGREEMENT_IOU)
    map50_vs_fp32 = evaluate.mean_average_precision(reference, detections)
    row = VariantRow(
        name=model.name,
        path=str(model.path),
        size_bytes=model.path.stat().st_size,
        latency_median_ms=median,
        latency_p95_ms=p95,
        speedup=fp32_median / median if median else math.nan,
        recall=agreement.recall,
        precision=agreement.precision,
        map50_vs_fp32=map50_vs_fp32,
        detections=agreement.candidate,
        float_layers=model.float_layers,
        recipe=model.info.quantization.model_dump() if model.info.quantization else {},
    )
    if truth is not None:
        row.map50 = evaluate.mean_average_precision(truth, detections)
        row.map50_95 = evaluate.mean_average_precision(
            truth, detections, evaluate.COCO_IOU_THRESHOLDS
        )
    if model.info.quantization is not None:
        judged = fidelity(fp32_detections, detections, truth)
        row.within_budget = judged.within(request.max_drop)
    return row
