"""Scale-equivariant VAE: the loss, the spectral diagnostics and the training command (CPU, in-process)."""

import contextlib
import importlib.util
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfm_diffusers.data import FASHION_MNIST_DIR
from dfm_diffusers.training.config import ConfigError, load_config
from dfm_diffusers.vae import (
    ScaleEquivarianceLossConfig,
    ScaleEquivariantVAELoss,
    VAETrainingConfig,
    diagnose_vae,
    radial_dct_spectrum,
    radial_frequency,
)

TINY_VAE = dict(
    in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
    norm_num_groups=4, sample_size=32,
)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE)


class PointwiseAutoencoder(torch.nn.Module):
    """encode: z = g(W x + b) per pixel, a near-deterministic posterior; decode: its exact inverse.

    With g the identity the map is affine per pixel, so average pooling commutes with it and
    decode(down_s(encode(x))) == down_s(x) exactly; with g = tanh reconstruction stays exact but pooling no longer
    commutes (the mean of tanh is not tanh of the mean)."""

    def __init__(self, channels=1, latent_channels=3, nonlinear=False):
        super().__init__()
        torch.manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(latent_channels, channels) * 0.3 + torch.eye(latent_channels,
                                                                                                  channels))
        self.bias = torch.nn.Parameter(torch.randn(latent_channels) * 0.1)
        self.nonlinear = nonlinear

    def encode(self, x):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        mean = torch.einsum("lc,bchw->blhw", self.weight, x) + self.bias[:, None, None]
        if self.nonlinear:
            mean = torch.tanh(mean)
        logvar = torch.full_like(mean, -30.0)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)))

    def decode(self, z):
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.nonlinear:
            z = torch.atanh(z)
        x = torch.einsum("cl,blhw->bchw", torch.linalg.pinv(self.weight), z - self.bias[:, None, None])
        return DecoderOutput(sample=x)


def images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 1, size // 4, size // 4, generator=g), size=size, mode="bilinear")
    return (smooth + 0.2 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1) * 1.6 - 0.8


# ------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("posterior", ["mode", "sample"])
def test_loss_vanishes_for_an_exactly_equivariant_autoencoder(posterior):
    config = ScaleEquivarianceLossConfig(posterior=posterior, equivariance_factors=[2, 4, 8])
    loss, logs = ScaleEquivariantVAELoss(PointwiseAutoencoder(), config)(images())
    assert logs["reconstruction"] < 1e-5
    for s in (2, 4, 8):
        assert logs[f"equivariance_x{s}"] < 1e-5
    assert logs["equivariance"] == pytest.approx(np.mean([logs[f"equivariance_x{s}"] for s in (2, 4, 8)]), abs=1e-9)
    # what is left is the KL term of the near-deterministic posterior, with its weight
    assert loss.item() == pytest.approx(logs["reconstruction"] + 1e-6 * logs["kl"] + logs["equivariance"], rel=1e-4)


def test_loss_is_positive_when_pooling_does_not_commute():
    x = images()
    _, logs = ScaleEquivariantVAELoss(PointwiseAutoencoder(nonlinear=True), ScaleEquivarianceLossConfig(
        posterior="mode"))(x)
    assert logs["reconstruction"] < 1e-4  # exact inverse: perfect reconstruction ...
    assert logs["equivariance_x2"] > 1e-3 and logs["equivariance_x4"] > 1e-3  # ... yet not scale-equivariant

    vae = tiny_vae()
    loss, logs = ScaleEquivariantVAELoss(vae, ScaleEquivarianceLossConfig(posterior="mode", pixel_loss="l2"))(x)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        expected = F.mse_loss(vae.decode(F.avg_pool2d(z, 4)).sample, F.avg_pool2d(x, 4)).item()
    assert logs["equivariance_x4"] == pytest.approx(expected, rel=1e-4)
    assert logs["equivariance_x2"] > 0.01 and loss.item() > logs["reconstruction"]


def test_decoder_only_training_leaves_the_encoder_without_gradients():
    vae = tiny_vae()
    loss, _ = ScaleEquivariantVAELoss(vae, ScaleEquivarianceLossConfig(train_encoder=False))(images(2))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in vae.encoder.parameters())
    assert all(p.grad is None for p in vae.quant_conv.parameters())
    assert all(p.grad is not None for p in vae.decoder.parameters())
    assert any(p.grad.abs().sum() > 0 for p in vae.post_quant_conv.parameters())


