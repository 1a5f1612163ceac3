"""The YOLOv5 detection head: one 1x1 conv per level, then (in eval mode) box decoding.

Input: a list of ``nl`` feature maps ``(batch, ch[i], ny, nx)``, strides ``self.stride``.

Training mode returns the raw maps, each ``(batch, na, ny, nx, 5 + nc)`` (no sigmoid), for the
loss. Eval mode returns ``(batch, na * sum(ny * nx), 5 + nc)``: ``cx, cy, w, h`` in input
pixels, objectness and per-class probabilities, all after the sigmoid, levels concatenated in
stride order. This decoding is upstream's v6.0+ formula:

    xy = (2 * sigmoid(t_xy) - 0.5 + grid) * stride
    wh = (2 * sigmoid(t_wh)) ** 2 * anchor
"""

from __future__ import annotations

import torch
from torch import nn


class Detect(nn.Module):
    """Per-level prediction convs and the anchor-based decoder."""

    def __init__(self, nc: int, anchors: list[list[float]], ch: list[int], inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.inplace = inplace

        # In pixels until the model builder divides them by the level strides.
        self.register_buffer(
            "anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        )
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.stride = torch.zeros(self.nl)

        # Recompute grids from the traced shapes (needed for ONNX exports with dynamic size).
        self.dynamic = False
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        maps = []
        for level, conv in enumerate(self.m):
            y = conv(x[level])
            batch, _, ny, nx = y.shape
            maps.append(y.view(batch, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())

        if self.training:
            return maps
        return torch.cat([self._decode(level, p) for level, p in enumerate(maps)], 1)

    def _decode(self, level: int, p: torch.Tensor) -> torch.Tensor:
        batch, _, ny, nx, _ = p.shape
        grid, anchor_grid = self._grid(level, nx, ny, p)
        xy, wh, conf = p.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * float(self.stride[level])
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4).view(batch, self.na * ny * nx, self.no)

    def _grid(
        self, level: int, nx: int, ny: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._grids.get(level)
        if (
            not self.dynamic
            and cached is not None
            and cached[0].shape[2:4] == (ny, nx)
            and cached[0].dtype == like.dtype
            and cached[0].device == like.device
        ):
            return cached

        shape = (1, self.na, ny, nx, 2)
        ys = torch.arange(ny, device=like.device, dtype=like.dtype)
        xs = torch.arange(nx, device=like.device, dtype=like.dtype)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        # The -0.5 folds upstream's "2 * sigmoid - 0.5" offset into the grid.
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (
            (self.anchors[level] * self.stride[level].to(like.device))
            .to(like.dtype)
            .view(1, self.na, 1, 1, 2)
            .expand(shape)
        )
        if not self.dynamic:
            self._grids[level] = (grid, anchor_grid)
        return grid, anchor_grid

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the module invalidates the cached grids.
        self._grids = {}
        return super()._apply(fn, *args, **kwargs)
