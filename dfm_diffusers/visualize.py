"""Small PIL-only figures: image grids, a decomposition strip, line plots (loss curves, sigma schedules)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def to_uint8(images: torch.Tensor, value_range=(-1.0, 1.0)) -> np.ndarray:
    """[B, C, H, W] float in value_range -> [B, H, W, 3] uint8 (1-channel images become gray RGB)."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def image_grid(rows, size: int | None = None, value_range=(-1.0, 1.0), pad: int = 2) -> Image.Image:
    """Grid with one row per entry of ``rows``: a tensor [N, C, H, W] or a list of [C, H, W] tiles of any
    sizes; every tile is resized (nearest) to ``size`` px."""
    rows = [list(r) for r in rows]
    size = size or max(t.shape[-1] for r in rows for t in r)
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            tile = F.interpolate(tile[None].detach().float().cpu(), size=(size, size), mode="nearest")
            grid.paste(Image.fromarray(to_uint8(tile, value_range)[0]), (pad + j * (size + pad), pad + i * (size + pad)))
    return grid


def line_plot(
    series: dict[str, Sequence[float]],
    x: Sequence[float] | None = None,
    title: str = "",
    size: tuple[int, int] = (640, 400),
    logy: bool = False,
) -> Image.Image:
    """A plain line plot of named series (PIL only, no matplotlib)."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    values = [np.asarray(v, dtype=np.float64) for v in series.values()]
    if logy:
        values = [np.log10(np.maximum(v, 1e-12)) for v in values]
    xs = np.asarray(x if x is not None else np.arange(max(len(v) for v in values)), dtype=np.float64)
    ymin = min(float(v.min()) for v in values if len(v))
    ymax = max(float(v.max()) for v in values if len(v))
    if ymax == ymin:
        ymax = ymin + 1.0
    xmin, xmax = float(xs.min()), float(xs.max()) if len(xs) > 1 else float(xs.min()) + 1

    def point(px, py):
        return (
            left + (px - xmin) / (xmax - xmin or 1) * (w - left - right),
            top + (1 - (py - ymin) / (ymax - ymin)) * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for k, (name, v) in enumerate(zip(series.keys(), values)):
        color = PALETTE[k % len(PALETTE)]
        pts = [point(xs[i], v[i]) for i in range(len(v))]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        draw.text((left + 8, top + 6 + 14 * k), name, fill=color)
    fmt = (lambda t: f"1e{t:.1f}") if logy else (lambda t: f"{t:.3g}")
    draw.text((4, top - 6), fmt(ymax), fill=(0, 0, 0))
    draw.text((4, h - bottom - 6), fmt(ymin), fill=(0, 0, 0))
    draw.text((left, h - bottom + 6), f"{xmin:.3g}", fill=(0, 0, 0))
    draw.text((w - right - 40, h - bottom + 6), f"{xmax:.3g}", fill=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    return img
