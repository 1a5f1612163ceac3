"""The YOLOv5 training loss: anchor matching, CIoU box loss, BCE objectness and class losses.

The same recipe as upstream's ``ComputeLoss``:

- a target is assigned to every anchor of a level whose width and height ratios to the target
  are within ``anchor_t`` (4.0) both ways, in the target's cell and in the two neighbouring cells
  nearest to its centre (so up to 3 cells x 3 anchors x 3 levels predict one object);
- box loss is ``1 - CIoU`` between the decoded prediction and the target in grid units;
- objectness target is the (detached, clamped) CIoU of the prediction at a matched cell, 0
  elsewhere, with per-level weights 4.0, 1.0, 0.4 (strides 8, 16, 32);
- class loss is BCE against one-hot targets.

Input contract: ``predictions`` is the model's training-mode output, a list of ``nl`` raw maps
``(batch, na, ny, nx, 5 + nc)``; ``targets`` is ``(n, 6)`` rows ``image_index, class, cx, cy, w,
h`` with the box normalised to the input size (0..1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LEVEL_BALANCE = (4.0, 1.0, 0.4)  # objectness weight per level, strides 8, 16, 32
NEIGHBOUR_MARGIN = 0.5  # a centre this close to a cell edge also assigns the neighbouring cell


@dataclass(frozen=True)
class LossWeights:
    """Gains of the three loss terms and the anchor matching threshold (upstream's hyp)."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0

    def scaled(self, num_classes: int, image_size: int, levels: int = 3) -> LossWeights:
        """Upstream's scaling of the gains to the class count, input size and level count."""
        return LossWeights(
            box=self.box * 3 / levels,
            obj=self.obj * (image_size / 640) ** 2 * 3 / levels,
            cls=self.cls * num_classes / 80 * 3 / levels,
            anchor_t=self.anchor_t,
        )


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired (n, 4) ``cx, cy, w, h`` boxes: IoU minus the centre-distance and
    aspect-ratio penalties (Zheng et al. 2020). Returns (n,)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(1), box2.unbind(1)
    b1_x1, b1_x2, b1_y1, b1_y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2_x1, b2_x2, b2_y1, b2_y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2

    inter_w = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0)
    inter_h = (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    # Squared diagonal of the smallest enclosing box, and squared distance between centres.
    enclose_w = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    enclose_h = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    diagonal = enclose_w**2 + enclose_h**2 + eps
    distance = (x2 - x1) ** 2 + (y2 - y1) ** 2

    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (distance / diagonal + v * alpha)


class YoloV5Loss:
    """Callable ``(predictions, targets) -> (total, [box, obj, cls] detached)``.

    ``total`` is multiplied by the batch size, as upstream does, so the learning rate means the
    same at any batch size.
    """

    def __init__(self, detect: nn.Module, weights: LossWeights) -> None:
        self.weights = weights
        self.num_classes = detect.nc
        self.num_levels = detect.nl
        self.num_anchors = detect.na
        self.anchors = detect.anchors  # (nl, na, 2) in grid units of each level
        self.bce = nn.BCEWithLogitsLoss()
        if self.num_levels != len(LEVEL_BALANCE):
            raise ValueError(f"expected {len(LEVEL_BALANCE)} detection levels, got {detect.nl}")

    def __call__(
        self, predictions: list[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = predictions[0].device
        box_loss = torch.zeros(1, device=device)
        obj_loss = torch.zeros(1, device=device)
        cls_loss = torch.zeros(1, device=device)
        matches = self.build_targets(predictions, targets)

        for level, raw in enumerate(predictions):
            (image, anchor, gy, gx), target_box, target_cls, anchor_wh = matches[level]
            target_obj = torch.zeros(raw.shape[:4], dtype=raw.dtype, device=device)

            if image.numel():
                pxy, pwh, _, pcls = raw[image, anchor, gy, gx].split((2, 2, 1, self.num_classes), 1)
                pxy = pxy.sigmoid() * 2 - 0.5
                pwh = (pwh.sigmoid() * 2) ** 2 * anchor_wh
                ciou = bbox_ciou(torch.cat((pxy, pwh), 1), target_box)
                box_loss += (1.0 - ciou).mean()

                # Objectness learns the quality of the box, not just "an object is here".
                target_obj[image, anchor, gy, gx] = ciou.detach().clamp(0).to(raw.dtype)

                if self.num_classes > 1:
                    onehot = torch.zeros_like(pcls)
                    onehot[torch.arange(len(target_cls)), target_cls] = 1.0
                    cls_loss += self.bce(pcls, onehot)

            obj_loss += self.bce(raw[..., 4], target_obj) * LEVEL_BALANCE[level]

        box_loss *= self.weights.box
        obj_loss *= self.weights.obj
        cls_loss *= self.weights.cls
        batch = predictions[0].shape[0]
        total = (box_loss + obj_loss + cls_loss) * batch
        return total, torch.cat((box_loss, obj_loss, cls_loss)).detach()

    def build_targets(self, predictions: list[torch.Tensor], targets: torch.Tensor) -> list[tuple]:
        """For each level: ((image, anchor, gy, gx) indices, boxes relative to their cell
        ``(dx, dy, w, h)`` in grid units, class ids, matched anchor sizes in grid units)."""
        device = targets.device
        na, nt = self.num_anchors, targets.shape[0]
        anchor_index = torch.arange(na, device=device).float().view(na, 1).repeat(1, nt)
        # (na, nt, 7): every target once per anchor, with the anchor index appended.
        per_anchor = torch.cat((targets.repeat(na, 1, 1), anchor_index[..., None]), 2)
        offsets = (
            torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float()
            * NEIGHBOUR_MARGIN
        )

        matches = []
        gain = torch.ones(7, device=device)
        for level in range(self.num_levels):
            anchors = self.anchors[level]
            _, _, ny, nx, _ = predictions[level].shape
            gain[2:6] = torch.tensor([nx, ny, nx, ny], device=device).float()
            scaled = per_anchor * gain  # boxes in this level's grid units

            if nt:
                # Keep target-anchor pairs whose sizes differ by less than anchor_t either way.
                ratio = scaled[..., 4:6] / anchors[:, None]
                keep = torch.max(ratio, 1 / ratio).max(2)[0] < self.weights.anchor_t
                kept = scaled[keep]

                # Also assign the two neighbouring cells nearest to the centre.
                gxy = kept[:, 2:4]
                gxy_inverse = gain[[2, 3]] - gxy
                left, top = ((gxy % 1 < NEIGHBOUR_MARGIN) & (gxy > 1)).T
                right, bottom = ((gxy_inverse % 1 < NEIGHBOUR_MARGIN) & (gxy_inverse > 1)).T
                cells = torch.stack((torch.ones_like(left), left, top, right, bottom))
                kept = kept.repeat((5, 1, 1))[cells]
                shift = (torch.zeros_like(gxy)[None] + offsets[:, None])[cells]
            else:
                kept = per_anchor[0]
                shift = torch.zeros((0, 2), device=device)

            image_class, gxy, gwh, anchor = kept.split((2, 2, 2, 1), 1)
            anchor = anchor.long().view(-1)
            image, cls = image_class.long().T
            cell = (gxy - shift).long()
            gx = cell[:, 0].clamp(0, nx - 1)
            gy = cell[:, 1].clamp(0, ny - 1)
            matches.append(
                ((image, anchor, gy, gx), torch.cat((gxy - cell, gwh), 1), cls, anchors[anchor])
            )
        return matches
