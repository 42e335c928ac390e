"""DFMPipeline against diffusers' FluxPipeline, on tiny offline components."""

import json
import os
import shutil

import pytest
import torch
from diffusers import FluxPipeline

from dfm_diffusers import DFMPipeline, DFMScheduler, DFMTransformer2DModel

from conftest import RELOAD_ATOL, assert_images_close_after_reload, assert_reloaded_equal

H = W = 32  # pixels; the tiny VAE has factor 2 -> 16x16 latents, 8x8 tokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def flux_pipe(tiny_flux_components):
    pipe = FluxPipeline(**tiny_flux_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def dfm_pipe(flux_pipe):
    pipe = DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=2, steps_per_stage=[3, 2], stage_thresholds=[0.3])
    # give stage 1 non-zero weights so the second stage does something in these tests
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pipe.transformer.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_single_stage_reproduces_flux_pipeline(flux_pipe):
    assert flux_pipe.scheduler.config.use_dynamic_shifting
    dfm = DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=1)
    dfm.set_progress_bar_config(disable=True)
    for steps in (4, 7):
        ref = flux_pipe("a cat", height=H, width=W, num_inference_steps=steps, generator=gen(3), output_type="pt")
        out = dfm("a cat", height=H, width=W, steps_per_stage=[steps], generator=gen(3), output_type="pt")
        assert (out.images - ref.images).abs().max() <= 1e-4
    # same with true CFG and a negative prompt
    ref = flux_pipe("a cat", negative_prompt="a", true_cfg_scale=2.0, height=H, width=W, num_inference_steps=3,
                    generator=gen(4), output_type="pt")
    out = dfm("a cat", negative_prompt="a", true_cfg_scale=2.0, height=H, width=W, steps_per_stage=3,
              generator=gen(4), output_type="pt")
    assert (out.images - ref.images).abs().max() <= 1e-4


def record_transformer_calls(pipe):
    calls = []
    original = pipe.transformer.forward

    def recording_forward(*args, **kwargs):
        calls.append((kwargs["timestep"].clone(), kwargs["num_active_stages"].clone(),
                      [x.shape for x in kwargs["hidden_states"]]))
        return original(*args, **kwargs)

    pipe.transformer.forward = recording_forward
    return calls


def test_transformer_receives_the_scheduler_table(dfm_pipe):
    calls = record_transformer_calls(dfm_pipe)
    seen = []
    out = dfm_pipe(
        "a cat", height=H, width=W, generator=gen(), output_type="pt", num_images_per_prompt=2,
        callback_on_step_end=lambda p, i, t, kw: seen.append((i, p.stage_index, p.stage_sigmas.clone(),
                                                               [x.shape for x in p.unpack_stage_latents(kw["latents"], H, W)])) or {},
    )
    sched = dfm_pipe.scheduler
    assert len(calls) == sched.num_inference_steps == 5
    for i, (sigmas, active, shapes) in enumerate(calls):
        assert sigmas.shape == (2, 2)
        torch.testing.assert_close(sigmas, sched.sigmas[i][None].expand(2, 2))
        assert (active == sched.num_active_stages[i]).all()
        assert shapes == [(2, 4, 16, 16), (2, 4, 16, 16)]  # stage 0 carried at the finest resolution
    assert [s for _, s, _, _ in seen] == [0, 0, 0, 1, 1]
    torch.testing.assert_close(torch.stack([s for _, _, s, _ in seen]), sched.sigmas[:-1])
    assert out.images.shape == (2, 3, H, W)


