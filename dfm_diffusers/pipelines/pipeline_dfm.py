"""DFMPipeline: progressive (coarse-to-fine) text-to-image generation with a DFM FLUX transformer.

It is FluxPipeline with a multi-stage sampler: noise is drawn per stage at the stage's resolution, the
DFMScheduler table drives the stages, the stages are recomposed with the Laplacian pyramid and decoded.
Prompt encoding, LoRA and IP-Adapter loading, offloading and the VAE handling are FluxPipeline's own; its call
conventions (callbacks, ``output_type="latent"``, size rounding, ``from_pipe``) are kept, see ``__call__``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..models.transformer_dfm_flux import DFMTransformer2DModel
from ..schedulers import DFMScheduler, calculate_shift
from .hub import DFMHubMixin
from .lora_export import DFMLoraExportMixin
from .stagewise import DFMStagewiseMixin, StageEndCallback, check_finite_latents, check_scale

logger = logging.get_logger(__name__)

#: FLUX modules that a DFMTransformer2DModel holds as stage 0's layers (verbatim with the default conversion).
FLUX_TO_STAGE0_MODULES = {
    "x_embedder": "stage_layers.patch_embedders.0",
    "proj_out": "stage_layers.heads.0.proj_out",
    "norm_out.linear": "stage_layers.heads.0.norm_out.linear",
}


def _rename_flux_stage0_keys(state_dict: dict, prefix: str) -> tuple[dict] | tuple:
    """(renamed copy,) of a LoRA state dict with FLUX_TO_STAGE0_MODULES applied under ``prefix``, or () if no key
    names those FLUX modules."""
    renamed, changed = {}, False
    for key, value in state_dict.items():
        for flux_name, dfm_name in FLUX_TO_STAGE0_MODULES.items():
            head = f"{prefix}.{flux_name}."
            if key.startswith(head):
                key, changed = f"{prefix}.{dfm_name}." + key[len(head):], True
                break
        renamed[key] = value
    return (renamed,) if changed else ()


class DFMPipeline(DFMStagewiseMixin, DFMHubMixin, DFMLoraExportMixin, FluxPipeline):
    """Text-to-image DFM pipeline with FluxPipeline's components and call signature.

    ``steps_per_stage`` (a list, or an int total split in the scheduler's ratio) sets the steps;
    FluxPipeline's ``num_inference_steps`` is accepted as that int total; ``stage_thresholds`` (the actual sigma, after the time shift, of stage s-1 when stage s
    starts) can be overridden per call; ``latents`` is a list of
    per-stage latents shaped like :meth:`latent_stage_shapes` (stage 0 carried at the finest resolution by
    default: i.i.d. noise there is the prior the model was converted and trained with), or their packed form
    (:meth:`pack_stage_latents`, what callbacks receive). The time shift is FLUX's dynamic shifting with mu computed
    from the token count (the finest stage's), when the scheduler has ``use_dynamic_shifting`` (as converted
    FLUX.1-dev schedulers do), else the scheduler's static ``shift``.

    With a transformer whose ``coarse_phase_on_coarse_grid`` is set, phase 0 is FLUX at the band's resolution:
    stage 0's noise is drawn at the band's own resolution, phase 0 uses FLUX's mu for the band's token count, and
    the scheduler moves stage 0 to the carrier at the threshold (docs/coarse_grid.md); nothing else changes.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds"]
    model_card_kind = "flux"

    def __init__(
        self,
        scheduler: DFMScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: DFMTransformer2DModel,
        image_encoder: CLIPVisionModelWithProjection = None,
        feature_extractor: CLIPImageProcessor = None,
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
        new_stage_init: str = "band_split",
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
        """FluxPipeline.check_inputs plus: height/width positive ints, guidance scales finite and >= 0; a size the
        stages cannot split is rounded down with a warning (as FluxPipeline does for its 2x2 packing), or a
        ValueError when nothing is left."""
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
        check_scale("guidance_scale", guidance_scale)
        check_scale("true_cfg_scale", true_cfg_scale)
        rounded = self.round_to_stage_multiple(height, width)
        return super().check_inputs(prompt, prompt_2, *rounded, *args, **kwargs)

    @property
    def stage_size_multiple(self) -> int:
        """Image height and width must be multiples of this: the VAE factor x the least common multiple of FLUX's
        2x2 packing and the product of the stage factors (x 2 F with the coarse phase on the coarse grid: the band
        is 2x2-packed at its own resolution)."""
        total = self.decomposition.total_factor
        if self.coarse_phase_on_coarse_grid:
            return self.vae_scale_factor * 2 * total
        return self.vae_scale_factor * (2 * total // math.gcd(2, total))

    def round_to_stage_multiple(self, height: int, width: int, warn: bool = True) -> tuple[int, int]:
        """(height, width) rounded down to :attr:`stage_size_multiple` (a warning when that changes them, ValueError
        when it leaves 0)."""
        multiple = self.stage_size_multiple
        rounded = (height // multiple * multiple, width // multiple * multiple)
        if min(rounded) == 0:
            raise ValueError(
                f"height and width must be at least {multiple} (VAE factor {self.vae_scale_factor} x the 2x2 packing "
                f"and stage factors {self.decomposition.factors}); got height={height}, width={width}"
            )
        if warn and rounded != (height, width):
            logger.warning(
                f"`height` and `width` have to be divisible by {multiple} (VAE factor {self.vae_scale_factor} x the "
                f"2x2 packing and stage factors {self.decomposition.factors}) but are {height} and {width}. "
                f"Dimensions will be resized accordingly, to {rounded[0]} and {rounded[1]}"
            )
        return rounded

    @property
    def coarse_phase_on_coarse_grid(self) -> bool:
        """Whether phase 0 runs on stage 0's band at its own resolution (the transformer's config flag)."""
        return bool(self.transformer.config.get("coarse_phase_on_coarse_grid", False))

    def latent_stage_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Per-stage initial latent sizes for an image of height x width pixels; ValueError if they do not fit.
        With the default conversion stage 0 is carried at the finest latent resolution (its noise is drawn there);
        with ``coarse_phase_on_coarse_grid`` it starts at its band's own resolution (2x2-packed there)."""
        multiple = self.stage_size_multiple
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
        """Per-stage initial noise (drawn stage by stage, coarse to fine) or the given latents (a list of stage
        tensors, or their packed form), validated."""
        channels = self.transformer.config.in_channels // 4
        shapes = [(batch_size, channels, h, w) for h, w in self.latent_stage_shapes(height, width)]
        if latents is not None:
            if torch.is_tensor(latents) and latents.ndim == 3:
                if latents.shape[0] != batch_size:
                    raise ValueError(f"packed latents have batch {latents.shape[0]}, the call needs {batch_size}")
                latents = self.unpack_stage_latents(latents, height, width)
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
        """[B, C, H, W] FLUX latent -> images in ``output_type``; "latent" returns it packed as FluxPipeline does,
        [B, H/2 * W/2, C * 4] (``FluxPipeline._unpack_latents(x, height, width, pipe.vae_scale_factor)`` undoes it)."""
        if output_type == "latent":
            b, c, h, w = latents.shape
            return self._pack_latents(latents, b, c, h, w)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    def current_timestep_of(self, step: int) -> torch.Tensor:
        """The scalar timestep of step ``step`` that callbacks and diffusers' caches see (``current_timestep``): the
        newest active stage's, i.e. the largest of the step's per-stage timesteps. It restarts near 1000 when a
        stage starts, when the input changes most."""
        return self.scheduler.timesteps[step, int(self.scheduler.stage_index[step])]

    # ------------------------------------------------------------------------------------------ LoRA
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        """FluxPipeline.load_lora_weights; a FLUX LoRA's parts on ``x_embedder`` / ``proj_out`` / ``norm_out.linear``
        load into stage 0's input projection and head, which are those FLUX layers (see :meth:`lora_state_dict`).
        ValueError if the transformer's stage 0 is not FLUX's layout (``stage_upsampling=[1, 1]``) and the LoRA
        has such parts."""
        if self.transformer.stage_layers.patch_sizes[0] != 2:
            source = pretrained_model_name_or_path_or_dict
            probe = FluxPipeline.lora_state_dict(dict(source) if isinstance(source, dict) else source, **kwargs)
            flux_only = sorted({k for k in probe for name in FLUX_TO_STAGE0_MODULES
                                if k.startswith(f"{self.transformer_name}.{name}.")})
            if flux_only:
                raise ValueError(
                    f"this LoRA adapts FLUX's {flux_only[:3]}, which this DFM transformer has no counterpart for: its "
                    f"stage 0 has patch size {self.transformer.stage_layers.patch_sizes[0]} "
                    f"(stage_upsampling={self.transformer.config.stage_upsampling}), not FLUX's 2x2 packing. Use a "
                    f"model converted with the default stage_upsampling, or a LoRA without those parts"
                )
        return super().load_lora_weights(
            pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs
        )

    @classmethod
    def lora_state_dict(cls, *args, **kwargs):
        """FluxPipeline.lora_state_dict with FLUX's ``x_embedder`` / ``proj_out`` / ``norm_out.linear`` keys (and
        alphas) renamed to the DFM transformer's stage-0 layers, which hold those very FLUX layers
        (:meth:`DFMTransformer2DModel.from_flux`). Only stage 0: the later stages' layers are the DFM model's own."""
        out = super().lora_state_dict(*args, **kwargs)
        parts = list(out) if isinstance(out, tuple) else [out]
        renamed = _rename_flux_stage0_keys(parts[0], cls.transformer_name)
        if renamed and kwargs.get("return_alphas") and parts[1]:
            parts[1] = _rename_flux_stage0_keys(parts[1], cls.transformer_name)[0]
        if renamed and kwargs.get("return_lora_metadata") and parts[-1]:
            # the exact module names (FLUX's "proj_out" would also name every stage's head by suffix matching)
            key = f"{cls.transformer_name}.target_modules"
            if key in parts[-1]:
                prefix = f"{cls.transformer_name}."
                modules = {k[len(prefix):].split(".lora_")[0] for k in renamed[0] if k.startswith(prefix)}
                parts[-1] = {**parts[-1], key: sorted(modules)}
        if renamed:
            parts[0] = renamed[0]
        return tuple(parts) if isinstance(out, tuple) else parts[0]

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
        num_inference_steps: int | None = None,
        steps_per_stage: list[int] | int | None = None,
        stage_thresholds: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: list[torch.Tensor] | torch.Tensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: PipelineImageInput | None = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_previews: bool = False,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        callback_on_stage_end: StageEndCallback | None = None,
    ):
        """Generate images coarse to fine.

        ``num_inference_steps`` (FluxPipeline's name) is the total of ``steps_per_stage``, split in the scheduler's
        ratio. Guidance: ``true_cfg_scale`` > 1 runs true classifier-free guidance on every active stage,
        v = v_neg + true_cfg_scale * (v_cond - v_neg). Without ``negative_prompt`` / ``negative_prompt_embeds`` the
        negative is the empty prompt "" (what training with caption dropout learns as unconditional; FluxPipeline
        would skip CFG instead). ``guidance_scale`` feeds FLUX-dev's distilled-guidance embedding. A converted,
        not yet finetuned FLUX.1-dev is used like FLUX (guidance_scale 3.5, true_cfg_scale 1); a DFM-finetuned one
        as in the paper: true_cfg_scale 3.0 with guidance_scale 1.0 (the value it was trained with).

        As in FluxPipeline: a height / width the stages cannot split is rounded down with a warning;
        ``output_type="latent"`` returns the final latent packed [B, H/2 * W/2, C * 4]; ``ip_adapter_image(_embeds)``
        work once an IP-Adapter is loaded (``load_ip_adapter``); callbacks are called as
        ``callback_on_step_end(pipe, step, t, callback_kwargs)`` with exactly the requested tensors, ``t`` a scalar
        timestep (``pipe.current_timestep``: the newest active stage's) and ``callback_kwargs["latents"]`` the stage
        latents packed into one tensor [B, N, sum_s C * p_s^2] (:meth:`pack_stage_latents`; with one stage exactly
        FluxPipeline's packed latents); what the callback returns under "latents" (or changes in place) is used.
        During the call ``pipe.stage_index`` and ``pipe.stage_sigmas`` say where the sampler is.

        ``callback_on_stage_end(pipe, stage, preview)`` is called when each stage's preview is ready (decoded in
        ``output_type``, as ``return_previews`` gives them); the last call carries the final images.

        Returns:
            DFMPipelineOutput(images, previews) or a tuple (images,) / (images, previews). With
            ``output_type="latent"`` the previews are unpacked latents [B, C, h_s, w_s].
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
        height, width = self.round_to_stage_multiple(height, width, warn=False)  # check_inputs warned
        if num_inference_steps is not None:
            if steps_per_stage is not None:
                raise ValueError("pass steps_per_stage or num_inference_steps (its int total), not both")
            steps_per_stage = num_inference_steps
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self._current_timestep = None
        self._interrupt = False
        self.start_stages(callback_on_stage_end)

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
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but"
                    f" got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds`"
                    f" {negative_prompt_embeds.shape}."
                )
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
        image_embeds, negative_image_embeds = self.prepare_ip_adapter_inputs(
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
            height, width, device, total_batch,
        )
        num_stages = len(latents)
        config = self.scheduler.config

        def flux_mu(latent):  # FLUX's mu for the token count of a latent (2x2 packing)
            seq_len = (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
            return calculate_shift(
                seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.15),
            )

        mu = flux_mu(latents[-1])
        coarse = {}
        if self.coarse_phase_on_coarse_grid:  # phase 0: FLUX at the band's resolution, with its mu
            coarse = dict(coarse_phase_factor=self.decomposition.upsampling[0], coarse_mu=flux_mu(latents[0]))
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
                t = self.current_timestep_of(i)
                self._current_timestep = t
                self._stage_index = int(self.scheduler.stage_index[i])
                self._stage_sigmas = stage_sigmas
                sigma_batch = stage_sigmas[None, :].expand(total_batch, num_stages).to(latents[0].dtype)
                num_active = self.scheduler.num_active_stages[i].expand(total_batch)

                def run_transformer(embeds, pooled, ids, context, ip_embeds):
                    if ip_embeds is not None:
                        self._joint_attention_kwargs["ip_adapter_image_embeds"] = ip_embeds
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

                velocity = run_transformer(prompt_embeds, pooled_prompt_embeds, text_ids, "cond", image_embeds)
                if do_true_cfg:
                    negative = run_transformer(
                        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_text_ids, "uncond",
                        negative_image_embeds,
                    )
                    velocity = [n + true_cfg_scale * (v - n) for v, n in zip(velocity, negative)]

                self.add_stage_preview(previews, i, latents, velocity, output_type)
                latents = self.scheduler.step(velocity, i, latents, return_dict=False, generator=generator)[0]

                if callback_on_step_end is not None:
                    latents, prompt_embeds = self.run_step_end_callback(
                        callback_on_step_end, callback_on_step_end_tensor_inputs, i, t, latents, prompt_embeds
                    )
                progress_bar.update()

        self._current_timestep = None
        return self.finish_output(latents, previews, output_type, return_dict)

    def run_step_end_callback(self, callback, tensor_inputs, step, t, latents, prompt_embeds):
        """Call ``callback`` as FluxPipeline does, with the stage latents packed; returns (latents, prompt_embeds)
        with what it returned (or changed in place) applied."""
        grid = tuple(latents[-1].shape[-2:])
        grid = (grid[0] // self.transformer.stage_layers.finest_patch_size,
                grid[1] // self.transformer.stage_layers.finest_patch_size)
        available = {"prompt_embeds": prompt_embeds}
        if "latents" in tensor_inputs:
            available["latents"] = self.pack_stage_latents(latents)
        callback_kwargs = {k: available[k] for k in tensor_inputs}
        outputs = callback(self, step, t, callback_kwargs) or {}
        packed = outputs.pop("latents", available.get("latents"))
        if packed is not None:
            latents = [x.to(y.dtype) for x, y in zip(self._unpack_on_grid(packed, grid), latents)]
        return latents, outputs.pop("prompt_embeds", prompt_embeds)

    def prepare_ip_adapter_inputs(
        self, image, image_embeds, negative_image, negative_image_embeds, height, width, device, batch
    ):
        """FluxPipeline's IP-Adapter handling: (image_embeds, negative_image_embeds), each None without an adapter
        input; a missing negative (or positive) image is a black image, as FluxPipeline does."""
        given = image is not None or image_embeds is not None
        given_negative = negative_image is not None or negative_image_embeds is not None
        if not (given or given_negative):
            return None, None
        projection = getattr(self.transformer, "encoder_hid_proj", None)
        if projection is None:
            raise ValueError("ip_adapter_image(_embeds) needs an IP-Adapter: call pipe.load_ip_adapter(...) first")
        black = [np.zeros((width, height, 3), dtype=np.uint8)] * projection.num_ip_adapters
        if given and not given_negative:
            negative_image = black
        elif given_negative and not given:
            image = black
        needs_encoder = (image_embeds is None) or (negative_image_embeds is None)
        if needs_encoder and self.image_encoder is None:
            raise ValueError(
                "the IP-Adapter images need an image encoder, and this pipeline has none (image_encoder=None): pass "
                "both ip_adapter_image_embeds and negative_ip_adapter_image_embeds, or load the adapter with its "
                "image encoder (load_ip_adapter(..., image_encoder_pretrained_model_name_or_path=...))"
            )
        positive = self.prepare_ip_adapter_image_embeds(image, image_embeds, device, batch)
        negative = self.prepare_ip_adapter_image_embeds(negative_image, negative_image_embeds, device, batch)
        return positive, negative
