"""Linear-Gaussian proxy for the FLUX -> DFM conversion (issue 10, part 1): how far from optimal is the converted
stage-0 prediction right after conversion, for each way of presenting stage 0 to FLUX?

Proxy. Data: stationary Gaussian fields (periodic, n x n, unit variance per pixel) with a 1/f^2 power spectrum,
like natural images / latents. "FLUX" is the Bayes-optimal denoiser of full-resolution data under i.i.d. noise,
x_sigma = (1 - sigma) x + sigma eps: the Wiener filter with that spectrum. Stage 0 is the f x f block mean c of the
data (the Laplacian low band). For each form we compare the mean squared error of stage 0's clean estimate
(equivalently of its velocity: v-error = x0-error / sigma at a fixed sigma) with the Bayes-optimal estimate that
sees the same input, so 1.00 means "the converted model starts at the best possible stage-0 predictor":

- old: stage 0 noised at its own resolution, z = (1 - sigma) c + sigma eps_c, then nearest-upsampled into FLUX
  (the first implementation's exact weight algebra): FLUX sees noise constant over every f x f block.
- carrier (paper, option a, used now): c nearest-upsampled BEFORE noise, i.i.d. noise at full resolution,
  FLUX verbatim, output block-averaged. Reported on the coarse content and on the full-resolution carrier (the
  training loss, which also holds the within-block part).
- remap (option b): z as in "old", presented as (up(z) + fresh within-block noise) at FLUX time
  sigma' = f sigma / (1 + (f - 1) sigma). In distribution by construction: its error equals the carrier form's
  at sigma', but it makes the model's forward stochastic and needs an input-skip head.

Run: python bench/flux_conversion_proxy.py [--size 64] [--samples 512]   (CPU, seconds)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def spectrum(n: int) -> torch.Tensor:
    """1/|k|^2 power spectrum on the n x n DFT grid (k in cycles per image, k0 = 1 regularises DC), scaled so
    that a field with it has unit variance per pixel."""
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    p = 1.0 / (k[:, None] ** 2 + k[None, :] ** 2 + 1.0)
    return p / p.mean()


def coarse_spectrum(p: torch.Tensor, f: int) -> torch.Tensor:
    """Spectrum of the f x f block mean of a field with spectrum p: (1/f^2) sum over aliases |B|^2 p."""
    n = p.shape[0]
    m = n // f
    k = torch.fft.fftfreq(n, d=1.0, dtype=torch.float64)
    b1 = sum(torch.exp(2j * torch.pi * k * d) for d in range(f)) / f  # 1-D box response
    weight = (b1.abs() ** 2)[:, None] * (b1.abs() ** 2)[None, :] * p
    return weight.view(f, m, f, m).sum((0, 2)) / f**2


def wiener(y: torch.Tensor, p: torch.Tensor, alpha: float, noise_var: float) -> torch.Tensor:
    """E[x | y = alpha x + noise] for x with spectrum p and white noise of variance noise_var."""
    gain = alpha * p / (alpha**2 * p + noise_var)
    return torch.fft.ifft2(torch.fft.fft2(y) * gain).real


def within_block_noise(shape, f: int, g: torch.Generator) -> torch.Tensor:
    """The within-block part of i.i.d. unit noise: eps - up(blockmean(eps)) (variance 1 - 1/f^2 per pixel)."""
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return eps - F.interpolate(F.avg_pool2d(eps, f), scale_factor=f, mode="nearest")


def measure(size: int = 64, samples: int = 512, f: int = 2, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0):
    """Rows (sigma, old, carrier_coarse, carrier_full, remap): error / Bayes-optimal error for each form."""
    g = torch.Generator().manual_seed(seed)
    p = spectrum(size)
    pc = coarse_spectrum(p, f)
    white = torch.randn(samples, 1, size, size, generator=g, dtype=torch.float64)
    x = torch.fft.ifft2(torch.fft.fft2(white) * p.sqrt()).real
    c = F.avg_pool2d(x, f)
    assert abs(c.var().item() / pc.mean().item() - 1) < 0.1, "coarse spectrum does not match the data"
    up = lambda t: F.interpolate(t, scale_factor=f, mode="nearest")  # noqa: E731
    down = lambda t: F.avg_pool2d(t, f)  # noqa: E731
    mse = lambda a, b: (a - b).pow(2).mean().item()  # noqa: E731
    rows = []
    for sigma in sigmas:
        alpha = 1 - sigma
        # old: noise at stage 0's resolution, nearest-upsampled noisy latent into FLUX
        z = alpha * c + sigma * torch.randn(c.shape, generator=g, dtype=torch.float64)
        old = mse(down(wiener(up(z), p, alpha, sigma**2)), c) / mse(wiener(z, pc, alpha, sigma**2), c)
        # carrier: clean part upsampled, i.i.d. noise at full resolution
        y = alpha * up(c) + sigma * torch.randn(up(c).shape, generator=g, dtype=torch.float64)
        flux = wiener(y, p, alpha, sigma**2)
        best = wiener(down(y), pc, alpha, sigma**2 / f**2)  # block means are sufficient; noise var sigma^2/f^2
        carrier_coarse = mse(down(flux), c) / mse(best, c)
        carrier_full = mse(flux, up(c)) / mse(up(best), up(c))
        # remap: z at FLUX time sigma', rescaled, fresh within-block noise
        s2 = f * sigma / (1 + (f - 1) * sigma)
        y_b = up(z) / (1 + (f - 1) * sigma) + s2 * within_block_noise(up(z).shape, f, g)
        remap = mse(down(wiener(y_b, p, 1 - s2, s2**2)), c) / mse(wiener(z, pc, alpha, sigma**2), c)
        rows.append((sigma, old, carrier_coarse, carrier_full, remap))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for f in (2, 4):
        print(f"\nfactor {f} ({args.size}x{args.size} field, stage 0 {args.size // f}x{args.size // f}); "
              f"stage-0 prediction error / Bayes-optimal")
        print("| sigma | old (noise at stage-0 res) | carrier, coarse | carrier, full-res loss | remap (b) |")
        print("|---|---|---|---|---|")
        for row in measure(args.size, args.samples, f, seed=args.seed):
            print("| {:.1f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} |".format(*row))


if __name__ == "__main__":
    main()
