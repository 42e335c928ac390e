"""Official DFM-SiT / SiT / REPA checkpoints -> DFMDiTPipeline, checked against the official code's own outputs.

The fixtures in tests/data/official/ were made by running the official model and sampler code (snap-research/elit,
willisma/SiT) on tiny random-weight models (see tests/data/official/README.md); these tests convert the saved
official checkpoints with our converter and must reproduce the saved official outputs to float32 rounding
(|ours - official| <= 1e-6 + 1e-6 |official|).
"""

import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from dfm_diffusers import DFMDiTPipeline, DFMDiTTransformer2DModel, convert_official_checkpoint
from dfm_diffusers.models.official_sit import load_official_checkpoint, time_reversal_matrix, transformer_from_official
from dfm_diffusers.pipelines.official import official_model_card

DATA = os.path.join(os.path.dirname(__file__), "data", "official")
DFM_CKPT = os.path.join(DATA, "dfm_sit_tiny.pt")
REPA_CKPT = os.path.join(DATA, "sit_repa_tiny.pt")
SIT_CKPT = os.path.join(DATA, "sit_original_tiny.pt")
TOL = dict(rtol=1e-6, atol=1e-6)
# after a guided step: uncond + w (cond - uncond) carries (1 + 2w) times each output's float32 rounding (w = 3 here;
# the official sampler also keeps its state in float64, this pipeline in the latents' float32)
TOL_CFG = dict(rtol=1e-6, atol=2e-6)


@pytest.fixture(scope="module")
def official():
    return load_file(os.path.join(DATA, "official_outputs.safetensors"))


