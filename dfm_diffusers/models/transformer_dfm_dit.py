"""A class-conditional DiT (Peebles & Xie, 2023) with the Decomposable Flow Matching changes (arXiv 2506.19839).

The trunk is DiT's: patch tokens + fixed 2D sin-cos positions, N blocks of adaLN-Zero self-attention and MLP,
conditioning c = class embedding + timestep embedding. The DFM changes all live in the
shared :class:`~dfm_diffusers.models.stage_layers.DFMStageLayers`:

- every stage s (coarse to fine) has its own patch embedding, with a patch size chosen so that all stages give
  the finest stage's token grid; the per-stage token embeddings are summed (inactive stages' inputs are zeroed);
- every stage has its own timestep embedder; their outputs, plus an embedding of the current stage index
  (num_active_stages - 1), are summed into c;
- every stage has its own adaLN output head, unpatchified with its own patch size.

Optionally (``coarse_phase_on_coarse_grid``) a pass in which only stage 0 is active runs on stage 0's own token grid
(1/F^2 of the tokens, own patch embedder and head, positions ``coarse_grid_positions``); docs/coarse_grid.md.

With ``num_stages=1`` the model is a plain DiT trained with flow matching (the paper's baseline) and runs through
the same code. Inputs and outputs follow the project's conventions: sigma in [0, 1] with
sigma = 1 pure noise, and the model predicts the velocity v = eps - x of every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import LabelEmbedding, get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..utils import normalize_stage_factors
from .loading import SelfContainedModelMixin, strict_from_pretrained
from .stage_layers import DFMStageLayers, check_values, stage_activity, zero_contribution

# --------------------------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------------------------

#: Positions of the coarse grid's tokens (``coarse_grid_positions``); docs/coarse_grid.md compares them.
COARSE_GRID_POSITIONS = ("scaled", "own")

#: Trunk sizes of the DiT paper (Table 1), plus "T", a tiny size of this project for tests and the quickstart.
DIT_SIZES = {
    "T": dict(num_layers=6, num_attention_heads=3, attention_head_dim=64),  # 192 wide; not in the DiT paper
    "S": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),  # 384 wide
    "B": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),  # 768 wide
    "L": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),  # 1024 wide
    "XL": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),  # 1152 wide
}


def _build_presets() -> dict[str, dict]:
    presets = {}
    for size, trunk in DIT_SIZES.items():
        for patch in (1, 2, 4, 8):
            # "DiT-*": one stage, i.e. the plain flow-matching DiT baseline.
            presets[f"DiT-{size}/{patch}"] = dict(trunk, patch_size=patch, num_stages=1, stage_factors=2)
            # "DFM-DiT-*": two stages a factor 2 apart; the patch size is the finest stage's (the coarse stage
            # uses patch / 2, so a finest patch of 1 is impossible).
            if patch >= 2:
                presets[f"DFM-DiT-{size}/{patch}"] = dict(trunk, patch_size=patch, num_stages=2, stage_factors=2)
    return presets


#: Every named configuration accepted by :meth:`DFMDiTTransformer2DModel.from_preset`. Presets fix the trunk
#: (depth, width, heads), the finest-stage patch size and the stages; everything else keeps the class defaults
#: (sample_size 32, in_channels 4, num_classes 1000: ImageNet 256x256 through the SD VAE, as in DiT) and can be
#: overridden.
DIT_PRESETS: dict[str, dict] = _build_presets()


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens [B, N, D] by per-sample shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed_at(embed_dim: int, pos_h: torch.Tensor, pos_w: torch.Tensor) -> torch.Tensor:
    """2D sin-cos embedding [h*w, D] at arbitrary (float) row positions ``pos_h`` [h] and column positions ``pos_w``
    [w], rows major; with integer-spaced positions it is diffusers' ``get_2d_sincos_pos_embed``."""
    grid = torch.stack(torch.meshgrid(pos_w, pos_h, indexing="xy"), dim=0).reshape(2, 1, len(pos_h), len(pos_w))
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


