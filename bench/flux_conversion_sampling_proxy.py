"""Linear-Gaussian proxy for what a converted FLUX *samples* right after conversion (issue 17, part 1).

Data: stationary Gaussian fields (periodic, n x n, unit variance per pixel, 1/f^2 power spectrum, like latents).
"FLUX": the Bayes-optimal velocity for full-resolution data under i.i.d. noise, x_sigma = (1 - sigma) x + sigma eps
(the Wiener filter), which a well-trained FLUX approximates. Every sampler below is then a linear map of its initial
noise, so the covariance of its samples is exact (pushed through on a basis, no sampling error) and the Frechet
distance (FD) to the data is exact too. We report FD(samples, data) for FLUX's own Euler sampler and for the DFM
sampler (DFMScheduler's sigma table) driving each conversion of FLUX into a 2-stage DFM model, and the same sampler
driving the exact DFM model (``optimal_dfm``: the posterior-mean velocity of every stage, i.e. what a perfectly
trained DFM model predicts; with few Euler steps another velocity field can do slightly better, so it is the
reference a trained model converges to, not a strict bound):

- ``zero_head``: the conversion before issue 17 (bilinear Laplacian pyramid, stage 0 carried at full resolution,
  the detail stage's input projection = x_embedder and its head zero, FLUX conditioned on stage 0's sigma). The
  detail band keeps its initial noise.
- ``skip``: a skip parametrisation of the detail stage, v = z / sigma + c_out F with F = 0 at conversion: the band
  is driven to 0, i.e. the samples are FLUX's coarse content upsampled.
- ``band_split/<cond>/<cin>``: the Haar pyramid (box down, nearest up), FLUX reads P_low(carrier) + P_high(band)
  (== FLUX on the recomposed latent when both stages share sigma), the detail head is P_high(FLUX velocity), the
  carrier's head FLUX's velocity. ``cond``: FLUX's time input while stage 0 is ahead: ``stage0`` (its sigma),
  ``newest`` (the detail stage's), ``rms`` (the noise variance of FLUX's input averaged over pixels).
  ``cin`` rescales the carrier's low band to FLUX's signal level at the conditioning sigma, (1 - s_c) / (1 - s_0)
  (``scaled``) or not (``plain``). Suffix ``/xhat``: stage 0's velocity moves it to FLUX's clean estimate at its
  own sigma, (z_0 - x_hat) / sigma_0, instead of taking FLUX's velocity; ``/own``: a diagnostic with a second FLUX
  pass on the carrier alone for stage 0 (twice the cost; shows how much of the gap stage 0's velocity causes).

Run: python bench/flux_conversion_sampling_proxy.py [--size 16] [--factor 2] [--steps 30 10] [--threshold 0.1]
(CPU, seconds).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from dfm_diffusers import DFMScheduler


def spectrum(n: int) -> torch.Tensor:
    """1/(|k|^2 + 1) power spectrum on the n x n DFT grid, scaled to unit variance per pixel."""
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    p = 1.0 / (k[:, None] ** 2 + k[None, :] ** 2 + 1.0)
    return p / p.mean()


class GaussianFlux:
    """The Bayes-optimal velocity eps - x for x ~ N(0, C_p) at sigma, from x_sigma = (1 - sigma) x + sigma eps."""

    def __init__(self, p: torch.Tensor):
        self.p = p

    def denoise(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.view(-1, 1, 1, 1)
        alpha = 1 - sigma
        gain = alpha * self.p / (alpha**2 * self.p + sigma**2)
        return torch.fft.ifft2(torch.fft.fft2(y) * gain).real

    def velocity(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x_hat = self.denoise(y, sigma)
        return (y - x_hat) / sigma.view(-1, 1, 1, 1)


def frechet_to_data(samples_map: torch.Tensor, p: torch.Tensor) -> float:
    """FD between N(0, M M^T) (samples = M @ noise) and the data N(0, C_p)."""
    n = p.shape[0]
    basis = torch.eye(n * n, dtype=torch.float64).view(-1, 1, n, n)
    data_cov = torch.fft.ifft2(torch.fft.fft2(basis) * p).real.view(n * n, n * n)  # C e_i
    cov = samples_map @ samples_map.T

    def sqrtm(a):
        w, v = torch.linalg.eigh((a + a.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    root = sqrtm(data_cov)
    cross = sqrtm(root @ cov @ root)
    return float(torch.trace(data_cov + cov - 2 * cross))


def low(x: torch.Tensor, f: int) -> torch.Tensor:
    """P_low: the f x f block mean, nearest-upsampled (an orthogonal projection)."""
    return F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")


def bilinear_up(x: torch.Tensor, f: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)


def flux_sampler(flux: GaussianFlux, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    z = noise
    for k in range(steps):
        v = flux.velocity(z, sigmas[k].expand(len(z)))
        z = z + (sigmas[k + 1] - sigmas[k]) * v
    return z


def dfm_sampler(flux, noise0, noise1, table, active, f: int, method: str) -> torch.Tensor:
    """Euler over the DFM sigma table; returns the recomposed sample. method: zero_head | skip | band_split/..."""
    z0, z1 = noise0, noise1
    for k in range(len(active)):
        s0, s1 = table[k]
        ds0, ds1 = table[k + 1] - table[k]
        both = int(active[k]) == 2
        b = len(z0)
        if not both:
            v0 = flux.velocity(z0, s0.expand(b))  # stage 0 alone: FLUX on the carrier (every method)
            z0 = z0 + ds0 * v0
            continue
        if method == "zero_head":
            v0 = flux.velocity(z0 + z1, s0.expand(b))
            v1 = torch.zeros_like(z1)
        elif method == "skip":
            v0 = flux.velocity(z0, s0.expand(b))
            v1 = z1 / s1
        else:
            _, cond, cin, *stage0 = method.split("/")
            if cond == "stage0":
                sc = s0
            elif cond == "newest":
                sc = s1
            else:  # rms: pixel-averaged noise variance of FLUX's input
                sc = ((s0**2 + (f * f - 1) * s1**2) / (f * f)).sqrt()
            scale = (1 - sc) / (1 - s0) if cin == "scaled" else torch.tensor(1.0, dtype=torch.float64)
            u = scale * low(z0, f) + (z1 - low(z1, f))
            v = flux.velocity(u, sc.expand(b))
            v1 = v - low(v, f)
            if stage0 == ["xhat"]:  # stage 0 moves to FLUX's clean estimate at its own sigma: (z0 - x_hat) / s0
                x_hat = u - sc * v
                v0 = (low(z0, f) - low(x_hat, f)) / s0 + (v - low(v, f))
            elif stage0 == ["own"]:  # diagnostic: a second FLUX pass on the carrier alone at stage 0's sigma
                v0 = flux.velocity(z0, s0.expand(b))
            else:
                v0 = v
        z0 = z0 + ds0 * v0
        z1 = z1 + ds1 * v1
    coarse = F.avg_pool2d(z0, f)
    if method == "zero_head":
        return bilinear_up(coarse, f) + z1
    if method == "skip":
        return bilinear_up(coarse, f) + z1
    return F.interpolate(coarse, scale_factor=f, mode="nearest") + (z1 - low(z1, f))


def optimal_dfm_map(p: torch.Tensor, f: int, table: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Sample map of the exact 2-stage DFM model (the posterior-mean velocity given the coarse part at sigma_0 and the
    detail part at sigma_1: what a perfectly trained model predicts) under the same DFM sampler.
    Works in an orthonormal basis [block indicators / f, the detail subspace]; returns [d, d] (samples of a basis)."""
    n = p.shape[0]
    d, m = n * n, n // f
    basis = torch.eye(d, dtype=torch.float64).view(d, 1, n, n)
    cov = torch.fft.ifft2(torch.fft.fft2(basis) * p).real.view(d, d)
    low_basis = F.interpolate(torch.eye(m * m, dtype=torch.float64).view(-1, 1, m, m), scale_factor=f) / f
    low_basis = low_basis.view(m * m, d).T
    w, v = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - low_basis @ low_basis.T)
    q = torch.cat([low_basis, v[:, w > 0.5]], 1)
    cov_q, n_low = q.T @ cov @ q, m * m
    coords = torch.eye(d, dtype=torch.float64)  # the initial noise basis, in q's coordinates
    for k in range(len(active)):
        both = int(active[k]) == 2
        s0, s1 = table[k, 0].item(), (table[k, 1].item() if both else 1.0)
        a = torch.cat([torch.full((n_low,), 1 - s0), torch.full((d - n_low,), 1 - s1)]).double()
        sig = torch.cat([torch.full((n_low,), s0), torch.full((d - n_low,), s1)]).double()
        gain = (cov_q * a[None, :]) @ torch.linalg.inv(a[:, None] * cov_q * a[None, :] + torch.diag(sig**2))
        velocity = (coords - gain @ coords) / sig[:, None]
        step = (table[k + 1] - table[k]).double()
        ds = torch.cat([torch.full((n_low,), step[0].item()), torch.full((d - n_low,), step[1].item() if both else 0.0)])
        coords = coords + ds[:, None] * velocity
    return q @ coords