@pytest.fixture(scope="module")
def dfm_pipe():
    pipe = convert_official_checkpoint(DFM_CKPT, "elit-dfm", num_heads=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def repa_pipe():
    pipe = convert_official_checkpoint(REPA_CKPT, "repa", num_heads=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL with the SD VAE's latent layout (4 channels, x 0.18215, no shift)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
    path = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(path)
    return path


def record_inputs(pipe, batch):
    """Wrap pipe.transformer.forward to record every call's (per-stage inputs of the first ``batch`` samples, i.e.
    the conditional half under CFG, sigmas, number of active stages)."""
    calls = []
    forward = pipe.transformer.forward

    def recording(hidden_states, timestep, num_active_stages, class_labels, **kwargs):
        calls.append(([x[:batch].clone() for x in hidden_states], timestep[0].clone(), int(num_active_stages[0])))
        return forward(hidden_states, timestep, num_active_stages, class_labels, **kwargs)

    pipe.transformer.forward = recording
    return calls, forward


# ------------------------------------------------------------------------------------------- DFM-SiT, the model
def test_dfm_sit_per_stage_velocities_match_the_official_forward(dfm_pipe, official):
    model = dfm_pipe.transformer
    x = [official["dfm.x0"], official["dfm.x1"]]
    y = official["dfm.y"]  # includes the null class 1000
    with torch.no_grad():
        # only stage 0 active: stage 1's input is zeroed but its patch bias and its sigma-1 timestep embedding are
        # still added, as in the official forward
        partial = model(x, official["dfm.t_partial"], torch.ones(3, dtype=torch.long), y).sample
        full = model(x, official["dfm.t_full"], torch.full((3,), 2), y).sample
    torch.testing.assert_close(partial[0], official["dfm.out_partial.0"], **TOL)
    assert partial[1].abs().max() == 0  # an inactive stage's output is zero here (the official one is never used)
    for s in range(2):
        torch.testing.assert_close(full[s], official[f"dfm.out_full.{s}"], **TOL)
    # the pieces that make it exact: raw time embedding, no stage-index embedding
    assert model.config.timestep_scale == 1.0 and model.stage_layers.stage_embedding.weight.abs().max() == 0


def test_training_checkpoint_weights_choice_and_config(official):
    ema, args = load_official_checkpoint(DFM_CKPT)
    raw, _ = load_official_checkpoint(DFM_CKPT, weights="model")
    assert args["model"] == "DFM-SiT-tiny" and args["num_steps_per_scale"] == [40, 10]
    different = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert len(different) == 1  # the fixture's "model" weights differ from "ema" in one tensor
    model = transformer_from_official(raw, "elit-dfm", args, num_heads=2)
    with torch.no_grad():
        out = model([official["dfm.x0"], official["dfm.x1"]], official["dfm.t_full"], torch.full((3,), 2),
                    official["dfm.y"]).sample
    assert (out[0] - official["dfm.out_full.0"]).abs().max() > 1e-2  # not the weights the official outputs used
    config = model.config
    assert (config.num_stages, config.patch_size, config.stage_factors, config.sample_size) == (2, 2, 2, 8)
    sizes = (config.num_layers, config.num_attention_heads, config.attention_head_dim, config.mlp_ratio)
    assert sizes == (2, 2, 8, 2.0)
    assert model.stage_layers.patch_sizes == [1, 2]


# ------------------------------------------------------------------------------------------- DFM-SiT, the sampler
def test_dfm_sit_official_evaluation_sampler(dfm_pipe, official):
    """steps [40, 10], threshold 0.1, Euler, cfg 1: same sigma table, same final (recomposed) latent."""
    sched = dfm_pipe.scheduler
    assert sched.config.steps_per_stage == [40, 10] and sched.config.stage_thresholds == [0.1]
    noise = [official["dfm.sample.noise0"], official["dfm.sample.noise1"]]
    out = dfm_pipe(official["dfm.sample.y"], latents=[n.clone() for n in noise], output_type="latent").images
    torch.testing.assert_close(sched.sigmas[:-1], official["dfm.sample.eval.times"], rtol=0, atol=1e-8)
    torch.testing.assert_close(out, official["dfm.sample.eval.latent"], **TOL)


def test_dfm_sit_sampler_with_cfg_and_guidance_interval_step_by_step(dfm_pipe, official):
    """steps [6, 4], threshold 0.25, cfg 3 inside the guidance interval [0.2, 0.7] (per stage, by its own sigma):
    every step's model inputs and active stages, and the final per-stage latents, are the official sampler's."""
    from dfm_diffusers import DFMScheduler

    scheduler = dfm_pipe.scheduler
    dfm_pipe.scheduler = DFMScheduler(num_stages=2, steps_per_stage=[6, 4], stage_thresholds=[0.25])
    calls, forward = record_inputs(dfm_pipe, 2)
    try:
        noise = [official["dfm.sample.noise0"], official["dfm.sample.noise1"]]
        out = dfm_pipe(official["dfm.sample.y"], latents=[n.clone() for n in noise], output_type="latent",
                       guidance_scale=3.0, guidance_interval=(0.2, 0.7)).images
    finally:
        dfm_pipe.transformer.forward = forward
        dfm_pipe.scheduler = scheduler
    assert len(calls) == 10
    torch.testing.assert_close(torch.stack([c[1] for c in calls]), official["dfm.sample.cfg.times"], rtol=0, atol=1e-8)
    assert [c[2] for c in calls] == official["dfm.sample.cfg.drop_masks"].sum(-1).long().tolist()
    for s in range(2):
        torch.testing.assert_close(torch.stack([c[0][s] for c in calls]), official[f"dfm.sample.cfg.inputs{s}"], **TOL)
    torch.testing.assert_close(out, official["dfm.sample.cfg.latent"], **TOL_CFG)


# ------------------------------------------------------------------------------------------- SiT / REPA
def test_repa_sit_forward_and_samplers(repa_pipe, official):
    model = repa_pipe.transformer
    assert model.config.num_stages == 1 and model.config.timestep_scale == 1.0
    with torch.no_grad():
        out = model([official["sit.x"]], official["sit.t"][:, None], torch.ones(3, dtype=torch.long),
                    official["sit.y"]).sample[0]
    torch.testing.assert_close(out, official["sit.out"], **TOL)
    y, noise = official["sit.sample.y"], official["sit.sample.noise"]
    assert repa_pipe.scheduler.config.steps_per_stage == [50]
    out = repa_pipe(y, latents=[noise.clone()], output_type="latent").images
    torch.testing.assert_close(out, official["sit.sample.eval.latent"], **TOL)

    from dfm_diffusers import DFMScheduler

    scheduler = repa_pipe.scheduler
    repa_pipe.scheduler = DFMScheduler(num_stages=1, steps_per_stage=[8])
    calls, forward = record_inputs(repa_pipe, 2)
    try:  # REPA's guidance: cfg 1.8 for t <= 0.7
        out = repa_pipe(y, latents=[noise.clone()], output_type="latent", guidance_scale=1.8,
                        guidance_interval=(0.0, 0.7)).images
    finally:
        repa_pipe.transformer.forward = forward
        repa_pipe.scheduler = scheduler
    sigmas = torch.stack([c[1][0] for c in calls])
    torch.testing.assert_close(sigmas, official["sit.sample.cfg.times"], rtol=0, atol=1e-8)
    torch.testing.assert_close(torch.stack([c[0][0] for c in calls]), official["sit.sample.cfg.inputs"], **TOL)
    torch.testing.assert_close(out, official["sit.sample.cfg.latent"], **TOL_CFG)


def test_repa_projectors_dropped_and_legacy_block_names(repa_pipe, official):
    state, args = load_official_checkpoint(REPA_CKPT)
    assert any(k.startswith("projectors.") for k in state)
    # REPA's legacy layout: blocks after the REPA layer (encoder_depth 1) are named decoder_blocks.i
    legacy = {("decoder_blocks.0" + k[len("blocks.1"):] if k.startswith("blocks.1.") else k): v
              for k, v in state.items()}
    legacy = {"module." + k: v for k, v in legacy.items()}
    model = transformer_from_official(legacy, "repa", args, num_heads=2)
    for a, b in zip(model.state_dict().values(), repa_pipe.transformer.state_dict().values()):
        assert torch.equal(a, b)
    # the ELIT repository's SiT is the same module: --from elit-sit gives the same weights
    elit = transformer_from_official(state, "elit-sit", args, num_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(elit.state_dict().values(), model.state_dict().values()))


def test_original_sit_time_reversal_and_learned_sigma_folded_into_the_weights(official):
    """willisma/SiT: t = 1 - sigma, output = data - noise = -velocity, 8 output channels of which 4 are kept."""
    state, args = load_official_checkpoint(SIT_CKPT)
    assert args == {} and state["final_layer.linear.weight"].shape[0] == 2 * 2 * 8
    model = transformer_from_official(state, "sit", args, num_heads=2)
    assert model.config.num_classes == 10 and model.out_channels == 4
    with torch.no_grad():
        out = model([official["orig.x"]], (1 - official["orig.t"])[:, None], torch.ones(3, dtype=torch.long),
                    official["orig.y"]).sample[0]
    torch.testing.assert_close(-out, official["orig.out"], **TOL)


def test_time_reversal_matrix_is_exact_in_float64():
    import math

    half = 128
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).double()
    s = torch.rand(257, dtype=torch.float64)

    def emb(t):
        return torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], -1)

    torch.testing.assert_close(emb(s) @ time_reversal_matrix().T, emb(1 - s), rtol=0, atol=1e-12)


