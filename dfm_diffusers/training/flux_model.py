"""The model side of FLUX-DFM finetuning: the DFMPipeline to train (a FluxPipeline converted, or a DFMPipeline
folder loaded) and its transformer made trainable (LoRA / QLoRA, full finetune, patchification layers)."""

from __future__ import annotations

import logging

import torch

from .flux_config import FluxTrainingConfig, inspect_pretrained
from .quantize import quantize_frozen_blocks

logger = logging.getLogger(__name__)


def load_dfm_pipeline(config: FluxTrainingConfig, info: dict | None = None):
    """The DFMPipeline to train, in ``weight_dtype``: a FluxPipeline converted (DFMPipeline.from_flux_pipeline), or
    a DFMPipeline folder loaded; ``steps_per_stage`` / ``stage_thresholds`` set on its scheduler when given."""
    from diffusers import FluxPipeline

    from ..pipelines.pipeline_dfm import DFMPipeline
    from ..schedulers import DFMScheduler

    info = info or inspect_pretrained(config)
    dtype = config.resolved_weight_dtype()
    components = {}
    if config.vae:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(config.vae, dtype=dtype)
    factors = info["stage_factors"]  # a list of S - 1 ints
    factors = factors[0] if len(set(factors)) == 1 else (factors or 2)  # [2] -> 2 as the converter stores it
    if info["kind"] == "flux":
        flux = FluxPipeline.from_pretrained(
            config.pretrained, dtype=dtype, revision=config.revision, **components
        )
        pipe = DFMPipeline.from_flux_pipeline(
            flux, num_stages=info["num_stages"], stage_factors=factors, steps_per_stage=config.steps_per_stage,
            stage_thresholds=config.stage_thresholds, stage_upsampling=config.stage_upsampling,
            new_stage_init=config.new_stage_init,
        )
        del flux
    else:
        kwargs = {"revision": config.revision, **components} if config.revision else components
        pipe = DFMPipeline.from_pretrained(config.pretrained, dtype=dtype, **kwargs)
        if config.steps_per_stage is not None or config.stage_thresholds is not None:
            overrides = {}
            if config.steps_per_stage is not None:
                overrides["steps_per_stage"] = config.steps_per_stage
            if config.stage_thresholds is not None:
                overrides["stage_thresholds"] = config.stage_thresholds
            pipe.scheduler = DFMScheduler.from_config(pipe.scheduler.config, **overrides)
    if config.coarse_phase_on_coarse_grid is not None:
        pipe.transformer.set_coarse_phase_on_coarse_grid(config.coarse_phase_on_coarse_grid)
    pipe.latent_stage_shapes(config.resolution, config.resolution)  # authoritative resolution check
    return pipe


def prepare_trainable(
    config: FluxTrainingConfig, transformer, device: torch.device | str | None = None
) -> dict[str, int]:
    """Freeze / adapt ``transformer`` for the configured mode and cast its trainable parameters to float32.

    LoRA: everything frozen, ``transformer.add_adapter(LoraConfig(...))`` on ``lora_target_modules`` (Gaussian A,
    zero B: the model starts exactly at the converted one), plus the per-stage layers when train_stage_layers.
    With ``quantize_base``, the blocks' linear layers are first replaced by bitsandbytes ones
    (:func:`.quantize.quantize_frozen_blocks`), quantized on ``device`` (default: accelerate's), and the LoRA wraps
    them. peft's ``prepare_model_for_kbit_training`` is not needed: it freezes (done here), casts the frozen
    unquantized weights to float32 (they stay in weight_dtype under autocast, as without quantization) and turns on
    gradient checkpointing (the loop's setting). Full finetune: everything trainable. With ``patchify_only_steps``
    the patchification layers are trainable in either mode. Returns counts of trainable / total parameters.
    """
    from diffusers.training_utils import cast_training_params

    if config.lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        if config.quantize_base:
            from accelerate import PartialState

            device = device if device is not None else PartialState().device
            replaced = quantize_frozen_blocks(
                transformer, config.quantize_base, config.resolved_weight_dtype(), device=device
            )
            logger.info("quantize_base %s: %d linear layers of the FLUX blocks quantized on %s",
                        config.quantize_base, len(replaced), device)
        transformer.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules),
            )
        )
        if config.train_stage_layers:
            transformer.stage_layers.requires_grad_(True)
        else:
            logger.warning(
                "train_stage_layers is false: the per-stage layers stay as converted (stages >= 1 output zero "
                "after a FLUX conversion)"
            )
    else:
        transformer.requires_grad_(True)
    if config.patchify_only_steps:
        for name in patchify_parameter_names(transformer):
            transformer.get_parameter(name).requires_grad_(True)
    cast_training_params(transformer, dtype=torch.float32)
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return dict(trainable=trainable, total=sum(p.numel() for p in transformer.parameters()))


def patchify_parameter_names(transformer) -> list[str]:
    """The patchification layers of a DFMTransformer2DModel: every stage's patch embedding and output projection
    (``stage_layers.patch_embedders.*``, ``stage_layers.heads.*.proj_out.*``; stage 0's are FLUX's x_embedder and
    proj_out). The adaLN modulation of the output norm is not one of them."""
    return [
        name for name, _ in transformer.named_parameters()
        if name.startswith("stage_layers.patch_embedders.")
        or (name.startswith("stage_layers.heads.") and ".proj_out." in name)
    ]
