"""train_dfm_flux.py on tiny offline FLUX components and a tiny captioned image folder (scikit-image's images)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level train_dfm_flux.py

import train_dfm_flux  # noqa: E402
from conftest import CAPTIONED_IMAGES  # noqa: E402
from dfm_diffusers import DFMPipeline  # noqa: E402
from dfm_diffusers.pipelines.lora_export import LORA_EXPORT_CONFIG_NAME, TRAINED_WEIGHT_NAME  # noqa: E402
from dfm_diffusers.training.flux import LORA_WEIGHT_NAME, FluxTrainingConfig, build_flux_task  # noqa: E402

R = 32  # pixels; the tiny VAE has factor 2 -> 16x16 latents (stage 0: 8x8)
IMAGES = CAPTIONED_IMAGES  # the caption_dir fixture's (conftest)
SAMPLE = dict(height=R, width=R, output_type="pt", max_sequence_length=16, steps_per_stage=[2, 2])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)




@pytest.fixture(scope="module")
def dfm_dir(flux_pipeline_dir, tmp_path_factory):
    """The tiny FLUX pipeline converted to a 2-stage DFMPipeline folder."""
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("tiny-dfm")
    flux = FluxPipeline.from_pretrained(flux_pipeline_dir)
    DFMPipeline.from_flux_pipeline(flux, steps_per_stage=[2, 2]).save_pretrained(path)
    return path


def args(pretrained, dataset, out, **kw):
    base = dict(pretrained=pretrained, dataset=dataset, output_dir=out, resolution=R, train_batch_size=2,
                max_sequence_length=16, report_to="none", checkpointing_steps=0, validation_steps=0,
                validation_prompts='["a cat"]', steps_per_stage="[2, 2]", lora_rank=4, log_every=1)
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def converted_start(flux_pipeline_dir, num_stages=2):
    """State dict of the freshly converted transformer (what training starts from)."""
    from diffusers import FluxPipeline

    pipe = DFMPipeline.from_flux_pipeline(FluxPipeline.from_pretrained(flux_pipeline_dir), num_stages=num_stages)
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def test_lora_run_trains_adapters_and_stage_layers_and_exports(flux_pipeline_dir, caption_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    pushed = {}

    class RepoUrl:
        repo_id = "someone/tiny-dfm-lora"

    def fake_create_repo(self, repo_id, **kwargs):
        pushed["created"] = repo_id
        return RepoUrl()

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        pushed.update(repo=repo_id, files=sorted(os.listdir(folder_path)))

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    out = tmp_path / "lora"
    result = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, out, max_train_steps=20, learning_rate=1e-2,
                                      lora_alpha=8, validation_steps=10, push_to_hub="true",
                                      hub_model_id="tiny-dfm-lora"))
    assert result["global_step"] == 20 and len(result["log"]) == 20
    assert {"loss", "loss_stage_0", "loss_stage_1"} <= set(result["log"][-1])
    assert (out / "samples" / "step_0000010.png").exists() and (out / "samples" / "step_0000020.png").exists()
    assert (out / "loss_curve.png").exists()

    # base weights bit-identical to the converted start; LoRA and the stage layers trained
    pipe = result["pipeline"].to("cpu")  # compare on the CPU wherever it trained
    trained = pipe.transformer.eval()
    start = converted_start(flux_pipeline_dir)
    state = trained.state_dict()
    lora_keys = [k for k in state if ".lora_B." in k]
    assert lora_keys and all(state[k].abs().max() > 0 for k in lora_keys)
    assert all(p.dtype == torch.float32 for p in trained.parameters() if p.requires_grad)
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.replace(".base_layer.", ".")
        if name.startswith("stage_layers."):
            continue
        assert torch.equal(value, start[name]), name
    assert not torch.equal(state["stage_layers.heads.1.proj_out.weight"], start["stage_layers.heads.1.proj_out.weight"])
    assert state["stage_layers.patch_embedders.1.weight"].abs().max() > 0  # stage 1 started at zero

    # the export: only what was trained (LoRA + stage layers + a JSON naming the base), no copy of FLUX
    export = Path(result["export_dir"])
    card = (export / "README.md").read_text()
    assert sorted(os.listdir(export)) == sorted(
        [LORA_WEIGHT_NAME, TRAINED_WEIGHT_NAME, LORA_EXPORT_CONFIG_NAME, "README.md", "samples.png"])
    assert "from_lora_export" in card and f"base_model: {os.path.abspath(flux_pipeline_dir)}" in card
    assert "stages: 2" in card and "steps: 20" in card and str(caption_dir) in card and "samples.png" in card
    # the paper's sampling settings for a DFM-finetuned FLUX are recorded as the recommended ones
    assert "true_cfg_scale=3.0" in card and "guidance_scale=1.0" in card
    assert pushed["created"] == "tiny-dfm-lora" and pushed["repo"] == "someone/tiny-dfm-lora"
    assert LORA_WEIGHT_NAME in pushed["files"] and "model_index.json" not in pushed["files"]
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a cat", generator=gen(), **SAMPLE).images
    loaded = DFMPipeline.from_lora_export(export)  # converts the plain FLUX base named in the export
    loaded.set_progress_bar_config(disable=True)
    loaded_state = loaded.transformer.state_dict()
    assert loaded_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded_state[key], value), key
    assert loaded.scheduler.config.steps_per_stage == [2, 2]
    torch.testing.assert_close(loaded("a cat", generator=gen(), **SAMPLE).images, reference, rtol=0, atol=1e-5)
    # the same through an already converted base: from_pretrained + load_dfm_lora
    from diffusers import FluxPipeline

    converted = tmp_path / "converted"
    DFMPipeline.from_flux_pipeline(FluxPipeline.from_pretrained(flux_pipeline_dir)).save_pretrained(converted)
    again = DFMPipeline.from_pretrained(converted).load_dfm_lora(export)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again("a cat", generator=gen(), **SAMPLE).images, reference, rtol=0, atol=1e-5)

    # fuse_lora_on_export: one transformer with the LoRA merged in, no LoRA file
    task = result["task"]
    task.config.fuse_lora_on_export, task.config.push_to_hub = True, False
    task.export_fn(trained, str(tmp_path / "fused"))
    assert not (tmp_path / "fused" / LORA_WEIGHT_NAME).exists()
    fused = DFMPipeline.from_pretrained(tmp_path / "fused")
    fused.set_progress_bar_config(disable=True)
    torch.testing.assert_close(fused("a cat", generator=gen(), **SAMPLE).images, reference, rtol=0, atol=1e-4)


def test_full_finetune_from_dfm_folder_exports_changed_weights(dfm_dir, caption_dir, tmp_path):
    out = tmp_path / "full"
    result = train_dfm_flux.main(args(dfm_dir, caption_dir, out, lora="false", max_train_steps=3, learning_rate=1e-3,
                                      stage_weights="[0.5, 0.5]"))  # stage 1 trained at least once (p = 63/64)
    assert result["global_step"] == 3 and (out / "samples" / "step_0000003.png").exists()
    export = Path(result["export_dir"])
    assert not (export / LORA_WEIGHT_NAME).exists()
    start = DFMPipeline.from_pretrained(dfm_dir).transformer.state_dict()
    loaded = DFMPipeline.from_pretrained(export)
    state = loaded.transformer.state_dict()
    assert state.keys() == start.keys()
    for key in ["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_mlp.weight",
                "context_embedder.weight", "stage_layers.heads.1.proj_out.weight"]:
        assert not torch.equal(state[key], start[key]), key
    torch.testing.assert_close(state, result["pipeline"].to("cpu").transformer.state_dict(), rtol=0, atol=0)
    assert loaded.scheduler.config.steps_per_stage == [2, 2]
    loaded.set_progress_bar_config(disable=True)
    assert torch.isfinite(loaded("a cat", generator=gen(), **SAMPLE).images).all()


@pytest.mark.parametrize("mode", ["auto", [0.5, 0.25]])
def test_stage_scales_auto_or_given_reach_the_transformer_config_and_the_export(
    mode, flux_pipeline_dir, caption_dir, tmp_path
):
    """stage_scales auto: measured on the training images through the VAE (FLUX's shift and scale) before training,
    stored in the transformer config, so the task's decomposition, the validation pipeline and the export use them."""
    from dfm_diffusers.data.latents import encode_images
    from dfm_diffusers.decomposition import LaplacianDecomposition

    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                max_sequence_length=16, lora_rank=4, stage_scales=mode, output_dir=str(tmp_path),
                                new_stage_init="x_embedder")
    task, dataset = build_flux_task(config)
    if mode == "auto":
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        latents = encode_images(task.pipe.vae, pixels)
        bands = LaplacianDecomposition(2, 2).decompose(latents)
        expected = [b.double().std(unbiased=False).item() for b in bands]
    else:
        expected = mode
    assert task.transformer.config.stage_scales == pytest.approx(expected, rel=1e-4)
    assert task.decomposition.stage_scales == pytest.approx(expected, rel=1e-4)
    assert task.pipeline(task.transformer).decomposition.stage_scales == pytest.approx(expected, rel=1e-4)
    assert task.export_transformer(task.transformer).config.stage_scales == pytest.approx(expected, rel=1e-4)