def test_timestep_scale_only_rescales_sigma():
    torch.manual_seed(0)
    kw = dict(sample_size=8, in_channels=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
              num_classes=3, patch_size=2, num_stages=2)
    a = DFMDiTTransformer2DModel(**kw).eval()
    assert a.config.timestep_scale == 1000.0  # the default keeps DiT's x1000
    b = DFMDiTTransformer2DModel(**kw, timestep_scale=1.0).eval()
    b.load_state_dict(a.state_dict())
    x = [torch.randn(2, 2, 4, 4), torch.randn(2, 2, 8, 8)]
    sigma = torch.rand(2, 2)
    with torch.no_grad():
        for p in a.parameters():  # random heads so that the outputs depend on sigma
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
        b.load_state_dict(a.state_dict())
        args = (torch.full((2,), 2), torch.tensor([0, 3]))
        torch.testing.assert_close(a(x, sigma, *args).sample[1], b(x, sigma * 1000, *args).sample[1])
    with pytest.raises(ValueError, match="timestep_scale"):
        DFMDiTTransformer2DModel(**kw, timestep_scale=0)


# ------------------------------------------------------------------------------------------- loading safely
class NotAllowed:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_runs_no_pickled_code(tmp_path):
    state, args = load_official_checkpoint(REPA_CKPT)
    bad = tmp_path / "bad.pt"
    torch.save({"ema": state, "args": argparse.Namespace(model="SiT-XL/2"), "extra": NotAllowed()}, bad)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*NotAllowed.*allow-list"):
        load_official_checkpoint(str(bad))

    class Exploit:  # unpickling this would run os.system
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"ema": state, "payload": Exploit()}, evil)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_official_checkpoint(str(evil))
    assert not (tmp_path / "pwned").exists()
    with open(tmp_path / "junk.pt", "wb") as f:
        pickle.dump([1, 2], f)
        f.write(b"garbage")
    with pytest.raises(ValueError, match="junk.pt"):
        load_official_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="no such checkpoint"):
        load_official_checkpoint(str(tmp_path / "missing.pt"))


