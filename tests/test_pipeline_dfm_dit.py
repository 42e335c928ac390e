"""DFMDiTPipeline: class-conditional sampling, CFG per stage, previews, VAE latent space, save/load, hub."""

import json
import os

import pytest
import torch

from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, DFMScheduler, LaplacianDecomposition

from conftest import assert_images_close_after_reload, assert_reloaded_equal

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, num_classes=5)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_pipe(num_stages=2, in_channels=1, sample_size=16, vae=None, patch=4, **sched):
    torch.manual_seed(0)
    model = DFMDiTTransformer2DModel.from_preset(
        f"DiT-T/{patch}", in_channels=in_channels, sample_size=sample_size, num_stages=num_stages, **TINY
    ).eval()
    with torch.no_grad():  # DiT's zero-init heads would make every output 0: randomise them
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    scheduler = DFMScheduler(num_stages=num_stages, **sched)
    pipe = DFMDiTPipeline(transformer=model, scheduler=scheduler, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_shapes_previews_and_schedule(num_stages):
    steps = {1: [4], 2: [3, 2], 3: [3, 2, 2]}[num_stages]
    pipe = make_pipe(num_stages, steps_per_stage=steps, stage_thresholds=[0.3] * (num_stages - 1))
    calls = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        calls.append((kwargs["timestep"].clone(), kwargs["num_active_stages"].clone()))
        return forward(*args, **kwargs)

    pipe.transformer.forward = recording
    out = pipe(class_labels=[0, 3], generator=gen(), output_type="pt", return_previews=True)
    assert out.images.shape == (2, 1, 16, 16)
    sizes = LaplacianDecomposition(num_stages, 2).stage_shapes(16, 16)
    assert [tuple(p.shape[-2:]) for p in out.previews] == sizes
    assert out.previews[-1] is out.images
    assert len(calls) == sum(steps)
    for i, (sigmas, active) in enumerate(calls):
        torch.testing.assert_close(sigmas, pipe.scheduler.sigmas[i][None].expand(2, num_stages))
        assert (active == pipe.scheduler.num_active_stages[i]).all()


@pytest.mark.parametrize("sched", [dict(shift=3.0), dict(use_dynamic_shifting=True)])
def test_thresholds_are_the_shifted_sigma_the_transformer_sees(sched):
    pipe = make_pipe(3, steps_per_stage=[3, 2, 2], stage_thresholds=[0.4, 0.1], **sched)
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **kw: calls.append(kw["timestep"][0].clone()) or forward(*a, **kw)
    pipe(class_labels=[1], generator=gen(), output_type="latent")
    # the first call of phase 1 sees stage 0 at 0.4, the first of phase 2 stage 1 at 0.1 (after the shift)
    assert abs(calls[3][0].item() - 0.4) < 1e-6 and abs(calls[5][1].item() - 0.1) < 1e-6
    assert calls[2][0] > 0.4 and calls[4][1] > 0.1


def test_deterministic_and_label_dependent():
    pipe = make_pipe()
    a = pipe(class_labels=[1, 2], generator=gen(1), output_type="pt").images
    b = pipe(class_labels=[1, 2], generator=gen(1), output_type="pt").images
    c = pipe(class_labels=[3, 4], generator=gen(1), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_num_inference_steps_is_the_total_split_in_the_scheduler_ratio():
    """DiTPipeline's num_inference_steps (diffusers' PipelineTesterMixin passes it): the total of steps_per_stage."""
    pipe = make_pipe(2, steps_per_stage=[3, 2])
    a = pipe(class_labels=[1], generator=gen(), output_type="pt", num_inference_steps=7).images
    assert pipe.scheduler.num_inference_steps == 7 and pipe.scheduler.split_steps(7) == [4, 3]
    b = pipe(class_labels=[1], generator=gen(), output_type="pt", steps_per_stage=[4, 3]).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        pipe(class_labels=[1], num_inference_steps=4, steps_per_stage=[2, 2])


def test_cfg_is_applied_per_stage_and_respects_the_guidance_interval():
    """Against a hand-written reference loop: v = u + w (c - u) on stage s only while sigma_s is inside the interval."""
    pipe = make_pipe(steps_per_stage=[3, 2], stage_thresholds=[0.4])
    labels = torch.tensor([1, 4])
    noise = [torch.randn(2, 1, 8, 8, generator=gen(7)), torch.randn(2, 1, 16, 16, generator=gen(8))]
    w, interval = 3.0, (0.0, 0.5)
    out = pipe(class_labels=labels, guidance_scale=w, guidance_interval=interval, latents=[x.clone() for x in noise],
               output_type="latent").images
    sched = pipe.scheduler
    x = [t.clone() for t in noise]
    null = torch.full_like(labels, pipe.transformer.config.num_classes)
    for i in range(sched.num_inference_steps):
        sig = sched.sigmas[i][None].expand(2, 2)
        act = sched.num_active_stages[i].expand(2)
        with torch.no_grad():
            cond = pipe.transformer(x, timestep=sig, num_active_stages=act, class_labels=labels).sample
            uncond = pipe.transformer(x, timestep=sig, num_active_stages=act, class_labels=null).sample
        v = [u + w * (c - u) if interval[0] <= sched.sigmas[i, s] <= interval[1] else c
             for s, (c, u) in enumerate(zip(cond, uncond))]
        x = sched.step(v, i, x).prev_sample
    ref = LaplacianDecomposition(2, 2).recompose(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    unguided = pipe(class_labels=labels, latents=[t.clone() for t in noise], output_type="latent").images
    assert (unguided - out).abs().max() > 1e-4


def test_latent_space_with_a_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.5, shift_factor=0.1).eval()
    pipe = make_pipe(in_channels=4, sample_size=16, vae=vae)
    out = pipe(class_labels=[0], generator=gen(), output_type="pt", return_previews=True)
    assert out.images.shape == (1, 3, 32, 32)
    assert [tuple(p.shape) for p in out.previews] == [(1, 3, 16, 16), (1, 3, 32, 32)]
    latent = pipe(class_labels=[0], generator=gen(), output_type="latent").images
    decoded = vae.decode(latent / 0.5 + 0.1).sample
    torch.testing.assert_close(out.images, (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_save_load_round_trip_and_push_to_hub(tmp_path, monkeypatch):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["transformer"] == ["dfm_diffusers.models.transformer_dfm_dit", "DFMDiTTransformer2DModel"]
    loaded = DFMDiTPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None
    assert_reloaded_equal(pipe, loaded)
    a = pipe(class_labels=[2], generator=gen(3), output_type="pt").images
    b = loaded(class_labels=[2], generator=gen(3), output_type="pt").images
    assert_images_close_after_reload(a, b)

    from huggingface_hub import HfApi

    seen = {}

    class Repo:
        repo_id = "me/tiny-dit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())

    def upload(self, repo_id, folder_path, **kw):
        seen["files"] = sorted(os.path.relpath(os.path.join(d, f), folder_path)
                               for d, _, fs in os.walk(folder_path) for f in fs)
        seen["card"] = open(os.path.join(folder_path, "README.md")).read()

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    assert pipe.push_to_hub("tiny-dit") == "me/tiny-dit"
    assert "transformer/diffusion_pytorch_model.safetensors" in seen["files"] and "model_index.json" in seen["files"]
    assert "DFMDiTPipeline.from_pretrained(\"me/tiny-dit\"" in seen["card"] and "trained from scratch" in seen["card"]


def test_bad_inputs_raise():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[5])
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[])
    with pytest.raises(ValueError, match="guidance_interval"):
        pipe(class_labels=[0], guidance_scale=2.0, guidance_interval=(0.6, 0.2))
    with pytest.raises(ValueError, match="latents"):
        pipe(class_labels=[0], latents=[torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)])
    with pytest.raises(ValueError, match="steps_per_stage"):
        pipe(class_labels=[0], steps_per_stage=[1, 2, 3])