def test_single_stage_is_plain_flux_flow_matching(flux_pipeline_dir, caption_dir, tmp_path):
    """num_stages 1: the task's loss is F.mse_loss(FLUX(x_sigma), eps - x) with diffusers' own FLUX, and trains."""
    from diffusers import FluxPipeline

    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                num_stages=1, max_sequence_length=16, guidance_scale=1.0, lora_rank=4,
                                caption_dropout=0.0, output_dir=str(tmp_path / "s1"))
    task, dataset = build_flux_task(config)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    model = task.transformer
    x = task.encode_images(batch["pixel_values"], sample=False)
    eps = torch.randn(x.shape, generator=gen(1))
    torch.manual_seed(0)
    out = task.objective(model, batch, noise=[eps], latents=x)
    assert len(out.prediction) == 1 and out.draw.sigmas.shape == (2, 1)
    torch.testing.assert_close(out.targets[0], eps - x)

    flux = FluxPipeline.from_pretrained(flux_pipeline_dir)
    sigma = out.draw.sigmas[:, 0]
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1) * eps
    b, c, h, w = x.shape
    embeds, pooled, text_ids = flux.encode_prompt(batch["captions"], prompt_2=None, max_sequence_length=16)
    with torch.no_grad():
        packed = flux.transformer(
            hidden_states=FluxPipeline._pack_latents(x_t, b, c, h, w), encoder_hidden_states=embeds,
            pooled_projections=pooled, timestep=sigma, guidance=torch.ones(b), txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype), return_dict=False,
        )[0]
    pred = FluxPipeline._unpack_latents(packed, h * 2, w * 2, 2)
    torch.testing.assert_close(out.prediction[0].detach(), pred, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), F.mse_loss(pred, eps - x), rtol=1e-5, atol=1e-6)

    # a few optimizer steps on this fixed batch (same noise and sigma) lower the loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        loss = task.objective(model, batch, noise=[eps], latents=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses

    # and the command trains / exports a 1-stage pipeline
    result = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "s1run", num_stages=1,
                                      steps_per_stage="[4]", max_train_steps=2, learning_rate=1e-2))
    assert result["global_step"] == 2 and "loss_stage_1" not in result["log"][-1]
    # the LoRA export holds every trained tensor: the LoRA file + the stage layers (stage 0's patch embedding and
    # head, trained), and loads back to the same weights
    from safetensors.torch import load_file

    trained = result["pipeline"].transformer
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    export = Path(result["export_dir"])
    lora_file = load_file(export / LORA_WEIGHT_NAME)
    stage_file = load_file(export / TRAINED_WEIGHT_NAME)
    assert any(n.startswith("stage_layers.") for n in names)
    for name in names:
        if ".lora_" in name:
            key = "transformer." + name.replace(".default", "")
            assert torch.equal(lora_file[key], trained.get_parameter(name).detach()), name
        else:
            assert torch.equal(stage_file[name], trained.get_parameter(name).detach()), name
    loaded = DFMPipeline.from_lora_export(export)
    assert loaded.transformer.config.num_stages == 1
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value), key


