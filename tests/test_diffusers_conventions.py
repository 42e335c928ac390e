"""DFMPipeline / DFMDiTPipeline against diffusers' own pipeline conventions, with FluxPipeline as the reference.

The behaviours diffusers' PipelineTesterMixin, its cache tester mixins and the Flux pipeline / transformer / LoRA
tests check (callbacks, caches, from_pipe, size rounding, embeds checks, latent output, deprecated ids, IP-Adapter,
LoRA targets), asserted on tiny offline models. A one-stage DFMPipeline converted from FLUX is FluxPipeline (see
test_single_stage_reproduces_flux_pipeline), so wherever a behaviour can be compared it is compared to FluxPipeline's
own output on the same call; two stages are checked for what is specific to them.
"""

import logging

import pytest
import torch
from diffusers import FasterCacheConfig, FluxPipeline, PyramidAttentionBroadcastConfig
from diffusers.hooks.first_block_cache import FirstBlockCacheConfig

from dfm_diffusers import DFMDiTPipeline, DFMPipeline, DFMScheduler, DFMTransformer2DModel

H = W = 32  # pixels; the tiny VAE has factor 2 -> 16x16 latents, 8x8 tokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_zero_params(module, seed=1):
    """Give the zero-initialised new-stage layers values, so stage 1 does something in these tests."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)


@pytest.fixture
def flux_pipe(tiny_flux_components):
    return quiet(FluxPipeline(**tiny_flux_components))


@pytest.fixture
def one_stage(flux_pipe):
    """DFMPipeline with one stage: FluxPipeline's sampler exactly (the reference for the conventions)."""
    return quiet(DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=1))


@pytest.fixture
def two_stage(flux_pipe):
    pipe = DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=2, steps_per_stage=[2, 2], stage_thresholds=[0.3])
    randomize_zero_params(pipe.transformer.stage_layers)
    return quiet(pipe)


# ----------------------------------------------------------------------------------------------- callbacks
def record_callbacks(pipe, inputs, **call):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t.clone(), {k: v.clone() for k, v in kwargs.items()}))
        return kwargs

    pipe("a cat", height=H, width=W, generator=gen(3), callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=inputs, **call)
    return seen


@pytest.mark.parametrize("inputs", [["latents"], ["latents", "prompt_embeds"], ["prompt_embeds"]])
def test_one_stage_callbacks_see_what_fluxpipeline_callbacks_see(flux_pipe, one_stage, inputs):
    """Same keys (exactly the requested ones), same step indices, same scalar t, same packed latents."""
    ref = record_callbacks(flux_pipe, inputs, num_inference_steps=3, output_type="latent")
    out = record_callbacks(one_stage, inputs, num_inference_steps=3, output_type="latent")
    assert len(ref) == len(out) == 3
    for (i_ref, t_ref, kw_ref), (i, t, kw) in zip(ref, out):
        assert i == i_ref and t.shape == t_ref.shape == ()
        torch.testing.assert_close(t, t_ref)
        assert list(kw) == list(kw_ref) == inputs
        for key in inputs:
            assert kw[key].shape == kw_ref[key].shape
            torch.testing.assert_close(kw[key], kw_ref[key], rtol=0, atol=1e-5)


