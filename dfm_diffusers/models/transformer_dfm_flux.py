"""DFMTransformer2DModel: FLUX (diffusers' FluxTransformer2DModel) turned into a Decomposable Flow Matching model.

The model takes one tensor per stage (coarse to fine), one sigma per stage ([B, S]) and the number of active stages
([B]); it returns one velocity per stage. Inside, every stage is patchified with its own patch size so that all
stages give the finest stage's token grid, the per-stage token embeddings are summed and the FLUX blocks run once
on the summed tokens. Stage 0's sigma goes through FLUX's own timestep/guidance/pooled-text embedder; later stages'
sigmas through per-stage embedders; an embedding of the stage index (num_active_stages - 1) is added to the
conditioning. One output head per stage.

Stage 0 is carried at the finest resolution, so FLUX's own packing, x_embedder and proj_out apply verbatim and
stage 0 alone is exactly FLUX; the layout of the later stages and ``band_split`` (from_flux's default): see
:mod:`.flux_conversion` and docs/flux_conversion.md.

The coarse phase on the coarse grid (``coarse_phase_on_coarse_grid``, off by default; docs/coarse_grid.md)
-------------------------------------------------------------------------------------------------------------
With the flag, a pass with stage 0 alone is FLUX at the band's resolution: the band (at its own resolution, noise
drawn there) packed 2x2 by stage 0's layers (FLUX's x_embedder / norm_out / proj_out), RoPE ids of that grid,
1/F^2 of the tokens; DFMScheduler runs that phase at its own sigmas (FLUX's mu for the band's token count) and
moves the state to the carrier at the threshold (``DFMScheduler.coarse_to_carrier``). Right after the conversion
that phase is exactly FLUX generating at 1/F of the resolution.

Not supported (FLUX's forward has them): ControlNet residuals, context parallelism. IP-Adapters work as in FLUX
(``joint_attention_kwargs["ip_adapter_image_embeds"]``, loaded with the pipeline's ``load_ip_adapter``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, ModelMixin  # noqa: F401  (pipeline loaders look up ModelMixin here)
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, apply_lora_scale, logging

from ..decomposition.laplacian import block_projection
from ..utils import normalize_stage_factors
from .flux_conversion import (  # noqa: F401  (public here too)
    FLUX_CONFIG_KEYS,
    FLUX_PACKING,
    NEW_STAGE_INITS,
    check_coarse_phase_layout,
    convert_flux_weights,
    default_stage_upsampling,
)
from .loading import SelfContainedModelMixin, strict_from_pretrained
from .stage_layers import DFMStageLayers, stage_activity, stage_patch_sizes, zero_contribution

logger = logging.get_logger(__name__)

# What FLUX's time input is while stages are active: stage 0's sigma (the first conversion), the newest active
# stage's, or the root-mean-square noise level of FLUX's (band-split) input over its pixels.
FLUX_TIMESTEPS = ("stage_0", "newest", "noise_rms")

# FLUX modules replaced by the per-stage layers (stage 0's versions live in stage_layers).
REPLACED_FLUX_MODULES = ("x_embedder", "norm_out", "proj_out")


@dataclass
class DFMTransformer2DModelOutput(BaseOutput):
    """sample: list of S per-stage velocities [B, C, H_s, W_s] (zeros for inactive stages)."""

    sample: list[torch.Tensor]


class DFMTransformer2DModel(SelfContainedModelMixin, FluxTransformer2DModel):
    """FLUX with per-stage input projections, timestep embedders, stage-index embedding and output heads.

    Config: every FluxTransformer2DModel argument (``in_channels`` keeps FLUX's meaning: latent channels x 2x2
    packing of the finest stage, e.g. 64 = 16 x 4; ``patch_size`` must stay 1 as in every FLUX checkpoint), plus

    - ``num_stages`` (default 2): number of DFM stages S;
    - ``stage_factors`` (int or list of S-1 ints, default 2): resolution factor between consecutive stages, any
      ints >= 2 (e.g. 4: 256 -> 1024 px; [2, 2]: three stages);
    - ``stage_upsampling`` (list of S ints, default :func:`default_stage_upsampling`): stage s's tensor is its
      band nearest-upsampled by u_s (:mod:`.flux_conversion` explains why stage 0 is carried at the finest
      resolution). The config stores the resolved list; ``[1, 1]`` at factor 2 is the first implementation's
      layout (stage 0 at its own resolution, patch 1), kept for comparisons only;
    - ``stage_scales``, ``decomposition_antialias``: the LaplacianDecomposition the model works with (per-stage
      standardization, off by default for images; antialiased instead of box downsampling). Stored for the
      pipelines, unused by forward;
    - ``coarse_phase_on_coarse_grid`` (default False): a pass with stage 0 alone runs as FLUX on stage 0's band at
      its own resolution (see the module docstring and :meth:`set_coarse_phase_on_coarse_grid`); needs stage 0
      carried at the finest resolution (the default ``stage_upsampling``).
    """

    _cp_plan = None  # FLUX's context-parallel plan refers to proj_out and packed tokens; not supported here.

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        num_stages: int = 2,
        stage_factors: int | Sequence[int] = 2,
        stage_scales: Sequence[float] | None = None,
        decomposition_antialias: bool = False,
        stage_upsampling: Sequence[int] | None = None,
        decomposition_upsampling: str | None = None,
        band_split: bool = False,
        flux_timestep: str = "stage_0",
        coarse_phase_on_coarse_grid: bool = False,
    ):
        if patch_size != 1:
            raise ValueError(
                f"patch_size must be 1 (FLUX's 2x2 packing is expressed through in_channels = 4 x latent "
                f"channels), got {patch_size}"
            )
        out_channels_packed = out_channels or in_channels
        if in_channels % 4 or out_channels_packed % 4:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels_packed}) must be 4 x latent channels "
                f"(FLUX's 2x2 packing)"
            )
        factors = normalize_stage_factors(num_stages, stage_factors)
        if stage_upsampling is None:
            stage_upsampling = default_stage_upsampling(num_stages, factors)
        upsampling = [int(u) for u in stage_upsampling]
        stage_patch_sizes(num_stages, factors, FLUX_PACKING, upsampling)  # ValueError before any allocation
        self.register_to_config(stage_upsampling=upsampling)
        if flux_timestep not in FLUX_TIMESTEPS:
            raise ValueError(f"flux_timestep must be one of {FLUX_TIMESTEPS}, got {flux_timestep!r}")
        if band_split:
            if decomposition_upsampling != "nearest":
                raise ValueError("band_split needs the Haar pyramid: decomposition_upsampling='nearest'")
            if upsampling[0] != math.prod(factors):
                raise ValueError(
                    f"band_split needs stage 0 carried at the finest resolution, got stage_upsampling {upsampling} "
                    "(from_flux: new_stage_init='x_embedder' or 'zero' build the other layouts)"
                )
            if stage_scales is not None and any(float(x) != 1.0 for x in stage_scales):
                raise ValueError(
                    "band_split keeps FLUX's units (FLUX reads the recomposed latent): stage_scales must be unset"
                )
        if coarse_phase_on_coarse_grid:
            check_coarse_phase_layout(num_stages, factors, upsampling)

        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        for name in REPLACED_FLUX_MODULES:
            delattr(self, name)
        self._resolution_ratios = [math.prod(factors[s:]) for s in range(num_stages)]  # finest / stage s

        self.latent_channels = in_channels // 4
        self.out_latent_channels = out_channels_packed // 4
        self.stage_layers = DFMStageLayers(
            num_stages=num_stages,
            stage_factors=factors,
            finest_patch_size=FLUX_PACKING,
            in_channels=self.latent_channels,
            out_channels=self.out_latent_channels,
            embedding_dim=self.inner_dim,
            first_timestep_stage=1,
            stage_upsampling=upsampling,
            coarse_grid=coarse_phase_on_coarse_grid,
        )

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: list[torch.Tensor],
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        num_active_stages: torch.Tensor,
        guidance: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        img_ids: torch.Tensor | None = None,
    ) -> DFMTransformer2DModelOutput | tuple[list[torch.Tensor]]:
        """
        Args:
            hidden_states: list of S noisy stage tensors [B, C, H_s * u_s, W_s * u_s] (u_s = stage_upsampling[s]:
                stage 0 carried at the finest resolution by default), coarse to fine, C = in_channels // 4.
            encoder_hidden_states: text tokens [B, L, joint_attention_dim].
            pooled_projections: pooled text embedding [B, pooled_projection_dim].
            timestep: per-stage sigmas [B, S] in [0, 1] (scaled by 1000 inside, as FLUX does).
            num_active_stages: [B] integers in 1..S; inactive stages' inputs are ignored and their outputs are 0.
            guidance: [B] guidance scale, required iff the config has guidance_embeds.
            txt_ids: [L, 3] text position ids (default zeros, as FluxPipeline uses).
            joint_attention_kwargs: passed to the attention processors (``scale`` sets the LoRA scale;
                ``ip_adapter_image_embeds`` feeds a loaded IP-Adapter, as in FLUX).
            img_ids: [N, 3] position ids of the shared token grid (default: FluxPipeline._prepare_latent_image_ids of
                the finest stage's grid). A 3-D ``txt_ids`` / ``img_ids`` (with a batch axis) is deprecated, as in
                FLUX: the first row is used, with a warning.
        Returns:
            DFMTransformer2DModelOutput whose ``sample`` is the list of S velocities shaped like the inputs,
            or ``(sample,)`` if not return_dict. Image position ids are built from the finest stage's token grid
            exactly as FluxPipeline._prepare_latent_image_ids does.
        """
        if self.config.get("coarse_phase_on_coarse_grid", False):
            output = self._route_coarse_phase(
                hidden_states, encoder_hidden_states, pooled_projections, timestep, num_active_stages, guidance,
                txt_ids, joint_attention_kwargs,
            )
            if output is not None:  # None: no row in the coarse phase, the joint grid as always
                return DFMTransformer2DModelOutput(sample=output) if return_dict else (output,)
        layers = self.stage_layers
        grid = layers.check_inputs(hidden_states, timestep, num_active_stages)
        self._check_conditioning(hidden_states[-1], encoder_hidden_states, pooled_projections, guidance)
        txt_ids, img_ids = self._position_ids(
            txt_ids, img_ids, encoder_hidden_states.shape[1], grid, hidden_states[-1].device
        )

        # Per-stage patch embeddings (stage s with its own patch size), summed; inactive stages contribute nothing.
        active = stage_activity(num_active_stages, layers.num_stages)
        if self.config.band_split:
            hidden_states = self._band_split_inputs(hidden_states, num_active_stages.long() - 1)
        hidden_states = layers.embed_stages(hidden_states, active)

        temb = self._conditioning(timestep, num_active_stages, guidance, pooled_projections, hidden_states.dtype)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        hidden_states = self._blocks(hidden_states, encoder_hidden_states, temb, txt_ids, img_ids, joint_attention_kwargs)

        # One head per stage, each unpatchified with its own patch size; inactive stages come back as zeros.
        output = layers.unembed_stages(hidden_states, temb, grid, active)
        if self.config.band_split:  # a detail stage's velocity lives in its band: zero block means
            output = [out if s == 0 else out - block_projection(out, self._band_block(s)) for s, out in enumerate(output)]
        if not return_dict:
            return (output,)
        return DFMTransformer2DModelOutput(sample=output)

    def _check_conditioning(self, finest, encoder_hidden_states, pooled_projections, guidance) -> None:
        """ValueError unless the text / guidance inputs fit the batch."""
        batch_size, channels = finest.shape[:2]
        if channels != self.latent_channels:
            raise ValueError(f"stage tensors need in_channels // 4 = {self.latent_channels} channels, got {channels}")
        text = encoder_hidden_states
        if text is None or text.ndim != 3 or text.shape[0] != batch_size:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"encoder_hidden_states must be [B={batch_size}, L, joint_attention_dim], got {got}")
        if pooled_projections is None or pooled_projections.ndim != 2 or pooled_projections.shape[0] != batch_size:
            got = None if pooled_projections is None else tuple(pooled_projections.shape)
            raise ValueError(f"pooled_projections must be [B={batch_size}, pooled_projection_dim], got {got}")
        if (guidance is None) == self.config.guidance_embeds:
            raise ValueError(
                "guidance is required because this model has guidance_embeds"
                if self.config.guidance_embeds
                else "this model has no guidance embedding (guidance_embeds=False): pass guidance=None"
            )

    def _conditioning(self, timestep, num_active_stages, guidance, pooled_projections, dtype) -> torch.Tensor:
        """FLUX's time input (``flux_timestep``; stage 0's sigma while it is alone) through FLUX's own embedder (with
        guidance and pooled text), the sigmas of stages >= 1 through the per-stage embedders, plus the stage-index
        embedding. -> temb [B, D]."""
        sigma_0 = self.flux_sigma(timestep, num_active_stages.long() - 1).to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = (
            self.time_text_embed(sigma_0, pooled_projections)
            if guidance is None
            else self.time_text_embed(sigma_0, guidance, pooled_projections)
        )
        return temb + self.stage_layers.embed_conditioning(timestep, num_active_stages, temb.dtype)

    def _blocks(self, hidden_states, encoder_hidden_states, temb, txt_ids, img_ids, joint_attention_kwargs):
        """FLUX's blocks on the image tokens (position ids ``img_ids`` [N, 3]) and the embedded text tokens
        (``txt_ids`` [L, 3]); -> image tokens."""
        image_rotary_emb = self.pos_embed(torch.cat((txt_ids.to(img_ids.dtype), img_ids), dim=0))
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            joint_attention_kwargs["ip_hidden_states"] = self.encoder_hid_proj(ip_adapter_image_embeds)

        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    image_rotary_emb=image_rotary_emb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
        return hidden_states

    # ------------------------------------------------------------------------------- the coarse phase
    def set_coarse_phase_on_coarse_grid(self, enabled: bool = True) -> "DFMTransformer2DModel":
        """Switch the coarse phase onto stage 0's own token grid (or back). It adds no parameters (stage 0's
        layers are FLUX's 2x2 ones and apply to the band as they are), so a converted or saved model can be
        switched at any time; the config records it. Returns the model."""
        config = self.config
        if enabled:
            check_coarse_phase_layout(config.num_stages, config.stage_factors, config.stage_upsampling)
        self.register_to_config(coarse_phase_on_coarse_grid=bool(enabled))
        self.stage_layers.coarse_grid = bool(enabled)
        return self

    def _route_coarse_phase(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, num_active_stages, guidance,
        txt_ids, joint_attention_kwargs,
    ) -> list[torch.Tensor] | None:
        """Rows with stage 0 alone on the coarse grid, the others through the joint grid; None if there are none.

        Stage 0 of a coarse-phase row is its band's state at its own resolution: a stage-0 tensor at the band's
        resolution (every row in the coarse phase; the pipeline's case), or, in a batch of carrier-sized stage-0
        tensors (training batches that mix phases), the band's state nearest-upsampled to the carrier, read back
        by average pooling; the velocity comes back at the same size.
        """
        layers = self.stage_layers
        if not isinstance(hidden_states, (list, tuple)) or len(hidden_states) != layers.num_stages:
            return None  # check_inputs names the problem
        if not torch.is_tensor(num_active_stages) or tuple(num_active_stages.shape) != (hidden_states[-1].shape[0],):
            return None
        coarse = num_active_stages == 1
        u0 = self.config.stage_upsampling[0]
        stage0, finest = hidden_states[0], hidden_states[-1]
        p = layers.finest_patch_size
        band_shape = layers.coarse_band_shape((finest.shape[-2] // p, finest.shape[-1] // p))
        at_band = stage0.ndim == 4 and tuple(stage0.shape[-2:]) == band_shape
        if not at_band and not coarse.any():
            return None
        if at_band and not coarse.all():
            raise ValueError(
                f"stage 0 at its band's resolution {band_shape} is the coarse phase: every row needs "
                f"num_active_stages 1, got {num_active_stages.tolist()}"
            )
        grid = layers.check_inputs(hidden_states, timestep, num_active_stages, stage0_at_band=at_band)
        layers.coarse_grid_of(grid)
        self._check_conditioning(finest, encoder_hidden_states, pooled_projections, guidance)

        def pick(t, rows):
            return t if rows is None or t is None else t[rows]

        def coarse_rows(rows):
            band = stage0 if at_band else F.avg_pool2d(stage0.float(), u0).to(stage0.dtype)
            v0 = self._coarse_phase(
                pick(band, rows), pick(encoder_hidden_states, rows), pick(pooled_projections, rows),
                pick(timestep, rows), pick(num_active_stages, rows), pick(guidance, rows), txt_ids,
                joint_attention_kwargs,
            )
            return v0 if at_band else F.interpolate(v0, scale_factor=u0, mode="nearest")

        if coarse.all():
            v0 = coarse_rows(None)
            zeros = [torch.zeros(v0.shape[0], self.out_latent_channels, *x.shape[2:], device=v0.device, dtype=v0.dtype)
                     for x in hidden_states[1:]]
            return [v0, *zeros]
        # a mixed batch (carrier-sized stage 0): the coarse rows here, the others through the joint grid
        rows_c, rows_j = coarse.nonzero().squeeze(1), (~coarse).nonzero().squeeze(1)
        v0_c = coarse_rows(rows_c)
        out_j = self.forward(
            [x[rows_j] for x in hidden_states], pick(encoder_hidden_states, rows_j), pick(pooled_projections, rows_j),
            pick(timestep, rows_j), pick(num_active_stages, rows_j), guidance=pick(guidance, rows_j), txt_ids=txt_ids,
            joint_attention_kwargs=joint_attention_kwargs, return_dict=False,
        )[0]
        out_c = [v0_c] + [torch.zeros(len(rows_c), *v.shape[1:], device=v.device, dtype=v.dtype) for v in out_j[1:]]
        order = torch.argsort(torch.cat([rows_c, rows_j]))
        return [torch.cat([a, b])[order] for a, b in zip(out_c, out_j)]

    def _coarse_phase(self, band, encoder_hidden_states, pooled_projections, timestep, num_active_stages, guidance,
                      txt_ids, joint_attention_kwargs) -> torch.Tensor:
        """Stage 0's band [B, C, H_0, W_0] -> its velocity, FLUX on the band's own 2x2-packed token grid."""
        layers = self.stage_layers
        coarse_grid = (band.shape[-2] // layers.finest_patch_size, band.shape[-1] // layers.finest_patch_size)
        tokens = layers.embed_coarse(band)
        temb = self._conditioning(timestep, num_active_stages, guidance, pooled_projections, tokens.dtype)
        text = self.context_embedder(encoder_hidden_states)
        txt_ids, img_ids = self._position_ids(txt_ids, None, text.shape[1], coarse_grid, band.device)
        tokens = self._blocks(tokens, text, temb, txt_ids, img_ids, joint_attention_kwargs)
        v0 = layers.unembed_coarse(tokens, temb, coarse_grid)
        if torch.is_grad_enabled():  # later stages' layers join the graph with weight 0 (for DDP)
            v0 = v0 + zero_contribution(*layers.patch_embedders[1:], *layers.heads[1:])
        return v0

    def _band_block(self, s: int) -> int:
        """Block size (on stage s's tensor) whose block means the Haar band s >= 1 does not hold."""
        factors = normalize_stage_factors(self.config.num_stages, self.config.stage_factors)
        return factors[s - 1] * self.config.stage_upsampling[s]

    def _band_split_inputs(self, stage_latents: Sequence[torch.Tensor], newest: torch.Tensor) -> list[torch.Tensor]:
        """The band-split coupling: every active stage s >= 1 replaces the carrier's content in its band.

        Per sample, with k = newest active stage: stage 0's carrier keeps its coarsest part (F x F block means,
        F the total factor) and whatever is finer than stage k (the part no active band covers), and band s's tensor
        is projected onto its band (zero block means). FLUX's input is then the Haar recomposition of the noisy
        stages; with one shared sigma it is FLUX's own input for the recomposed latent.
        """
        ratios = self._resolution_ratios
        carrier = stage_latents[0]
        coarsest = block_projection(carrier.float(), ratios[0])
        carrier_in = carrier.float()
        for k in range(1, len(stage_latents)):
            replaced = carrier.float() - block_projection(carrier.float(), ratios[k]) + coarsest
            carrier_in = torch.where((newest == k).view(-1, 1, 1, 1), replaced, carrier_in)
        inputs = [carrier_in.to(carrier.dtype)]
        for s in range(1, len(stage_latents)):
            x = stage_latents[s]
            inputs.append((x.float() - block_projection(x.float(), self._band_block(s))).to(x.dtype))
        return inputs

    def flux_sigma(self, timestep: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """[B] sigma given to FLUX's time embedder (config ``flux_timestep``); stage 0's sigma while it is alone."""
        mode = self.config.flux_timestep
        if mode == "stage_0":
            return timestep[:, 0]
        if mode == "newest":
            return timestep.gather(1, newest.view(-1, 1)).squeeze(1)
        # noise_rms: sqrt of the pixel-averaged noise variance of FLUX's band-split input. With newest stage k, the
        # carrier's sigma covers the coarsest 1/F^2 of the pixels and everything finer than stage k, band s the
        # fraction 1/r_s^2 - 1/r_{s-1}^2 (r_s = finest / stage s resolution).
        ratios = self._resolution_ratios
        k = newest.view(-1, 1)
        index = torch.arange(len(ratios), device=timestep.device).view(1, -1)
        r = torch.tensor(ratios, dtype=torch.float32, device=timestep.device)
        band_fraction = 1 / r[1:] ** 2 - 1 / r[:-1] ** 2  # stages 1..S-1
        finer = 1 - 1 / r[newest] ** 2  # [B]: pixels finer than the newest stage, still the carrier's
        var = timestep[:, 0].float() ** 2 * (1 / r[0] ** 2 + finer)
        bands = (timestep[:, 1:].float() ** 2 * band_fraction * (index[:, 1:] <= k)).sum(1)
        return (var + bands).sqrt().to(timestep.dtype)

    @staticmethod
    def _position_ids(txt_ids, img_ids, text_len: int, grid: tuple[int, int], device):
        """(txt_ids [L, 3], img_ids [N, 3]): the given ones checked (3-D: deprecated, first row used, as FLUX does)
        or the defaults: zeros for the text, FluxPipeline._prepare_latent_image_ids for the token grid."""
        ids = {}
        for name, value, rows in (("txt_ids", txt_ids, text_len), ("img_ids", img_ids, grid[0] * grid[1])):
            if value is not None and value.ndim == 3:
                logger.warning(
                    f"Passing `{name}` 3d torch.Tensor is deprecated. Please remove the batch dimension and pass it as "
                    f"a 2d torch Tensor"
                )
                value = value[0]
            if value is not None and tuple(value.shape) != (rows, 3):
                raise ValueError(f"{name} must be [{rows}, 3], got {tuple(value.shape)}")
            ids[name] = value
        if ids["txt_ids"] is None:
            ids["txt_ids"] = torch.zeros(text_len, 3, device=device)
        if ids["img_ids"] is None:
            img = torch.zeros(grid[0], grid[1], 3, device=device)
            img[..., 1] = torch.arange(grid[0], device=device)[:, None]
            img[..., 2] = torch.arange(grid[1], device=device)[None, :]
            ids["img_ids"] = img.reshape(grid[0] * grid[1], 3)
        return ids["txt_ids"], ids["img_ids"].to(device)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """ModelMixin.from_pretrained, but a checkpoint that lacks any DFM parameter (e.g. a plain FLUX one) or does
        not match its config.json is an error instead of a model with parameters left on the meta device, randomly
        initialised or dropped (see :mod:`.loading`)."""
        return strict_from_pretrained(
            cls, super().from_pretrained, pretrained_model_name_or_path, kwargs,
            hint="To start from a FLUX checkpoint use DFMTransformer2DModel.from_flux(path, subfolder=...), or convert "
            "a FluxPipeline folder with `python -m dfm_diffusers.convert --flux FOLDER --output DFM_FOLDER`.",
        )

    @torch.no_grad()
    def scale_new_stage_inputs(self, stage_scales: Sequence[float]) -> None:
        """Multiply stage s >= 1's input projection by ``stage_scales[s]``: stage s's input is its band divided by
        its scale, so a copy of FLUX's x_embedder (``from_flux(new_stage_init="x_embedder")``) then reads the band in
        FLUX's units. ``from_flux(stage_scales=...)`` calls it; call it yourself only on a freshly converted model
        whose stage scales were set after the conversion (the FLUX trainer's ``stage_scales: auto``)."""
        for s, scale in enumerate(list(stage_scales)[1:], start=1):
            self.stage_layers.patch_embedders[s].weight.mul_(float(scale))

    @classmethod
    def from_flux(
        cls,
        flux: FluxTransformer2DModel | str | os.PathLike,
        num_stages: int = 2,
        stage_factors: int | Sequence[int] = 2,
        torch_dtype: torch.dtype | None = None,
        subfolder: str | None = None,
        share_weights: bool = False,
        stage_scales: Sequence[float] | None = None,
        decomposition_antialias: bool = False,
        stage_upsampling: Sequence[int] | None = None,
        new_stage_init: str = "band_split",
        flux_timestep: str | None = None,
        **load_kwargs,
    ) -> "DFMTransformer2DModel":
        """Convert a FLUX transformer into a DFM model (paper appendix E).

        Args:
            flux: a FluxTransformer2DModel, or a local path / Hub id loaded with FluxTransformer2DModel.from_pretrained
                (with ``subfolder``, ``torch_dtype`` and ``load_kwargs``).
            num_stages, stage_factors: the DFM stages (any factors, see the class docstring).
            stage_upsampling: carrier factors (default: the paper's layout, stage 0 at the finest resolution; see
                :mod:`.flux_conversion`). ``[1, 1]`` at factor 2 builds the first implementation's conversion instead.
            torch_dtype: dtype of the result (default: FLUX's).
            share_weights: if True, the blocks and embedders use FLUX's very parameter objects (no extra memory;
                training one trains the other). Default: copies. A FLUX loaded from a path is always shared.

            new_stage_init: how every stage >= 1 starts:
                ``"band_split"`` (default): the converted model samples like FLUX. The pyramid is the Haar one
                (``decomposition_upsampling="nearest"``), every later stage's input projection is FLUX's x_embedder
                and its head FLUX's norm_out / proj_out followed by the projection onto its band (``band_split``
                config: an active band replaces the carrier's content in its band), so with one shared sigma the
                model IS FLUX on the recomposed latent, and the detail stages are generated by FLUX itself; while
                stage 0 is ahead FLUX is conditioned on the noise level of its input (``flux_timestep="noise_rms"``;
                docs/flux_conversion.md has the measurements behind both choices). ``stage_scales`` must be unset.
                The two earlier inits keep the later stages' heads at zero (velocity 0: their band keeps its noise):
                ``"x_embedder"``: FLUX's x_embedder weight (no bias; summed over the sub-pixels a patch
                smaller than 2 covers), times ``stage_scales[s]`` when given, so FLUX reads the detail band in the
                pixel basis it knows and gradients reach both the input projection and the head from step 1;
                ``"zero"``: zero as well (the first implementation; a saddle that stalls the new stage).
            flux_timestep: FLUX's time input while later stages are active (see FLUX_TIMESTEPS); default
                ``"noise_rms"`` with band_split, else ``"stage_0"``.

        Weights: :func:`.flux_conversion.convert_flux_weights` says what comes from FLUX and what starts at zero.
        The result is in eval mode, like from_pretrained's.
        """
        if new_stage_init not in NEW_STAGE_INITS:
            raise ValueError(f"new_stage_init must be one of {NEW_STAGE_INITS}, got {new_stage_init!r}")
        band_split = new_stage_init == "band_split"
        if flux_timestep is None:
            flux_timestep = "noise_rms" if band_split else "stage_0"
        if isinstance(flux, (str, os.PathLike)):
            flux = FluxTransformer2DModel.from_pretrained(
                flux, subfolder=subfolder, dtype=torch_dtype, **load_kwargs
            )
            share_weights = True  # nobody else holds this instance
        elif subfolder is not None or load_kwargs:
            raise ValueError("subfolder and loading kwargs only apply when flux is a path or Hub id")
        if not isinstance(flux, FluxTransformer2DModel) or isinstance(flux, DFMTransformer2DModel):
            raise TypeError(f"flux must be a FluxTransformer2DModel or a path to one, got {type(flux).__name__}")

        return convert_flux_weights(
            cls, flux, num_stages=num_stages, stage_factors=stage_factors, torch_dtype=torch_dtype,
            share_weights=share_weights, stage_scales=stage_scales, decomposition_antialias=decomposition_antialias,
            stage_upsampling=stage_upsampling, new_stage_init=new_stage_init, flux_timestep=flux_timestep,
        )