def test_paper_training_defaults():
    config = FluxTrainingConfig()
    assert config.caption_dropout == 0.1 and config.guidance_scale == 1.0
    assert config.validation_true_cfg_scale == 3.0 and config.validation_guidance_scale == 1.0


@pytest.mark.parametrize("num_stages,factors", [(2, 4), (3, [2, 2])])
def test_factor_four_and_three_stages_convert_train_and_sample(num_stages, factors, flux_pipeline_dir, caption_dir,
                                                               tmp_path):
    """Build from FLUX, check the converted stage 0 is FLUX on the noised carrier (plus the active later stages)
    inside the objective, take a training step, sample with previews."""
    from diffusers import FluxPipeline

    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                num_stages=num_stages, stage_factors=factors, max_sequence_length=16, lora_rank=4,
                                caption_dropout=0.0, steps_per_stage=[1] * num_stages, output_dir=str(tmp_path / "o"),
                                new_stage_init="x_embedder")
    task, dataset = build_flux_task(config)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    x = task.encode_images(batch["pixel_values"], sample=False)
    torch.manual_seed(0)
    out = task.objective(task.transformer, batch, latents=x)
    assert [tuple(t.shape[-2:]) for t in out.inputs][0] == (16, 16)  # stage 0 carried at the finest resolution
    carrier = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
    torch.testing.assert_close(task.decomposition.decompose(x)[0], carrier)
    flux = FluxPipeline.from_pretrained(flux_pipeline_dir)
    embeds, pooled, text_ids = flux.encode_prompt(batch["captions"], prompt_2=None, max_sequence_length=16)
    x_t = out.inputs[0].clone()  # FLUX reads the carrier plus the active later stages (new_stage_init x_embedder)
    for s, stage in enumerate(out.inputs[1:], start=1):
        active = (out.draw.num_active_stages > s).to(x_t.dtype).view(-1, 1, 1, 1)
        x_t += active * F.interpolate(stage, size=x_t.shape[-2:], mode="nearest")
    with torch.no_grad():
        packed = flux.transformer(
            hidden_states=FluxPipeline._pack_latents(x_t, 2, 4, 16, 16), encoder_hidden_states=embeds,
            pooled_projections=pooled, timestep=out.draw.sigmas[:, 0], guidance=torch.ones(2), txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, x.device, x.dtype), return_dict=False,
        )[0]
    torch.testing.assert_close(out.prediction[0].detach(), FluxPipeline._unpack_latents(packed, 32, 32, 2),
                               rtol=1e-4, atol=1e-5)
    optimizer = torch.optim.AdamW([p for p in task.transformer.parameters() if p.requires_grad], lr=1e-3)
    out.loss.backward()
    optimizer.step()
    images, previews = task.generate(task.transformer, ["a cat"])
    assert images.shape == (1, 3, R, R) and torch.isfinite(images).all()
    assert [p.shape[-1] for p in previews] == {2: [8, 32], 3: [8, 16, 32]}[num_stages]


