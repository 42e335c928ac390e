"""DFMPipeline: progressive (coarse-to-fine) text-to-image generation with a DFM FLUX transformer.

It is FluxPipeline with a multi-stage sampler: noise is drawn per stage at the stage's resolution, the
DFMScheduler table drives the stages, the stages are recomposed with the Laplacian pyramid and decoded.
Prompt encoding, LoRA loading, offloading and the VAE handling are FluxPipeline's own.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from ..models.transformer_dfm_flux import DFMTransformer2DModel
from ..schedulers import DFMScheduler, calculate_shift
from .hub import DFMHubMixin
from .lora_export import DFMLoraExportMixin
from .stagewise import DFMStagewiseMixin, check_finite_latents, check_scale


class DFMPipeline(DFMStagewiseMixin, DFMHubMixin, DFMLoraExportMixin, FluxPipeline):
    """Text-to-image DFM pipeline with FluxPipeline's components and call signature.

    ``num_inference_steps`` is replaced by ``steps_per_stage`` (a list, or an int total split in the
    scheduler's ratio); ``stage_thresholds`` (the actual sigma, after the time shift, of stage s-1 when stage s
    starts) can be overridden per call; ``latents`` is a list of
    per-stage latents shaped like :meth:`latent_stage_shapes` (stage 0 carried at the finest resolution by
    default: i.i.d. noise there is the prior the model was converted and trained with). The time shift is FLUX's dynamic shifting with mu computed from the
    token count (the finest stage's), when the scheduler has ``use_dynamic_shifting`` (as converted FLUX.1-dev
    schedulers do), else the scheduler's static ``shift``.

    With a transformer whose ``coarse_phase_on_coarse_grid`` is set, phase 0 is FLUX at the band's resolution:
    stage 0's noise is drawn at the band's own resolution, phase 0 uses FLUX's mu for the band's token count, and
    the scheduler moves stage 0 to the carrier at the threshold (docs/coarse_grid.md); nothing else changes.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    model_card_kind = "flux"

    def __init__(
        self,
        scheduler: DFMScheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer: DFMTransformer2DModel,
        image_encoder=None,
        feature_extractor=None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    # ------------------------------------------------------------------------------------ conversion
    @classmethod
    def from_flux_pipeline(
        cls,
        flux_pipe: FluxPipeline,
        num_stages: int = 2,
        stage_factors=2,
        steps_per_stage=None,
        stage_thresholds=None,
        stage_upsampling=None,
        new_stage_init: str = "x_embedder",
        coarse_phase_on_coarse_grid: bool = False,
    ) -> "DFMPipeline":
        """Convert a loaded FluxPipeline: DFMTransformer2DModel.from_flux + DFMScheduler.from_flow_match;
        the text encoders, tokenizers and VAE are shared with ``flux_pipe``. ``stage_upsampling`` is from_flux's
        (default: the paper's conversion, stage 0 carried at the finest resolution), ``new_stage_init`` too;
        ``coarse_phase_on_coarse_grid`` runs phase 0 as FLUX at the band's resolution (docs/coarse_grid.md)."""
        transformer = DFMTransformer2DModel.from_flux(
            flux_pipe.transformer, num_stages=num_stages, stage_factors=stage_factors, stage_upsampling=stage_upsampling,
            new_stage_init=new_stage_init,
        )
        if coarse_phase_on_coarse_grid:
            transformer.set_coarse_phase_on_coarse_grid(True)
        scheduler = DFMScheduler.from_flow_match(
            flux_pipe.scheduler, num_stages=num_stages, steps_per_stage=steps_per_stage, stage_thresholds=stage_thresholds
        )
        components = {k: v for k, v in flux_pipe.components.items() if k not in ("transformer", "scheduler")}
        return cls(transformer=transformer, scheduler=scheduler, **components)

    # -------------------------------------------------------------------------------------- helpers
    def check_inputs(self, prompt, prompt_2, height, width, *args, guidance_scale=0.0, true_cfg_scale=1.0, **kwargs):
        """FluxPipeline.check_inputs plus: height/width positive ints, guidance scales finite and >= 0."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
        check_scale("guidance_scale", guidance_scale)
        check_scale("true_cfg_scale", true_cfg_scale)
        return super().check_inputs(prompt, prompt_2, height, width, *args, **kwargs)

    @property
    def coarse_phase_on_coarse_grid(self) -> bool:
        """Whether phase 0 runs on stage 0's band at its own resolution (the transformer's config flag)."""
        return bool(self.transformer.config.get("coarse_phase_on_coarse_grid", False))

    def latent_stage_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Per-stage initial latent sizes for an image of height x width pixels; ValueError if they do not fit.
        With the default conversion stage 0 is carried at the finest latent resolution (its noise is drawn there);
        with ``coarse_phase_on_coarse_grid`` it starts at its band's own resolution (2x2-packed there)."""
        total = self.decomposition.total_factor
        multiple = self.vae_scale_factor * (2 * total // math.gcd(2, total))
        if self.coarse_phase_on_coarse_grid:
            multiple = self.vae_scale_factor * 2 * total
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be divisible by {multiple} (VAE factor {self.vae_scale_factor} x the 2x2 "
                f"packing and stage factors {self.decomposition.factors}"
                f"{', at the band of stage 0' if self.coarse_phase_on_coarse_grid else ''}); got height={height}, "
                f"width={width}"
            )
        shapes = self.decomposition.stage_shapes(height // self.vae_scale_factor, width // self.vae_scale_factor)
        if self.coarse_phase_on_coarse_grid:
            shapes[0] = self.decomposition.band_shapes(height // self.vae_scale_factor, width // self.vae_scale_factor)[0]
        return shapes

    def prepare_stage_latents(self, batch_size, height, width, dtype, device, generator, latents=None):
        """Per-stage initial noise (drawn stage by stage, coarse to fine) or the given latents, validated."""
        channels = self.transformer.config.in_channels // 4
        shapes = [(batch_size, channels, h, w) for h, w in self.latent_stage_shapes(height, width)]
        if latents is not None:
            if not isinstance(latents, (list, tuple)) or [tuple(x.shape) for x in latents] != shapes:
                got = [tuple(x.shape) for x in latents] if isinstance(latents, (list, tuple)) else type(latents)
                raise ValueError(f"latents must be a list of per-stage tensors shaped {shapes}, got {got}")
            check_finite_latents(latents)
            return [x.to(device=device, dtype=dtype) for x in latents]
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"got a list of {len(generator)} generators for an effective batch size of {batch_size}"
            )
        return [randn_tensor(shape, generator=generator, device=device, dtype=dtype) for shape in shapes]

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        """[B, C, H, W] FLUX latent -> images in ``output_type`` ("latent" returns the latent)."""
        if output_type == "latent":
            return latents
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    # --------------------------------------------------------------------------------------- __call__
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        steps_per_stage: list[int] | int | None = None,
        stage_thresholds: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: list[torch.Tensor] | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_previews: bool = False,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
    ):
        """Generate images coarse to fine.

        Guidance: ``true_cfg_scale`` > 1 runs true classifier-free guidance on every active stage,
        v = v_neg + true_cfg_scale * (v_cond - v_neg). Without ``negative_prompt`` / ``negative_prompt_embeds`` the
        negative is the empty prompt "" (what training with caption dropout learns as unconditional; FluxPipeline
        would skip CFG instead). ``guidance_scale`` feeds FLUX-dev's distilled-guidance embedding. A converted,
        not yet finetuned FLUX.1-dev is used like FLUX (guidance_scale 3.5, true_cfg_scale 1); a DFM-finetuned one
        as in the paper: true_cfg_scale 3.0 with guidance_scale 1.0 (the value it was trained with).

        Callbacks are called as ``callback_on_step_end(pipe, step, timestep_row [S], callback_kwargs)``;
        ``callback_kwargs`` holds the requested tensors ("latents" is the list of stage latents) plus
        ``stage_index`` (the phase) and ``stage_sigmas`` ([S], the sigmas the transformer just received).

        Returns:
            DFMPipelineOutput(images, previews) or a tuple (images,) / (images, previews).
        """
        height = self.default_sample_size * self.vae_scale_factor if height is None else height
        width = self.default_sample_size * self.vae_scale_factor if width is None else width
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        self.latent_stage_shapes(height, width)
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs or {}
        self._current_timestep = None
        self._interrupt = False

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = self._joint_attention_kwargs.get("scale", None)
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        do_true_cfg = true_cfg_scale > 1
        if do_true_cfg and not has_neg_prompt:
            negative_prompt = [""] * batch_size  # the unconditional prompt that caption dropout trains
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if do_true_cfg:
            negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids = self.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                device=device,
                num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length,
                lora_scale=lora_scale,
            )

        total_batch = batch_size * num_images_per_prompt
        latents = self.prepare_stage_latents(
            total_batch, height, width, prompt_embeds.dtype, device, generator, latents
        )
        num_stages = len(latents)
        image_seq_len = (latents[-1].shape[-2] // 2) * (latents[-1].shape[-1] // 2)
        config = self.scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        coarse = {}
        if self.coarse_phase_on_coarse_grid:  # phase 0: FLUX at the band's resolution, with its mu
            coarse_seq_len = (latents[0].shape[-2] // 2) * (latents[0].shape[-1] // 2)
            coarse = dict(
                coarse_phase_factor=self.decomposition.upsampling[0],
                coarse_mu=calculate_shift(
                    coarse_seq_len,
                    config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096),
                    config.get("base_shift", 0.5),
                    config.get("max_shift", 1.15),
                ),
            )
        self.scheduler.set_timesteps(
            steps_per_stage, device=device, mu=mu, stage_thresholds=stage_thresholds, **coarse
        )
        sigmas_table = self.scheduler.sigmas
        num_steps = self.scheduler.num_inference_steps
        self._num_timesteps = num_steps

        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([total_batch], guidance_scale, device=device, dtype=torch.float32)

        previews: list | None = [] if return_previews else None
        with self.progress_bar(total=num_steps) as progress_bar:
            for i in range(num_steps):
                if self.interrupt:
                    continue
                stage_sigmas = sigmas_table[i]
                self._current_timestep = self.scheduler.timesteps[i]
                sigma_batch = stage_sigmas[None, :].expand(total_batch, num_stages).to(latents[0].dtype)
                num_active = self.scheduler.num_active_stages[i].expand(total_batch)

                def run_transformer(embeds, pooled, ids, context):
                    with self.transformer.cache_context(context):
                        return self.transformer(
                            hidden_states=latents,
                            encoder_hidden_states=embeds,
                            pooled_projections=pooled,
                            timestep=sigma_batch,
                            num_active_stages=num_active,
                            guidance=guidance,
                            txt_ids=ids,
                            joint_attention_kwargs=self._joint_attention_kwargs,
                            return_dict=False,
                        )[0]

                velocity = run_transformer(prompt_embeds, pooled_prompt_embeds, text_ids, "cond")
                if do_true_cfg:
                    negative = run_transformer(
                        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids, "uncond"
                    )
                    velocity = [n + true_cfg_scale * (v - n) for v, n in zip(velocity, negative)]

                stage = int(self.scheduler.stage_index[i])
                self.add_stage_preview(previews, i, latents, velocity, output_type)
                latents = self.scheduler.step(velocity, i, latents, return_dict=False, generator=generator)[0]

                if callback_on_step_end is not None:
                    available = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_kwargs.update(stage_index=stage, stage_sigmas=stage_sigmas)
                    callback_outputs = callback_on_step_end(self, i, self.scheduler.timesteps[i], callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                progress_bar.update()

        self._current_timestep = None
        return self.finish_output(latents, previews, output_type, return_dict)
