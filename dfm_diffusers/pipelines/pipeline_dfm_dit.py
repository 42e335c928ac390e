"""DFMDiTPipeline: class-conditional coarse-to-fine generation with a DFM-DiT (pixel or latent space)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from ..models.transformer_dfm_dit import DFMDiTTransformer2DModel
from ..schedulers import DFMScheduler
from .hub import DFMHubMixin
from .stagewise import DFMStagewiseMixin, StageEndCallback, check_finite_latents, check_scale


def integer_class_labels(class_labels) -> torch.Tensor:
    """class_labels (an int, a sequence of ints, or an integer tensor) -> long [N]; ValueError for anything else
    (floats such as 1.5 are not rounded, bools are not classes)."""
    if torch.is_tensor(class_labels):
        if class_labels.dtype == torch.bool or class_labels.is_floating_point() or class_labels.is_complex():
            raise ValueError(f"class_labels must be integers, got a {class_labels.dtype} tensor")
        return class_labels.long().reshape(-1)
    values = [class_labels] if isinstance(class_labels, (int, np.integer)) else class_labels
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"class_labels must be an int or a sequence of ints, got {class_labels!r}") from None
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise ValueError(f"class_labels must be integers, got {bad[:5]} in {class_labels!r}")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


class DFMDiTPipeline(DFMStagewiseMixin, DFMHubMixin, DiffusionPipeline):
    """Class labels -> images with a DFMDiTTransformer2DModel and a DFMScheduler.

    ``vae`` is optional: None means the transformer works in pixel space ([-1, 1]); otherwise any diffusers
    AutoencoderKL, latents being ``(z - shift_factor) * scaling_factor``.

    Args:
        id2label: optional class names, ``{class index: "name, synonym, ..."}`` (DiTPipeline's convention);
            enables :meth:`get_label_ids` and class names in ``class_labels``.
        vae_reference: optional Hub id (or description) of the VAE whose latents the transformer generates, for
            a latent-space transformer saved without its VAE; images then need ``vae=`` at load time.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    model_card_kind = "dit"

    def __init__(
        self,
        transformer: DFMDiTTransformer2DModel,
        scheduler: DFMScheduler,
        vae: AutoencoderKL | None = None,
        id2label: dict[int, str] | None = None,
        vae_reference: str | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        id2label = None if id2label is None else {int(k): str(v) for k, v in id2label.items()}
        self.register_to_config(id2label=id2label, vae_reference=vae_reference)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # name -> class index, every comma-separated synonym of every class (DiTPipeline.get_label_ids' table)
        self.labels = {}
        for index, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = index

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class names (any of a class's comma-separated synonyms in ``id2label``) -> class indices."""
        if not self.labels:
            raise ValueError("this pipeline has no class names (id2label); pass integer class labels")
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"unknown class name(s) {unknown}; known names include {list(self.labels)[:8]} ...")
        return [self.labels[n] for n in names]

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        """Finest-resolution latent (or pixels) -> images in ``output_type``."""
        if output_type == "latent":
            return latents
        if self.vae is not None:
            shift = self.vae.config.get("shift_factor", None) or 0.0
            latents = latents / self.vae.config.scaling_factor + shift
            latents = latents.to(device=get_module_execution_device(self.vae), dtype=self.vae.dtype)
            latents = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(latents.float().clamp(-1, 1), output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        steps_per_stage: Sequence[int] | int | None = None,
        stage_thresholds: Sequence[float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_previews: bool = False,
        return_dict: bool = True,
        callback_on_stage_end: StageEndCallback | None = None,
        num_inference_steps: int | None = None,
    ):
        """Generate one image per class label.

        Args:
            class_labels: class indices, or class names when the pipeline has ``id2label``.
            guidance_scale: classifier-free guidance scale (1 = off), applied per active stage.
            guidance_interval: optional (low, high) sigma interval: a stage is guided only while its own sigma
                lies inside it (guidance interval, Kynkaanniemi et al. 2024).
            steps_per_stage / stage_thresholds: override the scheduler config for this call (thresholds are the
                actual sigma, after the time shift, at which the next stage starts).
            num_inference_steps: DiTPipeline's name for the total number of steps (an int >= the number of
                stages), split in the scheduler's steps_per_stage ratio; not together with ``steps_per_stage``.
            latents: optional list of per-stage initial noise [B, C, H_s, W_s].
            callback_on_stage_end: ``callback(pipe, stage, preview)`` when each stage's preview is ready (decoded
                in ``output_type``); the last call carries the final images.
        """
        config = self.transformer.config
        device = self._execution_device
        reference = self.config.get("vae_reference", None)
        if self.vae is None and reference and output_type != "latent":
            raise ValueError(
                f"the transformer generates latents of the VAE {reference!r} and this pipeline has no VAE: load it "
                f"with vae=AutoencoderKL.from_pretrained({reference!r}) (from_pretrained(..., vae=...)), or ask "
                f"for output_type='latent'"
            )
        names = isinstance(class_labels, str) or (
            isinstance(class_labels, (list, tuple)) and class_labels and all(isinstance(c, str) for c in class_labels)
        )
        if names and self.labels:
            class_labels = self.get_label_ids(class_labels)
        labels = integer_class_labels(class_labels).to(device)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= config.num_classes:
            raise ValueError(f"class_labels must be in 0..{config.num_classes - 1}, got {labels.tolist()}")
        check_scale("guidance_scale", guidance_scale)
        if num_inference_steps is not None:
            if steps_per_stage is not None:
                raise ValueError("pass steps_per_stage or num_inference_steps (its int total), not both")
            steps_per_stage = num_inference_steps
        if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
            raise ValueError(f"guidance_interval must be (low, high) with 0 <= low <= high <= 1, got {guidance_interval}")
        batch = labels.shape[0]
        decomposition = self.decomposition
        shapes = [(batch, config.in_channels, h, w) for h, w in decomposition.stage_shapes(config.sample_size, config.sample_size)]
        dtype = self.transformer.dtype
        if latents is None:
            latents = [randn_tensor(shape, generator=generator, device=device, dtype=dtype) for shape in shapes]
        elif [tuple(x.shape) for x in latents] != shapes:
            raise ValueError(f"latents must be per-stage tensors shaped {shapes}, got {[tuple(x.shape) for x in latents]}")
        else:
            check_finite_latents(latents)
            latents = [x.to(device=device, dtype=dtype) for x in latents]

        seq_len = (config.sample_size // config.patch_size) ** 2
        mu = None
        if self.scheduler.config.use_dynamic_shifting:
            from ..schedulers import calculate_shift

            sc = self.scheduler.config
            mu = calculate_shift(seq_len, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
        self.scheduler.set_timesteps(steps_per_stage, device=device, mu=mu, stage_thresholds=stage_thresholds)
        do_cfg = guidance_scale != 1.0
        null = torch.full_like(labels, config.num_classes)
        model_labels = torch.cat([labels, null]) if do_cfg else labels
        num_stages = len(latents)
        previews = [] if return_previews else None
        self.start_stages(callback_on_stage_end)

        for i in self.progress_bar(range(self.scheduler.num_inference_steps)):
            stage_sigmas = self.scheduler.sigmas[i]
            self._stage_index, self._stage_sigmas = int(self.scheduler.stage_index[i]), stage_sigmas
            n = model_labels.shape[0]
            model_in = [torch.cat([x, x]) if do_cfg else x for x in latents]
            velocity = self.transformer(
                model_in,
                timestep=stage_sigmas[None].expand(n, num_stages).to(dtype),
                num_active_stages=self.scheduler.num_active_stages[i].expand(n),
                class_labels=model_labels,
                return_dict=False,
            )[0]
            if do_cfg:
                guided = []
                for s, v in enumerate(velocity):
                    cond, uncond = v.chunk(2)
                    sigma = float(stage_sigmas[s])
                    inside = guidance_interval is None or guidance_interval[0] <= sigma <= guidance_interval[1]
                    guided.append(uncond + guidance_scale * (cond - uncond) if inside else cond)
                velocity = guided
            self.add_stage_preview(previews, i, latents, velocity, output_type)
            latents = self.scheduler.step(velocity, i, latents, return_dict=False)[0]

        return self.finish_output(latents, previews, output_type, return_dict)
