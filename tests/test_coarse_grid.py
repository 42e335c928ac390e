"""The coarse phase on the coarse token grid (``coarse_phase_on_coarse_grid``): DFM-DiT forward against explicitly
built references, the joint phase unchanged, mixed batches, save/load, gradients; FLUX-DFM's phase 0 against FLUX at
the band's resolution; the phase-0 -> carrier transition's noise statistics; scheduler and pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid
from test_transformer_dfm_dit import randomize

from dfm_diffusers.models import DFMDiTTransformer2DModel
from dfm_diffusers.models.stage_layers import patchify, unpatchify

TINY_DIT = dict(
    sample_size=16, in_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=16, num_classes=10,
    patch_size=2, num_stages=2, stage_factors=2,
)


def make_dit(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(DFMDiTTransformer2DModel(**{**TINY_DIT, **overrides}), seed).eval()


def dit_inputs(model, batch=3, finest=None, seed=1, num_active=1):
    gen = torch.Generator().manual_seed(seed)
    layers = model.stage_layers
    finest = finest or model.config.sample_size
    grid = finest // layers.finest_patch_size
    c = model.config.in_channels
    x = [torch.randn(batch, c, grid * p, grid * p, generator=gen) for p in layers.patch_sizes]
    sigmas = torch.rand(batch, layers.num_stages, generator=gen)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=gen)
    active = torch.as_tensor(num_active, dtype=torch.long).expand(batch).clone()
    return x, sigmas, active, labels


def reference_coarse_dit(model, x, sigmas, active, labels, positions):
    """Stage 0 alone, by hand: the band patchified with the finest patch size at its own grid, + the sin-cos table at
    ``positions`` (row/column positions of the coarse tokens), DiT blocks, the coarse head."""
    layers = model.stage_layers
    p = model.config.patch_size
    band = x[0]
    h0, w0 = band.shape[-2] // p, band.shape[-1] // p
    tokens = patchify(band, p) @ layers.coarse_patch_embedder.weight.T + layers.coarse_patch_embedder.bias
    pos_h, pos_w = positions(h0), positions(w0)
    grid = np.stack(np.meshgrid(pos_w, pos_h, indexing="xy"), axis=0).reshape(2, 1, h0, w0)
    pos = get_2d_sincos_pos_embed_from_grid(model.inner_dim, torch.from_numpy(grid).float())
    tokens = tokens + pos.float()[None]
    c = model.class_embedder(labels)
    for s, embedder in enumerate(layers.timestep_embedders):
        c = c + embedder(sigmas[:, s], torch.float32)
    c = c + layers.stage_embedding(active - 1)
    for block in model.transformer_blocks:
        tokens = block(tokens, c)
    head = layers.coarse_head
    return unpatchify(head.proj_out(head.norm_out(tokens, c)), p, band.shape[-2], band.shape[-1])


# ------------------------------------------------------------------------------------------------ DFM-DiT


@pytest.mark.parametrize("positions", ["scaled", "own"])
@pytest.mark.parametrize("num_stages, factors, patch, size", [(2, 2, 2, 16), (2, 4, 4, 32), (3, [2, 2], 4, 32)])
def test_dit_coarse_forward_equals_explicit_reference(positions, num_stages, factors, patch, size):
    model = make_dit(num_stages=num_stages, stage_factors=factors, patch_size=patch, sample_size=size,
                     coarse_phase_on_coarse_grid=True, coarse_grid_positions=positions)
    f = model.stage_layers.coarse_factor
    x, sigmas, active, labels = dit_inputs(model)
    with torch.no_grad():
        out = model(x, sigmas, active, labels).sample
        if positions == "own":  # the coarse grid's own DiT table: 0, 1, 2, ...
            ref = reference_coarse_dit(model, x, sigmas, active, labels, lambda n: np.arange(n, dtype=np.float64))
        else:  # the fine grid's positions of the coarse tokens' centres: f*i + (f-1)/2
            ref = reference_coarse_dit(model, x, sigmas, active, labels, lambda n: f * np.arange(n) + (f - 1) / 2)
    assert out[0].shape == x[0].shape and out[0].shape[-1] == size // f
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    for v in out[1:]:
        assert v.shape[1] == model.out_channels and torch.equal(v, torch.zeros_like(v))
    assert out[0].abs().mean() > 1e-3  # not trivially zero


def test_dit_own_positions_are_dits_table_of_the_coarse_grid():
    """"own" is what a DiT built for the band's size (sample_size / F, same patch) uses; "scaled" interleaves with the
    fine grid's table (coarse token i sits between fine tokens 2i and 2i+1 at factor 2)."""
    own = make_dit(coarse_phase_on_coarse_grid=True, coarse_grid_positions="own")
    small = make_dit(sample_size=8, num_stages=1)
    torch.testing.assert_close(own.coarse_positional_embedding((4, 4), "cpu", torch.float32),
                               small.positional_embedding((4, 4), "cpu", torch.float32))
    scaled = make_dit(coarse_phase_on_coarse_grid=True)
    table = scaled.coarse_positional_embedding((4, 4), "cpu", torch.float32)[0]
    expected = get_2d_sincos_pos_embed(scaled.inner_dim, 8, base_size=8)  # positions 0..7 (the fine grid)
    assert not torch.allclose(table, expected.float()[: 16])
    # at other sizes the positions are rescaled like the fine grid's: the coarse grid of a 32px input spans 0..8
    big = scaled.coarse_positional_embedding((8, 8), "cpu", torch.float32)[0]
    pos = (2 * np.arange(8) + 0.5) * 0.5
    grid = np.stack(np.meshgrid(pos, pos, indexing="xy"), axis=0).reshape(2, 1, 8, 8)
    torch.testing.assert_close(big, get_2d_sincos_pos_embed_from_grid(scaled.inner_dim, torch.from_numpy(grid)).float())