def test_deterministic_and_previews(dfm_pipe):
    a = dfm_pipe("a cat", height=H, width=W, generator=gen(5), output_type="pt", return_previews=True)
    b = dfm_pipe("a cat", height=H, width=W, generator=gen(5), output_type="pt", return_previews=True)
    c = dfm_pipe("a cat", height=H, width=W, generator=gen(6), output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert (a.images - c.images).abs().max() > 1e-3
    assert [tuple(p.shape) for p in a.previews] == [(1, 3, 16, 16), (1, 3, 32, 32)]
    assert a.previews[-1] is a.images
    pil = dfm_pipe("a cat", height=H, width=W, generator=gen(5), return_previews=True)
    assert [im[0].size for im in pil.previews] == [(16, 16), (32, 32)]


def test_int_total_steps_and_threshold_override(dfm_pipe):
    calls = record_transformer_calls(dfm_pipe)
    dfm_pipe("a cat", height=H, width=W, steps_per_stage=10, stage_thresholds=[0.5], generator=gen(), output_type="latent")
    # config ratio 3:2 -> 6 + 4 steps; stage 1 starts when stage 0 reaches the (shifted) threshold 0.5
    assert dfm_pipe.scheduler.steps_per_stage == [6, 4] and len(calls) == 10
    assert all(c[1].item() == 1 for c in calls[:6]) and all(c[1].item() == 2 for c in calls[6:])
    # the threshold is the actual (shifted) sigma of stage 0 the transformer sees when stage 1 starts
    assert abs(calls[6][0][0, 0].item() - 0.5) < 1e-6 and calls[5][0][0, 0].item() > 0.5


def test_true_cfg_without_negative_prompt_uses_the_empty_prompt(dfm_pipe):
    kwargs = dict(height=H, width=W, steps_per_stage=[2, 1], output_type="latent")
    auto = dfm_pipe("a cat", true_cfg_scale=3.0, guidance_scale=1.0, generator=gen(7), **kwargs).images
    empty = dfm_pipe("a cat", negative_prompt="", true_cfg_scale=3.0, guidance_scale=1.0, generator=gen(7), **kwargs)
    plain = dfm_pipe("a cat", guidance_scale=1.0, generator=gen(7), **kwargs).images
    torch.testing.assert_close(auto, empty.images, rtol=0, atol=1e-6)
    assert (auto - plain).abs().max() > 1e-3  # guidance did happen
    two = dfm_pipe(["a cat", "ca"], true_cfg_scale=3.0, guidance_scale=1.0, generator=gen(7), **kwargs).images
    assert two.shape[0] == 2


@pytest.mark.parametrize("num_stages,factors", [(2, 4), (3, [2, 2])])
def test_factor_four_and_three_stages_sample_with_previews(flux_pipe, num_stages, factors):
    """256 -> 1024 analogue (factor 4: 4x4 -> 16x16 latents here) and three stages: convert, sample, preview."""
    pipe = DFMPipeline.from_flux_pipeline(flux_pipe, num_stages=num_stages, stage_factors=factors,
                                          steps_per_stage=[2] * num_stages, stage_thresholds=[0.3] * (num_stages - 1))
    pipe.set_progress_bar_config(disable=True)
    calls = record_transformer_calls(pipe)
    out = pipe("a cat", height=H, width=W, generator=gen(), output_type="pt", return_previews=True)
    sizes = {(2, 4): [8, 32], (3, 2): [8, 16, 32]}[(num_stages, 4 if factors == 4 else 2)]
    assert [p.shape[-1] for p in out.previews] == sizes and torch.isfinite(out.images).all()
    assert calls[0][2][0] == (1, 4, 16, 16)  # stage 0's noise drawn at the finest latent resolution
    # right after conversion stage 0 is FLUX on the carrier: the stage-0 preview is the block mean of what FLUX
    # alone generates on the same noise with the same (shifted) sigmas down to the first threshold
    sched = pipe.scheduler
    x = torch.randn(1, 4, 16, 16, generator=gen())
    embeds, pooled, ids = flux_pipe.encode_prompt("a cat", prompt_2=None)
    guidance = torch.full([1], 3.5)
    with torch.no_grad():
        for i in range(2):
            packed = FluxPipeline._pack_latents(x, 1, 4, 16, 16)
            img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, x.device, x.dtype)
            v = flux_pipe.transformer(hidden_states=packed, encoder_hidden_states=embeds, pooled_projections=pooled,
                                      timestep=sched.sigmas[i, :1], img_ids=img_ids, txt_ids=ids, guidance=guidance).sample
            v = FluxPipeline._unpack_latents(v, H, W, 2)
            x0 = x - sched.sigmas[i, 0] * v
            x = x + (sched.sigmas[i + 1, 0] - sched.sigmas[i, 0]) * v
    stage0 = torch.nn.functional.avg_pool2d(x0, 4)
    ref = pipe.decode_latents(stage0, "pt")
    torch.testing.assert_close(out.previews[0], ref, rtol=0, atol=1e-4)