def test_wrong_source_and_unsupported_checkpoints_fail_clearly(tmp_path):
    state, args = load_official_checkpoint(DFM_CKPT)
    with pytest.raises(ValueError, match="DFM-SiT checkpoint.*--from elit-dfm"):
        transformer_from_official(state, "elit-sit", args, num_heads=2)
    sit_state, sit_args = load_official_checkpoint(REPA_CKPT)
    with pytest.raises(ValueError, match="not a DFM-SiT checkpoint"):
        transformer_from_official(sit_state, "elit-dfm", sit_args, num_heads=2)
    with pytest.raises(ValueError, match="--from repa or --from elit-sit"):
        transformer_from_official(sit_state, "sit", sit_args, num_heads=2)
    with pytest.raises(ValueError, match="path_type='cosine'"):
        transformer_from_official(sit_state, "repa", {**sit_args, "path_type": "cosine"}, num_heads=2)
    with pytest.raises(ValueError, match="ELIT's latent-interface"):
        transformer_from_official(sit_state, "elit-sit", {**sit_args, "model": "ELIT-SiT-XL/2"}, num_heads=2)
    with pytest.raises(ValueError, match="--num-heads"):
        transformer_from_official(sit_state, "repa", sit_args)
    with pytest.raises(ValueError, match="does not know"):
        transformer_from_official({**sit_state, "latent_tokens": torch.zeros(3)}, "repa", sit_args, num_heads=2)
    with pytest.raises(ValueError, match="pos_embed"):
        transformer_from_official({**sit_state, "pos_embed": sit_state["pos_embed"] + 1}, "repa", sit_args, num_heads=2)


