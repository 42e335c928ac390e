"""The FLUX-DFM task the shared training loop calls (:class:`FluxTask`): frozen text encoders and VAE, the DFM loss
on a batch, validation samples with stage previews, and the export (:class:`.flux_export.FluxExportMixin`)."""

from __future__ import annotations

import contextlib
import os

import torch

from ..visualize import image_grid
from .flux_config import FluxTrainingConfig
from .flux_export import FluxExportMixin
from .flux_model import patchify_parameter_names
from .objective import DFMObjectiveOutput, dfm_objective, small_tensor


def distributed_state():
    """accelerate's PartialState as the Accelerator will see it: ``ACCELERATE_USE_CPU=1`` (a CPU run of several
    processes) must reach it, else a torchrun-launched process on a machine without GPUs takes itself for a
    single-process run, and the processes never form one group."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


class FluxTask(FluxExportMixin):
    """The FLUX-DFM pieces the shared loop calls: loss, validation samples, export.

    ``pipe`` is the DFMPipeline whose frozen parts (text encoders, tokenizers, VAE, scheduler) the task uses;
    the transformer being trained is passed to every call (possibly wrapped by accelerate).
    """

    def __init__(self, config: FluxTrainingConfig, pipe):
        self.config, self.pipe = config, pipe
        self.transformer = pipe.transformer
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            if module is not None:
                module.requires_grad_(False).eval()
        self.num_stages = self.transformer.config.num_stages
        self.decomposition = pipe.decomposition
        config.validate_objective(self.num_stages)
        self.weight_dtype = config.resolved_weight_dtype()
        self.samples_dir = os.path.join(config.output_dir, "samples")
        self.last_sample, self.last_step = None, None  # the latest validation grid (shown in the model card)
        self.cache = None  # a complete FluxEmbeddingCache when training from cached latents and embeddings
        self._empty_text = None  # the cached empty prompt's embeddings, kept on the training device
        patchify = set(patchify_parameter_names(self.transformer))
        # trainable parameters held fixed during the patchify-only phase (the LoRA, the blocks, the other stage layers)
        self.held_in_patchify_phase = [
            p for n, p in self.transformer.named_parameters() if p.requires_grad and n not in patchify
        ]

    def held_fixed_parameters(self, step: int) -> list[torch.nn.Parameter]:
        """The loop's ``held_fixed_fn``: everything trainable but the patchification layers while fewer than
        ``patchify_only_steps`` optimizer steps are done (``step`` = steps done), then nothing."""
        return self.held_in_patchify_phase if step < self.config.patchify_only_steps else []

    # ---------------------------------------------------------------------------------- frozen encoders
    def _to_device(self, device: torch.device, names=("vae", "text_encoder", "text_encoder_2")):
        for name in names:
            module = getattr(self.pipe, name)
            if module is not None and module.device != device:
                module.to(device)

    @torch.no_grad()
    def encode_text(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled [B, D], text_ids [L, 3]) from the frozen text encoders."""
        self._to_device(torch.device(device))
        return self.pipe.encode_prompt(
            prompt=list(captions), prompt_2=None, device=device, max_sequence_length=self.config.max_sequence_length
        )

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> FLUX latents (z - shift) * scale, float32 [B, C, H/f, W/f]."""
        vae = self.pipe.vae
        self._to_device(pixel_values.device)
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self.latents_from_distribution(dist, sample).to(pixel_values.device)

    def latents_from_distribution(self, dist, sample: bool = True) -> torch.Tensor:
        """A VAE posterior (DiagonalGaussianDistribution) -> FLUX latents (z - shift) * scale, float32."""
        from ..data.latents import normalize_latents

        return normalize_latents(self.pipe.vae, dist.sample() if sample else dist.mode())

    def caption_keep_mask(self, n: int) -> list[bool]:
        """Which of ``n`` captions survive caption dropout (the rest train on the empty prompt)."""
        p = self.config.caption_dropout
        return [True] * n if p <= 0 else (torch.rand(n) >= p).tolist()

    def drop_captions(self, captions: list[str]) -> list[str]:
        return [c if k else "" for c, k in zip(captions, self.caption_keep_mask(len(captions)))]

    def cached_conditioning(self, batch, device):
        """(prompt_embeds, pooled, text_ids) of a cached batch, caption dropout applied with the cached empty prompt."""
        embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
        keep = self.caption_keep_mask(embeds.shape[0])
        if not all(keep):
            if self._empty_text is None or self._empty_text[0].device != embeds.device:
                self._empty_text = self.cache.text_batch([""], device)
            empty_embeds, empty_pooled = self._empty_text
            drop = ~small_tensor(keep, torch.bool, device)  # (no host sync)
            embeds = torch.where(drop[:, None, None], empty_embeds.to(embeds.dtype), embeds)
            pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        # FluxPipeline.encode_prompt's text ids: zeros, one row per T5 token
        return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)

    # ---------------------------------------------------------------------------------------- the loss
    def objective(self, model, batch, noise=None, latents=None) -> DFMObjectiveOutput:
        """The DFM objective on one batch (``latents`` may be given to skip the VAE; ``noise`` per stage)."""
        if "latent_dist" in batch:  # from the cache (flux_cache.CachedCaptionedImages)
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            params = batch["latent_dist"]
            device = params.device
            prompt_embeds, pooled, text_ids = self.cached_conditioning(batch, device)
            if latents is None:
                latents = self.latents_from_distribution(DiagonalGaussianDistribution(params))
        else:
            pixels = batch["pixel_values"]
            device = pixels.device
            prompt_embeds, pooled, text_ids = self.encode_text(self.drop_captions(batch["captions"]), device)
            if latents is None:
                latents = self.encode_images(pixels)
        bands = self.decomposition.decompose(latents.float())
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), float(self.config.guidance_scale), device=device)

        def predict(inputs, draw):
            return model(
                hidden_states=inputs, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                timestep=draw.sigmas, num_active_stages=draw.num_active_stages, guidance=guidance, txt_ids=text_ids,
                return_dict=False,
            )[0]

        carrier = None  # the coarse phase on the band's own grid: stage 0's carrier factor
        if self.transformer.config.get("coarse_phase_on_coarse_grid", False):
            carrier = self.decomposition.upsampling[0]
        return dfm_objective(self.config, bands, predict, noise=noise, coarse_phase_carrier=carrier)

    def loss_fn(self, model, batch):
        out = self.objective(model, batch)
        return out.loss, out.logs

    # --------------------------------------------------------------------------------- sampling, export
    def pipeline(self, model):
        """A DFMPipeline around ``model`` and the task's frozen components."""
        from ..pipelines.pipeline_dfm import DFMPipeline

        components = {k: v for k, v in self.pipe.components.items() if k != "transformer"}
        return DFMPipeline(transformer=model, **components)

    def _autocast(self, device: torch.device):
        if self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.weight_dtype)

    def generate(self, model, prompts: list[str] | None = None, seed: int = 0, size: tuple[int, int] | None = None):
        """Validation samples and per-stage previews (tensors in [0, 1]), one prompt at a time, at ``size``
        (height, width; default resolution x resolution)."""
        prompts = prompts or self.config.validation_prompts or ["a photo"]
        device = next(model.parameters()).device
        # with the cache, the prompts' embeddings come from it and only the VAE (decoding) visits the device
        self._to_device(device, ("vae",) if self.cache is not None else ("vae", "text_encoder", "text_encoder_2"))
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        images, previews = [], []
        height, width = size or (self.config.resolution, self.config.resolution)
        for i, prompt in enumerate(prompts):
            text = dict(prompt=prompt)
            if self.cache is not None:
                embeds, pooled = self.cache.text_batch([prompt], device)
                empty_embeds, empty_pooled = self.cache.text_batch([""], device)
                text = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=empty_embeds,
                            negative_pooled_prompt_embeds=empty_pooled)
            with self._autocast(device):
                out = pipe(
                    **text, height=height, width=width,
                    guidance_scale=self.config.validation_guidance_scale,
                    true_cfg_scale=self.config.validation_true_cfg_scale, output_type="pt", return_previews=True,
                    generator=torch.Generator(device="cpu").manual_seed(seed + i),
                    max_sequence_length=self.config.max_sequence_length,
                )
            images.append(out.images.float().cpu())
            previews.append([p.float().cpu() for p in out.previews])
        if self.cache is not None:
            self._to_device(torch.device("cpu"), ("vae",))
        per_stage = [torch.cat([p[s] for p in previews]) for s in range(len(previews[0]))]
        return torch.cat(images), per_stage

    def sample_fn(self, model, step: int):
        """samples/step_XXXXXXX.png (with validation_sizes: step_XXXXXXX_HxW.png per size): one column per validation
        prompt, one row per stage preview (coarse to fine; the last row is the final image). Returns the grids for
        the trackers (the loop logs them)."""
        os.makedirs(self.samples_dir, exist_ok=True)
        sizes = self.config.validation_sizes
        logged = {}
        for size in sizes or [None]:
            images, previews = self.generate(model, size=size)
            grid = image_grid(previews, size=min(max(images.shape[-1], 256), 512), value_range=(0, 1))
            suffix = f"_{size[0]}x{size[1]}" if sizes else ""  # one grid per validation size
            path = os.path.join(self.samples_dir, f"step_{step:07d}{suffix}.png")
            if distributed_state().is_main_process:  # under FSDP every rank samples (in lockstep); one writes
                grid.save(path)
            self.last_sample = self.last_sample if suffix and logged else path  # the card shows the first size
            logged[f"validation/samples_with_stage_previews{suffix}"] = grid.convert("RGB")
        self.last_step = step
        return logged