def test_dit_joint_phase_unchanged_bit_for_bit():
    """Flag off: no new parameters, the output of the model without the flag; flag on: passes with later stages
    active are the flag-off model's, bit for bit (same weights)."""
    off = make_dit()
    on = DFMDiTTransformer2DModel(**TINY_DIT, coarse_phase_on_coarse_grid=True).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and sorted({k.split(".")[1] for k in missing}) == ["coarse_head", "coarse_patch_embedder"]
    assert not any("coarse" in k for k in off.state_dict())
    x, sigmas, active, labels = dit_inputs(off, num_active=2)
    with torch.no_grad():
        a, b = off(x, sigmas, active, labels).sample, on(x, sigmas, active, labels).sample
        off_stage0 = off(x, sigmas, torch.ones_like(active), labels).sample
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # and the flag-off model keeps running stage 0 alone on the joint grid (its output is that grid's head's)
    layers = off.stage_layers
    tokens = layers.patch_embedders[0](patchify(x[0], layers.patch_sizes[0])) + layers.patch_embedders[1].bias  # stage 1 zeroed
    tokens = tokens + off.positional_embedding((8, 8), "cpu", torch.float32)
    c = off.class_embedder(labels) + layers.embed_conditioning(sigmas, torch.ones_like(active), torch.float32)
    with torch.no_grad():
        for block in off.transformer_blocks:
            tokens = block(tokens, c)
        ref = layers.heads[0](tokens, c, 8, 8)
    torch.testing.assert_close(off_stage0[0], ref, rtol=1e-5, atol=1e-6)


def test_dit_old_config_without_the_keys_loads_unchanged(tmp_path):
    model = make_dit()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("coarse_phase_on_coarse_grid", "coarse_grid_positions"):
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = DFMDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.coarse_phase_on_coarse_grid is False
    x, sigmas, active, labels = dit_inputs(model, num_active=1)
    with torch.no_grad():
        for u, v in zip(model(x, sigmas, active, labels).sample, loaded(x, sigmas, active, labels).sample):
            torch.testing.assert_close(u, v, rtol=0, atol=1e-6)