def test_given_latents_are_used(dfm_pipe):
    latents = [torch.randn(1, 4, 16, 16, generator=gen(9)), torch.randn(1, 4, 16, 16, generator=gen(10))]
    a = dfm_pipe("a cat", height=H, width=W, latents=latents, output_type="pt")
    b = dfm_pipe("a cat", height=H, width=W, latents=[x.clone() for x in latents], generator=gen(1), output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_save_load_round_trip(dfm_pipe, tmp_path):
    dfm_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DFMPipeline"
    assert index["transformer"] == ["dfm_diffusers.models.transformer_dfm_flux", "DFMTransformer2DModel"]
    assert index["scheduler"] == ["dfm_diffusers.schedulers.scheduling_dfm", "DFMScheduler"]
    loaded = DFMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, DFMTransformer2DModel) and isinstance(loaded.scheduler, DFMScheduler)
    assert_reloaded_equal(dfm_pipe, loaded)
    a = dfm_pipe("a cat", height=H, width=W, generator=gen(2), output_type="pt")
    b = loaded("a cat", height=H, width=W, generator=gen(2), output_type="pt")
    assert_images_close_after_reload(a.images, b.images)


def test_reload_tolerance_catches_a_changed_weight(dfm_pipe):
    """RELOAD_ATOL is far below what one slightly changed stage-1 weight does to the images."""
    a = dfm_pipe("a cat", height=H, width=W, generator=gen(2), output_type="pt").images
    with torch.no_grad():
        dfm_pipe.transformer.stage_layers.heads[1].proj_out.weight[0, 0] += 1e-3
    b = dfm_pipe("a cat", height=H, width=W, generator=gen(2), output_type="pt").images
    assert (a - b).abs().max() > 10 * RELOAD_ATOL