def test_default_conversion_is_the_band_split_in_training_validation_and_export(flux_pipeline_dir, caption_dir,
                                                                               tmp_path):
    """The trainer converts with from_flux's default (band split): its task decomposes with the model's Haar pyramid,
    and the objective's stage-1 prediction has zero 2x2 block means (its head is projected onto the band)."""
    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                max_sequence_length=16, lora_rank=4, output_dir=str(tmp_path / "o"))
    task, dataset = build_flux_task(config)
    assert task.transformer.config.band_split and task.transformer.config.flux_timestep == "noise_rms"
    assert task.decomposition.upsampling_mode == "nearest"
    assert task.export_transformer(task.transformer).config.band_split
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    torch.manual_seed(0)
    out = task.objective(task.transformer, batch)
    assert F.avg_pool2d(out.prediction[1].detach().float(), 2).abs().max() < 1e-5
    assert out.prediction[1].detach().abs().max() > 0 or not (out.draw.num_active_stages > 1).any()


def test_conversion_scales_the_new_stage_input_projection_by_its_stage_scale(flux_pipeline_dir, caption_dir, tmp_path):
    """new_stage_init x_embedder: stage 1's input is band / scale_1, so its copy of FLUX's x_embedder is scaled by
    scale_1 (scales set after the conversion, as the trainer does) and FLUX reads the band in its own units."""
    from diffusers import FluxPipeline

    flux_w = FluxPipeline.from_pretrained(flux_pipeline_dir).transformer.x_embedder.weight.detach()
    for stage_scales, factor in ((None, 1.0), ([1.0, 0.25], 0.25)):
        config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                    max_sequence_length=16, lora=False, stage_scales=stage_scales,
                                    output_dir=str(tmp_path / "o"), new_stage_init="x_embedder")
        task, _ = build_flux_task(config)
        embed = task.transformer.stage_layers.patch_embedders[1].weight.detach().float()
        torch.testing.assert_close(embed, factor * flux_w.float())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(dataset="no/such-dataset"), "could not load"),
        (dict(dataset="NOCAPTIONS"), "no caption column"),
        (dict(caption_column="prompt_text"), "caption column 'prompt_text' not in"),
        (dict(resolution=30), "divisible by 4"),
        (dict(pretrained="IMAGES"), "model_index.json"),
        (dict(pretrained="DFM", num_stages=1), "2-stage DFMPipeline"),
        (dict(stage_factors=4, stage_upsampling="[1, 1]"), "fractional patch size"),
        (dict(weight_dtype="bfloat16"), "mixed_precision"),
        (dict(stage_weights="[1.0]"), "stage_weights"),
        (dict(stage_scales="[1.0, 0.5]"), "stage_scales: must stay unset with new_stage_init band_split"),
        (dict(stage_scales="standardize"), "auto_relative"),
        (dict(stage_scales="[1.0]"), "stage_scales"),
    ],
)
def test_bad_inputs_raise_before_training(overrides, match, flux_pipeline_dir, dfm_dir, caption_dir, tmp_path):
    no_captions = tmp_path / "no-captions"
    no_captions.mkdir()
    shutil.copy(caption_dir / "chelsea.png", no_captions / "chelsea.png")
    names = {"NOCAPTIONS": no_captions, "IMAGES": caption_dir, "DFM": dfm_dir}
    overrides = {k: names.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    kw = dict(pretrained=flux_pipeline_dir, dataset=caption_dir, out=tmp_path / "out")
    kw.update({k: overrides.pop(k) for k in ("pretrained", "dataset") if k in overrides})
    with pytest.raises(ValueError, match=match):
        train_dfm_flux.main(args(kw["pretrained"], kw["dataset"], kw["out"], max_train_steps=1, **overrides))
    assert not (tmp_path / "out" / "training_log.jsonl").exists() and not (tmp_path / "out" / "pipeline").exists()


def test_unknown_config_key_is_named_with_the_closest_key(flux_pipeline_dir, caption_dir, tmp_path):
    from dfm_diffusers.training.config import ConfigError

    with pytest.raises(ConfigError, match="lora_rnak: unknown setting \\(did you mean 'lora_rank'\\?\\)"):
        train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path, lora_rnak=4))


