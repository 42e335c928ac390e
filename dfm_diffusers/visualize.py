"""Figures: image grids (PIL) and line plots (matplotlib: loss curves, sigma schedules)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(images: torch.Tensor, value_range=(-1.0, 1.0)) -> np.ndarray:
    """[B, C, H, W] float in value_range -> [B, H, W, 3] uint8 (1-channel images become gray RGB)."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def image_grid(rows, size: int | None = None, value_range=(-1.0, 1.0), pad: int = 2) -> Image.Image:
    """Grid with one row per entry of ``rows``: a tensor [N, C, H, W] or a list of [C, H, W] tiles of any
    sizes; every tile is resized (nearest) to ``size`` px wide, and as high as the aspect of the last row's first
    tile says (square tiles stay square)."""
    rows = [list(r) for r in rows]
    size = size or max(t.shape[-1] for r in rows for t in r)
    height = max(1, round(size * rows[-1][0].shape[-2] / rows[-1][0].shape[-1]))
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * (size + pad) + pad, len(rows) * (height + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            tile = F.interpolate(tile[None].detach().float().cpu(), size=(height, size), mode="nearest")
            grid.paste(Image.fromarray(to_uint8(tile, value_range)[0]), (pad + j * (size + pad), pad + i * (height + pad)))
    return grid


def ema_smooth(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average (weight 0 = none, 0.99 = heavy)."""
    values = np.asarray(values, dtype=np.float64)
    out, avg, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = avg / norm if norm > 0 else v
    return out


def line_plot(
    series: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    path: str,
    x: Sequence[float] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
    smoothing: float = 0.0,
    size: tuple[int, int] = (640, 400),
) -> str:
    """Write a matplotlib line plot of named series to ``path`` (PNG, ``size`` pixels) and return ``path``.

    A series is a list of y values (against ``x``, default 0, 1, ...) or its own ``(xs, ys)`` pair. With
    ``smoothing`` > 0 the raw curves are drawn faint and their :func:`ema_smooth` on top.
    """
    from matplotlib.figure import Figure  # the object API renders with Agg, without pyplot's global state

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot()
    for k, (name, values) in enumerate(series.items()):
        xs, ys = values if isinstance(values, tuple) else (x if x is not None else range(len(values)), values)
        xs, ys = np.asarray(list(xs), dtype=np.float64), np.asarray(list(ys), dtype=np.float64)
        color = f"C{k % 10}"
        if smoothing > 0 and len(ys) > 1:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
            ys = ema_smooth(ys, smoothing)
        ax.plot(xs, ys, color=color, linewidth=1.8, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
