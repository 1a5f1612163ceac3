"""Train the shipped demo detector: YOLOv5n, four shape classes, on generated scenes, on a CPU.

Every batch is drawn fresh from the scene generator (scripts/demo_scenes.py) with a seed made of
the run seed and the step number, so the run is reproducible and never sees an image twice.
Scenes are letterboxed into the square input exactly as the device runtime does
(device.preprocess), then trained with upstream YOLOv5's loss (scripts/demo_loss.py), AdamW, a
warmup, cosine decay and an EMA of the weights.  The EMA weights are evaluated on the committed
validation set and saved as an Ultralytics-style fp16 checkpoint.

    .venv/bin/python scripts/train_demo.py --out models/demo/shapes-yolov5n.pt

The hyperparameters are the ``Recipe`` defaults; models/demo/RECIPE.md records the run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# OpenMP workers that spin while waiting burn their time slices on a busy shared CPU: on the
# 2-core build machine under load, passive waiting made each step about 10x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from demo_loss import LossWeights, YoloV5Loss  # noqa: E402
from demo_metrics import decode_detections, match_predictions, mean_average_precision  # noqa: E402
from demo_scenes import CLASS_NAMES, random_frame_shape, render_scene  # noqa: E402

from device.contract import Preprocess  # noqa: E402
from device.preprocess import letterbox, to_tensor  # noqa: E402
from toolkit.yolo import build_model, load_config  # noqa: E402

log = logging.getLogger("train_demo")


@dataclass(frozen=True)
class Recipe:
    """Every knob of the training run."""

    architecture: str = "yolov5n"  # shipped config in models/, nc replaced by the class count
    image_size: int = 256  # square letterboxed input, as exported
    batch_size: int = 16
    steps: int = 1200
    seed: int = 0
    # AdamW, as Ultralytics chooses for short runs, at its largest automatic lr (0.002).
    lr0: float = 0.002
    lr_final_ratio: float = 0.01  # cosine decay to lr0 * this
    beta1: float = 0.9
    weight_decay: float = 0.0005  # on conv and linear weights only, as upstream
    warmup_steps: int = 100
    warmup_beta1: float = 0.8
    warmup_bias_lr: float = 0.01  # upstream uses 0.1 with SGD; Adam moves biases ~lr per step
    grad_clip_norm: float = 10.0
    ema_decay: float = 0.9999
    ema_tau: float = 300.0  # upstream 2000, for runs of tens of thousands of steps
    loss_box: float = 0.05  # upstream hyp.scratch-low gains, before scaling by nc and size
    loss_obj: float = 1.0
    loss_cls: float = 1.5  # upstream 0.5; with 4 classes the class term learns last
    anchor_t: float = 4.0
    render_scale_max: float = 2.5  # scenes are drawn at 1x .. this x the input, then resized
    jpeg_probability: float = 0.5  # camera and clip compression artefacts
    eval_every: int = 400
    init_from: str = ""  # a previous run's state whose raw weights start this run


# Data


def training_sample(rng: np.random.Generator, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """One letterboxed RGB float tensor (3, S, S) and its (N, 5) labels in input-normalised
    ``class cx cy w h``."""
    height, width = random_frame_shape(rng)
    scale = recipe.image_size * rng.uniform(1.0, recipe.render_scale_max) / max(height, width)
    size = (round(height * scale), round(width * scale))
    image, labels = render_scene(rng, size)

    if rng.random() < recipe.jpeg_probability:
        quality = int(rng.integers(40, 96))
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1]
        image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)

    side = recipe.image_size
    padded, transform = letterbox(image, (side, side))
    boxes = labels[:, 1:].copy()
    boxes[:, [0, 2]] *= transform.resized_size[1] / side
    boxes[:, [1, 3]] *= transform.resized_size[0] / side
    boxes[:, 0] += transform.pad_left / side
    boxes[:, 1] += transform.pad_top / side
    return to_tensor(padded, Preprocess())[0], np.concatenate([labels[:, :1], boxes], 1)


def training_batch(step: int, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) and targets (n, 6) ``image_index class cx cy w h`` for one step."""
    images, targets = [], []
    for index in range(recipe.batch_size):
        rng = np.random.default_rng([recipe.seed, step, index])
        image, labels = training_sample(rng, recipe)
        images.append(image)
        targets.append(np.concatenate([np.full((len(labels), 1), index), labels], 1))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.concatenate(targets)).float()


