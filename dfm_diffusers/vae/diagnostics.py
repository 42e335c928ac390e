"""How well a VAE's latents suit DFM: spectra of latents and images, scale equivariance, reconstruction.

Conventions:

- Radial DCT spectrum: each channel of each image (or latent) has its mean removed (the DC term says nothing about
  frequency content and would depend on the VAE's shift factor), goes through ``scipy.fft.dctn`` (type II,
  orthonormal) and its power is normalized to sum 1; the spectra are averaged over channels and images. DCT index
  (u, v) of an H x W signal has the normalized radial frequency ``rho = sqrt((u / H)^2 + (v / W)^2) / sqrt(2)`` in
  [0, 1) (1 = the corner, the highest frequency on both axes), binned into ``num_bins`` equal bins. The spectrum
  reported per bin is the mean normalized power per coefficient; the *high-frequency fraction* is the share of the
  power at rho >= 1/2. White noise, whose power is the same at every coefficient, has the share of coefficients with
  rho >= 1/2 (1 - pi / 8 = 0.607 for large H = W). Per-element scaling of the latents (scaling_factor) cancels in the
  normalization, so the spectra are those the diffusion model sees.
- Latents are the posterior means (deterministic); images are in [-1, 1]; PSNRs are per image with data range 2
  (decoded images clamped to [-1, 1]) and averaged over the images.
- Equivariance PSNR at factor s: decode(down_s(z)) against down_s(x), down_s = s x s average pooling
  (:func:`~dfm_diffusers.decomposition.box_downsample`), as in the training loss.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch

from ..decomposition import box_downsample
from .equivariance import check_equivariance_sizes, psnr


def radial_frequency(height: int, width: int) -> np.ndarray:
    """[H, W] normalized radial frequency rho in [0, 1) of every DCT index (see the module docstring)."""
    u = np.arange(height)[:, None] / height
    v = np.arange(width)[None, :] / width
    return np.sqrt(u**2 + v**2) / math.sqrt(2)


def dct_power(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [H, W] DCT power of the mean-removed channels, each normalized to sum 1, averaged over the
    channels and samples (channels with no variation are left out)."""
    from scipy.fft import dctn

    array = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    array = array.reshape(-1, *array.shape[-2:]).astype(np.float64)
    array = array - array.mean(axis=(-2, -1), keepdims=True)
    power = dctn(array, axes=(-2, -1), norm="ortho") ** 2
    total = power.sum(axis=(-2, -1))
    keep = total > 1e-20 * max(float(total.max()), 1e-300)
    if not keep.any():
        raise ValueError("every channel is constant: no spectrum to measure")
    return (power[keep] / total[keep][:, None, None]).mean(axis=0)