def test_from_pretrained_resolves_hub_repo_from_prefilled_cache(dfm_pipe, tmp_path, hf_home):
    """A Hub repo id loads through snapshot_download (offline, from a pre-filled HF cache)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo_id, commit = "dfm-test/tiny-dfm", "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(HF_HUB_CACHE, "models--dfm-test--tiny-dfm")
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    dfm_pipe.save_pretrained(snapshot)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    assert HF_HUB_CACHE.startswith(hf_home)
    try:
        loaded = DFMPipeline.from_pretrained(repo_id)
        loaded.set_progress_bar_config(disable=True)
        assert_reloaded_equal(dfm_pipe, loaded)
        a = dfm_pipe("a cat", height=H, width=W, generator=gen(2), output_type="pt")
        b = loaded("a cat", height=H, width=W, generator=gen(2), output_type="pt")
        assert_images_close_after_reload(a.images, b.images)
        with pytest.raises(Exception):
            DFMPipeline.from_pretrained("dfm-test/not-in-cache")
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)


def test_push_to_hub_uploads_folder_with_model_card(dfm_pipe, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    class RepoUrl:
        repo_id = "someone/tiny-dfm"

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["created"] = repo_id
        return RepoUrl()

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs
        )
        uploaded["card"] = open(os.path.join(folder_path, "README.md")).read()
        uploaded["index"] = json.load(open(os.path.join(folder_path, "model_index.json")))
        uploaded["kwargs"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    repo = dfm_pipe.push_to_hub("tiny-dfm", base_model="black-forest-labs/FLUX.1-dev")
    assert repo == "someone/tiny-dfm" and uploaded["created"] == "tiny-dfm" and uploaded["repo_id"] == repo
    for f in ["README.md", "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
              "transformer/diffusion_pytorch_model.safetensors", "vae/config.json", "tokenizer/tokenizer_config.json"]:
        assert f in uploaded["files"], f
    card = uploaded["card"]
    assert "base_model: black-forest-labs/FLUX.1-dev" in card and "stages: 2" in card
    assert "[0.3]" in card and "0.7" in card and 'DFMPipeline.from_pretrained("someone/tiny-dfm"' in card
    assert uploaded["index"]["_class_name"] == ["pipeline_dfm", "DFMPipeline"]  # self-contained by default


def test_bad_inputs_raise(dfm_pipe):
    with pytest.raises(ValueError, match="height and width must be at least 4"):
        dfm_pipe("a cat", height=3, width=W)
    with pytest.raises(ValueError, match="steps_per_stage"):
        dfm_pipe("a cat", height=H, width=W, steps_per_stage=[3, 2, 1])
    with pytest.raises(ValueError, match="latents"):
        dfm_pipe("a cat", height=H, width=W, latents=[torch.randn(1, 4, 8, 8), torch.randn(1, 4, 16, 16)])
    with pytest.raises(ValueError, match="prompt"):
        dfm_pipe("a cat", prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 32), height=H, width=W)
    with pytest.raises(ValueError, match="stage_thresholds"):
        dfm_pipe("a cat", height=H, width=W, stage_thresholds=[1.2])


def test_bfloat16_load(dfm_pipe, tmp_path):
    dfm_pipe.save_pretrained(tmp_path)
    loaded = DFMPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.dtype == torch.bfloat16
    out = loaded("a cat", height=H, width=W, generator=gen(), output_type="pt")
    ref = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt")
    assert torch.isfinite(out.images).all() and (out.images.float() - ref.images).abs().mean() < 0.05


def test_lora_load_and_fuse(dfm_pipe, flux_pipe, tmp_path):
    """A FLUX LoRA (attention projections) loads into the DFM pipeline; fusing gives the unfused output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    flux_transformer = flux_pipe.transformer
    flux_transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(flux_transformer))
    base = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    dfm_pipe.load_lora_weights(tmp_path)
    with_lora = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    assert (with_lora - base).abs().max() > 1e-4
    dfm_pipe.fuse_lora()
    dfm_pipe.unload_lora_weights()
    fused = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(fused, with_lora, rtol=0, atol=1e-4)


def test_convert_command_writes_loadable_folder(flux_pipeline_dir, tmp_path):
    from dfm_diffusers.convert import main

    out = tmp_path / "dfm"
    main(["--flux", str(flux_pipeline_dir), "--output", str(out), "--num-stages", "2", "--steps-per-stage", "4", "2",
          "--stage-thresholds", "0.2", "--torch-dtype", "float32"])
    pipe = DFMPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_stages == 2
    assert pipe.scheduler.config.steps_per_stage == [4, 2] and pipe.scheduler.config.stage_thresholds == [0.2]
    assert pipe.scheduler.config.use_dynamic_shifting
    flux = FluxPipeline.from_pretrained(flux_pipeline_dir)
    torch.testing.assert_close(pipe.transformer.transformer_blocks[0].attn.to_q.weight,
                               flux.transformer.transformer_blocks[0].attn.to_q.weight)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images.shape == (1, 3, H, W)


@pytest.mark.gpu
def test_model_cpu_offload_matches(dfm_pipe):
    ref = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    dfm_pipe.enable_model_cpu_offload()
    out = dfm_pipe("a cat", height=H, width=W, generator=gen(), output_type="pt").images
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-3)
