"""What both DFM pipelines share: the decomposition of their transformer, stage previews, the final output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..decomposition import LaplacianDecomposition


@dataclass
class DFMPipelineOutput(BaseOutput):
    """images: the final images. previews: None, or one entry per stage, entry i the decoded recomposition of
    stages 0..i at stage i's resolution, taken when stage i finished its phase (the last entry is ``images``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    previews: list | None = None


def check_scale(name: str, value) -> None:
    """ValueError unless ``value`` is a finite real number >= 0 (guidance scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_finite_latents(latents) -> None:
    """ValueError if any per-stage latent holds NaN or inf."""
    for s, x in enumerate(latents):
        if torch.is_tensor(x) and not torch.isfinite(x).all():
            raise ValueError(f"latents[{s}] (stage {s}) holds NaN or inf values; pass finite initial noise")


def decomposition_for(transformer) -> LaplacianDecomposition:
    """The Laplacian decomposition a DFM transformer was built for (from its config)."""
    return LaplacianDecomposition.from_config(transformer.config)


class DFMStagewiseMixin:
    """Mixed into pipelines that have ``transformer``, ``scheduler`` (a DFMScheduler after set_timesteps) and a
    ``decode_latents(latent, output_type)`` method."""

    @property
    def decomposition(self) -> LaplacianDecomposition:
        return decomposition_for(self.transformer)

    def add_stage_preview(self, previews, step: int, latents, velocity, output_type: str) -> None:
        """At the last step of phase i < S-1, append the decoded preview of stages 0..i: the recomposition of
        their clean estimates x0 = x - sigma * v, at stage i's resolution."""
        if previews is None:
            return
        sched = self.scheduler
        stage = int(sched.stage_index[step])
        last_of_phase = step == sched.num_inference_steps - 1 or int(sched.stage_index[step + 1]) != stage
        if not last_of_phase or stage == len(latents) - 1:
            return
        sigmas = sched.sigmas[step]
        x0 = [latents[s].float() - sigmas[s] * velocity[s].float() for s in range(stage + 1)]
        decomposition = self.decomposition
        u0 = decomposition.upsampling[0]
        if stage == 0 and getattr(sched, "coarse_phase_steps", 0) and u0 > 1:  # the band at its own resolution
            x0[0] = torch.nn.functional.interpolate(x0[0], scale_factor=u0, mode="nearest")  # -> its carrier
        preview = decomposition.preview(x0, upto=stage).to(latents[0].dtype)
        previews.append(self.decode_latents(preview, output_type))

    def finish_output(self, latents, previews, output_type: str, return_dict: bool):
        """Recompose the stages, decode, attach the final image as the last preview, free offload hooks."""
        image = self.decode_latents(self.decomposition.recompose(latents), output_type)
        if previews is not None:
            previews.append(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,) if previews is None else (image, previews)
        return DFMPipelineOutput(images=image, previews=previews)
