"""Scale-equivariance regularisation of an autoencoder (DFM paper section 2.3 / appendix D; EQ-VAE; Skorokhodov et
al. 2025, "Improving the Diffusability of Autoencoders").

For each factor s: ``decode(down_s(z))`` is pulled towards ``down_s(x)``, where ``z`` is the posterior latent of
``encode(x)`` and ``down_s`` is s x s average pooling (:func:`~dfm_diffusers.decomposition.box_downsample`, the
decomposition's own antialiased operator), applied alike to the image and to the latent. Low latent frequencies
then decode to low image frequencies, which is what a coarse DFM stage generates.

Latents are the raw posterior latents that ``vae.decode`` takes. The VAE's ``scaling_factor`` / ``shift_factor``
(the pipelines' ``(z - shift) * scale``) are a per-element affine map, which average pooling commutes with, so the
loss is the same on scaled latents; the exported config keeps both factors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from ..decomposition import box_downsample
from ..training.config import finite, require, setting


@dataclass
class ScaleEquivarianceLossConfig:
    """The VAE objective: reconstruction + KL + scale equivariance (+ optional LPIPS)."""

    equivariance_factors: list[int] = setting(
        help="downsampling factors s of the equivariance term", default_factory=lambda: [2, 4]
    )
    equivariance_weight: float = setting(1.0, "weight of the equivariance term (the mean over the factors)")
    pixel_loss: Literal["l1", "l2"] = setting("l1", "distance of the reconstruction and equivariance terms")
    kl_weight: float = setting(
        1e-6, "weight of the KL divergence to N(0, I), summed over latent elements and divided by the number of "
        "pixel elements (the ratio of LDM's autoencoder loss, whose weight is 1e-6)"
    )
    posterior: Literal["sample", "mode"] = setting(
        "sample", "z used by both terms: a draw of the posterior (the usual VAE training) or its mean"
    )
    train_encoder: bool = setting(
        True, "train encoder and decoder; false trains the decoder (and post_quant_conv) only"
    )
    lpips_weights: str | None = setting(
        None, "state dict (.pth / .safetensors) of a whole lpips.LPIPS model (backbone + linear layers); enables the "
        "perceptual term. Needs the `lpips` package; nothing is downloaded"
    )
    lpips_net: Literal["alex", "vgg", "squeeze"] = setting("vgg", "LPIPS backbone the weights belong to")
    lpips_weight: float = setting(0.0, "weight of LPIPS in the reconstruction and the equivariance terms")

    def validate(self) -> list[str]:
        problems = require(len(self.equivariance_factors) > 0 or self.equivariance_weight == 0,
                           "equivariance_factors", "must hold at least one factor (or set equivariance_weight: 0)")
        problems += require(all(f >= 2 for f in self.equivariance_factors), "equivariance_factors",
                            f"entries must be integers >= 2, got {self.equivariance_factors}")
        problems += finite(self, "equivariance_weight", "kl_weight", "lpips_weight", low=0.0)
        problems += require(self.lpips_weight == 0 or bool(self.lpips_weights), "lpips_weight",
                            "needs lpips_weights (no LPIPS weights are downloaded)")
        problems += require(not self.lpips_weights or os.path.isfile(self.lpips_weights), "lpips_weights",
                            f"{self.lpips_weights!r} is not a file")
        return problems


def pixel_distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean L1 or squared-L2 distance over all elements (float32)."""
    diff = a.float() - b.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def load_lpips(weights: str, net: str = "vgg") -> torch.nn.Module:
    """A frozen ``lpips.LPIPS`` with the given whole-model state dict; inputs in [-1, 1]. Nothing is downloaded."""
    try:
        import lpips
    except ImportError as e:
        raise ImportError(
            "the perceptual term (lpips_weights) needs the `lpips` package: `pip install lpips`; or leave "
            "lpips_weights unset to train without it"
        ) from e
    model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)  # random init: no download
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def check_equivariance_sizes(height: int, width: int, latent_height: int, latent_width: int, factors) -> None:
    """Raise ValueError unless image and latent sizes are divisible by every factor."""
    bad = [s for s in factors if height % s or width % s or latent_height % s or latent_width % s]
    if bad:
        raise ValueError(
            f"scale equivariance needs the image ({height}x{width}) and latent ({latent_height}x{latent_width}) "
            f"sizes divisible by every factor; {bad} do not divide them (choose a larger resolution or smaller factors)"
        )


class ScaleEquivariantVAELoss(torch.nn.Module):
    """The training module: holds the VAE (``.vae``) and computes its loss in ``forward(pixels)``.

    Going through ``forward`` (rather than calling ``vae.encode`` from outside) keeps the module usable under
    DistributedDataParallel, which accelerate wraps it in. ``vae`` is any module with diffusers' AutoencoderKL
    interface: ``encode(x).latent_dist`` (``sample`` / ``mode`` / ``kl``) and ``decode(z).sample``.
    """

    def __init__(self, vae: torch.nn.Module, config: ScaleEquivarianceLossConfig, lpips: torch.nn.Module | None = None):
        super().__init__()
        self.vae, self.config, self.lpips = vae, config, lpips
        if not config.train_encoder:
            for name in ("encoder", "quant_conv"):
                module = getattr(vae, name, None)
                if module is not None:
                    module.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()  # a frozen metric: its dropout stays off
        return self

    def enable_gradient_checkpointing(self):
        self.vae.enable_gradient_checkpointing()

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        d = pixel_distance(a, b, self.config.pixel_loss)
        if self.lpips is None or self.config.lpips_weight == 0:
            return d, {}
        a, b = a.float(), b.float()
        if a.shape[1] == 1:  # LPIPS' backbones take RGB
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        p = self.lpips(a, b).mean()
        return d + self.config.lpips_weight * p, {"lpips": p.item()}

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """pixels [B, C, H, W] in [-1, 1] -> (total loss, logs: reconstruction, kl, equivariance_x<s>, ...)."""
        cfg = self.config
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.train_encoder):
            posterior = self.vae.encode(pixels).latent_dist
            z = posterior.sample() if cfg.posterior == "sample" else posterior.mode()
        reconstruction = self.vae.decode(z).sample
        rec, logs = self.distance(reconstruction, pixels)
        # KL summed over the latent, per pixel element: LDM's sum-over-everything ratio with per-element means
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = rec + cfg.kl_weight * kl
        logs = {"reconstruction": rec.item(), "kl": kl.item(), **{f"reconstruction_{k}": v for k, v in logs.items()}}
        factors = cfg.equivariance_factors if cfg.equivariance_weight > 0 else []
        if factors:
            check_equivariance_sizes(*pixels.shape[-2:], *z.shape[-2:], factors)
            terms = []
            for s in factors:
                decoded = self.vae.decode(box_downsample(z, s)).sample
                term, _ = self.distance(decoded, box_downsample(pixels, s))
                terms.append(term)
                logs[f"equivariance_x{s}"] = term.item()
            equivariance = torch.stack(terms).mean()
            logs["equivariance"] = equivariance.item()
            loss = loss + cfg.equivariance_weight * equivariance
        return loss, logs


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of [B, ...] tensors (``data_range`` 2 for images in [-1, 1])."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


__all__ = [
    "ScaleEquivarianceLossConfig",
    "ScaleEquivariantVAELoss",
    "check_equivariance_sizes",
    "load_lpips",
    "pixel_distance",
    "psnr",
]