@pytest.mark.gpu
def test_bf16_lora_with_8bit_adam_and_checkpointing_on_gpu(flux_pipeline_dir, caption_dir, tmp_path):
    out = tmp_path / "gpu"
    result = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, out, max_train_steps=4, learning_rate=1e-2,
                                      mixed_precision="bf16", use_8bit_adam="true", gradient_checkpointing="true",
                                      validation_steps=2))
    trained = result["pipeline"].transformer
    assert trained.device.type == "cuda"
    assert trained.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trained.parameters() if p.requires_grad)
    assert (out / "samples" / "step_0000004.png").exists()
    loaded = DFMPipeline.from_pretrained(result["export_dir"], torch_dtype=torch.bfloat16).to("cuda")
    assert loaded.transformer.dtype == torch.bfloat16
    loaded.load_lora_weights(result["export_dir"])
    loaded.set_progress_bar_config(disable=True)
    images = loaded("a cat", generator=gen(), **SAMPLE).images
    assert torch.isfinite(images).all()
    full = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "gpu-full", lora="false",
                                    max_train_steps=2, mixed_precision="bf16", use_8bit_adam="true"))
    from safetensors.torch import load_file

    weights = load_file(os.path.join(full["export_dir"], "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())  # exported in weight_dtype


def test_cache_is_built_once_reused_without_encoders_and_invalidated(flux_pipeline_dir, caption_dir, tmp_path,
                                                                      monkeypatch):
    """cache_latents: the first run encodes every image and caption (+ the empty prompt, the validation prompt); a
    second run reads them and never calls the VAE encoder or a text encoder (patched to raise); a changed resolution
    or sequence length makes new latent / text entries; the cached loss equals the uncached one."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from dfm_diffusers.training.flux_cache import CachedCaptionedImages, FluxEmbeddingCache

    cache_dir = tmp_path / "cache"
    common = dict(cache_latents="true", cache_dir=cache_dir, max_train_steps=2, validation_steps=2)
    first = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "a", **common))
    cache = first["task"].cache
    assert isinstance(cache, FluxEmbeddingCache)
    latent_files = sorted(Path(cache.latent_dir).glob("*.safetensors"))
    text_files = sorted(Path(cache.text_dir).glob("*.safetensors"))
    assert len(latent_files) == len(IMAGES) and len(text_files) == len(set(IMAGES.values()) | {"", "a cat"})
    stamps = {p: p.stat().st_mtime_ns for p in latent_files + text_files}

    def refuse(*a, **k):
        raise AssertionError("an encoder ran although the cache is complete")

    with monkeypatch.context() as m:
        for cls in (CLIPTextModel, T5EncoderModel):
            m.setattr(cls, "forward", refuse)
        m.setattr(AutoencoderKL, "encode", refuse)
        second = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "b", **common))
    assert second["global_step"] == 2 and (tmp_path / "b" / "samples" / "step_0000002.png").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing rewritten
    task = second["task"]
    assert task.pipe.vae.device.type == "cpu" and task.pipe.text_encoder_2.device.type == "cpu"

    # cached items match the encoders: latents (posterior mean) and embeddings, and caption dropout's empty prompt
    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                max_sequence_length=16, lora_rank=4, output_dir=str(tmp_path / "c"),
                                cache_latents=True, cache_dir=str(cache_dir), validation_prompts=["a cat"],
                                caption_dropout=1.0)
    task, cached = build_flux_task(config)
    assert isinstance(cached, CachedCaptionedImages)
    plain = task.cache.dataset
    item = cached[1]
    x = task.encode_images(plain[1]["pixel_values"][None], sample=False)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.testing.assert_close(task.latents_from_distribution(DiagonalGaussianDistribution(item["latent_dist"][None]),
                                                              sample=False), x, rtol=1e-5, atol=1e-5)
    embeds, pooled, _ = task.encode_text([item["captions"]], "cpu")
    torch.testing.assert_close(item["prompt_embeds"][None], embeds, rtol=1e-5, atol=1e-6)
    batch = torch.utils.data.default_collate([cached[0], cached[1]])
    dropped, dropped_pooled, _ = task.cached_conditioning(batch, "cpu")  # caption_dropout 1.0: all empty
    empty, empty_pooled, _ = task.encode_text(["", ""], "cpu")
    torch.testing.assert_close(dropped, empty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dropped_pooled, empty_pooled, rtol=1e-5, atol=1e-6)
    # the cached loss equals the uncached one at the same draws
    task.config.caption_dropout = 0.0
    uncached = torch.utils.data.default_collate([plain[0], plain[1]])
    uncached["captions"] = batch["captions"]
    torch.manual_seed(3)
    loss_cached = task.objective(task.transformer, batch).loss
    torch.manual_seed(3)
    loss_plain = task.objective(task.transformer, uncached).loss
    torch.testing.assert_close(loss_cached, loss_plain, rtol=1e-4, atol=1e-5)

    # a changed resolution: new latent entries (the text ones are reused); a changed sequence length: new text ones
    config.resolution, config.caption_dropout = 16, 0.1
    other, _ = build_flux_task(config)
    assert other.cache.latent_dir != cache.latent_dir and other.cache.text_dir == cache.text_dir
    assert load_latent_shape(other.cache) == (8, 8, 8)
    config.resolution, config.max_sequence_length = R, 8
    other, _ = build_flux_task(config)
    assert other.cache.latent_dir == cache.latent_dir and other.cache.text_dir != cache.text_dir
    assert other.cache.text("")["prompt_embeds"].shape[0] == 8


def load_latent_shape(cache):
    from safetensors.torch import load_file

    return tuple(load_file(cache.latent_path(0))["latent_dist"].shape)


def test_cache_needs_fixed_pixels(flux_pipeline_dir, caption_dir, tmp_path):
    with pytest.raises(ValueError, match="random_flip: must be false with cache_latents"):
        train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path, cache_latents="true", random_flip="true"))


def test_vae_option_replaces_the_autoencoder_for_training_and_export(flux_pipeline_dir, caption_dir, tmp_path,
                                                                     tokenizer_dir):
    """--vae: another AutoencoderKL (here: other weights, scale and shift) encodes the training images, decodes the
    samples and is the one exported (whole folder) or named by the LoRA export (loaded back with it)."""
    from conftest import make_tiny_flux_components

    vae = make_tiny_flux_components(tokenizer_dir, seed=7)["vae"]
    vae.register_to_config(scaling_factor=0.7, shift_factor=-0.1)
    vae_dir = tmp_path / "other-vae"
    vae.save_pretrained(vae_dir)
    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(caption_dir), resolution=R,
                                max_sequence_length=16, lora_rank=4, vae=str(vae_dir), output_dir=str(tmp_path / "o"))
    task, dataset = build_flux_task(config)
    torch.testing.assert_close(task.pipe.vae.state_dict(), vae.state_dict(), rtol=0, atol=0)
    pixels = dataset[0]["pixel_values"][None]
    expected = (vae.encode(pixels).latent_dist.mode() - -0.1) * 0.7
    torch.testing.assert_close(task.encode_images(pixels, sample=False), expected, rtol=1e-5, atol=1e-6)

    full = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "full", vae=vae_dir, lora="false",
                                    max_train_steps=1))
    exported = DFMPipeline.from_pretrained(full["export_dir"]).vae
    torch.testing.assert_close(exported.state_dict(), vae.state_dict(), rtol=0, atol=0)
    assert exported.config.scaling_factor == 0.7
    lora = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "lora", vae=vae_dir, max_train_steps=1))
    loaded = DFMPipeline.from_lora_export(lora["export_dir"])
    torch.testing.assert_close(loaded.vae.state_dict(), vae.state_dict(), rtol=0, atol=0)

    other_channels = make_tiny_flux_components(tokenizer_dir)["vae"]
    other_channels.register_to_config(latent_channels=8)
    bad = tmp_path / "bad-vae"
    other_channels.save_pretrained(bad)
    with pytest.raises(ValueError, match="8 latent channels"):
        train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "bad", vae=bad, max_train_steps=1))


def test_validation_grids_are_logged_to_tensorboard_and_written_as_png(flux_pipeline_dir, caption_dir, tmp_path):
    """Each validation grid (stage previews + final images) goes to the tracker as an image, equal to the PNG."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, out, report_to="tensorboard", max_train_steps=2,
                             validation_steps=1))
    tag, logged = "validation/samples_with_stage_previews", {}
    for path in (out / "logs").rglob("events.out.tfevents*"):
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        if tag in events.Tags()["images"]:
            logged.update({e.step: e for e in events.Images(tag)})
    assert sorted(logged) == [1, 2]
    for step, event in logged.items():
        image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        png = np.asarray(Image.open(out / "samples" / f"step_{step:07d}.png").convert("RGB"))
        assert image.shape == png.shape and np.array_equal(image, png), step


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory):
    """Two 3:1 panoramas, two squares and one image smaller than every bucket, with captions."""
    import skimage
    from PIL import Image

    src = Path(skimage.__file__).parent / "data"
    root = tmp_path_factory.mktemp("buckets")
    images = {
        "wide1.png": Image.open(src / "astronaut.png").convert("RGB").resize((192, 64)),
        "wide2.png": Image.open(src / "coffee.png").convert("RGB").resize((195, 65)),
        "square1.png": Image.open(src / "chelsea.png").convert("RGB").resize((64, 64)),
        "square2.png": Image.open(src / "camera.png").convert("RGB").resize((48, 48)),
        "tiny.png": Image.open(src / "chelsea.png").convert("RGB").resize((8, 8)),
    }
    with open(root / "metadata.jsonl", "w") as f:
        for name, image in images.items():
            image.save(root / name)
            f.write(json.dumps({"file_name": name, "text": name[:-4]}) + "\n")
    return root