def test_callback_changes_latents_like_fluxpipeline(two_stage):
    """PipelineTesterMixin.test_callback_inputs: only allowed keys; zeroing "latents" at the last step gives a zero
    latent output; what a callback returns (or changes in place) is what the sampler continues from."""
    allowed = two_stage._callback_tensor_inputs

    def subset(p, i, t, kwargs):
        assert set(kwargs) <= set(allowed)
        return kwargs

    def everything(p, i, t, kwargs):
        assert set(kwargs) == set(allowed)
        return kwargs

    def zero_last(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    def zero_in_place(p, i, t, kwargs):
        if i == p.num_timesteps - 1:
            kwargs["latents"].zero_()
        return {}

    call = dict(height=H, width=W, generator=gen(), output_type="latent")
    plain = two_stage("a cat", **call).images
    assert plain.abs().sum() > 0 and plain.shape == (1, 64, 16)
    out = two_stage("a cat", callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"],
                    **{**call, "generator": gen()}).images
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # an unchanged round trip through the packed form
    two_stage("a cat", callback_on_step_end=everything, callback_on_step_end_tensor_inputs=allowed, **call)
    for callback in (zero_last, zero_in_place):
        out = two_stage("a cat", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=allowed, **call)
        assert out.images.abs().sum() == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        two_stage("a cat", callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["stage_sigmas"], **call)


def test_callback_cfg_and_stage_state(two_stage):
    """PipelineTesterMixin.test_callback_cfg (guidance_scale raised at every step) and where the stages stand."""
    states = []

    def callback(p, i, t, kwargs):
        p._guidance_scale += 1.0
        stages = p.unpack_stage_latents(kwargs["latents"], H, W)
        states.append((p.stage_index, p.stage_sigmas.clone(), float(t), [tuple(x.shape) for x in stages]))
        return kwargs

    two_stage("a cat", height=H, width=W, guidance_scale=2.0, callback_on_step_end=callback,
              callback_on_step_end_tensor_inputs=two_stage._callback_tensor_inputs, output_type="latent")
    sched = two_stage.scheduler
    assert two_stage.guidance_scale == 2.0 + two_stage.num_timesteps == 6.0
    assert [s[0] for s in states] == [0, 0, 1, 1]
    torch.testing.assert_close(torch.stack([s[1] for s in states]), sched.sigmas[:-1])
    # t is the newest active stage's timestep: stage 0's in phase 0, stage 1's (restarting at 1000) in phase 1
    assert [s[2] for s in states] == pytest.approx([float(sched.timesteps[i, i // 2]) for i in range(4)])
    assert states[2][2] == pytest.approx(1000.0)
    assert all(s[3] == [(1, 4, 16, 16), (1, 4, 16, 16)] for s in states)
    assert two_stage.stage_index is None and two_stage.current_timestep is None  # only during a call


def test_packed_latents_round_trip_and_input(two_stage):
    stages = [torch.randn(2, 4, 16, 16, generator=gen(s)) for s in range(2)]
    packed = two_stage.pack_stage_latents(stages)
    assert packed.shape == (2, 64, 32)  # 8x8 tokens; each stage's 2x2 patches of 4 channels, concatenated
    # stage 0's slice is FluxPipeline's own packing
    torch.testing.assert_close(packed[..., :16], FluxPipeline._pack_latents(stages[0], 2, 4, 16, 16), rtol=0, atol=0)
    for a, b in zip(two_stage.unpack_stage_latents(packed, H, W), stages):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    call = dict(height=H, width=W, output_type="pt")
    a = two_stage("a cat", latents=stages[:1] and [x[:1] for x in stages], **call).images
    b = two_stage("a cat", latents=two_stage.pack_stage_latents([x[:1] for x in stages]), **call).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="packed latents must be"):
        two_stage("a cat", latents=packed[:1, :, :20], **call)


def test_callback_on_stage_end_gets_the_previews(two_stage):
    got = []
    out = two_stage("a cat", height=H, width=W, generator=gen(2), output_type="pt", return_previews=True,
                    callback_on_stage_end=lambda p, stage, image: got.append((stage, image)))
    assert [s for s, _ in got] == [0, 1]
    for (_, image), preview in zip(got, out.previews):
        assert image is preview
    assert got[-1][1] is out.images


# ------------------------------------------------------------------------------------------------- caches
def cache_configs(pipe):
    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=["transformer_blocks"], current_timestep_callback=timestep),
        "faster": FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True,
            current_timestep_callback=timestep),
        "first_block": FirstBlockCacheConfig(threshold=0.8),
    }


@pytest.mark.parametrize("name", ["pab", "faster", "first_block"])
def test_inference_caches_match_fluxpipeline_with_one_stage(flux_pipe, one_stage, name):
    call = dict(height=H, width=W, num_inference_steps=4, output_type="pt")
    images = []
    for pipe in (flux_pipe, one_stage):
        pipe.transformer.enable_cache(cache_configs(pipe)[name])
        images.append(pipe("a cat", generator=gen(1), **call).images)
        pipe.transformer.disable_cache()
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)


