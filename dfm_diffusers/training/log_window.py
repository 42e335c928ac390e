"""Means of the training logs over a log window (every step since the last log row)."""

from __future__ import annotations

from typing import Mapping


class LogWindow:
    """Accumulates per-step logs and returns their means over the window.

    A value is either a float (averaged over the steps that reported it) or a ``(sum, count)`` pair (pooled:
    the window's summed sums over its summed counts), for means over a varying number of samples per step, such
    as a stage's loss over the samples where the stage is active. A pooled key whose window count is 0 (no sample
    at all) is left out of the means rather than reported as 0 or NaN.
    """

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}

    def add(self, logs: Mapping[str, float | tuple[float, float]]) -> None:
        for key, value in logs.items():
            total, count = (value if isinstance(value, (tuple, list)) else (value, 1.0))
            self._sums[key] = self._sums.get(key, 0.0) + float(total)
            self._counts[key] = self._counts.get(key, 0.0) + float(count)

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._counts[k] for k in self._sums if self._counts[k] > 0}

    def pop_means(self) -> dict[str, float]:
        """The window's means; the window starts again empty."""
        out = self.means()
        self._sums, self._counts = {}, {}
        return out
