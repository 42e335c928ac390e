"""Means of the training logs over a log window (every step since the last log row)."""

from __future__ import annotations

from typing import Mapping

import torch


class LogWindow:
    """Accumulates per-step logs and returns their means over the window.

    A value is either a number (averaged over the steps that reported it) or a ``(sum, count)`` pair (pooled:
    the window's summed sums over its summed counts), for means over a varying number of samples per step, such
    as a stage's loss over the samples where the stage is active. A pooled key whose window count is 0 (no sample
    at all) is left out of the means rather than reported as 0 or NaN.

    Numbers may be 0-dim tensors on the device: they are summed there and read on the host once, in
    :meth:`means` (one transfer for the whole window), so that adding a step's logs never waits for the device.
    """

    def __init__(self):
        self._sums: dict[str, float | torch.Tensor] = {}
        self._counts: dict[str, float | torch.Tensor] = {}

    def add(self, logs: Mapping[str, float | torch.Tensor | tuple]) -> None:
        for key, value in logs.items():
            total, count = (value if isinstance(value, (tuple, list)) else (value, 1.0))
            self._sums[key] = self._sums.get(key, 0.0) + _value(total)
            self._counts[key] = self._counts.get(key, 0.0) + _value(count)

    def means(self) -> dict[str, float]:
        keys = list(self._sums)
        sums, counts = _floats([self._sums[k] for k in keys]), _floats([self._counts[k] for k in keys])
        return {k: s / c for k, s, c in zip(keys, sums, counts) if c > 0}

    def pop_means(self) -> dict[str, float]:
        """The window's means; the window starts again empty."""
        out = self.means()
        self._sums, self._counts = {}, {}
        return out


def _value(x):
    if torch.is_tensor(x):
        return x.detach()
    return float(x)


def _floats(values: list) -> list[float]:
    """Python floats of numbers and 0-dim tensors, the tensors of each device read in one transfer."""
    out = [v if not torch.is_tensor(v) else None for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        read = torch.stack([values[i].reshape(()) for i in indices]).tolist()
        for i, x in zip(indices, read):
            out[i] = float(x)
    return out
