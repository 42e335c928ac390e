"""The FLUX side of DFMTransformer2DModel: how FLUX's 2x2 packing fixes the stages' carriers
(:func:`default_stage_upsampling`) and the weights ``DFMTransformer2DModel.from_flux`` copies from FLUX
(:func:`convert_flux_weights`).

Stage 0 is carried at the finest resolution (its band nearest-upsampled by the total factor F, i.i.d. noise drawn
there), so FLUX's own packing, x_embedder and proj_out apply verbatim and stage 0 alone is exactly FLUX. Later stages
are carried at their own resolution where a patch 2 * H_s / H_finest is an integer, else at half the finest resolution
with patch 1 (2 stages, factor 2: stage_upsampling [2, 1], patch sizes [2, 2]; factor 4: [4, 1], [2, 2]; 3 stages
[2, 2]: [4, 1, 1], [2, 1, 2]). ``band_split`` (from_flux's default) makes FLUX read the Haar recomposition of the noisy
stages and gives every later stage FLUX's head projected onto its band. docs/flux_conversion.md explains both, with
the measurements.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..utils import normalize_stage_factors
from .stage_layers import StageOutputHead


# FLUX packs 2x2 latent pixels into one token: the finest stage's patch size.
FLUX_PACKING = 2


def default_stage_upsampling(num_stages: int, stage_factors: int | Sequence[int]) -> list[int]:
    """The carrier factors of the paper's conversion: stage 0 at the finest resolution (u_0 = total factor, patch
    2 = FLUX's packing); stage s >= 1 at its own resolution if a patch 2 * H_s / H_finest >= 1 gives the shared
    token grid, else upsampled to half the finest resolution (patch 1)."""
    factors = normalize_stage_factors(num_stages, stage_factors)
    upsampling = []
    for s in range(num_stages):
        below = math.prod(factors[s:])  # finest / stage s
        if s == 0:
            upsampling.append(below)
        else:
            upsampling.append(1 if FLUX_PACKING % below == 0 else below // math.gcd(below, FLUX_PACKING))
    return upsampling

def check_coarse_phase_layout(num_stages: int, stage_factors, stage_upsampling: Sequence[int]) -> None:
    """ValueError unless the coarse phase can run as FLUX on stage 0's band: 2+ stages, stage 0 carried by the total
    factor (its patch embedder / head are then FLUX's 2x2 ones and apply to the band at its own resolution)."""
    total = math.prod(normalize_stage_factors(num_stages, stage_factors))
    if num_stages < 2 or int(stage_upsampling[0]) != total:
        raise ValueError(
            f"coarse_phase_on_coarse_grid needs 2+ stages with stage 0 carried at the finest resolution "
            f"(stage_upsampling[0] = {total}, the default); got {num_stages} stages, stage_upsampling {list(stage_upsampling)}"
        )


# Every FluxTransformer2DModel.__init__ argument; from_flux copies these from the FLUX config.
FLUX_CONFIG_KEYS = (
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)
NEW_STAGE_INITS = ("band_split", "x_embedder", "zero")


def convert_flux_weights(
    cls,
    flux,
    num_stages: int,
    stage_factors: int | Sequence[int],
    torch_dtype: torch.dtype | None,
    share_weights: bool,
    stage_scales: Sequence[float] | None,
    decomposition_antialias: bool,
    stage_upsampling: Sequence[int] | None,
    new_stage_init: str,
    flux_timestep: str,
):
    """The body of :meth:`DFMTransformer2DModel.from_flux` (see there): a ``cls`` model built on the meta device from
    a loaded FluxTransformer2DModel ``flux``, FLUX's parameters shared or copied, the stage layers set from FLUX's
    x_embedder / norm_out / proj_out as ``new_stage_init`` says. Returns the model in eval mode.

    Weights: blocks, pos/context/time-text(+guidance) embedders are FLUX's. Stage 0 with the default layout: its
    patch embedding and head are FLUX's x_embedder / norm_out / proj_out verbatim, so its velocity equals
    unpack(FLUX(pack(carrier))) on the (finest-resolution) carrier. With a stage-0 patch size p0 = 2 / r < 2
    (``stage_upsampling[0] = 1``): FLUX's x_embedder summed over the r x r sub-pixels that nearest upsampling
    fills with the same value and proj_out averaged over them, i.e. avgpool_r(unpack(FLUX(pack(nearest_up_r(x_0)))))
    (the noise is then constant over r x r blocks, which FLUX never saw). Stages >= 1: head, timestep embedder
    output layer (its first layer keeps PyTorch's default init, otherwise it could never learn) and the
    stage-index embedding are zero, so their velocities are 0 and, while they are inactive, stage 0 is exactly
    FLUX; their patch embedding follows ``new_stage_init``.
    """
    band_split = new_stage_init == "band_split"
    source = flux.state_dict(keep_vars=True)
    reference = source["x_embedder.weight"]
    if reference.is_meta:
        raise ValueError("flux's parameters are on the meta device; load its weights first")
    device = reference.device
    dtype = torch_dtype or reference.dtype
    if share_weights and dtype != reference.dtype:
        raise ValueError(f"share_weights needs the result in flux's dtype {reference.dtype}, got {dtype}")

    # Build on the meta device (no 12B-parameter random init), then give every parameter real storage.
    with torch.device("meta"):
        model = cls(
            **{key: flux.config[key] for key in FLUX_CONFIG_KEYS},
            num_stages=num_stages,
            stage_factors=stage_factors,
            stage_scales=stage_scales,
            decomposition_antialias=decomposition_antialias,
            stage_upsampling=stage_upsampling,
            decomposition_upsampling="nearest" if band_split else None,
            band_split=band_split,
            flux_timestep=flux_timestep,
        )

    # 1) Everything outside stage_layers is FLUX's own (shared or copied).
    shared = {}
    for key in model.state_dict():
        if key.startswith("stage_layers."):
            continue
        if key not in source:
            raise ValueError(
                f"flux has no parameter {key!r}; is it a plain FluxTransformer2DModel (fuse or unload "
                f"adapters first)?"
            )
        tensor = source[key] if share_weights else source[key].detach().to(dtype, copy=True)
        shared[key] = tensor
    missing, unexpected = model.load_state_dict(shared, strict=False, assign=True)
    assert not unexpected and all(key.startswith("stage_layers.") for key in missing)

    # 2) stage_layers: allocate, default-initialise everything, then set what the conversion defines.
    layers = model.stage_layers
    layers.to_empty(device=device)
    layers.float()
    for module in layers.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    p0 = layers.patch_sizes[0]
    dim = model.inner_dim
    c_in, c_out = model.latent_channels, model.out_latent_channels
    with torch.no_grad():
        x_w, x_b = source["x_embedder.weight"].float(), source["x_embedder.bias"].float()

        def flux_patch_embedding(p: int) -> torch.Tensor:
            """x_embedder's weight for a patch of p <= 2 pixels: summed over the (2/p)^2 sub-pixels that nearest
            upsampling by 2/p fills with the same value (p = 2: x_embedder verbatim)."""
            if FLUX_PACKING % p:
                raise ValueError(f"new_stage_init={new_stage_init!r} needs patch sizes dividing 2, got {p}; use 'zero'")
            q = FLUX_PACKING // p
            return x_w.view(dim, c_in, p, q, p, q).sum((3, 5)).reshape(dim, c_in * p * p)

        o_w, o_b = source["proj_out.weight"].float(), source["proj_out.bias"].float()

        def copy_flux_head(head: StageOutputHead, p: int) -> None:
            """FLUX's norm_out / proj_out for a patch of p <= 2 pixels: proj_out averaged over the (2/p)^2
            sub-pixels (the block mean of FLUX's output; p = 2: verbatim)."""
            q = FLUX_PACKING // p
            head.norm_out.linear.weight.copy_(source["norm_out.linear.weight"].float())
            head.norm_out.linear.bias.copy_(source["norm_out.linear.bias"].float())
            head.proj_out.weight.copy_(o_w.view(c_out, p, q, p, q, dim).mean((2, 4)).reshape(-1, dim))
            head.proj_out.bias.copy_(o_b.view(c_out, p, q, p, q).mean((2, 4)).reshape(-1))

        layers.patch_embedders[0].weight.copy_(flux_patch_embedding(p0))
        layers.patch_embedders[0].bias.copy_(x_b)
        copy_flux_head(layers.heads[0], p0)
        zeroed = [layers.stage_embedding]
        for s in range(1, layers.num_stages):
            embed = layers.patch_embedders[s]
            embed.bias.zero_()  # stage 0 carries FLUX's bias once
            if new_stage_init == "zero":
                embed.weight.zero_()
            else:
                embed.weight.copy_(flux_patch_embedding(layers.patch_sizes[s]))
            if band_split:
                copy_flux_head(layers.heads[s], layers.patch_sizes[s])
            else:
                zeroed.append(layers.heads[s])
        zeroed += [embedder.timestep_embedder.linear_2 for embedder in layers.timestep_embedders]
        for module in zeroed:
            for param in module.parameters():
                param.zero_()
    if stage_scales is not None:
        model.scale_new_stage_inputs(stage_scales)
    layers.to(dtype)

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"internal error: {name} was left on the meta device by from_flux")
    return model.eval()
