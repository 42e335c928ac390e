"""Per-stage DFM layers shared by the FLUX-based and the DiT-based DFM transformers (paper section 3.4).

Every stage s has its own patch size p_s, chosen so that all stages give the same token grid as the finest
stage: p_s = p_finest * u_s / (H_finest / H_s), where u_s (default 1) is the factor by which the stage's tensor is
a nearest-upsampled carrier of its band (LaplacianDecomposition's ``stage_upsampling``). Patches are flattened in
(channel, row, column) order, which is exactly FLUX's 2x2 latent packing (FluxPipeline._pack_latents) when p = 2.

Coarse grid (optional, ``coarse_grid=True``): a pass in which only stage 0 is active may instead run on stage 0's
own token grid, its band patchified with the finest stage's patch size (1/F^2 of the tokens, F = the total stage
factor); docs/coarse_grid.md explains why and when.
"""

from __future__ import annotations

from typing import Sequence

import math

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import nn

from ..utils import normalize_stage_factors


def check_values(ok: torch.Tensor, message, training: bool) -> None:
    """ValueError(``message()``) unless the 0-dim bool tensor ``ok`` holds.

    Reading ``ok`` on the host waits for the device; so in training on an accelerator the check runs on the
    device instead (``torch._assert_async``: a failure stops the run with a device-side assert) and the step never
    waits. Skipped while torch.compile traces (a host read would break the graph)."""
    if torch.compiler.is_compiling():
        return
    if training and ok.device.type != "cpu":
        torch._assert_async(ok, "DFM model input out of range (run it on the CPU or in eval mode for the details)")
    elif not bool(ok):
        raise ValueError(message())


def stage_patch_sizes(
    num_stages: int,
    stage_factors: int | Sequence[int],
    finest_patch_size: int,
    stage_upsampling: Sequence[int] | None = None,
) -> list[int]:
    """Patch size of every stage (coarse to fine) so that all stages share the finest stage's token grid; stage s's
    tensor is its band nearest-upsampled by ``stage_upsampling[s]`` (default 1)."""
    factors = normalize_stage_factors(num_stages, stage_factors)
    upsampling = [1] * num_stages if stage_upsampling is None else [int(u) for u in stage_upsampling]
    if len(upsampling) != num_stages or any(u < 1 for u in upsampling):
        raise ValueError(f"stage_upsampling must be {num_stages} ints >= 1, got {list(stage_upsampling)}")
    sizes = []
    below = 1  # resolution ratio between the finest stage and stage s
    for s in reversed(range(num_stages)):
        if (finest_patch_size * upsampling[s]) % below:
            raise ValueError(
                f"stage {s} is {below}x coarser than the finest stage (factors {factors}) and carried "
                f"{upsampling[s]}x upsampled: it would need a fractional patch size "
                f"{finest_patch_size} * {upsampling[s]} / {below} to share the finest stage's token grid"
            )
        sizes.insert(0, finest_patch_size * upsampling[s] // below)
        if s > 0:
            below *= factors[s - 1]
    return sizes


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, (H/p)*(W/p), C*p*p], patch features in (c, py, px) order."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, (H/p)*(W/p), C*p*p] -> [B, C, H, W]."""
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def stage_activity(num_active_stages: torch.Tensor, num_stages: int) -> torch.Tensor:
    """[B] long -> [B, S] bool, True where stage s < num_active_stages."""
    return torch.arange(num_stages, device=num_active_stages.device)[None, :] < num_active_stages[:, None]


def zero_contribution(*modules) -> torch.Tensor | float:
    """0 x (sum of the trainable parameters of ``modules``): added to an output so that layers a pass does not use
    still get (zero) gradients, as DistributedDataParallel requires of every step."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return 0.0
    return sum(p.sum() for p in params) * 0.0


class StageTimestepEmbedding(nn.Module):
    """FLUX/DiT-style sinusoidal (256 channels) + MLP timestep embedder; input is sigma in [0, 1].

    ``timestep_scale`` multiplies sigma before the sinusoids: 1000 like diffusers' FLUX does internally (default),
    1 for SiT-family models, which embed the raw time in [0, 1].
    """

    def __init__(self, embedding_dim: int, num_channels: int = 256, timestep_scale: float = 1000.0):
        super().__init__()
        self.timestep_scale = float(timestep_scale)
        self.time_proj = Timesteps(num_channels=num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=num_channels, time_embed_dim=embedding_dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma [B] -> [B, D] (sigma * timestep_scale goes into the sinusoids)."""
        proj = self.time_proj(sigma.float() * self.timestep_scale)
        return self.timestep_embedder(proj.to(dtype))