def test_dit_mixed_batch_rows_equal_homogeneous_batches():
    model = make_dit(coarse_phase_on_coarse_grid=True)
    x, sigmas, _, labels = dit_inputs(model, batch=5)
    mixed = torch.tensor([1, 2, 1, 2, 2])
    with torch.no_grad():
        out = model(x, sigmas, mixed, labels).sample
        coarse = model(x, sigmas, torch.ones(5, dtype=torch.long), labels).sample
        joint = model(x, sigmas, torch.full((5,), 2), labels).sample
    for s in range(2):
        expected = torch.where((mixed == 1).view(-1, 1, 1, 1), coarse[s], joint[s])
        torch.testing.assert_close(out[s], expected, rtol=1e-5, atol=1e-6)


def test_dit_save_load_round_trip_of_the_flag(tmp_path):
    model = make_dit(coarse_phase_on_coarse_grid=True, coarse_grid_positions="own")
    model.save_pretrained(tmp_path)
    loaded = DFMDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.coarse_phase_on_coarse_grid is True and loaded.config.coarse_grid_positions == "own"
    x, sigmas, active, labels = dit_inputs(model, num_active=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigmas, active, labels).sample[0],
                                   loaded(x, sigmas, active, labels).sample[0], rtol=0, atol=1e-6)


def test_dit_init_coarse_head_is_zero_and_every_parameter_gets_a_gradient():
    fresh = DFMDiTTransformer2DModel(**TINY_DIT, coarse_phase_on_coarse_grid=True)
    x, sigmas, active, labels = dit_inputs(fresh, num_active=1)
    with torch.no_grad():
        assert torch.equal(fresh(x, sigmas, active, labels).sample[0], torch.zeros_like(x[0]))  # DiT's zero init
    model = make_dit(coarse_phase_on_coarse_grid=True).train()
    for num_active in ([1, 1, 1], [2, 2, 2], [1, 2, 1]):
        model.zero_grad(set_to_none=True)
        out = model(x, sigmas, torch.tensor(num_active), labels, force_drop_ids=torch.zeros(3)).sample
        sum(v.pow(2).mean() for v in out).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, (num_active, missing)  # DistributedDataParallel needs every parameter in every step
        used = {n for n, p in model.named_parameters() if p.grad.abs().sum() > 0}
        assert ("stage_layers.coarse_head.proj_out.weight" in used) == (1 in num_active)
        assert ("stage_layers.heads.1.proj_out.weight" in used) == (2 in num_active)


def test_dit_bad_configs_raise():
    with pytest.raises(ValueError, match="coarse_grid_positions"):
        DFMDiTTransformer2DModel(**TINY_DIT, coarse_grid_positions="middle")
    with pytest.raises(ValueError, match="num_stages >= 2"):
        DFMDiTTransformer2DModel(**{**TINY_DIT, "num_stages": 1}, coarse_phase_on_coarse_grid=True)
    with pytest.raises(ValueError, match="divisible"):
        DFMDiTTransformer2DModel(**{**TINY_DIT, "sample_size": 18}, coarse_phase_on_coarse_grid=True)


@pytest.mark.parametrize("dims", [(1, 2), (2, 3)])
def test_dit_objective_and_pipeline_use_the_coarse_grid(dims):
    """Training: mixed batches through the shared objective, one loss; sampling: DFMDiTPipeline's phase 0 runs on
    1/F^2 of the tokens, the joint phase on all of them, with no change to the pipeline."""
    from dfm_diffusers import DFMDiTPipeline, DFMScheduler, LaplacianDecomposition
    from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective

    model = make_dit(coarse_phase_on_coarse_grid=True).train()
    labels = torch.arange(8) % 10
    bands = LaplacianDecomposition(2, 2).decompose(torch.randn(8, 3, 16, 16))

    def predict(inputs, draw):
        return model(inputs, draw.sigmas, draw.num_active_stages, labels).sample

    out = dfm_objective(DFMObjectiveConfig(stage_weights=[0.5, 0.5]), bands, predict,
                        generator=torch.Generator().manual_seed(0))
    assert set(out.draw.stage.tolist()) == {0, 1} and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.stage_layers.coarse_head.proj_out.weight.grad.abs().sum() > 0
    assert model.stage_layers.heads[1].proj_out.weight.grad.abs().sum() > 0

    tokens = []
    model.eval().transformer_blocks[0].register_forward_pre_hook(lambda m, a: tokens.append(a[0].shape[1]))
    pipe = DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2, steps_per_stage=list(dims)))
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt", return_previews=True)
    assert tokens == [16] * dims[0] + [64] * dims[1]  # 8x8 fine grid, 4x4 coarse grid
    assert images.images.shape == (2, 3, 16, 16) and images.previews[0].shape == (2, 3, 8, 8)


