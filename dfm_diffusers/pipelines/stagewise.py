"""What both DFM pipelines share: the decomposition of their transformer, the packed (token) layout of the stage
latents, stage previews, the final output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..decomposition import LaplacianDecomposition
from ..models.stage_layers import patchify, unpatchify


@dataclass
class DFMPipelineOutput(BaseOutput):
    """images: the final images. previews: None, or one entry per stage, entry i the decoded recomposition of
    stages 0..i at stage i's resolution, taken when stage i finished its phase (the last entry is ``images``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    previews: list | None = None


#: Called as ``callback_on_stage_end(pipe, stage, preview)`` when stage ``stage``'s preview (in the call's output_type)
#: is ready; the last call carries the final images.
StageEndCallback = Callable[[Any, int, Any], None]


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

    _stage_index = None
    _stage_sigmas = None
    _stage_end_callback = None

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """DiffusionPipeline.from_pipe: a new pipeline sharing ``pipeline``'s components (no copies); components
        passed as keyword arguments replace them. From another kind of pipeline (e.g. a FluxPipeline, whose text
        encoders, tokenizers and VAE are shared) pass the DFM ``transformer`` and ``scheduler``: ValueError naming
        the one that is missing or of the wrong class."""
        types = cls._get_signature_types()
        found = {}
        for name in ("transformer", "scheduler"):
            component = kwargs[name] if name in kwargs else pipeline.components.get(name)
            expected = types[name][0]
            if not isinstance(component, expected):
                raise ValueError(
                    f"{cls.__name__}.from_pipe needs a {expected.__name__} as `{name}`, but "
                    f"{type(pipeline).__name__}'s is a {type(component).__name__}: pass one, e.g. "
                    f"{cls.__name__}.from_pipe(pipe, {name}={expected.__name__}.from_pretrained(DFM_FOLDER, "
                    f"subfolder='{name}'))"
                )
            found[name] = component
        stages = (found["transformer"].config.num_stages, found["scheduler"].config.num_stages)
        if stages[0] != stages[1]:
            raise ValueError(f"the transformer has {stages[0]} stages but the scheduler {stages[1]}")
        return super().from_pipe(pipeline, **kwargs)

    @property
    def decomposition(self) -> LaplacianDecomposition:
        return decomposition_for(self.transformer)

    @property
    def stage_index(self) -> int | None:
        """During a call: the phase of the current step (stage ``stage_index`` is the newest active one); else None."""
        return self._stage_index

    @property
    def stage_sigmas(self) -> torch.Tensor | None:
        """During a call: the per-stage sigmas [S] the transformer receives at the current step; else None."""
        return self._stage_sigmas

    def pack_stage_latents(self, stage_latents) -> torch.Tensor:
        """List of S stage tensors [B, C, H_s, W_s] -> one tensor [B, N, sum_s C * p_s^2]: every stage patchified
        with its own patch size p_s onto the shared token grid (N tokens) and concatenated on the last axis. For a
        FLUX-DFM model each stage with p_s = 2 is FluxPipeline's 2x2 packing, so one stage gives exactly FluxPipeline's
        packed latents."""
        sizes = self.transformer.stage_layers.patch_sizes
        return torch.cat([patchify(x, p) for x, p in zip(stage_latents, sizes)], dim=-1)

    def unpack_stage_latents(self, latents: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
        """Inverse of :meth:`pack_stage_latents` for images of ``height`` x ``width`` pixels."""
        layers = self.transformer.stage_layers
        grid = (height // self.vae_scale_factor // layers.finest_patch_size,
                width // self.vae_scale_factor // layers.finest_patch_size)
        return self._unpack_on_grid(latents, grid)

    def _unpack_on_grid(self, latents: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        layers = self.transformer.stage_layers
        sizes = layers.patch_sizes
        channels = layers.patch_embedders[0].in_features // sizes[0] ** 2  # every stage's input channels
        widths = [channels * p * p for p in sizes]
        expected = (grid[0] * grid[1], sum(widths))
        if not torch.is_tensor(latents) or latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"packed latents must be [B, N, C] = [B, {expected[0]}, {expected[1]}] (the stages' patches on a "
                f"{grid[0]}x{grid[1]} token grid, see pack_stage_latents), got {got}"
            )
        parts = latents.split(widths, dim=-1)
        return [unpatchify(x, p, grid[0] * p, grid[1] * p) for x, p in zip(parts, sizes)]

    def add_stage_preview(self, previews, step: int, latents, velocity, output_type: str) -> None:
        """At the last step of phase i < S-1, append the decoded preview of stages 0..i: the recomposition of
        their clean estimates x0 = x - sigma * v, at stage i's resolution (also handed to the call's
        ``callback_on_stage_end``)."""
        if previews is None and self._stage_end_callback is None:
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
        preview = self.decode_preview(preview, output_type)
        if previews is not None:
            previews.append(preview)
        if self._stage_end_callback is not None:
            self._stage_end_callback(self, stage, preview)

    def decode_preview(self, latents: torch.Tensor, output_type: str):
        """A preview latent [B, C, h, w] -> images in ``output_type`` ("latent": the latent itself)."""
        return latents if output_type == "latent" else self.decode_latents(latents, output_type)

    def start_stages(self, callback_on_stage_end: StageEndCallback | None) -> None:
        """Reset the per-call stage state (before the denoising loop)."""
        if callback_on_stage_end is not None and not callable(callback_on_stage_end):
            raise ValueError(f"callback_on_stage_end must be callable, got {type(callback_on_stage_end).__name__}")
        self._stage_end_callback = callback_on_stage_end
        self._stage_index = None
        self._stage_sigmas = None

    def finish_output(self, latents, previews, output_type: str, return_dict: bool):
        """Recompose the stages, decode, attach the final image as the last preview (``callback_on_stage_end`` gets
        it too), free offload hooks."""
        final = self.decomposition.recompose(latents)
        image = self.decode_latents(final, output_type)
        if previews is not None:
            previews.append(self.decode_preview(final, output_type) if output_type == "latent" else image)
        callback, self._stage_end_callback = self._stage_end_callback, None
        self._stage_index = self._stage_sigmas = None
        if callback is not None:
            callback(self, len(latents) - 1, image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,) if previews is None else (image, previews)
        return DFMPipelineOutput(images=image, previews=previews)