class StageOutputHead(nn.Module):
    """adaLN-modulated LayerNorm + linear projection to one stage's patch features (FLUX's norm_out/proj_out)."""

    def __init__(self, embedding_dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.norm_out = AdaLayerNormContinuous(embedding_dim, embedding_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(embedding_dim, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """tokens [B, N, D], temb [B, D] -> [B, C, height, width]."""
        return unpatchify(self.proj_out(self.norm_out(hidden_states, temb)), self.patch_size, height, width)


class DFMStageLayers(nn.Module):
    """The per-stage input projections, timestep embedders, stage-index embedding and output heads.

    ``timestep_embedders`` exist for stages ``first_timestep_stage .. S-1`` (a model may embed stage 0's
    sigma with its own embedder, as the FLUX-based model does with FLUX's time_text_embed); they embed
    sigma * ``timestep_scale``.

    ``coarse_grid=True`` adds the coarse phase's layers: a pass with stage 0 alone may run on stage 0's own token
    grid (its band at its own resolution, patch = the finest patch size). When stage 0's patch size already is the
    finest one (stage 0 carried at the finest resolution, the FLUX conversion), its patch embedder and head apply to
    the band as they are and are shared; otherwise (DiT: stage 0 uses a smaller patch) the coarse phase gets its own
    ``coarse_patch_embedder`` and ``coarse_head`` (docs/coarse_grid.md says why).
    """

    def __init__(
        self,
        num_stages: int,
        stage_factors: int | Sequence[int],
        finest_patch_size: int,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        first_timestep_stage: int = 0,
        stage_upsampling: Sequence[int] | None = None,
        timestep_scale: float = 1000.0,
        coarse_grid: bool = False,
    ):
        super().__init__()
        self.num_stages = num_stages
        self.first_timestep_stage = first_timestep_stage
        self.patch_sizes = stage_patch_sizes(num_stages, stage_factors, finest_patch_size, stage_upsampling)
        self.finest_patch_size = finest_patch_size
        self.patch_embedders = nn.ModuleList(
            [nn.Linear(in_channels * p * p, embedding_dim) for p in self.patch_sizes]
        )
        self.timestep_embedders = nn.ModuleList(
            [
                StageTimestepEmbedding(embedding_dim, timestep_scale=timestep_scale)
                for _ in range(first_timestep_stage, num_stages)
            ]
        )
        self.stage_embedding = nn.Embedding(num_stages, embedding_dim)
        self.heads = nn.ModuleList([StageOutputHead(embedding_dim, p, out_channels) for p in self.patch_sizes])
        #: resolution ratio between the finest stage and stage 0 (the coarse grid has 1/coarse_factor^2 the tokens)
        self.coarse_factor = math.prod(normalize_stage_factors(num_stages, stage_factors))
        self.coarse_grid = bool(coarse_grid)
        self.own_coarse_layers = self.coarse_grid and self.patch_sizes[0] != finest_patch_size
        if self.coarse_grid and num_stages < 2:
            raise ValueError("coarse_grid needs at least 2 stages (with one stage every pass is on the finest grid)")
        if self.own_coarse_layers:
            # stage 0's joint-grid layers read patches of p_0 < p pixels: the coarse grid needs p x p patches
            self.coarse_patch_embedder = nn.Linear(in_channels * finest_patch_size**2, embedding_dim)
            self.coarse_head = StageOutputHead(embedding_dim, finest_patch_size, out_channels)

    def check_inputs(
        self, stage_latents: Sequence[torch.Tensor], timestep: torch.Tensor, num_active_stages,
        stage0_at_band: bool = False,
    ):
        """ValueError unless the inputs follow the forward contract; returns the token grid (h, w).
        ``stage0_at_band``: stage 0 is expected at its band's own resolution (the coarse phase) instead."""
        S = self.num_stages
        if not isinstance(stage_latents, (list, tuple)) or len(stage_latents) != S:
            got = len(stage_latents) if isinstance(stage_latents, (list, tuple)) else type(stage_latents).__name__
            raise ValueError(f"hidden_states must be a list of {S} stage tensors [B, C, H_s, W_s], got {got}")
        if any(x.ndim != 4 for x in stage_latents):
            raise ValueError(f"stage tensors must be [B, C, H_s, W_s], got {[tuple(x.shape) for x in stage_latents]}")
        b, c = stage_latents[-1].shape[:2]
        h, w = stage_latents[-1].shape[-2:]
        p = self.finest_patch_size
        if h % p or w % p:
            raise ValueError(f"the finest stage's size {h}x{w} must be divisible by its patch size {p}")
        grid = (h // p, w // p)
        expected = [(b, c, grid[0] * ps, grid[1] * ps) for ps in self.patch_sizes]
        if stage0_at_band:
            expected[0] = (b, c, *self.coarse_band_shape(grid))
        got = [tuple(x.shape) for x in stage_latents]
        if got != expected:
            raise ValueError(f"stage tensors have shapes {got}; with patch sizes {self.patch_sizes} expected {expected}")
        if timestep is None or tuple(timestep.shape) != (b, S):
            got_t = None if timestep is None else tuple(timestep.shape)
            raise ValueError(f"timestep must be per-stage sigmas of shape [B, S] = {(b, S)}, got {got_t}")
        if num_active_stages is None or tuple(num_active_stages.shape) != (b,):
            got_n = None if num_active_stages is None else tuple(num_active_stages.shape)
            raise ValueError(f"num_active_stages must be a [B] = ({b},) integer tensor, got {got_n}")
        check_values(
            (num_active_stages.min() >= 1) & (num_active_stages.max() <= S),
            lambda: f"num_active_stages must be in 1..{S}, got {num_active_stages.tolist()}", self.training,
        )
        return grid

    def embed_stages(self, stage_latents: Sequence[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        """Sum of the per-stage patch embeddings; inactive stages' inputs are zeroed first. -> [B, N, D]."""
        tokens = None
        for s, (x, embedder) in enumerate(zip(stage_latents, self.patch_embedders)):
            x = x * active[:, s].view(-1, 1, 1, 1).to(x.dtype)
            emb = embedder(patchify(x, self.patch_sizes[s]).to(embedder.weight.dtype))
            tokens = emb if tokens is None else tokens + emb
        return tokens

    def embed_conditioning(self, timestep: torch.Tensor, num_active_stages: torch.Tensor, dtype) -> torch.Tensor:
        """Sum of the per-stage timestep embeddings (stages >= first_timestep_stage) and the stage-index
        embedding of num_active_stages - 1. -> [B, D]."""
        cond = self.stage_embedding(num_active_stages.long() - 1).to(dtype)
        for i, embedder in enumerate(self.timestep_embedders):
            cond = cond + embedder(timestep[:, self.first_timestep_stage + i], dtype)
        return cond

    def unembed_stages(
        self, hidden_states: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int], active: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per-stage heads -> list of S velocities [B, C, H_s, W_s]; inactive stages come back as zeros."""
        outputs = []
        for s, head in enumerate(self.heads):
            p = self.patch_sizes[s]
            out = head(hidden_states, temb, grid[0] * p, grid[1] * p)
            outputs.append(out * active[:, s].view(-1, 1, 1, 1).to(out.dtype))
        return outputs

    # ------------------------------------------------------------------------------------ the coarse grid
    def coarse_band_shape(self, grid: tuple[int, int]) -> tuple[int, int]:
        """(H_0, W_0), stage 0's band at its own resolution, for the finest stage's token grid ``grid``."""
        p = self.finest_patch_size
        return grid[0] * p // self.coarse_factor, grid[1] * p // self.coarse_factor

    def coarse_grid_of(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Stage 0's own token grid (H_0 / p, W_0 / p) for the finest stage's token grid ``grid``; ValueError if
        the band's size is not a multiple of the finest patch size p."""
        h0, w0 = self.coarse_band_shape(grid)
        p = self.finest_patch_size
        if h0 % p or w0 % p:
            raise ValueError(
                f"stage 0's band {h0}x{w0} must be divisible by the finest patch size {p} to run on its own token "
                f"grid (the finest stage's size must be divisible by {p * self.coarse_factor})"
            )
        return h0 // p, w0 // p

    def coarse_layers(self) -> tuple[nn.Linear, StageOutputHead]:
        """The patch embedder and output head of the coarse phase (own ones, or stage 0's when shared)."""
        if not self.coarse_grid:
            raise ValueError("these stage layers were built without coarse_grid")
        if self.own_coarse_layers:
            return self.coarse_patch_embedder, self.coarse_head
        return self.patch_embedders[0], self.heads[0]

    def embed_coarse(self, band: torch.Tensor) -> torch.Tensor:
        """Stage 0's band [B, C, H_0, W_0] -> tokens [B, (H_0/p)*(W_0/p), D] of the coarse grid (p = finest)."""
        embedder, _ = self.coarse_layers()
        return embedder(patchify(band, self.finest_patch_size).to(embedder.weight.dtype))

    def unembed_coarse(self, hidden_states: torch.Tensor, temb: torch.Tensor, coarse_grid: tuple[int, int]):
        """Coarse-grid tokens [B, N_0, D] -> stage 0's velocity [B, C_out, H_0, W_0]."""
        _, head = self.coarse_layers()
        p = self.finest_patch_size
        return head(hidden_states, temb, coarse_grid[0] * p, coarse_grid[1] * p)