# --------------------------------------------------------------------------------------------- FLUX-DFM

from conftest import TINY_FLUX_TRANSFORMER  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

from dfm_diffusers import DFMScheduler, DFMTransformer2DModel, LaplacianDecomposition  # noqa: E402

C_LAT = TINY_FLUX_TRANSFORMER["in_channels"] // 4


def flux_conditioning(batch, seed=0, text_len=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(batch, text_len, TINY_FLUX_TRANSFORMER["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY_FLUX_TRANSFORMER["pooled_projection_dim"], generator=g),
        guidance=1 + 4 * torch.rand(batch, generator=g),
    )


def converted(flux, factor=2, coarse=True, randomize=True):
    model = DFMTransformer2DModel.from_flux(flux, num_stages=2, stage_factors=factor)
    with torch.no_grad():  # non-zero later-stage layers, so that a wrong routing shows
        for p in model.stage_layers.parameters():
            if randomize and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.set_coarse_phase_on_coarse_grid(coarse)


@pytest.mark.parametrize("factor, size", [(2, 16), (4, 32), (2, 24)])
def test_flux_phase0_equals_flux_at_the_bands_resolution(tiny_flux_transformer, factor, size):
    """Right after the conversion the coarse phase is FLUX on the band (FluxPipeline's packing and ids)."""
    model = converted(tiny_flux_transformer, factor, randomize=False)
    b, h0 = 2, size // factor
    g = torch.Generator().manual_seed(1)
    band, fine = torch.randn(b, C_LAT, h0, h0, generator=g), torch.randn(b, C_LAT, size, size, generator=g)
    sigmas, cond = torch.rand(b, 2, generator=g), flux_conditioning(b)
    with torch.no_grad():
        out = model([band, fine], timestep=sigmas, num_active_stages=torch.ones(b, dtype=torch.long), **cond).sample
        ref = tiny_flux_transformer(
            hidden_states=FluxPipeline._pack_latents(band, b, C_LAT, h0, h0), timestep=sigmas[:, 0],
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h0 // 2, h0 // 2, "cpu", torch.float32),
            txt_ids=torch.zeros(5, 3), **cond,
        ).sample
    torch.testing.assert_close(out[0], FluxPipeline._unpack_latents(ref, h0 * 8, h0 * 8, 8), rtol=1e-5, atol=1e-5)
    assert out[1].shape == fine.shape and torch.equal(out[1], torch.zeros_like(fine))


def test_flux_joint_phase_unchanged_and_mixed_carrier_batches(tiny_flux_transformer):
    off = converted(tiny_flux_transformer, coarse=False)
    on = DFMTransformer2DModel.from_config(off.config, coarse_phase_on_coarse_grid=True).eval()
    assert on.load_state_dict(off.state_dict())  # no new parameters
    g = torch.Generator().manual_seed(2)
    band, carrier, fine = (torch.randn(4, C_LAT, 8, 8, generator=g), torch.randn(4, C_LAT, 16, 16, generator=g),
                           torch.randn(4, C_LAT, 16, 16, generator=g))
    sigmas, cond = torch.rand(4, 2, generator=g), flux_conditioning(4)
    two = torch.full((4,), 2)
    with torch.no_grad():
        a = off([carrier, fine], timestep=sigmas, num_active_stages=two, **cond).sample
        b = on([carrier, fine], timestep=sigmas, num_active_stages=two, **cond).sample
        assert all(torch.equal(u, v) for u, v in zip(a, b))  # bit for bit
        # a training batch mixing phases: coarse rows carry their band nearest-upsampled, read back by pooling
        mixed = torch.tensor([1, 2, 1, 2])
        up = torch.nn.functional.interpolate(band, scale_factor=2, mode="nearest")
        stage0 = torch.where((mixed == 1).view(-1, 1, 1, 1), up, carrier)
        out = on([stage0, fine], timestep=sigmas, num_active_stages=mixed, **cond).sample
        coarse = on([band, fine], timestep=sigmas, num_active_stages=torch.ones(4, dtype=torch.long), **cond).sample
    rows = mixed == 1
    torch.testing.assert_close(out[0][rows], torch.nn.functional.interpolate(coarse[0], scale_factor=2)[rows],
                               rtol=1e-5, atol=1e-5)
    for s in range(2):
        torch.testing.assert_close(out[s][~rows], a[s][~rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1][rows], torch.zeros_like(out[1][rows]))
    with pytest.raises(ValueError, match="every row needs num_active_stages 1"):
        on([band, fine], timestep=sigmas, num_active_stages=mixed, **cond)


def test_flux_flag_save_load_and_layout(tiny_flux_transformer, tmp_path):
    model = converted(tiny_flux_transformer)
    model.save_pretrained(tmp_path)
    loaded = DFMTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.coarse_phase_on_coarse_grid is True and loaded.stage_layers.coarse_grid
    inputs = dict(timestep=torch.rand(1, 2), num_active_stages=torch.ones(1, dtype=torch.long), **flux_conditioning(1))
    x = [torch.randn(1, C_LAT, 8, 8), torch.randn(1, C_LAT, 16, 16)]
    with torch.no_grad():
        torch.testing.assert_close(model(x, **inputs).sample[0], loaded(x, **inputs).sample[0], rtol=0, atol=1e-6)
    assert not loaded.set_coarse_phase_on_coarse_grid(False).config.coarse_phase_on_coarse_grid
    with pytest.raises(ValueError, match="stage_upsampling"):  # the first implementation's layout: no shared 2x2 layers
        DFMTransformer2DModel.from_flux(tiny_flux_transformer, stage_upsampling=[1, 1]).set_coarse_phase_on_coarse_grid()


def carrier_residual_stats(r: torch.Tensor, factor: int) -> dict:
    """Statistics of a noise field r [N, 1, H, W]: mean, variance, block-mean variance, within-block variance,
    correlation of horizontal neighbours inside a block, and the variance of each Laplacian band."""
    blocks = torch.nn.functional.avg_pool2d(r, factor)
    within = r - torch.nn.functional.interpolate(blocks, scale_factor=factor, mode="nearest")
    pairs = r.unfold(3, factor, factor)[..., :2]  # the first two pixels of every block row
    corr = torch.corrcoef(torch.stack([pairs[..., 0].flatten(), pairs[..., 1].flatten()]))[0, 1]
    bands = LaplacianDecomposition(2, factor).decompose(r)
    return dict(mean=r.mean().item(), var=r.var().item(), block_var=blocks.var().item(),
                within_var=within.var().item(), corr=corr.item(), band_var=[b.var().item() for b in bands])


@pytest.mark.parametrize("factor, sigma_c", [(2, 0.05), (2, 0.4), (4, 0.1)])
def test_coarse_to_carrier_gives_the_training_noise(factor, sigma_c):
    """The band's state at sigma_c moved to the carrier is (1 - sigma) up(band) + sigma eps, eps i.i.d. at the
    carrier's resolution, sigma = F sigma_c / (1 + (F - 1) sigma_c): the state training noises (noise_stages)."""
    g = torch.Generator().manual_seed(0)
    n, h = 4000, 4
    band = torch.randn(1, 1, h, h, generator=g).expand(n, 1, h, h)
    x_c = (1 - sigma_c) * band + sigma_c * torch.randn(n, 1, h, h, generator=g)
    carrier = DFMScheduler.coarse_to_carrier(x_c, sigma_c, factor, generator=g)
    sigma = DFMScheduler.carrier_sigma(sigma_c, factor)
    assert DFMScheduler.band_sigma(sigma, factor) == pytest.approx(sigma_c)
    up = torch.nn.functional.interpolate(band, scale_factor=factor, mode="nearest")
    # the signal: the mean over draws is (1 - sigma) up(band)
    torch.testing.assert_close(carrier.mean(0), (1 - sigma) * up[0], rtol=0, atol=4 * sigma / n**0.5)
    got = carrier_residual_stats(carrier - (1 - sigma) * up, factor)
    ref = carrier_residual_stats(sigma * torch.randn(carrier.shape, generator=g), factor)
    assert abs(got["mean"]) < 4 * sigma / carrier.numel() ** 0.5
    assert got["var"] == pytest.approx(sigma**2, rel=0.02)
    assert got["block_var"] == pytest.approx(sigma**2 / factor**2, rel=0.04)
    assert got["within_var"] == pytest.approx(sigma**2 * (1 - 1 / factor**2), rel=0.03)
    assert abs(got["corr"]) < 0.02 and abs(ref["corr"]) < 0.02
    for v, w in zip(got["band_var"], ref["band_var"]):
        assert v == pytest.approx(w, rel=0.05)
    # without the fresh within-block noise (the upsampled band state alone) the statistics fail
    naive = carrier_residual_stats(torch.nn.functional.interpolate(x_c, scale_factor=factor) - (1 - sigma_c) * up, factor)
    assert naive["corr"] > 0.9


def test_scheduler_coarse_phase_table_and_transition():
    """Phase 0: the band's own sigmas, FLUX's shifted linspace for coarse_mu ending at band_sigma(theta); later rows
    as without the coarse phase; the Euler path with the exact velocity of a point mass lands on the carrier with
    the training noise at the table's sigma."""
    kw = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    plain, coarse = DFMScheduler(num_stages=2, **kw), DFMScheduler(num_stages=2, **kw)
    plain.set_timesteps([6, 3], mu=1.15)
    coarse.set_timesteps([6, 3], mu=1.15, coarse_phase_factor=2, coarse_mu=0.63)
    assert torch.equal(plain.sigmas[6:], coarse.sigmas[6:]) and torch.equal(plain.sigmas[:6, 1], coarse.sigmas[:6, 1])
    end = DFMScheduler.band_sigma(0.1, 2)
    assert coarse.coarse_phase_steps == 6 and coarse.coarse_end_sigma == pytest.approx(end)
    flow = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    start = DFMScheduler.unshift_sigma(end, np.exp(0.63))
    flow.set_timesteps(sigmas=np.linspace(1, start, 7)[:-1].tolist(), mu=0.63)
    torch.testing.assert_close(coarse.sigmas[:6, 0], flow.sigmas[:6].float())
    assert DFMScheduler._shift_sigmas(torch.tensor([start], dtype=torch.float64), np.exp(0.63)).item() == pytest.approx(end)
    assert coarse.sigmas[6, 0].item() == pytest.approx(0.1, abs=1e-6)  # the carrier's sigma at the threshold

    g = torch.Generator().manual_seed(3)
    n, h = 3000, 4
    band = torch.randn(1, 1, h, h, generator=g).expand(n, 1, h, h)
    x = [torch.randn(n, 1, h, h, generator=g), torch.randn(n, 1, 2 * h, 2 * h, generator=g)]
    for i in range(6):
        sigma = coarse.sigmas[i, 0]
        v = (x[0] - band) / sigma  # the exact velocity of a point mass at `band`
        x = coarse.step([v, torch.zeros_like(x[1])], i, x, generator=g).prev_sample
    assert x[0].shape == (n, 1, 2 * h, 2 * h)
    theta = coarse.sigmas[6, 0].item()
    up = torch.nn.functional.interpolate(band, scale_factor=2, mode="nearest")
    got = carrier_residual_stats(x[0] - (1 - theta) * up, 2)
    assert got["var"] == pytest.approx(theta**2, rel=0.03)
    assert got["block_var"] == pytest.approx(theta**2 / 4, rel=0.05)
    assert abs(got["corr"]) < 0.03


def test_objective_coarse_rows_for_a_carried_stage0(tiny_flux_transformer):
    """FLUX-DFM training: samples generating stage 0 see it noised at the band's own resolution (unit noise
    there), presented nearest-upsampled; the others as before; one forward, every parameter in the graph."""
    from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective, noise_stages

    dec = LaplacianDecomposition(2, 2, stage_upsampling=[2, 1])
    g = torch.Generator().manual_seed(4)
    bands = dec.decompose(torch.randn(64, C_LAT, 16, 16, generator=g))
    noise = [torch.randn(b.shape, generator=g) for b in bands]
    config = DFMObjectiveConfig(stage_weights=[0.5, 0.5])
    out = dfm_objective(config, bands, lambda i, d: [torch.zeros_like(t) for t in i], noise=noise,
                        generator=torch.Generator().manual_seed(5), coarse_phase_carrier=2)
    plain_in, plain_t = noise_stages(bands, out.draw.sigmas, out.draw.loss_mask, noise=noise)
    rows = out.draw.stage == 0
    assert 10 < rows.sum() < 54
    for s in range(2):
        torch.testing.assert_close(out.inputs[s][~rows], plain_in[s][~rows])
        torch.testing.assert_close(out.targets[s][~rows], plain_t[s][~rows])
    x0 = torch.nn.functional.avg_pool2d(bands[0], 2)
    eps_c = 2 * torch.nn.functional.avg_pool2d(noise[0], 2)
    sig = out.draw.sigmas[rows, 0].view(-1, 1, 1, 1)
    coarse_in = out.inputs[0][rows]
    assert torch.equal(coarse_in, torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(coarse_in, 2), scale_factor=2))
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(coarse_in, 2), (1 - sig) * x0[rows] + sig * eps_c[rows])
    assert eps_c.var().item() == pytest.approx(1.0, rel=0.05)  # unit noise at the band's resolution

    model = converted(tiny_flux_transformer).train()
    cond = flux_conditioning(8)

    def predict(inputs, draw):
        return model(inputs, timestep=draw.sigmas, num_active_stages=draw.num_active_stages, **cond).sample

    small = [b[:8] for b in bands]
    res = dfm_objective(config, small, predict, generator=torch.Generator().manual_seed(6), coarse_phase_carrier=2)
    assert set(res.draw.stage.tolist()) == {0, 1}
    res.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dfm_pipeline_coarse_phase(tiny_flux_components):
    """DFMPipeline with the flag: phase 0 on the band's own resolution (FLUX's mu for its token count), then the
    carrier; previews and images come out; the flag off keeps the old calls."""
    from dfm_diffusers import DFMPipeline
    from dfm_diffusers.schedulers import calculate_shift

    pipe = DFMPipeline.from_flux_pipeline(FluxPipeline(**tiny_flux_components), steps_per_stage=[3, 2],
                                          coarse_phase_on_coarse_grid=True)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append((tuple(k["hidden_states"][0].shape[-2:]), k["timestep"][0, 0].item())),
        with_kwargs=True)
    assert pipe.latent_stage_shapes(64, 64) == [(16, 16), (32, 32)]
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe.latent_stage_shapes(36, 36)
    out = pipe("a cat", height=64, width=64, generator=torch.Generator().manual_seed(0), output_type="pt",
               return_previews=True)
    assert [c[0] for c in calls] == [(16, 16)] * 3 + [(32, 32)] * 2
    sched = pipe.scheduler
    k_c = np.exp(calculate_shift(64))  # 8x8 tokens of the 16x16 band
    start = DFMScheduler.unshift_sigma(DFMScheduler.band_sigma(0.1, 2), k_c)
    expected = DFMScheduler._shift_sigmas(torch.tensor(np.linspace(1, start, 4)[:-1]), k_c).float()
    torch.testing.assert_close(torch.tensor([c[1] for c in calls[:3]]), expected)
    assert calls[3][1] == pytest.approx(0.1, abs=1e-6)
    assert out.images.shape == (1, 3, 64, 64) and out.previews[0].shape == (1, 3, 32, 32)
    assert all(torch.isfinite(torch.as_tensor(p)).all() for p in out.previews)