# ------------------------------------------------------------------------------------------- the pipeline folder
def test_convert_command_writes_the_pipeline_with_vae_classes_and_card(tmp_path, official, sd_vae_dir):
    from dfm_diffusers.convert import main

    out = tmp_path / "dfm-sit"
    main(["dit", "--from", "elit-dfm", DFM_CKPT, "--output", str(out), "--vae", str(sd_vae_dir), "--num-heads", "2"])
    pipe = DFMDiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.vae_reference == "stabilityai/sd-vae-ft-ema" and pipe.vae.config.scaling_factor == 0.18215
    assert pipe.get_label_ids(["tench", "golden retriever"]) == [0, 207]
    assert pipe.scheduler.config.steps_per_stage == [40, 10]
    noise = [official["dfm.sample.noise0"], official["dfm.sample.noise1"]]
    latent = pipe(official["dfm.sample.y"], latents=[n.clone() for n in noise], output_type="latent").images
    torch.testing.assert_close(latent, official["dfm.sample.eval.latent"], **TOL)
    named = pipe(["golden retriever"], latents=[n[:1].clone() for n in noise], output_type="pt").images
    assert named.shape == (1, 3, 16, 16)
    decoded = pipe.vae.decode(pipe(207, latents=[n[:1].clone() for n in noise], output_type="latent").images
                              / 0.18215).sample
    torch.testing.assert_close(named, (decoded / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)

    card = (out / "README.md").read_text()
    for text in ["license: other", "license_name: snap-non-commercial", "Snap Inc. Non-Commercial License",
                 "snap-research/elit", "steps per stage [40, 10]", "stage thresholds [0.1]", "dfm_sit_tiny.pt",
                 "FID 18.74", "sd-vae-ft-ema"]:
        assert text in card, text


def test_pipeline_without_vae_records_it_and_refuses_to_decode(dfm_pipe, tmp_path):
    assert dfm_pipe.vae is None and dfm_pipe.config.vae_reference == "stabilityai/sd-vae-ft-ema"
    with pytest.raises(ValueError, match="sd-vae-ft-ema.*output_type='latent'"):
        dfm_pipe(class_labels=[1], output_type="pil")
    dfm_pipe.save_pretrained(tmp_path / "p")
    loaded = DFMDiTPipeline.from_pretrained(tmp_path / "p")
    assert loaded.config.vae_reference == "stabilityai/sd-vae-ft-ema" and loaded.get_label_ids("goldfish") == [1]
    with pytest.raises(ValueError, match="unknown class name"):
        loaded.get_label_ids("unicorn")
    card = official_model_card(dfm_pipe, "elit-dfm", DFM_CKPT)
    assert "not included" in card


def test_model_cards_state_source_license_and_official_settings(repa_pipe):
    repa = official_model_card(repa_pipe, "repa", REPA_CKPT, repo_id="me/repa")
    assert "license: mit" in repa and "sihyun-yu/REPA" in repa and "guidance_interval=(0.0, 0.7)" in repa
    assert "guidance_scale=1.8" in repa and "SDE" in repa and "me/repa" in repa
    sit = convert_official_checkpoint(SIT_CKPT, "sit", num_heads=2)
    assert sit.config.id2label is None  # 10 classes: not ImageNet
    card = official_model_card(sit, "sit", SIT_CKPT)
    assert "willisma/SiT" in card and "MIT" in card and "3 of the 4 latent channels" in card


def test_vae_with_other_latent_scaling_is_refused(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(latent_channels=4, block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, scaling_factor=0.3611)
    with pytest.raises(ValueError, match="0.18215"):
        convert_official_checkpoint(DFM_CKPT, "elit-dfm", vae=vae, num_heads=2)
    with pytest.raises(ValueError, match="could not load the VAE.*--vae none"):
        convert_official_checkpoint(DFM_CKPT, "elit-dfm", vae=str(tmp_path / "no-vae"), num_heads=2)


def test_convert_command_push_to_hub_and_one_clear_error(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from dfm_diffusers.convert import main

    seen = {}

    class Repo:
        repo_id = "me/dfm-sit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())

    def upload(self, repo_id, folder_path, **kw):
        seen["repo"] = repo_id
        seen["files"] = sorted(os.listdir(folder_path))
        seen["card"] = open(os.path.join(folder_path, "README.md")).read()

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    main(["dit", "--from", "elit-dfm", DFM_CKPT, "--output", str(tmp_path / "p"), "--vae", "none", "--num-heads", "2",
          "--steps-per-stage", "30", "10", "--push-to-hub", "dfm-sit"])
    assert seen["repo"] == "me/dfm-sit" and "model_index.json" in seen["files"] and "vae" not in seen["files"]
    assert 'DFMDiTPipeline.from_pretrained("me/dfm-sit")' in seen["card"] and "steps per stage [30, 10]" in seen["card"]
    with pytest.raises(SystemExit) as exit_info:
        main(["dit", "--from", "sit", DFM_CKPT, "--output", str(tmp_path / "q"), "--vae", "none"])
    assert exit_info.value.code == 2
    assert "error: this is a DFM-SiT checkpoint" in capsys.readouterr().err and not (tmp_path / "q").exists()
