"""Scale-equivariant VAE adaptation for DFM: the loss, spectral diagnostics and the training command.

Command line: ``python -m dfm_diffusers.vae train --vae <AutoencoderKL> ...`` finetunes an autoencoder with the
scale-equivariance loss; ``python -m dfm_diffusers.vae diagnose --vae ... --dataset ...`` measures one.
"""

from .diagnostics import dct_power, diagnose_vae, radial_dct_spectrum, radial_frequency, summary_line, write_diagnostics
from .equivariance import (
    ScaleEquivarianceLossConfig,
    ScaleEquivariantVAELoss,
    check_equivariance_sizes,
    load_lpips,
    pixel_distance,
    psnr,
)
from .training import VAEImageDataConfig, VAETrainingConfig, train_vae

__all__ = [
    "ScaleEquivarianceLossConfig",
    "ScaleEquivariantVAELoss",
    "VAEImageDataConfig",
    "VAETrainingConfig",
    "check_equivariance_sizes",
    "dct_power",
    "diagnose_vae",
    "load_lpips",
    "pixel_distance",
    "psnr",
    "radial_dct_spectrum",
    "radial_frequency",
    "summary_line",
    "train_vae",
    "write_diagnostics",
]
