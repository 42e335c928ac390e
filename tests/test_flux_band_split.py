"""The band-split FLUX -> DFM conversion (from_flux's default): its defining properties against FLUX itself."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_flux_transformer
from test_transformer_dfm_flux import flux_reference, make_inputs

from dfm_diffusers import DFMTransformer2DModel, LaplacianDecomposition
from dfm_diffusers.decomposition.laplacian import block_projection


@pytest.fixture(scope="module")
def flux():
    return make_tiny_flux_transformer(11)


def test_haar_pyramid_is_exact_and_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    for factors in (2, 4, [2, 2]):
        num_stages = 2 if factors != [2, 2] else 3
        dec = LaplacianDecomposition(num_stages, factors, upsampling="nearest")
        bands = dec.decompose(x)
        torch.testing.assert_close(dec.recompose(bands), x, atol=1e-5, rtol=0)
        for s in range(1, num_stages):  # detail bands have zero block means: orthogonal to the coarser stages
            f = dec.factors[s - 1]
            assert F.avg_pool2d(bands[s], f).abs().max() < 1e-5
        # energy splits exactly (orthogonal projections), which the bilinear pyramid does not do
        total = sum(band.pow(2).sum() * (16 // band.shape[-1]) ** 2 for band in bands)
        torch.testing.assert_close(total, x.pow(2).sum(), rtol=1e-5, atol=0)
    # recompose discards a band's block means (the part a band-split head never moves)
    dec = LaplacianDecomposition(2, 2, upsampling="nearest")
    bands = dec.decompose(x)
    shifted = [bands[0], bands[1] + block_projection(torch.randn(x.shape, generator=g), 2)]
    torch.testing.assert_close(dec.recompose(shifted), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="upsampling"):
        LaplacianDecomposition(2, 2, upsampling="bicubic")


@pytest.mark.parametrize("num_stages,factors,size", [(2, 2, 8), (2, 4, 16), (3, [2, 2], 16)])
def test_band_split_with_one_sigma_is_flux_on_the_recomposed_latent(flux, num_stages, factors, size):
    """Every stage active at one shared sigma: the converted model's recomposed velocity is FLUX's velocity on the
    recomposition of the noisy stages (to 1e-5), and that input has exactly FLUX's noise (i.i.d. unit)."""
    model = DFMTransformer2DModel.from_flux(flux, num_stages=num_stages, stage_factors=factors)
    assert model.config.band_split and model.config.decomposition_upsampling == "nearest"
    dec = LaplacianDecomposition.from_config(model.config)
    inputs = make_inputs(batch=2, height=size, width=size, num_stages=num_stages, num_active=[num_stages] * 2,
                         stage_factors=factors, seed=3)
    sigma = torch.tensor([0.3, 0.8])
    inputs["timestep"] = sigma[:, None].repeat(1, num_stages)
    with torch.no_grad():
        out = model(**inputs).sample
        recomposed_input = dec.recompose(inputs["hidden_states"])
        expected = flux_reference(flux, recomposed_input, inputs, sigma, 1)
    torch.testing.assert_close(dec.recompose(out), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("new_stage_init", ["band_split", "x_embedder"])
def test_stage0_alone_is_still_flux_on_the_carrier(flux, new_stage_init):
    model = DFMTransformer2DModel.from_flux(flux, new_stage_init=new_stage_init)
    inputs = make_inputs(batch=2, height=8, width=8, num_active=[1, 1], seed=4)
    with torch.no_grad():
        out = model(**inputs).sample
        expected = flux_reference(flux, inputs["hidden_states"][0], inputs, inputs["timestep"][:, 0], 1)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-4)
    assert out[1].abs().max() == 0


def test_noise_rms_flux_timestep_and_mixed_batches(flux):
    """FLUX's time input: stage 0's sigma while it is alone, else the rms noise level of the band-split input; a
    mixed batch gives each sample what it gives alone."""
    model = DFMTransformer2DModel.from_flux(flux)
    t = torch.tensor([[0.2, 0.9], [0.2, 0.9], [0.5, 0.5]])
    got = model.flux_sigma(t, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(got, torch.tensor([0.2, ((0.2**2 + 3 * 0.9**2) / 4) ** 0.5, 0.5]))
    inputs = make_inputs(batch=3, height=8, width=8, num_active=[1, 2, 2], seed=5)
    with torch.no_grad():
        batch = model(**inputs).sample
        for i in range(3):
            single = {k: (v[i : i + 1] if torch.is_tensor(v) else [x[i : i + 1] for x in v]) for k, v in inputs.items()}
            alone = model(**single).sample
            for s in range(2):
                torch.testing.assert_close(batch[s][i : i + 1], alone[s], atol=1e-5, rtol=1e-4)


def test_band_split_refuses_stage_scales_and_old_configs_still_load(flux, tmp_path):
    with pytest.raises(ValueError, match="stage_scales"):
        DFMTransformer2DModel.from_flux(flux, stage_scales=[1.0, 0.5])
    # a config saved before these keys existed (x_embedder era) loads with the old behaviour
    old = DFMTransformer2DModel.from_flux(flux, new_stage_init="x_embedder")
    old.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("decomposition_upsampling", "band_split", "flux_timestep"):
        config.pop(key)
    config_file.write_text(json.dumps(config))
    loaded = DFMTransformer2DModel.from_pretrained(tmp_path / "old")
    assert not loaded.config.band_split and loaded.config.flux_timestep == "stage_0"
    assert LaplacianDecomposition.from_config(loaded.config).upsampling_mode == "bilinear"
    inputs = make_inputs(batch=2, height=8, width=8, num_active=[2, 2], seed=6)
    with torch.no_grad():
        for a, b in zip(old(**inputs).sample, loaded(**inputs).sample):
            torch.testing.assert_close(a, b)
    # and the band-split config round-trips
    new = DFMTransformer2DModel.from_flux(flux)
    new.save_pretrained(tmp_path / "new")
    reloaded = DFMTransformer2DModel.from_pretrained(tmp_path / "new")
    assert reloaded.config.band_split and reloaded.config.flux_timestep == "noise_rms"
    with torch.no_grad():
        for a, b in zip(new(**inputs).sample, reloaded(**inputs).sample):
            torch.testing.assert_close(a, b)