def load_val_set(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(BGR image, (M, 5) ``class x1 y1 x2 y2`` in pixels) for every image under ``root``."""
    samples = []
    for image_path in sorted((root / "images").glob("*.jpg")):
        image = cv2.imread(str(image_path))
        height, width = image.shape[:2]
        label_path = root / "labels" / f"{image_path.stem}.txt"
        text = label_path.read_text().split()  # empty for a scene without objects
        rows = np.array(text, dtype=np.float32).reshape(-1, 5)
        truth = np.empty_like(rows)
        truth[:, 0] = rows[:, 0]
        truth[:, 1] = (rows[:, 1] - rows[:, 3] / 2) * width
        truth[:, 2] = (rows[:, 2] - rows[:, 4] / 2) * height
        truth[:, 3] = (rows[:, 1] + rows[:, 3] / 2) * width
        truth[:, 4] = (rows[:, 2] + rows[:, 4] / 2) * height
        samples.append((image, truth))
    return samples


# Model state


class ModelEMA:
    """Exponential moving average of a model's floating-point state (weights and BN stats), with
    upstream's warm-up of the decay: ``decay * (1 - exp(-updates / tau))``."""

    def __init__(self, model: nn.Module, decay: float, tau: float, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, updates
        for parameter in self.ema.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(decay).add_(current[name].detach(), alpha=1 - decay)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Upstream's three groups: biases, batch-norm weights (no decay), other weights (decay)."""
    biases, norm_weights, weights = [], [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(parameter)
            elif isinstance(module, nn.BatchNorm2d):
                norm_weights.append(parameter)
            else:
                weights.append(parameter)
    return [
        {"params": biases, "weight_decay": 0.0, "is_bias": True},
        {"params": norm_weights, "weight_decay": 0.0, "is_bias": False},
        {"params": weights, "weight_decay": weight_decay, "is_bias": False},
    ]


def set_schedule(optimizer: torch.optim.Optimizer, step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine decay from lr0 to lr0 * lr_final_ratio. Returns the lr."""
    progress = step / max(recipe.steps - 1, 1)
    cosine = (1 - math.cos(math.pi * progress)) / 2
    lr = recipe.lr0 * (1 - cosine * (1 - recipe.lr_final_ratio))
    warm = min(step / recipe.warmup_steps, 1.0) if recipe.warmup_steps else 1.0
    beta1 = recipe.warmup_beta1 + warm * (recipe.beta1 - recipe.warmup_beta1)
    for group in optimizer.param_groups:
        start = recipe.warmup_bias_lr if group["is_bias"] else 0.0
        group["lr"] = start + warm * (lr - start)
        group["betas"] = (beta1, 0.999)
    return lr


# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, samples: list, image_size: int) -> dict:
    """mAP50 and mAP50-95 of ``model`` on (image, truth) pairs, boxes in original pixels."""
    model.eval()
    all_correct, all_scores, all_classes, all_truth = [], [], [], []
    for image, truth in samples:
        padded, transform = letterbox(image, (image_size, image_size))
        output = model(torch.from_numpy(to_tensor(padded, Preprocess())))[0]
        detections = decode_detections(output)
        detections[:, :4] = transform.boxes_to_frame(detections[:, :4])
        all_correct.append(match_predictions(detections, truth))
        all_scores.append(detections[:, 4])
        all_classes.append(detections[:, 5])
        all_truth.append(truth[:, 0])
    return mean_average_precision(
        np.concatenate(all_correct),
        np.concatenate(all_scores),
        np.concatenate(all_classes),
        np.concatenate(all_truth),
    )


# Saving


def save_resume_state(path: Path, model, ema: ModelEMA, optimizer, step: int) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.ema.state_dict(),
        "ema_updates": ema.updates,
        "optimizer": optimizer.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def save_checkpoint(model: nn.Module, path: Path, recipe: Recipe, metrics: dict) -> None:
    """The EMA model as an Ultralytics-style fp16 checkpoint, through the toolkit's saver."""
    extra = {"train_args": dataclasses.asdict(recipe), "metrics": metrics}
    try:
        from toolkit.checkpoint import save_ultralytics_checkpoint
    except ImportError:
        # Keep the weights even where the saver is missing; package them later.
        fallback = path.with_suffix(".state.pt")
        torch.save({"state_dict": model.state_dict(), "yaml": model.yaml, **extra}, fallback)
        log.warning("toolkit.checkpoint is missing: wrote raw EMA weights to %s", fallback)
        return
    save_ultralytics_checkpoint(model, path, extra=extra)
    log.info("wrote %s", path)


# The run


def train(
    recipe: Recipe,
    out: Path,
    val_dir: Path,
    state_path: Path,
    resume: bool,
    stop_after: int | None = None,
) -> dict | None:
    torch.manual_seed(recipe.seed)
    cfg = load_config(recipe.architecture)
    model = build_model(cfg, nc=len(CLASS_NAMES), names=list(CLASS_NAMES))
    loss_weights = LossWeights(recipe.loss_box, recipe.loss_obj, recipe.loss_cls, recipe.anchor_t)
    criterion = YoloV5Loss(model.detect, loss_weights.scaled(model.nc, recipe.image_size))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, recipe.weight_decay), lr=recipe.lr0, betas=(recipe.beta1, 0.999)
    )
    if recipe.init_from:
        model.load_state_dict(torch.load(recipe.init_from, weights_only=True)["model"])
        log.info("starting from the weights in %s", recipe.init_from)
    ema = ModelEMA(model, recipe.ema_decay, recipe.ema_tau)
    val_samples = load_val_set(val_dir)
    log.info("recipe %s", json.dumps(dataclasses.asdict(recipe)))
    parameters = sum(p.numel() for p in model.parameters())
    log.info("%d parameters, %d validation images", parameters, len(val_samples))

    start = 0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.ema.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log.info("resumed from %s at step %d", state_path, start)

    began, running = time.monotonic(), None
    for step in range(start, recipe.steps):
        if stop_after is not None and step >= stop_after:
            # A first phase: keep the state for --init-from, write no checkpoint.
            save_resume_state(state_path, model, ema, optimizer, step)
            log.info("stopped after step %d as asked; state in %s", step, state_path)
            return None
        model.train()
        lr = set_schedule(optimizer, step, recipe)
        images, targets = training_batch(step, recipe)
        total, items = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
        optimizer.step()
        ema.update(model)

        running = items if running is None else running * 0.9 + items * 0.1
        if step % 10 == 0 or step == recipe.steps - 1:
            elapsed = time.monotonic() - began
            done = step + 1 - start
            eta = elapsed / done * (recipe.steps - step - 1)
            box, obj, cls = running.tolist()
            log.info(
                "step %d/%d lr %.5f loss box %.4f obj %.4f cls %.4f  %.2f s/step, %.1f min left",
                *(step + 1, recipe.steps, lr, box, obj, cls, elapsed / done, eta / 60),
            )
        if (step + 1) % recipe.eval_every == 0 and step + 1 < recipe.steps:
            metrics = evaluate(ema.ema, val_samples, recipe.image_size)
            log.info(
                "step %d EMA mAP50 %.3f mAP50-95 %.3f",
                *(step + 1, metrics["map50"], metrics["map50_95"]),
            )
            save_resume_state(state_path, model, ema, optimizer, step + 1)

    save_resume_state(state_path, model, ema, optimizer, recipe.steps)
    metrics = evaluate(ema.ema, val_samples, recipe.image_size)
    metrics["train_minutes"] = round((time.monotonic() - began) / 60, 1)
    log.info(
        "final EMA mAP50 %.4f mAP50-95 %.4f per class AP50 %s",
        *(metrics["map50"], metrics["map50_95"], metrics["ap50_per_class"]),
    )
    save_checkpoint(ema.ema, out, recipe, metrics)
    return metrics


def main() -> None:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models/demo/shapes-yolov5n.pt")
    parser.add_argument("--val", type=Path, default=REPO_ROOT / "models/demo/val")
    parser.add_argument(
        "--state",
        type=Path,
        default=Path("/tmp/train_demo_state.pt"),
        help="resume state, written at every evaluation",
    )
    parser.add_argument("--resume", action="store_true", help="continue from --state")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lr0", type=float, default=defaults.lr0)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--init-from", default="", help="start from this run state's weights")
    parser.add_argument(
        "--stop-after", type=int, default=None, help="end after this many steps of the schedule"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    recipe = dataclasses.replace(
        defaults,
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        seed=args.seed,
        lr0=args.lr0,
        warmup_steps=args.warmup_steps,
        eval_every=args.eval_every,
        init_from=args.init_from,
    )
    train(recipe, args.out, args.val, args.state, args.resume, args.stop_after)


if __name__ == "__main__":
    main()
