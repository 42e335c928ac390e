"""The coarse phase on the coarse token grid (``coarse_phase_on_coarse_grid``): DFM-DiT forward against explicitly
built references, the joint phase unchanged, mixed batches, save/load, gradients; FLUX-DFM's phase 0 against FLUX at
the band's resolution; the phase-0 -> carrier transition's noise statistics; scheduler and pipelines."""

import json

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid

from dfm_diffusers.models import DFMDiTTransformer2DModel
from dfm_diffusers.models.stage_layers import patchify, unpatchify

TINY_DIT = dict(
    sample_size=16, in_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=16, num_classes=10,
    patch_size=2, num_stages=2, stage_factors=2,
)


def randomize(model, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


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
