"""Laplacian-pyramid decomposition of a latent into DFM stages (coarse to fine).

Stage 0 is the low-pass at the coarsest resolution; stage s > 0 is the detail band that takes the
recomposition of stages 0..s-1 to stage s's resolution. ``recompose(decompose(x)) == x`` up to float error.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..utils import normalize_stage_factors


class LaplacianDecomposition:
    """Bilinear Laplacian pyramid over [B, C, H, W] tensors.

    Args:
        num_stages: S >= 1, number of stages (S = 1 is the identity decomposition).
        factors: resolution factor between stage s-1 and stage s; an int for all, or a list of S-1 ints.
        antialias: antialiased bilinear downsampling (at factor 2 without it, down == 2x2 average pooling).
        stage_scales: optional per-stage standardization; band s is divided by ``stage_scales[s]`` on
            decompose and multiplied back on recompose / preview.

    All arithmetic runs in float32 and results come back in the input dtype.
    """

    def __init__(
        self,
        num_stages: int = 2,
        factors: int | Sequence[int] = 2,
        antialias: bool = False,
        stage_scales: Sequence[float] | None = None,
    ):
        self.num_stages = int(num_stages)
        self.factors = normalize_stage_factors(num_stages, factors)
        self.antialias = bool(antialias)
        if stage_scales is not None:
            stage_scales = [float(s) for s in stage_scales]
            if len(stage_scales) != self.num_stages or any(s <= 0 for s in stage_scales):
                raise ValueError(
                    f"stage_scales must be {self.num_stages} positive numbers (one per stage), got {stage_scales}"
                )
        self.stage_scales = stage_scales

    @classmethod
    def from_config(cls, config) -> "LaplacianDecomposition":
        """The decomposition a DFM model was built for, from its config (num_stages, stage_factors and the
        optional stage_scales / decomposition_antialias)."""
        return cls(
            config.num_stages,
            config.stage_factors,
            antialias=config.get("decomposition_antialias", False),
            stage_scales=config.get("stage_scales", None),
        )

    def __repr__(self) -> str:
        return (
            f"LaplacianDecomposition(num_stages={self.num_stages}, factors={self.factors}, "
            f"antialias={self.antialias}, stage_scales={self.stage_scales})"
        )

    @property
    def total_factor(self) -> int:
        """Resolution ratio between the finest and the coarsest stage."""
        total = 1
        for f in self.factors:
            total *= f
        return total

    def stage_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H_s, W_s) of every stage, coarse to fine, for a finest-stage size (height, width)."""
        total = self.total_factor
        if height % total or width % total:
            raise ValueError(
                f"height and width must be divisible by {total} (the product of the stage factors "
                f"{self.factors}); got {height}x{width}"
            )
        shapes = [(height, width)]
        for f in reversed(self.factors):
            h, w = shapes[0]
            shapes.insert(0, (h // f, w // f))
        return shapes

    def _down(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        size = (x.shape[-2] // factor, x.shape[-1] // factor)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.antialias)

    @staticmethod
    def _up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def decompose(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, H, W] -> list of S bands, band s shaped [B, C, H_s, W_s] (coarse to fine)."""
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        self.stage_shapes(x.shape[-2], x.shape[-1])
        dtype = x.dtype
        low = x.float()
        bands = []
        for factor in reversed(self.factors):
            coarse = self._down(low, factor)
            bands.insert(0, low - self._up(coarse, low.shape[-2:]))
            low = coarse
        bands.insert(0, low)
        if self.stage_scales is not None:
            bands = [band / scale for band, scale in zip(bands, self.stage_scales)]
        return [band.to(dtype) for band in bands]

    def recompose(self, bands: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of S bands -> [B, C, H, W] at the finest stage's resolution."""
        self.check_bands(bands, self.num_stages)
        return self._recompose(bands)

    def preview(self, bands: Sequence[torch.Tensor], upto: int) -> torch.Tensor:
        """Recomposition of stages 0..upto only, at stage ``upto``'s resolution (the low-res preview).

        ``bands`` may hold all S stages or just the first ``upto + 1``.
        """
        if not 0 <= upto < self.num_stages:
            raise ValueError(f"upto must be in 0..{self.num_stages - 1}, got {upto}")
        if len(bands) <= upto:
            raise ValueError(f"preview(upto={upto}) needs at least {upto + 1} bands, got {len(bands)}")
        self.check_bands(bands[: upto + 1], upto + 1)
        return self._recompose(bands[: upto + 1])

    def _recompose(self, bands: Sequence[torch.Tensor]) -> torch.Tensor:
        dtype = bands[0].dtype
        scales = self.stage_scales or [1.0] * self.num_stages
        y = bands[0].float() * scales[0]
        for s in range(1, len(bands)):
            y = self._up(y, bands[s].shape[-2:]) + bands[s].float() * scales[s]
        return y.to(dtype)

    def check_bands(self, bands: Sequence[torch.Tensor], count: int) -> None:
        """Raise ValueError unless ``bands`` holds ``count`` [B, C, H_s, W_s] tensors that fit the factors."""
        if len(bands) != count:
            raise ValueError(f"expected {count} stage tensors (coarse to fine), got {len(bands)}")
        if any(b.ndim != 4 for b in bands):
            raise ValueError(f"stage tensors must be [B, C, H, W], got shapes {[tuple(b.shape) for b in bands]}")
        b0, c0, h0, w0 = bands[0].shape
        expected = [(b0, c0, h0, w0)]
        for f in self.factors[: count - 1]:
            _, _, h, w = expected[-1]
            expected.append((b0, c0, h * f, w * f))
        got = [tuple(b.shape) for b in bands]
        if got != expected:
            raise ValueError(
                f"stage tensors have shapes {got}; with factors {self.factors[: count - 1]} expected {expected}"
            )