METHODS = ["zero_head", "skip"] + [
    f"band_split/{cond}/{cin}{v0}" for cond in ("stage0", "newest", "rms") for cin in ("plain", "scaled")
    for v0 in ("", "/xhat", "/own")
]


def measure(size: int = 16, factor: int = 2, steps=(30, 10), threshold: float = 0.1, flux_steps: int | None = None):
    p = spectrum(size)
    flux = GaussianFlux(p)
    d = size * size
    basis = torch.eye(d, dtype=torch.float64).view(d, 1, size, size)
    flux_map = flux_sampler(flux, basis, flux_steps or sum(steps)).reshape(d, d).T  # columns: sample of e_i
    rows = {"flux": frechet_to_data(flux_map, p)}
    scheduler = DFMScheduler(num_stages=2, steps_per_stage=list(steps), stage_thresholds=[threshold])
    scheduler.set_timesteps()
    table = scheduler.sigmas.double()
    active = scheduler.num_active_stages
    zeros = torch.zeros_like(basis)
    for method in METHODS:
        # the sampler is linear in (noise0, noise1): push each basis separately and stack the columns
        m0 = dfm_sampler(flux, basis, zeros, table, active, factor, method).reshape(d, d).T
        m1 = dfm_sampler(flux, zeros, basis, table, active, factor, method).reshape(d, d).T
        rows[method] = frechet_to_data(torch.cat([m0, m1], dim=1), p)
    rows["optimal_dfm"] = frechet_to_data(optimal_dfm_map(p, factor, table, active), p)
    rows["data_variance"] = float(d)  # FD of a sampler that returns zeros: trace(C) = d
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--factor", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, nargs=2, default=[30, 10])
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    out = []
    for f in args.factor:
        for threshold in args.threshold:
            rows = measure(args.size, f, tuple(args.steps), threshold)
            out.append({"factor": f, "threshold": threshold, **rows})
            print(f"\nfactor {f}, threshold {threshold}, steps {args.steps}: FD to data (FLUX's own: {rows['flux']:.4f};"
                  f" a sampler returning zeros: {rows['data_variance']:.0f})")
            for method in [*METHODS, "optimal_dfm"]:
                print(f"  {method:28s} {rows[method]:10.4f}   x{rows[method] / max(rows['flux'], 1e-12):.1f} FLUX's")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
