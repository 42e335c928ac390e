"""DFMDiTTransformer2DModel: shapes, stage masking, equivalence with diffusers' DiT at S = 1, label dropout,
presets, save/load, gradient checkpointing, input validation and a short overfit run."""

import numpy as np
import pytest
import torch

from dfm_diffusers import LaplacianDecomposition
from dfm_diffusers.models import DIT_PRESETS, DFMDiTTransformer2DModel
from dfm_diffusers.training import dfm_loss, noise_stages, sample_dfm_training_sigmas

TINY = dict(
    sample_size=16,
    in_channels=3,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_classes=10,
    patch_size=2,
    num_stages=2,
    stage_factors=2,
)


def randomize(model, seed=0, std=0.05):
    """DiT's init zeroes the gates and heads (the model starts at 0): randomize everything so tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(DFMDiTTransformer2DModel(**{**TINY, **overrides}), seed).eval()


def make_inputs(model, batch=3, finest=16, seed=1, num_active=None):
    gen = torch.Generator().manual_seed(seed)
    layers = model.stage_layers
    grid = finest // layers.finest_patch_size
    c = model.config.in_channels
    S = layers.num_stages
    x = [torch.randn(batch, c, grid * p, grid * p, generator=gen) for p in layers.patch_sizes]
    sigmas = torch.rand(batch, S, generator=gen)
    if num_active is None:
        num_active = torch.full((batch,), S, dtype=torch.long)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=gen)
    return x, sigmas, torch.as_tensor(num_active, dtype=torch.long), labels


def run(model, x, sigmas, num_active, labels, **kw):
    with torch.no_grad():
        return model(x, sigmas, num_active, labels, **kw).sample


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "num_stages, factors, patch, finest, out_channels",
    [
        (1, 2, 2, 16, None),
        (2, 2, 2, 16, None),
        (2, 4, 4, 16, 5),
        (3, 2, 4, 16, None),
        (3, 4, 16, 32, None),
        (3, [4, 2], 8, 32, 2),
    ],
)
def test_output_shapes(num_stages, factors, patch, finest, out_channels):
    model = make_model(num_stages=num_stages, stage_factors=factors, patch_size=patch, sample_size=finest,
                       out_channels=out_channels)
    x, sigmas, num_active, labels = make_inputs(model, finest=finest)
    # stage sizes are those of the Laplacian decomposition with the same factors
    shapes = LaplacianDecomposition(num_stages, factors).stage_shapes(finest, finest)
    assert [tuple(t.shape[-2:]) for t in x] == shapes
    out = run(model, x, sigmas, num_active, labels)
    c_out = out_channels or model.config.in_channels
    assert [tuple(o.shape) for o in out] == [(3, c_out, h, w) for h, w in shapes]
    assert all(torch.isfinite(o).all() for o in out)
    # a tuple comes back without return_dict
    with torch.no_grad():
        tup = model(x, sigmas, num_active, labels, return_dict=False)
    assert isinstance(tup, tuple) and all(torch.equal(a, b) for a, b in zip(tup[0], out))


def test_bfloat16_weights_with_float32_inputs():
    model = make_model()
    x, sigmas, num_active, labels = make_inputs(model, num_active=[1, 2, 2])
    ref = run(model, x, sigmas, num_active, labels)
    out = run(model.to(torch.bfloat16), x, sigmas, num_active, labels)
    assert all(o.dtype == torch.bfloat16 for o in out)
    for o, r in zip(out, ref):
        assert (o.float() - r).abs().max() < 0.05 * r.abs().max()


def test_non_default_and_non_square_grid():
    model = make_model()  # built for 16x16
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 3, 6, 10, generator=gen), torch.randn(2, 3, 12, 20, generator=gen)]
    out = run(model, x, torch.rand(2, 2), torch.tensor([2, 2]), torch.tensor([0, 1]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 6, 10), (2, 3, 12, 20)]


def test_positional_embedding_is_dits():
    """At the configured grid, the positions are exactly DiT's get_2d_sincos_pos_embed (numpy reference)."""

    def ref_1d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    def ref_2d(dim, grid_size):  # facebookresearch/DiT models.py
        grid_h = np.arange(grid_size, dtype=np.float32)
        grid_w = np.arange(grid_size, dtype=np.float32)
        grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
        return np.concatenate([ref_1d(dim // 2, grid[0]), ref_1d(dim // 2, grid[1])], axis=1)

    model = make_model()
    pos = model.positional_embedding((8, 8), "cpu", torch.float64)[0].numpy()
    np.testing.assert_allclose(pos, ref_2d(32, 8), atol=1e-6)


# ----------------------------------------------------------------------------------------------- stage masking


@pytest.mark.parametrize("num_stages, factors, patch", [(2, 2, 2), (3, 2, 4), (2, 4, 4)])
def test_inactive_stages_are_zero_and_ignored(num_stages, factors, patch):
    model = make_model(num_stages=num_stages, stage_factors=factors, patch_size=patch)
    batch = num_stages
    num_active = torch.arange(1, num_stages + 1)  # sample b has b + 1 active stages
    x, sigmas, num_active, labels = make_inputs(model, batch=batch, num_active=num_active)
    out = run(model, x, sigmas, num_active, labels)
    for s in range(num_stages):
        for b in range(batch):
            if s >= num_active[b]:
                assert torch.count_nonzero(out[s][b]) == 0, (s, b)
            else:
                assert out[s][b].abs().mean() > 1e-3, (s, b)

    # perturbing the inputs of inactive stages changes nothing, bit for bit
    x2 = [t.clone() for t in x]
    for s in range(num_stages):
        for b in range(batch):
            if s >= num_active[b]:
                x2[s][b] = torch.randn_like(x2[s][b]) * 10
    out2 = run(model, x2, sigmas, num_active, labels)
    assert all(torch.equal(a, b) for a, b in zip(out, out2))

    # ... while perturbing an active stage's input changes the outputs (the check above is not vacuous)
    x3 = [t.clone() for t in x]
    x3[num_stages - 1][batch - 1] += 1.0
    out3 = run(model, x3, sigmas, num_active, labels)
    assert not torch.allclose(out3[0][batch - 1], out[0][batch - 1], atol=1e-5)


def test_conditioning_reaches_the_output():
    """Every stage's sigma, the class label and the stage index change the prediction."""
    model = make_model(num_stages=2)
    x, sigmas, num_active, labels = make_inputs(model, batch=2)
    ref = run(model, x, sigmas, num_active, labels)
    for s in range(2):
        other = sigmas.clone()
        other[:, s] = 1 - other[:, s]
        assert not torch.allclose(run(model, x, other, num_active, labels)[0], ref[0], atol=1e-5)
    assert not torch.allclose(run(model, x, sigmas, num_active, (labels + 1) % 10)[0], ref[0], atol=1e-5)
    # same (zeroed-out) inputs, one vs two active stages: the stage index embedding enters c
    x_masked = [x[0], torch.zeros_like(x[1])]
    one = run(model, x_masked, sigmas, torch.tensor([1, 1]), labels)[0]
    two = run(model, x_masked, sigmas, torch.tensor([2, 2]), labels)[0]
    assert not torch.allclose(one, two, atol=1e-5)


# ------------------------------------------------------------------------------------ S = 1 is a plain DiT


def copy_to_diffusers_dit(model, ref):
    """Copy a one-stage DFMDiTTransformer2DModel's weights into diffusers' DiTTransformer2DModel.

    diffusers' DiT gives every block its own (identical in converted checkpoints) timestep/label embedder and
    splits qkv; its final adaLN chunks (shift, scale) where ours chunks (scale, shift), and its patch features are
    ordered (py, px, c) where ours are (c, py, px).
    """
    layers = model.stage_layers
    D, p, c_out = model.inner_dim, model.config.patch_size, model.out_channels
    with torch.no_grad():
        ref.pos_embed.proj.weight.copy_(layers.patch_embedders[0].weight.view_as(ref.pos_embed.proj.weight))
        ref.pos_embed.proj.bias.copy_(layers.patch_embedders[0].bias)
        t_mlp = layers.timestep_embedders[0].timestep_embedder
        for ours, theirs in zip(model.transformer_blocks, ref.transformer_blocks):
            emb = theirs.norm1.emb
            emb.time_proj.downscale_freq_shift = 0  # DiT's frequencies (diffusers' DiT uses a shift of 1)
            emb.timestep_embedder.load_state_dict(t_mlp.state_dict())
            emb.class_embedder.embedding_table.weight.copy_(
                model.class_embedder.embedding_table.weight + layers.stage_embedding.weight[0]
            )
            theirs.norm1.linear.load_state_dict(ours.adaLN_modulation[1].state_dict())
            q, k, v = ours.attn.qkv.weight.chunk(3)
            qb, kb, vb = ours.attn.qkv.bias.chunk(3)
            for lin, w, b in ((theirs.attn1.to_q, q, qb), (theirs.attn1.to_k, k, kb), (theirs.attn1.to_v, v, vb)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            theirs.attn1.to_out[0].load_state_dict(ours.attn.proj.state_dict())
            theirs.ff.net[0].proj.load_state_dict(ours.mlp.fc1.state_dict())
            theirs.ff.net[2].load_state_dict(ours.mlp.fc2.state_dict())
        head = layers.heads[0]
        w, b = head.norm_out.linear.weight, head.norm_out.linear.bias
        ref.proj_out_1.weight.copy_(torch.cat([w[D:], w[:D]]))
        ref.proj_out_1.bias.copy_(torch.cat([b[D:], b[:D]]))
        # ours: feature index c*p*p + py*p + px; theirs: (py*p + px)*c_out + c
        perm = torch.arange(c_out * p * p).view(c_out, p * p).t().reshape(-1)
        ref.proj_out_2.weight.copy_(head.proj_out.weight[perm])
        ref.proj_out_2.bias.copy_(head.proj_out.bias[perm])


def test_one_stage_equals_diffusers_dit():
    from diffusers import DiTTransformer2DModel

    model = make_model(num_stages=1, sample_size=16, in_channels=4, patch_size=2, num_layers=2)
    ref = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    randomize(model, std=0.3)  # large enough that e.g. GELU's tanh approximation vs exact GELU shows
    copy_to_diffusers_dit(model, ref)
    # float64 weights and activations; both models still build their sin-cos tables in float32, which is what
    # the tolerance below allows for (a GELU without the tanh approximation misses it by ~2e-3)
    model.double()
    ref.double()
    x, sigmas, num_active, labels = make_inputs(model, batch=3)
    x = [t.double() for t in x]
    labels[0] = 10  # the null class too
    out = run(model, x, sigmas.double(), num_active, labels)
    with torch.no_grad():
        expected = ref(x[0], timestep=sigmas[:, 0].double() * 1000, class_labels=labels).sample
    assert expected.abs().mean() > 1e-1
    torch.testing.assert_close(out[0], expected, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- label dropout


def test_force_drop_ids_equals_null_class():
    model = make_model()
    x, sigmas, num_active, labels = make_inputs(model, batch=3)
    null = torch.full_like(labels, model.config.num_classes)
    with_null = run(model, x, sigmas, num_active, null)
    dropped = run(model, x, sigmas, num_active, labels, force_drop_ids=torch.ones(3, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(dropped, with_null))
    conditional = run(model, x, sigmas, num_active, labels)
    assert not torch.allclose(conditional[1], with_null[1], atol=1e-5)
    # mixed: only sample 1 dropped (a bool mask works too)
    mixed = run(model, x, sigmas, num_active, labels, force_drop_ids=torch.tensor([False, True, False]))
    for s in range(2):
        torch.testing.assert_close(mixed[s][1], with_null[s][1])
        torch.testing.assert_close(mixed[s][[0, 2]], conditional[s][[0, 2]])


def test_label_dropout_only_in_training_mode():
    model = make_model(class_dropout_prob=1.0)
    x, sigmas, num_active, labels = make_inputs(model, batch=2)
    null = torch.full_like(labels, model.config.num_classes)
    eval_out = run(model, x, sigmas, num_active, labels)
    assert not torch.allclose(eval_out[1], run(model, x, sigmas, num_active, null)[1], atol=1e-5)
    model.train()
    train_out = run(model, x, sigmas, num_active, labels)
    train_null = run(model, x, sigmas, num_active, null)
    assert all(torch.equal(a, b) for a, b in zip(train_out, train_null))


def test_label_dropout_rate():
    model = make_model(class_dropout_prob=0.3, sample_size=4, num_stages=1, patch_size=2)
    n = 400
    torch.manual_seed(0)
    emb = model.class_embedder
    emb.train()
    labels = torch.randint(0, 10, (n,))
    dropped = (emb.token_drop(labels) == 10).float().mean().item()
    assert 0.22 < dropped < 0.38
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table(labels))


# ----------------------------------------------------------------------------------------------------- presets


def dit_paper_param_count(depth, width, patch, in_ch=4, out_ch=8, num_classes=1000, mlp_ratio=4):
    """Parameter count of facebookresearch/DiT's DiT (learn_sigma=True, so out_ch = 2 * in_ch), pos_embed included."""
    D, h = width, int(width * mlp_ratio)
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * h + h) + (h * D + D) + (6 * D * D + 6 * D)
    x_embedder = in_ch * patch * patch * D + D
    t_embedder = 256 * D + D + D * D + D
    y_embedder = (num_classes + 1) * D
    final = (D * 2 * D + 2 * D) + (D * patch * patch * out_ch + patch * patch * out_ch)
    pos_embed = (32 // patch) ** 2 * D  # a frozen nn.Parameter in DiT, counted in its reported total
    return depth * block + x_embedder + t_embedder + y_embedder + final + pos_embed, pos_embed


def count(name, **overrides):
    with torch.device("meta"):
        model = DFMDiTTransformer2DModel.from_preset(name, **overrides)
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize(
    "size, paper_millions", [("S", 33.0), ("B", 130.0), ("L", 458.0), ("XL", 675.0)]
)
def test_preset_param_counts_match_dit_paper(size, paper_millions):
    depth = DIT_PRESETS[f"DiT-{size}/2"]["num_layers"]
    width = DIT_PRESETS[f"DiT-{size}/2"]["num_attention_heads"] * DIT_PRESETS[f"DiT-{size}/2"]["attention_head_dim"]
    ours, model = count(f"DiT-{size}/2")  # in_channels 4, sample_size 32, out_channels 4 (no learned sigma)
    assert model.config.num_stages == 1 and model.config.patch_size == 2
    assert abs(ours / 1e6 - paper_millions) / paper_millions < 0.01
    # exact: DiT's architecture with out_channels = 8, minus the frozen pos_embed, plus the stage embedding row
    dit_total, pos = dit_paper_param_count(depth, width, 2)
    if size == "XL":
        assert dit_total == 675_129_632  # the figure DiT's train.py prints for DiT-XL/2
    ours8, _ = count(f"DiT-{size}/2", out_channels=8)
    assert ours8 == dit_total - pos + width


def test_dfm_preset_adds_per_stage_layers():
    base, _ = count("DiT-XL/2")
    dfm, model = count("DFM-DiT-XL/2")
    D = 1152
    assert model.config.num_stages == 2 and model.stage_layers.patch_sizes == [1, 2]
    extra_patch = 4 * 1 * 1 * D + D
    extra_t = 256 * D + D + D * D + D
    extra_head = (D * 2 * D + 2 * D) + (D * 1 * 1 * 4 + 4)
    assert dfm - base == extra_patch + extra_t + extra_head + D  # + one more stage-embedding row


def test_presets_names_and_overrides():
    for size, layers, width, heads in [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16), ("XL", 28, 1152, 16)]:
        for patch in (1, 2, 4, 8):
            cfg = DIT_PRESETS[f"DiT-{size}/{patch}"]
            assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"]) == (layers, width)
            assert cfg["num_attention_heads"] == heads and cfg["patch_size"] == patch and cfg["num_stages"] == 1
        for patch in (2, 4, 8):
            assert DIT_PRESETS[f"DFM-DiT-{size}/{patch}"]["num_stages"] == 2
    assert "DFM-DiT-T/2" in DIT_PRESETS
    _, model = count("DFM-DiT-B/4", num_stages=3, sample_size=64, in_channels=16, num_classes=10)
    assert model.stage_layers.patch_sizes == [1, 2, 4]
    assert model.config.in_channels == 16 and model.config.num_classes == 10
    with pytest.raises(ValueError, match="known presets: .*DFM-DiT-XL/2"):
        DFMDiTTransformer2DModel.from_preset("DiT-XXL/2")
    with pytest.raises(ValueError, match="known presets"):
        DFMDiTTransformer2DModel.from_preset("DFM-DiT-B/1")


def test_initialization_follows_dit():
    model = DFMDiTTransformer2DModel(**TINY)
    layers = model.stage_layers
    x, sigmas, num_active, labels = make_inputs(model, batch=2)
    out = run(model, x, sigmas, num_active, labels)
    assert all(torch.count_nonzero(o) == 0 for o in out)  # zero heads: the model starts at v = 0
    for block in model.transformer_blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert block.attn.qkv.weight.std() > 0 and torch.count_nonzero(block.attn.qkv.bias) == 0
    assert torch.count_nonzero(layers.stage_embedding.weight) == 0
    assert abs(model.class_embedder.embedding_table.weight.std().item() - 0.02) < 0.005
    w = layers.timestep_embedders[1].timestep_embedder.linear_1.weight
    assert abs(w.std().item() - 0.02) < 0.002


# ------------------------------------------------------------------------------------ save/load, checkpointing


def test_save_load_round_trip(tmp_path):
    model = make_model(num_stages=3, stage_factors=[2, 2], patch_size=4, stage_scales=[1.0, 0.5, 0.25],
                       decomposition_antialias=True)
    model.save_pretrained(tmp_path)
    loaded = DFMDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.stage_factors == [2, 2] and loaded.config.num_stages == 3
    # the decomposition settings travel with the model (the pipeline rebuilds its decomposition from them)
    assert loaded.config.stage_scales == [1.0, 0.5, 0.25] and loaded.config.decomposition_antialias is True
    x, sigmas, num_active, labels = make_inputs(model, num_active=[1, 2, 3])
    a = run(model, x, sigmas, num_active, labels)
    b = run(loaded, x, sigmas, num_active, labels)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_gradient_checkpointing_same_gradients():
    def grads(model, checkpointing):
        if checkpointing:
            model.enable_gradient_checkpointing()
        calls = []
        # an inner module: recomputation may stop early, before the block's own forward hook would fire
        hook = model.transformer_blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
        model.zero_grad()
        x, sigmas, num_active, labels = make_inputs(model, num_active=[1, 2, 2])
        out = model(x, sigmas, num_active, labels).sample
        sum((o**2).mean() for o in out).backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads(make_model(), False)
    ckpt, ckpt_calls = grads(make_model(), True)
    assert plain_calls == 1 and ckpt_calls == 2  # attention ran again in backward: checkpointing is on
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- validation


def test_bad_inputs_raise():
    model = make_model()
    x, sigmas, num_active, labels = make_inputs(model, batch=2)
    bad_calls = {
        "one stage": (x[:1], sigmas, num_active, labels),
        "not a list": (x[1], sigmas, num_active, labels),
        "wrong coarse size": ([x[0][..., :4, :4], x[1]], sigmas, num_active, labels),
        "indivisible finest": ([x[0][..., :7, :7], x[1][..., :15, :15]], sigmas, num_active, labels),
        "sigma [B]": (x, sigmas[:, 0], num_active, labels),
        "active 0": (x, sigmas, torch.tensor([0, 1]), labels),
        "active 3": (x, sigmas, torch.tensor([3, 1]), labels),
        "labels [B, 1]": (x, sigmas, num_active, labels[:, None]),
        "label too big": (x, sigmas, num_active, torch.tensor([11, 0])),
        "negative label": (x, sigmas, num_active, torch.tensor([-1, 0])),
        "float labels": (x, sigmas, num_active, labels.float()),
        "no labels": (x, sigmas, num_active, None),
    }
    for what, args in bad_calls.items():
        with pytest.raises(ValueError):
            run(model, *args)
        assert what  # for the failure message
    with pytest.raises(ValueError, match="force_drop_ids"):
        run(model, x, sigmas, num_active, labels, force_drop_ids=torch.ones(3))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="learn_sigma"):
        DFMDiTTransformer2DModel(**{**TINY, "learn_sigma": True})
    with pytest.raises(ValueError, match="divisible"):
        DFMDiTTransformer2DModel(**{**TINY, "num_stages": 3, "patch_size": 2})  # coarsest patch 1/2
    with pytest.raises(ValueError, match="divisible"):
        DFMDiTTransformer2DModel(**{**TINY, "sample_size": 15})
    with pytest.raises(ValueError):
        DFMDiTTransformer2DModel(**{**TINY, "stage_factors": [2, 2]})  # 2 stages need 1 factor
    with pytest.raises(ValueError, match="stage_scales"):
        DFMDiTTransformer2DModel(**{**TINY, "stage_scales": [1.0]})


# --------------------------------------------------------------------------------------------------- overfit


def test_tiny_model_overfits_a_fixed_batch():
    """A tiny two-stage DiT fits a fixed batch of real image crops (fixed noise and sigmas) with the DFM loss."""
    from skimage import data as skdata

    torch.manual_seed(0)
    img = torch.from_numpy(skdata.camera()).float()[None, None] / 127.5 - 1  # [1, 1, 512, 512]
    img = torch.nn.functional.interpolate(img, size=(64, 64), mode="area")
    batch = torch.cat([img[..., i * 16 : i * 16 + 16, j * 16 : j * 16 + 16] for i in range(2) for j in range(4)])
    decomposition = LaplacianDecomposition(2, 2)
    bands = decomposition.decompose(batch)
    gen = torch.Generator().manual_seed(0)
    draw = sample_dfm_training_sigmas(8, 2, generator=gen)
    inputs, targets = noise_stages(bands, draw.sigmas, draw.loss_mask, generator=gen)
    labels = torch.arange(8) % 4

    model = DFMDiTTransformer2DModel(**{**TINY, "in_channels": 1, "num_classes": 4, "class_dropout_prob": 0.0})
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        out = model(inputs, draw.sigmas, draw.num_active_stages, labels).sample
        loss, _ = dfm_loss(out, targets, draw.loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