def count_attention_computations(transformer):
    """A list that grows by one whenever a block's attention really runs (its to_q projection is called; a cached
    attention or a skipped block does not call it)."""
    calls = []
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn.to_q.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("name", ["pab", "faster", "first_block"])
def test_inference_caches_with_two_stages(two_stage, name):
    """The caches run with 2+ stages (they used to crash on a per-stage current_timestep), skip work, stay close to
    the uncached output, and leave no trace once disabled (diffusers' CacheTesterMixin checks)."""
    call = dict(height=H, width=W, steps_per_stage=[3, 3], output_type="pt")
    calls = count_attention_computations(two_stage.transformer)
    plain = two_stage("a cat", generator=gen(1), **call).images
    uncached_calls = len(calls)
    two_stage.transformer.enable_cache(cache_configs(two_stage)[name])
    cached = two_stage("a cat", generator=gen(1), **call).images
    cached_calls = len(calls) - uncached_calls
    two_stage.transformer.disable_cache()
    after = two_stage("a cat", generator=gen(1), **call).images
    assert cached_calls < uncached_calls  # the cache skipped attention or whole blocks
    assert (cached - plain).abs().max() < 0.2  # diffusers' tolerance for random tiny models
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- from_pipe
def assert_shares(new, old, names):
    for name in names:
        assert getattr(new, name) is getattr(old, name), name