class ClassEmbedding(LabelEmbedding):
    """diffusers' LabelEmbedding, always with a null class (index ``num_classes``) for classifier-free guidance.

    In training mode each label is replaced by the null class with probability ``dropout_prob``. ``force_drop_ids``
    ([B], 1/True = drop) replaces chosen labels in any mode, e.g. for the unconditional half of a CFG batch.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, hidden_size, dropout_prob)
        # LabelEmbedding only adds the null row when dropout_prob > 0; CFG at inference needs it regardless.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids=None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)


class DiTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (DiT / timm naming), via torch SDPA."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class DiTMlp(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning: c -> (shift, scale, gate) for attention and for the MLP."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = DiTMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


@dataclass
class DFMDiTTransformer2DModelOutput(BaseOutput):
    """sample: list of S per-stage velocities [B, C_out, H_s, W_s] (coarse to fine); inactive stages are zeros."""

    sample: list[torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class DFMDiTTransformer2DModel(SelfContainedModelMixin, ModelMixin, ConfigMixin):
    r"""Class-conditional DiT with Decomposable Flow Matching stages.

    Args:
        sample_size: spatial size of the finest stage the model is built for (32 for 32x32 pixels, 32 for 256px
            images through an 8x VAE). It fixes the reference grid of the positional embedding; other sizes
            (divisible by the patch sizes) also work, with positions rescaled to the same range.
        in_channels: channels of every stage's input.
        out_channels: channels of every stage's output (default: in_channels).
        num_layers: number of DiT blocks.
        num_attention_heads, attention_head_dim: the width is their product.
        mlp_ratio: MLP hidden width / width.
        num_classes: number of classes; label ``num_classes`` is the null (unconditional) class.
        class_dropout_prob: probability of replacing a label by the null class in training mode (for CFG).
        patch_size: patch size of the finest stage; stage s uses patch_size / (product of the later factors).
        num_stages: S, number of DFM stages (1 = plain DiT with flow matching).
        stage_factors: resolution factor between consecutive stages (an int, or S-1 ints).
        learn_sigma: must stay False (DiT's learned variance has no meaning for flow matching); kept so that DiT
            configs read naturally.
        stage_scales, decomposition_antialias: the LaplacianDecomposition the model is trained with (per-stage
            standardization scales, antialiased downsampling). The forward pass does not use them; they are stored
            in the config so that a saved model rebuilds its decomposition (see pipelines' ``decomposition_for``).
        timestep_scale: the timestep embedders embed sigma * timestep_scale (1000, the default, like DiT's
            integer timesteps; 1 for models converted from the SiT family, which embed the raw time in [0, 1]).
        coarse_phase_on_coarse_grid: if True, every sample with stage 0 alone active (num_active_stages 1) runs on
            stage 0's own token grid: its band patchified with the finest patch size (1/F^2 of the tokens, F the
            product of the stage factors) through its own ``coarse_patch_embedder`` and ``coarse_head``; samples
            with later stages active run on the finest grid exactly as with False (the default; old checkpoints).
            Needs sample_size divisible by F * patch_size.
        coarse_grid_positions: positions of the coarse grid's tokens: "scaled" (default: the sin-cos table at
            the fine-grid positions of the coarse tokens' centres, F * i + (F - 1) / 2) or "own" (the coarse
            grid's own DiT table, positions 0..h/F-1). Used only with coarse_phase_on_coarse_grid.

    Gradient checkpointing of the blocks: ``model.enable_gradient_checkpointing()`` (diffusers' API).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        patch_size: int = 2,
        num_stages: int = 1,
        stage_factors: int | Sequence[int] = 2,
        learn_sigma: bool = False,
        stage_scales: Sequence[float] | None = None,
        decomposition_antialias: bool = False,
        timestep_scale: float = 1000.0,
        coarse_phase_on_coarse_grid: bool = False,
        coarse_grid_positions: str = "scaled",
    ):
        super().__init__()
        if learn_sigma:
            raise ValueError("learn_sigma=True is not supported: flow matching predicts a velocity, not a variance")
        factors = normalize_stage_factors(num_stages, stage_factors)
        total_factor = 1
        for f in factors:
            total_factor *= f
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} must be divisible by patch_size {patch_size}")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not timestep_scale > 0:
            raise ValueError(f"timestep_scale must be > 0, got {timestep_scale}")
        if stage_scales is not None and (len(stage_scales) != num_stages or any(not s > 0 for s in stage_scales)):
            raise ValueError(f"stage_scales must be {num_stages} positive numbers (one per stage), got {stage_scales}")
        if patch_size % total_factor:
            raise ValueError(
                f"patch_size {patch_size} must be divisible by the product of the stage factors {factors} "
                f"({total_factor}): the coarsest stage's patch size would be fractional"
            )
        if coarse_grid_positions not in COARSE_GRID_POSITIONS:
            raise ValueError(f"coarse_grid_positions must be one of {COARSE_GRID_POSITIONS}, got {coarse_grid_positions!r}")
        if coarse_phase_on_coarse_grid and num_stages < 2:
            raise ValueError("coarse_phase_on_coarse_grid needs num_stages >= 2")
        if coarse_phase_on_coarse_grid and sample_size % (patch_size * total_factor):
            raise ValueError(
                f"coarse_phase_on_coarse_grid needs sample_size {sample_size} divisible by patch_size x total stage "
                f"factor = {patch_size * total_factor} (stage 0's band patchified with patch {patch_size})"
            )

        self.out_channels = in_channels if out_channels is None else out_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.gradient_checkpointing = False

        # Per-stage patch embeddings, timestep embedders, stage-index embedding and output heads (the DFM part).
        self.stage_layers = DFMStageLayers(
            num_stages, factors, patch_size, in_channels, self.out_channels, self.inner_dim, first_timestep_stage=0,
            timestep_scale=timestep_scale,
            coarse_grid=coarse_phase_on_coarse_grid,
        )
        self.class_embedder = ClassEmbedding(num_classes, self.inner_dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(self.inner_dim, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation, extended to the per-stage layers.

        Xavier-uniform linears with zero biases; N(0, 0.02) class and timestep-MLP weights; zero adaLN modulation
        in every block and every head (the coarse grid's too), zero output projections (so the model starts by predicting 0); zero
        stage-index embedding (so S = 1 starts exactly as DiT).
        """

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        layers = self.stage_layers
        for embedder in layers.timestep_embedders:
            nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(layers.stage_embedding.weight)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        heads = list(layers.heads) + ([layers.coarse_head] if layers.own_coarse_layers else [])
        for head in heads:
            nn.init.zeros_(head.norm_out.linear.weight)
            nn.init.zeros_(head.norm_out.linear.bias)
            nn.init.zeros_(head.proj_out.weight)
            nn.init.zeros_(head.proj_out.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DFMDiTTransformer2DModel":
        """Build a named configuration, e.g. ``from_preset("DFM-DiT-B/2", sample_size=32, in_channels=4)``.

        "DiT-{T,S,B,L,XL}/{1,2,4,8}" are one-stage models (plain DiT trained with flow matching);
        "DFM-DiT-{T,S,B,L,XL}/{2,4,8}" have two stages a factor 2 apart (the patch size is the finest stage's).
        ``overrides`` replace any config argument (including num_stages and stage_factors).
        """
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; known presets: {', '.join(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """ModelMixin.from_pretrained, but weights that do not match config.json (missing, unexpected or differently
        shaped parameters) are an error naming the folder (see :mod:`.loading`)."""
        return strict_from_pretrained(cls, super().from_pretrained, pretrained_model_name_or_path, kwargs)

    def positional_embedding(self, grid: tuple[int, int], device, dtype) -> torch.Tensor:
        """Fixed 2D sin-cos embedding [1, h*w, D] of a token grid (h, w), row-major like the patch tokens.

        At the configured grid (sample_size / patch_size) this is exactly DiT's; other grids span the same range of
        positions (diffusers' PatchEmbed behaviour).
        """
        base_size = self.config.sample_size // self.config.patch_size
        pos = get_2d_sincos_pos_embed(self.inner_dim, grid, base_size=base_size, interpolation_scale=1.0, device=device)
        return pos.to(dtype).unsqueeze(0)

    def coarse_positional_embedding(self, coarse_grid: tuple[int, int], device, dtype) -> torch.Tensor:
        """Sin-cos embedding [1, h0*w0, D] of stage 0's own token grid (``coarse_grid_positions``).

        "own": DiT's table of the coarse grid itself (positions 0..h0-1 at the configured size). "scaled": the
        fine grid's table at the coarse tokens' centres: coarse token i covers fine tokens F*i .. F*i+F-1, so its
        position is F*i + (F-1)/2 (in the fine grid's units, rescaled like :meth:`positional_embedding` at other
        sizes).
        """
        base = self.config.sample_size // self.config.patch_size
        f = self.stage_layers.coarse_factor
        h0, w0 = coarse_grid
        if self.config.coarse_grid_positions == "own":
            pos = get_2d_sincos_pos_embed(self.inner_dim, coarse_grid, base_size=base // f, device=device)
            return pos.to(dtype).unsqueeze(0)
        pos_h = (f * torch.arange(h0, device=device, dtype=torch.float32) + (f - 1) / 2) * (base / (f * h0))
        pos_w = (f * torch.arange(w0, device=device, dtype=torch.float32) + (f - 1) / 2) * (base / (f * w0))
        return sincos_pos_embed_at(self.inner_dim, pos_h, pos_w).to(dtype).unsqueeze(0)

    def forward(
        self,
        hidden_states: list[torch.Tensor],
        timestep: torch.Tensor,
        num_active_stages: torch.Tensor,
        class_labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DFMDiTTransformer2DModelOutput | tuple:
        """Per-stage velocities of noisy per-stage latents.

        Args:
            hidden_states: S tensors [B, C, H_s, W_s], coarse to fine; H_s = H_{S-1} / (product of later factors).
            timestep: [B, S] per-stage sigmas in [0, 1] (1 = pure noise; not multiplied by 1000).
            num_active_stages: [B] long in 1..S; stages s >= num_active_stages are masked: their inputs are
                ignored and their outputs are zero. With ``coarse_phase_on_coarse_grid`` the rows with 1 run on
                stage 0's own token grid (a batch may mix both kinds of rows).
            class_labels: [B] long in 0..num_classes (num_classes = the null class).
            force_drop_ids: optional [B]; where 1/True the label is replaced by the null class.
            return_dict: return a :class:`DFMDiTTransformer2DModelOutput` rather than a tuple.

        Returns:
            ``.sample``: list of S velocities [B, C_out, H_s, W_s].
        """
        layers = self.stage_layers
        grid = layers.check_inputs(hidden_states, timestep, num_active_stages)
        batch_size = hidden_states[-1].shape[0]
        self._check_labels(class_labels, force_drop_ids, batch_size)
        active = stage_activity(num_active_stages, layers.num_stages)
        dtype = layers.patch_embedders[0].weight.dtype

        # Conditioning: class + per-stage timesteps + stage index (the same on both grids).
        device = hidden_states[-1].device
        c = self.class_embedder(class_labels.to(device), force_drop_ids).to(dtype)
        c = c + layers.embed_conditioning(timestep, num_active_stages, dtype)

        coarse = num_active_stages == 1 if self.config.coarse_phase_on_coarse_grid else None
        if coarse is None or not coarse.any():
            output = self._joint_grid(hidden_states, c, grid, active)
        elif coarse.all():
            output = self._coarse_grid(hidden_states, c, grid)
        else:  # a mixed batch: each row on its own grid, one pass each
            rows_c, rows_j = coarse.nonzero().squeeze(1), (~coarse).nonzero().squeeze(1)
            out_c = self._coarse_grid([x[rows_c] for x in hidden_states], c[rows_c], grid)
            out_j = self._joint_grid([x[rows_j] for x in hidden_states], c[rows_j], grid, active[rows_j])
            order = torch.argsort(torch.cat([rows_c, rows_j]))
            output = [torch.cat([a, b])[order] for a, b in zip(out_c, out_j)]
        if not return_dict:
            return (output,)
        return DFMDiTTransformer2DModelOutput(sample=output)

    def _blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)
            else:
                x = block(x, c)
        return x

    def _joint_grid(self, hidden_states, c, grid, active) -> list[torch.Tensor]:
        """All stages on the finest stage's token grid (every pass without the coarse grid)."""
        layers = self.stage_layers
        x = layers.embed_stages(hidden_states, active)
        x = x + self.positional_embedding(grid, x.device, x.dtype)
        output = layers.unembed_stages(self._blocks(x, c), c, grid, active)
        if torch.is_grad_enabled() and layers.own_coarse_layers:
            output[0] = output[0] + zero_contribution(layers.coarse_patch_embedder, layers.coarse_head)
        return output

    def _coarse_grid(self, hidden_states, c, grid) -> list[torch.Tensor]:
        """Stage 0 alone on its own token grid; later stages' velocities are zeros."""
        layers = self.stage_layers
        band = hidden_states[0]
        coarse_grid = layers.coarse_grid_of(grid)
        x = layers.embed_coarse(band)
        x = x + self.coarse_positional_embedding(coarse_grid, x.device, x.dtype)
        v0 = layers.unembed_coarse(self._blocks(x, c), c, coarse_grid)
        if torch.is_grad_enabled():  # the finest grid's layers join the graph with weight 0 (for DDP)
            v0 = v0 + zero_contribution(layers.patch_embedders, layers.heads)
        zeros = [torch.zeros(x.shape[0], self.out_channels, *x.shape[2:], device=v0.device, dtype=v0.dtype)
                 for x in hidden_states[1:]]
        return [v0, *zeros]

    def _check_labels(self, class_labels, force_drop_ids, batch_size: int) -> None:
        num_classes = self.config.num_classes
        if class_labels is None or not torch.is_tensor(class_labels) or tuple(class_labels.shape) != (batch_size,):
            got = tuple(class_labels.shape) if torch.is_tensor(class_labels) else type(class_labels).__name__
            raise ValueError(f"class_labels must be a [B] = ({batch_size},) integer tensor, got {got}")
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {class_labels.dtype}")
        check_values(
            (class_labels.min() >= 0) & (class_labels.max() <= num_classes),
            lambda: f"class_labels must be in 0..{num_classes} ({num_classes} is the null class), "
                    f"got {class_labels.tolist()}",
            self.training,
        )
        if force_drop_ids is not None and tuple(torch.as_tensor(force_drop_ids).shape) != (batch_size,):
            raise ValueError(
                f"force_drop_ids must have shape [B] = ({batch_size},), got {tuple(torch.as_tensor(force_drop_ids).shape)}"
            )