def test_sizes_not_divisible_by_a_factor_are_refused():
    with pytest.raises(ValueError, match="divisible by every factor"):
        ScaleEquivariantVAELoss(tiny_vae(), ScaleEquivarianceLossConfig(equivariance_factors=[3]))(images(1))


class FakePerceptualMetric(torch.nn.Module):
    """Stands in for lpips.LPIPS (same call: RGB pairs in [-1, 1] -> [B, 1, 1, 1])."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, a, b):
        self.calls.append(tuple(a.shape))
        return (a - b).abs().mean((1, 2, 3), keepdim=True) * 10


def test_perceptual_term_enters_both_terms():
    x, vae, metric = images(2), tiny_vae(), FakePerceptualMetric()
    plain = ScaleEquivarianceLossConfig(posterior="mode")
    perceptual = ScaleEquivarianceLossConfig(posterior="mode", lpips_weight=0.5)
    _, base = ScaleEquivariantVAELoss(vae, plain)(x)
    loss, logs = ScaleEquivariantVAELoss(vae, perceptual, lpips=metric)(x)
    assert metric.calls == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]  # grayscale expanded to RGB
    # the fake metric is 10 x the L1 distance: each term grows by 0.5 * 10 = 5 times itself
    assert logs["reconstruction"] == pytest.approx(6 * base["reconstruction"], rel=1e-5)
    assert logs["equivariance_x4"] == pytest.approx(6 * base["equivariance_x4"], rel=1e-5)
    assert logs["reconstruction_lpips"] == pytest.approx(10 * base["reconstruction"], rel=1e-5)


def test_lpips_is_optional_and_never_downloaded(tmp_path):
    with pytest.raises(ConfigError, match="lpips_weight: needs lpips_weights"):
        load_config(VAETrainingConfig, None, ["--vae", "x", "--lpips_weight", "0.1"])
    with pytest.raises(ConfigError, match="lpips_weights: .* is not a file"):
        load_config(VAETrainingConfig, None, ["--vae", "x", "--lpips_weights", str(tmp_path / "missing.pth")])
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed: the missing-package error cannot be shown")
    from dfm_diffusers.vae import load_lpips

    weights = tmp_path / "lpips.pth"
    weights.write_bytes(b"")
    with pytest.raises(ImportError, match="pip install lpips"):
        load_lpips(str(weights))


# ------------------------------------------------------------------------------------------------ diagnostics


def dct_basis(k, n):
    """The DCT-II basis function of index k on n samples (all of its power sits at index k)."""
    return torch.cos(math.pi * k * (torch.arange(n) + 0.5) / n)


def test_spectrum_of_known_signals():
    n, bins = 32, 16
    low = dct_basis(3, n)[:, None].expand(n, n)[None, None] + 0.7  # vertical frequency 3; the offset is removed
    spectrum = radial_dct_spectrum(low, num_bins=bins)
    rho = 3 / n / math.sqrt(2)
    assert spectrum["high_frequency_fraction"] == pytest.approx(0.0, abs=1e-12)
    assert spectrum["energy"][int(rho * bins)] == pytest.approx(1.0, abs=1e-9)
    assert sum(spectrum["energy"]) == pytest.approx(1.0, abs=1e-9)

    high = (dct_basis(27, n)[:, None] * dct_basis(27, n)[None, :])[None, None]  # rho = 27 / 32 on both axes
    spectrum = radial_dct_spectrum(high, num_bins=bins)
    assert spectrum["high_frequency_fraction"] == pytest.approx(1.0, abs=1e-9)
    assert spectrum["energy"][int(27 / 32 * bins)] == pytest.approx(1.0, abs=1e-9)

    # white noise: the same expected power at every non-DC coefficient -> the share of those at rho >= 1/2
    noise = torch.randn(256, 1, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho = radial_frequency(n, n)
    expected = (rho >= 0.5).sum() / (n * n - 1)
    spectrum = radial_dct_spectrum(noise, num_bins=bins)
    assert spectrum["high_frequency_fraction"] == pytest.approx(expected, abs=0.005)
    assert expected == pytest.approx(0.5865, abs=1e-4)  # 32 x 32; large grids approach the continuum's 1 - pi / 8
    assert (radial_frequency(512, 512) >= 0.5).mean() == pytest.approx(1 - math.pi / 8, abs=2e-3)
    assert np.allclose(spectrum["power"], 1 / (n * n - 1), rtol=0.1)  # flat (DC, removed, is not in bin 0)
    # per-channel scaling and shifts (a VAE's scaling_factor / shift_factor) leave the spectrum as it is
    scaled = radial_dct_spectrum(noise * 5.0 + 3.0, num_bins=bins)
    assert np.allclose(scaled["power"], spectrum["power"], rtol=1e-9)


def test_diagnostics_psnrs_against_references():
    x = images(6)
    exact = diagnose_vae(PointwiseAutoencoder(), x, factors=(2, 4), batch_size=4)
    assert exact["reconstruction_psnr"] > 80 and min(exact["equivariance_psnr"].values()) > 80
    assert exact["image_high_frequency_fraction"] == pytest.approx(
        radial_dct_spectrum(x)["high_frequency_fraction"], abs=1e-12)
    # a pointwise linear encoder keeps the image's spectrum in every latent channel
    assert exact["latent_high_frequency_fraction"] == pytest.approx(exact["image_high_frequency_fraction"], abs=1e-6)

    vae = tiny_vae()
    result = diagnose_vae(vae, x, factors=(2, 4), batch_size=4)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample.clamp(-1, 1)
        eq4 = vae.decode(F.avg_pool2d(z, 4)).sample.clamp(-1, 1)
    reference = lambda a, b: float((10 * torch.log10(4 / (a - b).square().flatten(1).mean(1))).mean())  # noqa: E731
    assert result["reconstruction_psnr"] == pytest.approx(reference(rec, x), abs=1e-3)
    assert result["equivariance_psnr"]["4"] == pytest.approx(reference(eq4, F.avg_pool2d(x, 4)), abs=1e-3)
    assert result["latent_size"] == [4, 16, 16] and result["image_size"] == [1, 32, 32]
    assert vae.config.scaling_factor == pytest.approx(0.18215)  # AutoencoderKL's default: the std is of scaled z
    assert result["latent_std"] == pytest.approx(float(z.std()) * 0.18215, rel=1e-5)
    json.dumps(result)


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and a run stopped after step 3 then resumed from 'latest' up to step 6."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST is not available")
    from dfm_diffusers.vae.__main__ import main

    root = tmp_path_factory.mktemp("vae-runs")
    tiny_vae().save_pretrained(root / "vae0")
    common = [
        "--vae", root / "vae0", "--dataset", "fashion_mnist", "--split", "test", "--resolution", 32,
        "--max_samples", 24, "--train_batch_size", 8, "--diagnostic_images", 8, "--diagnostic_batch_size", 8,
        "--validation_images", 4, "--learning_rate", 1e-3, "--ema_decay", 0.8, "--report_to", "none",
        "--checkpointing_steps", 3, "--checkpoints_total_limit", "null", "--validation_steps", 3, "--log_every", 1,
        "--random_flip", "true", "--center_crop", "false",
    ]
    full = main(["train", *common, "--output_dir", root / "full", "--max_train_steps", 6])
    main(["train", *common, "--output_dir", root / "resumed", "--max_train_steps", 3])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        resumed = main(["train", *common, "--output_dir", root / "resumed", "--max_train_steps", 6, "--resume",
                        "latest"])
    return root, full, {**resumed, "printed": printed.getvalue()}


def test_command_trains_exports_and_diagnoses(runs):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    root, full, _ = runs
    out = root / "full"
    assert full["global_step"] == 6 and full["export_dir"] == str(out / "vae")
    vae = AutoencoderKL.from_pretrained(out / "vae")
    start = AutoencoderKL.from_pretrained(root / "vae0")
    moved = [not torch.equal(a, b) for a, b in zip(vae.parameters(), start.parameters())]
    assert all(moved)  # encoder and decoder trained
    assert vae.config.scaling_factor == start.config.scaling_factor  # the config (factors included) is kept
    # the export holds the EMA weights of the checkpoint, not the raw ones
    ema = load_file(out / "checkpoints" / "checkpoint-6" / "ema.safetensors")
    raw = load_file(out / "checkpoints" / "checkpoint-6" / "model.safetensors")
    name = "decoder.conv_out.weight"
    exported = dict(vae.named_parameters())[name]
    assert not torch.equal(raw["vae." + name], exported)
    assert any(torch.equal(v, exported) for v in ema.values())
    for step in (3, 6):
        assert (out / "validation" / f"step_{step:07d}.png").is_file()
        assert (out / "validation" / f"step_{step:07d}_diagnostics.png").is_file()
    before = json.loads((out / "diagnostics_before.json").read_text())
    after = json.loads((out / "diagnostics_after.json").read_text())
    assert (out / "diagnostics_before.png").is_file() and (out / "diagnostics_after.png").is_file()
    assert before["reconstruction_psnr"] == pytest.approx(full["diagnostics_before"]["reconstruction_psnr"])
    # "after" is the exported VAE's: the diagnose command measures it again on the same images
    from dfm_diffusers.vae.__main__ import main

    again = main(["diagnose", "--vae", out / "vae", "--split", "test", "--resolution", 32, "--diagnostic_images", 8,
                  "--output", root / "diagnose" / "after", "--device", "cpu"])
    assert (root / "diagnose" / "after.png").is_file()
    assert json.loads((root / "diagnose" / "after.json").read_text())["equivariance_psnr"] == again["equivariance_psnr"]
    assert again["reconstruction_psnr"] == pytest.approx(after["reconstruction_psnr"], abs=1e-3)
    assert again["equivariance_psnr"] == pytest.approx(after["equivariance_psnr"], abs=1e-3)
    # lr 1e-3 on a random VAE: the training objective improves both terms within 6 steps
    assert after["reconstruction_psnr"] > before["reconstruction_psnr"]
    assert after["equivariance_psnr"]["2"] > before["equivariance_psnr"]["2"]
    rows = full["log"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"reconstruction", "kl", "equivariance_x2", "equivariance_x4", "equivariance"} <= set(rows[0])


def test_resume_matches_the_uninterrupted_run(runs):
    from safetensors.torch import load_file

    root, full, resumed = runs
    assert resumed["global_step"] == 6
    assert f"resumed from {root / 'resumed' / 'checkpoints' / 'checkpoint-3'} at step 3" in resumed["printed"]
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(root / "full" / "checkpoints" / "checkpoint-6" / name)
        b = load_file(root / "resumed" / "checkpoints" / "checkpoint-6" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["loss"] for r in resumed["log"]] == pytest.approx([r["loss"] for r in full["log"]], rel=1e-5)


def test_decoder_only_run_keeps_the_encoder(runs):
    from diffusers import AutoencoderKL
    from dfm_diffusers.vae.__main__ import main

    root = runs[0]
    out = root / "decoder-only"
    main(["train", "--vae", root / "vae0", "--split", "test", "--resolution", 32, "--max_samples", 8,
          "--train_batch_size", 4, "--diagnostic_images", 4, "--validation_images", 2, "--report_to", "none",
          "--max_train_steps", 2, "--checkpointing_steps", 2, "--validation_steps", 0, "--learning_rate", 1e-3,
          "--train_encoder", "false", "--output_dir", out])
    start, vae = AutoencoderKL.from_pretrained(root / "vae0"), AutoencoderKL.from_pretrained(out / "vae")
    for name, p in vae.named_parameters():
        same = torch.equal(p, dict(start.named_parameters())[name])
        assert same == name.startswith(("encoder.", "quant_conv.")), name
    # checkpoints hold only the trainable (decoder) weights
    assert (out / "checkpoints" / "checkpoint-2" / "trainable_parameters.safetensors").is_file()


def test_example_config_loads():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "vae_scale_equivariance.yaml")
    config = load_config(VAETrainingConfig, path)
    assert config.equivariance_factors == [2, 4] and config.resolution == 256 and config.max_train_steps == 10000
    assert config.vae_subfolder == "vae" and not config.center_crop