def radial_dct_spectrum(x, num_bins: int = 32) -> dict:
    """Radial DCT spectrum of [N, C, H, W] signals.

    Returns ``bin_centers`` (rho), ``power`` (mean normalized power per coefficient in each bin, DC left out; NaN
    for a bin with no coefficient), ``energy`` (the share of the power in each bin; sums to 1) and
    ``high_frequency_fraction`` (the share at rho >= 1/2)."""
    power = dct_power(x)
    rho = radial_frequency(*power.shape)
    bins = np.minimum((rho * num_bins).astype(np.int64), num_bins - 1).ravel()[1:]  # [1:]: the DC term (removed)
    energy = np.bincount(bins, weights=power.ravel()[1:], minlength=num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        density = np.where(counts > 0, energy / np.maximum(counts, 1), np.nan)
    return {
        "bin_centers": ((np.arange(num_bins) + 0.5) / num_bins).tolist(),
        "power": density.tolist(),
        "energy": energy.tolist(),
        "high_frequency_fraction": float(power[rho >= 0.5].sum()),
    }


def _device_dtype(module: torch.nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def diagnose_vae(
    vae, images: torch.Tensor, factors: Sequence[int] = (2, 4), batch_size: int = 16, num_bins: int = 32
) -> dict:
    """Diagnostics of ``vae`` (diffusers AutoencoderKL interface) on ``images`` [N, C, H, W] in [-1, 1].

    Returns a JSON-ready dict: ``reconstruction_psnr``, ``equivariance_psnr`` {s: dB}, ``image_spectrum`` and
    ``latent_spectrum`` (:func:`radial_dct_spectrum`), their high-frequency fractions at the top level, and
    ``latent_std`` (of the latents as the diffusion model sees them, ``(z - shift_factor) * scaling_factor``).
    """
    device, dtype = _device_dtype(vae)
    was_training = vae.training
    vae.eval()
    latents, rec_psnr, eq_psnr = [], [], {int(s): [] for s in factors}
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device=device, dtype=dtype)
            z = vae.encode(x).latent_dist.mode()
            check_equivariance_sizes(*x.shape[-2:], *z.shape[-2:], factors)
            latents.append(z.float().cpu())
            rec_psnr.append(psnr(vae.decode(z).sample.clamp(-1, 1), x).cpu())
            for s in eq_psnr:
                decoded = vae.decode(box_downsample(z, s)).sample.clamp(-1, 1)
                eq_psnr[s].append(psnr(decoded, box_downsample(x, s)).cpu())
    finally:
        vae.train(was_training)
    z = torch.cat(latents)
    config = getattr(vae, "config", {})
    scale = float(getattr(config, "scaling_factor", None) or 1.0)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    image_spectrum = radial_dct_spectrum(images, num_bins)
    latent_spectrum = radial_dct_spectrum(z, num_bins)
    return {
        "num_images": int(len(images)),
        "image_size": list(images.shape[-3:]),
        "latent_size": list(z.shape[-3:]),
        "reconstruction_psnr": float(torch.cat(rec_psnr).mean()),
        "equivariance_psnr": {str(s): float(torch.cat(v).mean()) for s, v in eq_psnr.items()},
        "image_high_frequency_fraction": image_spectrum["high_frequency_fraction"],
        "latent_high_frequency_fraction": latent_spectrum["high_frequency_fraction"],
        "latent_std": float(((z - shift) * scale).std()),
        "image_spectrum": image_spectrum,
        "latent_spectrum": latent_spectrum,
    }


def summary_line(result: dict) -> str:
    """One line: reconstruction and equivariance PSNRs, high-frequency fractions."""
    eq = ", ".join(f"x{s} {v:.2f} dB" for s, v in result["equivariance_psnr"].items())
    return (
        f"reconstruction {result['reconstruction_psnr']:.2f} dB; equivariance {eq}; high-frequency fraction: "
        f"latent {result['latent_high_frequency_fraction']:.3f}, image {result['image_high_frequency_fraction']:.3f}"
    )


def write_diagnostics(result: dict, prefix: str, title: str = "") -> tuple[str, str]:
    """``<prefix>.json`` and ``<prefix>.png`` (the two radial spectra, log power). Returns both paths."""
    from ..visualize import line_plot

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    json_path, png_path = prefix + ".json", prefix + ".png"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    series = {}
    for name, key in (("image", "image_spectrum"), ("latent", "latent_spectrum")):
        spectrum = result[key]
        pairs = [(c, p) for c, p in zip(spectrum["bin_centers"], spectrum["power"]) if p == p and p > 0]
        label = f"{name} (high-frequency fraction {spectrum['high_frequency_fraction']:.3f})"
        series[label] = ([c for c, _ in pairs], [p for _, p in pairs])
    eq = ", ".join(f"x{s} {v:.1f}" for s, v in result["equivariance_psnr"].items())
    heading = f"{title + ': ' if title else ''}PSNR rec {result['reconstruction_psnr']:.1f} dB, equivariance {eq} dB"
    line_plot(series, png_path, title=heading, xlabel="normalized radial DCT frequency",
              ylabel="normalized power per coefficient", logy=True)
    return json_path, png_path


__all__ = ["dct_power", "diagnose_vae", "radial_dct_spectrum", "radial_frequency", "summary_line", "write_diagnostics"]
