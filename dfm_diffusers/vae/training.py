"""Scale-equivariance finetuning of a diffusers AutoencoderKL through the shared training loop.

    python -m dfm_diffusers.vae train --config examples/configs/vae_scale_equivariance.yaml [--key value ...]
    accelerate launch -m dfm_diffusers.vae train --config ...

Writes to ``output_dir``: ``diagnostics_before.{json,png}`` (the VAE as loaded), checkpoints, ``validation/``
(reconstruction grids and their diagnostics at every validation step), ``vae/`` (the EMA weights as an
AutoencoderKL folder: ``AutoencoderKL.from_pretrained(<output_dir>/vae)``) and
``diagnostics_after.{json,png}`` (of that exported VAE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..decomposition import box_downsample
from ..visualize import image_grid
from ..training.config import check_config, finite, flat_hparams, positive_int, require, setting
from ..training.loop import LoopConfig, run_training
from .diagnostics import diagnose_vae, summary_line, write_diagnostics
from .equivariance import ScaleEquivarianceLossConfig, ScaleEquivariantVAELoss, load_lpips


@dataclass
class VAEImageDataConfig:
    """Images and the VAE they are encoded with."""

    vae: str | None = setting(None, "AutoencoderKL to start from: a folder or a Hub id (required)")
    vae_subfolder: str | None = setting(None, "subfolder of the VAE, e.g. 'vae' for a whole pipeline")
    dataset: str = setting("fashion_mnist", "'fashion_mnist', a folder of class subfolders of images, or a data set")
    data_dir: str | None = setting(None, "Fashion-MNIST: folder of its IDX files; others: the data set's data_dir")
    split: str = setting("train", "data set split")
    image_column: str | None = setting(None, "image column of a data set (default: found by name)")
    resolution: int = setting(256, "image size in pixels (square)")
    max_samples: int | None = setting(None, "use only the first N samples")
    max_bad_sample_fraction: float = setting(
        0.05, "unreadable images are skipped (each named) up to this fraction of the data set"
    )
    diagnostic_split: str | None = setting(None, "split the diagnostics read (default: split)")
    diagnostic_images: int = setting(64, "images (center crops, the first of the split) the diagnostics use")
    diagnostic_batch_size: int = setting(16, "images per VAE call in the diagnostics")
    num_frequency_bins: int = setting(32, "radial frequency bins of the diagnostics' DCT spectra")

    def validate(self) -> list[str]:
        problems = require(bool(self.vae), "vae", "must name an AutoencoderKL folder or Hub id")
        problems += require(bool(self.dataset), "dataset", "must name a data set")
        problems += positive_int(self, "resolution", "diagnostic_images", "diagnostic_batch_size", "num_frequency_bins")
        problems += positive_int(self, "max_samples", optional=True)
        problems += finite(self, "max_bad_sample_fraction", low=0.0, high=1.0)
        return problems


@dataclass
class VAETrainingConfig(LoopConfig, ScaleEquivarianceLossConfig, VAEImageDataConfig):
    """All settings of `python -m dfm_diffusers.vae train` (YAML keys / --overrides)."""

    output_dir: str = "outputs/vae-scale-equivariance"
    train_batch_size: int = 8
    learning_rate: float = 1e-5
    max_train_steps: int = 10000
    ema_decay: float = 0.999
    checkpointing_steps: int = 1000
    validation_steps: int = 1000
    tracker_project_name: str = "dfm-vae"
    center_crop: bool = setting(False, "center crop (else random crop) to resolution")
    random_flip: bool = setting(True, "random horizontal flips")
    validation_images: int = setting(8, "images in the validation reconstruction grids (the first diagnostic ones)")

    def validate(self) -> list[str]:
        return positive_int(self, "validation_images")


def load_autoencoder(path: str, subfolder: str | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path, subfolder=subfolder)


def build_image_data(config: VAEImageDataConfig, channels: int, train: bool = True):
    """The training images (random crops / flips as configured) or the diagnostic ones (center crops, no flips)."""
    from ..data import build_image_dataset

    return build_image_dataset(
        config.dataset,
        resolution=config.resolution,
        center_crop=getattr(config, "center_crop", True) if train else True,
        random_flip=getattr(config, "random_flip", False) if train else False,
        split=config.split if train else (config.diagnostic_split or config.split),
        image_column=config.image_column,
        max_samples=config.max_samples if train else config.diagnostic_images,
        data_dir=config.data_dir,
        channels=channels,
        max_bad_fraction=config.max_bad_sample_fraction,
    )


def diagnostic_images(config: VAEImageDataConfig, channels: int) -> torch.Tensor:
    """[N, C, R, R] in [-1, 1]: the first ``diagnostic_images`` center crops of the diagnostic split."""
    data = build_image_data(config, channels, train=False)
    count = min(len(data), config.diagnostic_images)
    return torch.stack([data[i]["pixel_values"] for i in range(count)])


class VAETask:
    """The pieces the shared loop calls: loss, validation grids + diagnostics, export + final diagnostics."""

    def __init__(self, config: VAETrainingConfig, images: torch.Tensor):
        self.config, self.images = config, images
        self.validation_dir = os.path.join(config.output_dir, "validation")
        self.export_dir = os.path.join(config.output_dir, "vae")
        self.after: dict | None = None

    def loss_fn(self, model, batch):
        return model(batch["pixel_values"])

    def diagnose(self, vae, images=None) -> dict:
        c = self.config
        return diagnose_vae(vae, self.images if images is None else images, c.equivariance_factors or (2, 4),
                            batch_size=c.diagnostic_batch_size, num_bins=c.num_frequency_bins)

    @torch.no_grad()
    def sample_fn(self, model, step: int):
        """validation/step_<step>.png: rows original, reconstruction, then per factor s down_s(x), decode(down_s z);
        validation/step_<step>_diagnostics.{json,png}: the diagnostics of the validation images."""
        vae = model.vae
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        x = self.images[: self.config.validation_images].to(device=device, dtype=dtype)
        z = vae.encode(x).latent_dist.mode()
        rows = [x, vae.decode(z).sample]
        for s in self.config.equivariance_factors or (2, 4):
            rows += [box_downsample(x, s), vae.decode(box_downsample(z, s)).sample]
        os.makedirs(self.validation_dir, exist_ok=True)
        prefix = os.path.join(self.validation_dir, f"step_{step:07d}")
        image_grid([r.clamp(-1, 1) for r in rows], size=max(x.shape[-1], 64)).save(prefix + ".png")
        result = self.diagnose(vae, self.images[: self.config.validation_images])
        write_diagnostics(result, prefix + "_diagnostics", title=f"step {step}")

    def export_fn(self, model, folder: str):
        """The EMA VAE to <output_dir>/vae (``folder``, the loop's pipeline folder, is not used), then its
        diagnostics to diagnostics_after.{json,png}."""
        model.vae.save_pretrained(self.export_dir)
        self.after = self.diagnose(model.vae)
        write_diagnostics(self.after, os.path.join(self.config.output_dir, "diagnostics_after"), title="after")


def train_vae(config: VAETrainingConfig) -> dict:
    """Load the VAE and data, write the diagnostics before, train, export ``<output_dir>/vae`` and diagnose it.

    Diagnostics run on the main process, on the training device. Returns the loop's summary with ``export_dir`` =
    the VAE folder, ``diagnostics_before`` / ``_after`` (None on the other processes)."""
    from accelerate import PartialState

    check_config(config)
    state = PartialState()  # the process group accelerate launched (or a single process); run_training shares it
    vae = load_autoencoder(config.vae, config.vae_subfolder).to(state.device)
    channels = vae.config.in_channels
    dataset = build_image_data(config, channels, train=True)
    images = diagnostic_images(config, channels)
    task = VAETask(config, images)
    before = None
    if state.is_main_process:
        before = task.diagnose(vae)
        write_diagnostics(before, os.path.join(config.output_dir, "diagnostics_before"), title="before")
        print(f"before: {summary_line(before)}")
    lpips = load_lpips(config.lpips_weights, config.lpips_net) if config.lpips_weights else None
    model = ScaleEquivariantVAELoss(vae, config, lpips=lpips)
    result = run_training(config, model, dataset, task.loss_fn, sample_fn=task.sample_fn,
                          export_fn=task.export_fn, hparams=flat_hparams(config))
    if task.after is not None:
        print(f"after:  {summary_line(task.after)}")
    return {**result, "export_dir": task.export_dir, "diagnostics_before": before, "diagnostics_after": task.after}
