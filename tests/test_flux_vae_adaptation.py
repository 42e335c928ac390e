"""Adapting FLUX to a new autoencoder: a VAE exported by `python -m dfm_diffusers.vae train` feeds
train_dfm_flux.py --vae, and patchify_only_steps trains only the patchification layers first (tiny models, CPU)."""

import os

import pytest
import torch
from safetensors.torch import load_file

from dfm_diffusers import DFMPipeline
from dfm_diffusers.data import FASHION_MNIST_DIR
from dfm_diffusers.training.config import ConfigError, load_config
from dfm_diffusers.training.flux import FluxTrainingConfig, patchify_parameter_names
from test_train_flux import args, converted_start, train_dfm_flux

PATCHIFY = ("stage_layers.patch_embedders.0.weight", "stage_layers.patch_embedders.0.bias",
            "stage_layers.heads.0.proj_out.weight", "stage_layers.heads.0.proj_out.bias")


@pytest.fixture(scope="module")
def equivariant_vae_dir(flux_pipeline_dir, tmp_path_factory):
    """The tiny FLUX pipeline's VAE after 2 steps of `python -m dfm_diffusers.vae train` (RGB Fashion-MNIST)."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("Fashion-MNIST is not available")
    from dfm_diffusers.vae.__main__ import main

    out = tmp_path_factory.mktemp("vae-adapt")
    result = main(["train", "--vae", str(flux_pipeline_dir), "--vae_subfolder", "vae", "--split", "test",
                   "--resolution", "32", "--max_samples", "8", "--train_batch_size", "4", "--diagnostic_images", "4",
                   "--validation_images", "2", "--report_to", "none", "--max_train_steps", "2",
                   "--checkpointing_steps", "0", "--validation_steps", "0", "--learning_rate", "1e-3",
                   "--output_dir", str(out)])
    return result["export_dir"]


def test_patchify_layers_are_x_embedder_and_proj_out_of_every_stage(tiny_flux_transformer):
    from dfm_diffusers.models.transformer_dfm_flux import DFMTransformer2DModel

    model = DFMTransformer2DModel.from_flux(tiny_flux_transformer, num_stages=2)
    expected = {f"stage_layers.{layer}.{p}" for s in (0, 1) for layer in (f"patch_embedders.{s}", f"heads.{s}.proj_out")
                for p in ("weight", "bias")}
    assert sorted(patchify_parameter_names(model)) == sorted(expected)
    with pytest.raises(ConfigError, match="patchify_only_steps: must be an integer >= 0"):
        load_config(FluxTrainingConfig, None, ["--pretrained", "x", "--dataset", "y", "--patchify_only_steps", "-1"])


def test_vae_train_export_loads_in_autoencoder_and_flux_trainer(equivariant_vae_dir, flux_pipeline_dir, caption_dir,
                                                                  tmp_path):
    """Item 3: the adapted VAE loads with AutoencoderKL.from_pretrained and with train_dfm_flux.py --vae, which
    encodes with it and exports it (here after a plain-FLUX adaptation run, num_stages 1, LoRA)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(equivariant_vae_dir)
    original = AutoencoderKL.from_pretrained(flux_pipeline_dir, subfolder="vae")
    assert vae.config.scaling_factor == original.config.scaling_factor
    assert vae.config.shift_factor == original.config.shift_factor
    assert not torch.equal(vae.decoder.conv_out.weight, original.decoder.conv_out.weight)  # it was trained

    result = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, tmp_path / "lora", vae=equivariant_vae_dir,
                                      num_stages=1, steps_per_stage="[2]", max_train_steps=2, patchify_only_steps=1,
                                      checkpointing_steps=1, checkpoints_total_limit="null", train_stage_layers="false",
                                      learning_rate=1e-2))
    torch.testing.assert_close(result["task"].pipe.vae.state_dict(), vae.state_dict(), rtol=0, atol=0)
    loaded = DFMPipeline.from_lora_export(result["export_dir"])
    torch.testing.assert_close(loaded.vae.state_dict(), vae.state_dict(), rtol=0, atol=0)

    # LoRA + patchify_only_steps: the patchification layers are trainable (even with train_stage_layers false) and
    # step 1 moves only them; the LoRA starts at step 2 (B is zero at init; A's first gradient is zero through B = 0)
    ckpt = tmp_path / "lora" / "checkpoints"
    first = load_file(ckpt / "checkpoint-1" / "trainable_parameters.safetensors")
    second = load_file(ckpt / "checkpoint-2" / "trainable_parameters.safetensors")
    start = converted_start(flux_pipeline_dir, num_stages=1)
    lora_b = [k for k in first if ".lora_B." in k]
    assert lora_b and set(first) == set(lora_b) | {k for k in first if ".lora_A." in k} | set(PATCHIFY)
    for name in PATCHIFY:
        assert not torch.equal(first[name], start[name]), name
    assert all(torch.count_nonzero(first[k]) == 0 for k in lora_b)
    assert all(torch.count_nonzero(second[k]) > 0 for k in lora_b)


@pytest.fixture(scope="module")
def adaptation_runs(equivariant_vae_dir, flux_pipeline_dir, caption_dir, tmp_path_factory):
    """Full finetunes of FLUX (num_stages 1) on the adapted VAE with patchify_only_steps 2 and weight decay: an
    uninterrupted 4-step run, and one stopped after step 1 (inside the phase), resumed to step 3 (past it), then
    resumed to step 4."""
    root = tmp_path_factory.mktemp("flux-adapt")
    common = dict(vae=equivariant_vae_dir, num_stages=1, steps_per_stage="[2]", lora="false",
                  patchify_only_steps=2, adam_weight_decay=0.1, learning_rate=1e-3, checkpointing_steps=1,
                  checkpoints_total_limit="null", validation_steps=0)
    full = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, root / "full", max_train_steps=4, **common))
    train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, root / "resumed", max_train_steps=1, **common))
    train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, root / "resumed", max_train_steps=3, resume="latest",
                             **common))
    resumed = train_dfm_flux.main(args(flux_pipeline_dir, caption_dir, root / "resumed", max_train_steps=4,
                                       resume="latest", **common))
    return root, full, resumed


def test_patchify_only_phase_then_everything(adaptation_runs, flux_pipeline_dir):
    root, full, _ = adaptation_runs
    assert full["global_step"] == 4
    start = converted_start(flux_pipeline_dir, num_stages=1)
    weights = {s: load_file(root / "full" / "checkpoints" / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4)}
    assert set(weights[2]) == set(start)
    for name in start:
        moved_in_phase = not torch.equal(weights[2][name], start[name])
        assert moved_in_phase == (name in PATCHIFY), name  # exactly equal, weight decay notwithstanding
        assert not torch.equal(weights[4][name], weights[2][name]), name


def test_resume_inside_and_after_the_phase_matches_the_uninterrupted_run(adaptation_runs):
    root, full, resumed = adaptation_runs
    assert resumed["global_step"] == 4
    for step in (2, 4):  # the phase boundary and the end
        a = load_file(root / "full" / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
        b = load_file(root / "resumed" / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["loss"] for r in resumed["log"]] == pytest.approx([r["loss"] for r in full["log"]], rel=1e-5)