def test_aspect_buckets_train_each_image_at_its_own_shape(flux_pipeline_dir, bucket_dir, tmp_path, monkeypatch):
    """resolutions: the 3:1 images train at a 3:1 bucket (not a square crop), the squares at a square one, every
    batch from one bucket; the tiny image is skipped and counted (or upscaled with upscale_small_images);
    validation samples at a non-square size."""
    from dfm_diffusers.training.flux import FluxTask, build_flux_dataset

    shapes = []
    original = FluxTask.loss_fn

    def recording_loss(self, model, batch):
        shapes.append(tuple(batch["pixel_values"].shape))
        return original(self, model, batch)

    monkeypatch.setattr(FluxTask, "loss_fn", recording_loss)
    out = tmp_path / "buckets"
    result = train_dfm_flux.main(args(flux_pipeline_dir, bucket_dir, out, resolutions="[32]", max_train_steps=4,
                                      validation_sizes="[[16, 56]]", validation_steps=4))
    # sides in multiples of 4 (tiny VAE factor 2 x FLUX packing 2; the stage factor 2 fits inside), area ~ 32^2:
    # the 3:1 bucket is 20 x 56
    assert set(shapes) == {(2, 3, 20, 56), (2, 3, 32, 32)} and len(shapes) == 4
    assert "1 of 5 samples skipped" in result["bad_samples"]
    grid = Image_open(out / "samples" / "step_0000004_16x56.png")
    assert grid.width > 1.5 * grid.height  # one column, two rows (stage preview, final image) of 3.5:1 tiles

    config = FluxTrainingConfig(pretrained=str(flux_pipeline_dir), dataset=str(bucket_dir), resolution=R,
                                resolutions=[32], upscale_small_images=True)
    dataset = build_flux_dataset(config)
    assert len(dataset) == 5 and sorted(dataset.sizes).count((32, 32)) == 3
    wide = [i for i in range(len(dataset)) if dataset.sizes[i] == (20, 56)]
    assert len(wide) == 2 and dataset[wide[0]]["pixel_values"].shape == (3, 20, 56)

    # the cache holds each image's latent at its bucket's shape (VAE factor 2)
    config.cache_latents, config.output_dir, config.max_sequence_length = True, str(tmp_path / "c"), 16
    task, cached = build_flux_task(config)
    assert sorted(tuple(cached[i]["latent_dist"].shape) for i in range(5)) == \
        sorted([(8, 10, 28)] * 2 + [(8, 16, 16)] * 3)


def test_bucket_batches_are_one_bucket_each_cover_every_sample_and_depend_on_seed_and_epoch():
    from types import SimpleNamespace

    from dfm_diffusers.data.buckets import BucketBatchSampler

    buckets = [(1, 3)] * 5 + [(2, 2)] * 4
    epoch = SimpleNamespace(epoch=0)
    sampler = BucketBatchSampler(buckets, 2, seed=0, epoch_of=epoch)
    first = list(sampler)
    assert len(first) == len(sampler) == 5  # 3 + 2 batches, the last (1, 3) batch holds one
    assert sorted(i for b in first for i in b) == list(range(9))
    assert all(len({buckets[i] for i in b}) == 1 for b in first)
    assert list(sampler) == first  # same epoch, same batches (what an exact resume relies on)
    epoch.epoch = 1
    assert list(sampler) != first
    assert list(BucketBatchSampler(buckets, 2, seed=1, epoch_of=SimpleNamespace(epoch=0))) != first


def Image_open(path):
    from PIL import Image

    return Image.open(path)