def test_from_pipe_dfm_to_dfm_and_flux_to_dfm(flux_pipe, two_stage):
    call = dict(height=H, width=W, output_type="pt")
    again = quiet(DFMPipeline.from_pipe(two_stage))
    assert_shares(again, two_stage, ["transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer"])
    torch.testing.assert_close(again("a cat", generator=gen(), **call).images,
                               two_stage("a cat", generator=gen(), **call).images, rtol=0, atol=0)
    # FLUX's text encoders, tokenizers and VAE shared with a FluxPipeline already in memory
    shared = quiet(DFMPipeline.from_pipe(flux_pipe, transformer=two_stage.transformer, scheduler=two_stage.scheduler))
    assert_shares(shared, flux_pipe, ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"])
    torch.testing.assert_close(shared("a cat", generator=gen(), **call).images,
                               two_stage("a cat", generator=gen(), **call).images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a DFMTransformer2DModel as `transformer`"):
        DFMPipeline.from_pipe(flux_pipe)
    with pytest.raises(ValueError, match="needs a DFMScheduler as `scheduler`"):
        DFMPipeline.from_pipe(flux_pipe, transformer=two_stage.transformer)
    with pytest.raises(ValueError, match="2 stages but the scheduler 1"):
        DFMPipeline.from_pipe(two_stage, scheduler=DFMScheduler(num_stages=1))


def test_dit_from_pipe_keeps_the_vae(tiny_flux_components):
    from dfm_diffusers import DFMDiTTransformer2DModel

    vae = tiny_flux_components["vae"]
    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset("DiT-T/2", in_channels=4, sample_size=8, num_stages=2,
                                                 num_layers=1, num_attention_heads=2, attention_head_dim=16,
                                                 num_classes=3).eval()
    pipe = quiet(DFMDiTPipeline(transformer=model, scheduler=DFMScheduler(num_stages=2, steps_per_stage=[2, 1]),
                                vae=vae))
    new = quiet(DFMDiTPipeline.from_pipe(pipe))
    assert new.vae is vae
    a = pipe(class_labels=[1], generator=gen(), output_type="pt").images
    b = new(class_labels=[1], generator=gen(), output_type="pt").images
    assert a.shape == (1, 3, 16, 16)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


# -------------------------------------------------------------------------------------- sizes, embeds, output
def test_sizes_rounded_down_with_a_warning_as_fluxpipeline(flux_pipe, one_stage, two_stage, caplog):
    """FluxPipeline's test_flux_image_output_shape: an odd size is rounded down (with a warning), not refused."""
    for height, width in [(30, 35), (36, 42)]:
        ref = flux_pipe("a cat", height=height, width=width, num_inference_steps=2, generator=gen(), output_type="pt")
        out = one_stage("a cat", height=height, width=width, num_inference_steps=2, generator=gen(), output_type="pt")
        torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-4)
        expected = (height - height % 4, width - width % 4)
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            two = two_stage("a cat", height=height, width=width, output_type="pt").images
        assert tuple(two.shape[-2:]) == expected
        assert "Dimensions will be resized accordingly" in caplog.text and "have to be divisible by 4" in caplog.text
    with pytest.raises(ValueError, match="at least 4"):
        two_stage("a cat", height=3, width=W)


def test_prompt_and_negative_embeds_of_different_shapes_are_rejected(flux_pipe, two_stage):
    """FluxPipeline's test_flux_negative_embeds_shape_check, same message."""
    inputs = dict(prompt_embeds=torch.randn(1, 4, 32), pooled_prompt_embeds=torch.randn(1, 32),
                  negative_prompt_embeds=torch.randn(1, 5, 32), negative_pooled_prompt_embeds=torch.randn(1, 32),
                  height=16, width=16, output_type="latent")
    for pipe, steps in ((flux_pipe, dict(num_inference_steps=2)), (two_stage, {})):
        with pytest.raises(ValueError, match="must have the same shape when passed directly"):
            pipe(**inputs, **steps, true_cfg_scale=2.0, generator=gen())
        pipe(**inputs, **steps, true_cfg_scale=1.0, generator=gen())


def test_latent_output_is_packed_like_fluxpipeline(flux_pipe, one_stage, two_stage):
    ref = flux_pipe("a cat", height=H, width=W, num_inference_steps=3, generator=gen(), output_type="latent").images
    out = one_stage("a cat", height=H, width=W, num_inference_steps=3, generator=gen(), output_type="latent").images
    assert out.shape == ref.shape == (1, 64, 16)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # two stages: FluxPipeline's unpack + VAE decode of the packed latent gives the pipeline's own image
    packed = two_stage("a cat", height=H, width=W, generator=gen(), output_type="latent").images
    image = two_stage("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    latent = FluxPipeline._unpack_latents(packed, H, W, two_stage.vae_scale_factor)
    vae = two_stage.vae
    decoded = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(two_stage.image_processor.postprocess(decoded, output_type="pt"), image,
                               rtol=0, atol=1e-5)
    previews = two_stage("a cat", height=H, width=W, generator=gen(), output_type="latent",
                         return_previews=True).previews
    assert [tuple(p.shape) for p in previews] == [(1, 4, 8, 8), (1, 4, 16, 16)]  # unpacked, per stage resolution
    torch.testing.assert_close(previews[-1], latent, rtol=0, atol=0)


def test_num_inference_steps_is_the_total_of_steps_per_stage(two_stage):
    a = two_stage("a cat", height=H, width=W, num_inference_steps=6, generator=gen(), output_type="latent").images
    assert two_stage.scheduler.steps_per_stage == [3, 3]
    b = two_stage("a cat", height=H, width=W, steps_per_stage=6, generator=gen(), output_type="latent").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        two_stage("a cat", height=H, width=W, num_inference_steps=6, steps_per_stage=[3, 3])


# ------------------------------------------------------------------------------------------ transformer ids
def test_deprecated_3d_ids_warn_and_match(two_stage, caplog):
    model = two_stage.transformer
    x = [torch.randn(2, 4, 16, 16, generator=gen(s)) for s in range(2)]
    kwargs = dict(encoder_hidden_states=torch.randn(2, 6, 32), pooled_projections=torch.randn(2, 32),
                  timestep=torch.tensor([[0.7, 1.0], [0.3, 0.5]]), num_active_stages=torch.tensor([1, 2]),
                  guidance=torch.full([2], 3.5), return_dict=False)
    txt_ids = torch.zeros(6, 3)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    with torch.no_grad():
        default = model(x, **kwargs)[0]
        explicit = model(x, txt_ids=txt_ids, img_ids=img_ids, **kwargs)[0]
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            batched = model(x, txt_ids=txt_ids[None].expand(2, -1, -1), img_ids=img_ids[None].expand(2, -1, -1),
                            **kwargs)[0]
        shifted = model(x, txt_ids=txt_ids, img_ids=img_ids + torch.tensor([0.0, 3.0, 0.0]), **kwargs)[0]
    assert "Passing `txt_ids` 3d torch.Tensor is deprecated" in caplog.text
    assert "Passing `img_ids` 3d torch.Tensor is deprecated" in caplog.text
    for a, b, c in zip(default, explicit, batched):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    assert (shifted[0] - default[0]).abs().max() > 1e-5  # the given ids are used
    with pytest.raises(ValueError, match=r"img_ids must be \[64, 3\]"):
        model(x, img_ids=img_ids[:10], **kwargs)


# --------------------------------------------------------------------------------------------- IP-Adapter
def tiny_ip_adapter(transformer, seed=0):
    """An IP-Adapter state dict for ``transformer`` in the layout FluxIPAdapterMixin.load_ip_adapter reads: the image
    projection (4 tokens from a pooled_projection_dim image embedding) and to_k_ip / to_v_ip per double block."""
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    torch.manual_seed(seed)
    config = transformer.config
    ip_layers = {}
    for i in range(config.num_layers):
        proc = FluxIPAdapterAttnProcessor(hidden_size=config.num_attention_heads * config.attention_head_dim,
                                          cross_attention_dim=config.joint_attention_dim, scale=1.0).state_dict()
        for name in ("to_k_ip", "to_v_ip"):
            for kind in ("weight", "bias"):
                ip_layers[f"{i}.{name}.{kind}"] = proc[f"{name}.0.{kind}"]
    proj = ImageProjection(cross_attention_dim=config.joint_attention_dim,
                           image_embed_dim=config.pooled_projection_dim, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def test_ip_adapter_matches_fluxpipeline(flux_pipe, one_stage, two_stage):
    embeds = [torch.randn(1, 1, 32, generator=gen(5))]
    call = dict(height=H, width=W, negative_prompt="", true_cfg_scale=4.0, output_type="pt")
    with pytest.raises(ValueError, match="load_ip_adapter"):
        two_stage("a cat", ip_adapter_image_embeds=embeds, **call)
    state = tiny_ip_adapter(flux_pipe.transformer)
    base = two_stage("a cat", generator=gen(), **call).images
    for pipe in (flux_pipe, one_stage, two_stage):
        pipe.load_ip_adapter({k: dict(v) for k, v in state.items()}, weight_name="ip.bin",
                             image_encoder_pretrained_model_name_or_path=None)
    with pytest.raises(ValueError, match="need an image encoder"):  # FluxPipeline: AttributeError on None
        two_stage("a cat", ip_adapter_image_embeds=embeds, **call)
    call["negative_ip_adapter_image_embeds"] = [torch.randn(1, 1, 32, generator=gen(6))]
    ref = flux_pipe("a cat", ip_adapter_image_embeds=embeds, num_inference_steps=3, generator=gen(), **call).images
    out = one_stage("a cat", ip_adapter_image_embeds=embeds, num_inference_steps=3, generator=gen(), **call).images
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    with_ip = two_stage("a cat", ip_adapter_image_embeds=embeds, generator=gen(), **call).images
    assert (with_ip - base).abs().max() > 1e-3
    two_stage.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(two_stage("a cat", ip_adapter_image_embeds=embeds, generator=gen(), **call).images,
                               base, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- LoRA
ALL_LINEAR = ["x_embedder", "proj_out", "norm_out.linear", "to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def save_flux_lora(flux_transformer, folder, targets=ALL_LINEAR):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(7)
    flux_transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(flux_transformer),
                                   transformer_lora_adapter_metadata=flux_transformer.peft_config["default"].to_dict())


def test_all_linear_flux_lora_reaches_stage_zero(flux_pipe, one_stage, two_stage, tmp_path):
    """A FLUX LoRA on x_embedder / proj_out / norm_out.linear (plus the blocks) loads into the DFM stage-0 layers
    (which are those FLUX layers): one stage then gives FluxPipeline's output with the same LoRA."""
    call = dict(height=H, width=W, num_inference_steps=3, output_type="pt")
    save_flux_lora(flux_pipe.transformer, tmp_path)
    ref = flux_pipe("a cat", generator=gen(), **call).images
    one_stage.load_lora_weights(tmp_path)
    out = one_stage("a cat", generator=gen(), **call).images
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    two_stage.load_lora_weights(tmp_path)
    adapted = {n for n, m in two_stage.transformer.named_modules() if hasattr(m, "lora_A") and "stage_layers" in n}
    assert adapted == {"stage_layers.patch_embedders.0", "stage_layers.heads.0.proj_out",
                       "stage_layers.heads.0.norm_out.linear"}


def test_flux_lora_on_x_embedder_refused_for_the_legacy_stage_layout(flux_pipe, tmp_path):
    legacy = DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=2, stage_upsampling=[1, 1],
                                             new_stage_init="x_embedder")
    save_flux_lora(flux_pipe.transformer, tmp_path, targets=["x_embedder", "to_q"])
    with pytest.raises(ValueError, match="has no counterpart for: its stage 0 has patch size 1"):
        legacy.load_lora_weights(tmp_path)
    plain = tmp_path / "attention_only"
    flux_pipe.transformer.delete_adapters("default")
    save_flux_lora(flux_pipe.transformer, plain, targets=["to_q", "to_k"])
    legacy.load_lora_weights(plain)  # LoRAs without those parts load as before
    assert isinstance(legacy.transformer, DFMTransformer2DModel)
