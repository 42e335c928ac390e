"""quantize_base (QLoRA): the FLUX blocks' frozen linear layers in bitsandbytes int8 / nf4 under the LoRA.

bitsandbytes 0.50 runs 8-bit and 4-bit Linear forward and backward on the CPU (torch fallbacks), so everything runs
here on tiny models; the bf16 / CUDA path is the ``gpu`` test.
"""

import sys

import pytest
import torch

from dfm_diffusers import DFMPipeline
from dfm_diffusers.training.config import ConfigError, config_problems, load_config
from dfm_diffusers.training.flux import FluxTrainingConfig, build_flux_task, train_flux
from dfm_diffusers.training.quantize import QUANTIZED_FLUX_BLOCKS, quantize_frozen_blocks
from test_train_flux import R, SAMPLE, gen

bnb = pytest.importorskip("bitsandbytes")

# Relative L2 error of the tiny converted model's per-stage velocities, quantized vs bf16-free float32 base, measured
# (seed 0): int8 5e-4, nf4 1.2e-2. A single nf4 layer's output error is ~9% (NF4 has 16 levels per 64-weight block);
# through the residual blocks the velocity moves less. The bounds leave ~4x margin and still catch a wrong
# weight / scale (errors of order 1).
OUTPUT_TOLERANCE = {"int8": 0.005, "nf4": 0.05}
# Per-layer weight reconstruction (dequantized vs original, relative L2): int8 rounds to 1/127 of the row's absmax,
# NF4 to one of 16 levels of the block's absmax.
WEIGHT_TOLERANCE = {"int8": 0.01, "nf4": 0.15}


def tiny_dfm_transformer():
    """A converted 2-stage tiny DFM transformer (float32, eval) whose zero-initialised stage-1 layers are randomized,
    so both stages' outputs depend on the blocks."""
    from conftest import make_tiny_flux_transformer

    from dfm_diffusers.models.transformer_dfm_flux import DFMTransformer2DModel

    torch.manual_seed(0)
    model = DFMTransformer2DModel.from_flux(make_tiny_flux_transformer(0), num_stages=2)
    with torch.no_grad():
        for p in model.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def model_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=[torch.randn(batch, 4, 16, 16, generator=g) for _ in range(2)],
        encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, 2, generator=g), num_active_stages=torch.tensor([2] * batch),
        guidance=torch.ones(batch), txt_ids=torch.zeros(8, 3), return_dict=False,
    )


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantized(layer) -> torch.Tensor:
    from diffusers.quantizers.bitsandbytes.utils import dequantize_bnb_weight

    return dequantize_bnb_weight(layer.weight, getattr(layer, "state", None), torch.float32)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_blocks_are_quantized_stage_layers_are_not_and_outputs_stay_close(mode):
    reference = tiny_dfm_transformer()
    model = tiny_dfm_transformer()
    expected = {f"{b}.{n}" for b in QUANTIZED_FLUX_BLOCKS for n, m in getattr(model, b).named_modules()
                if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in expected}
    replaced = quantize_frozen_blocks(model, mode, torch.float32)

    # (a) every linear layer of the blocks, and only those, is a bitsandbytes layer holding 8 / 4-bit weights
    assert set(replaced) == expected and len(expected) == 20
    layer_type, weight_dtype = (bnb.nn.Linear8bitLt, torch.int8) if mode == "int8" else (bnb.nn.Linear4bit, torch.uint8)
    for name, module in model.named_modules():
        if name in expected:
            assert type(module) is layer_type and module.weight.dtype == weight_dtype, name
            if mode == "nf4":  # two 4-bit values per byte
                assert module.weight.numel() * 2 == originals[name].numel()
                assert module.weight.quant_state.quant_type == "nf4"
            assert relative_error(dequantized(module), originals[name]) < WEIGHT_TOLERANCE[mode], name
        elif isinstance(module, torch.nn.Linear):  # stage layers, text / timestep embedders
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32, name
    assert any(n.startswith("stage_layers.") for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    assert getattr(model, f"is_loaded_in_{'8' if mode == 'int8' else '4'}bit")

    # (b) the quantized model's velocities at init are close to the unquantized model's (and not identical)
    with torch.no_grad():
        want = reference(**model_inputs())[0]
        got = model(**model_inputs())[0]
    for s in range(2):
        error = relative_error(got[s], want[s])
        assert 1e-6 < error < OUTPUT_TOLERANCE[mode], (s, error)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_prepare_trainable_puts_peft_bnb_lora_on_the_quantized_layers_and_backpropagates(mode):
    from peft.tuners.lora import bnb as peft_bnb

    from dfm_diffusers.training.flux import prepare_trainable

    model = tiny_dfm_transformer()
    config = FluxTrainingConfig(quantize_base=mode, lora_rank=4)
    counts = prepare_trainable(config, model, device="cpu")
    lora_type = peft_bnb.Linear8bitLt if mode == "int8" else peft_bnb.Linear4bit
    targets = [n for n, m in model.named_modules() if n.split(".")[-1] in ("to_q", "add_q_proj", "to_add_out")]
    assert targets and all(type(model.get_submodule(n)) is lora_type for n in targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("stage_layers.")}
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # one backward through the quantized layers: gradients on exactly the trainable parameters (B starts at zero, so
    # the LoRA's nonzero gradient is B's)
    model.train()
    sum(v.square().mean() for v in model(**model_inputs())[0]).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().max() > 0 for name, param in model.named_parameters() if ".lora_B." in name)


def qlora_config(pretrained, dataset, out, **overrides):
    settings = dict(pretrained=str(pretrained), dataset=str(dataset), output_dir=str(out), resolution=R,
                    train_batch_size=2, max_sequence_length=16, report_to="none", checkpointing_steps=0,
                    validation_steps=0, validation_prompts=["a cat"], steps_per_stage=[2, 2], lora_rank=4,
                    quantize_base="nf4", stage_weights=[0.5, 0.5], caption_dropout=0.0)
    return FluxTrainingConfig(**{**settings, **overrides})


def test_quantize_base_settings_are_checked(flux_pipeline_dir, caption_dir, tmp_path, monkeypatch):  # noqa: F811
    config = qlora_config(flux_pipeline_dir, caption_dir, tmp_path, lora=False, fuse_lora_on_export=True)
    problems = config_problems(config)
    assert any(p.startswith("quantize_base: needs lora: true") for p in problems), problems
    assert any(p.startswith("fuse_lora_on_export: must be false with quantize_base") for p in problems), problems
    assert config_problems(qlora_config(flux_pipeline_dir, caption_dir, tmp_path)) == []
    required = ["--pretrained", str(flux_pipeline_dir), "--dataset", str(caption_dir), "--resolution", str(R)]
    with pytest.raises(ConfigError, match=r"quantize_base: must be one of 'int8', 'nf4'"):
        load_config(FluxTrainingConfig, None, required + ["--quantize_base", "int4"])
    assert load_config(FluxTrainingConfig, None, required + ["--quantize_base", "int8"]).quantize_base == "int8"

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importlib.util.find_spec then reports it missing
    problems = config_problems(qlora_config(flux_pipeline_dir, caption_dir, tmp_path))
    assert problems == ["quantize_base: needs bitsandbytes (pip install 'bitsandbytes>=0.50,<0.51')"]
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.49.1")
    assert config_problems(qlora_config(flux_pipeline_dir, caption_dir, tmp_path)) == [
        "quantize_base: needs bitsandbytes >= 0.50 (installed: 0.49.1)"]
    with pytest.raises(ConfigError, match="needs bitsandbytes >= 0.50"):  # build_flux_task checks before loading
        build_flux_task(qlora_config(flux_pipeline_dir, caption_dir, tmp_path))


def mean_loss(task, model, batch, seeds=range(2)) -> float:
    """The DFM loss on ``batch``, averaged over fixed draws (stage, sigmas, noise, VAE sample) per seed."""
    losses = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            losses.append(task.objective(model, batch).loss.item())
    return sum(losses) / len(losses)


def test_qlora_trains_lora_and_stage_layers_and_exports_for_the_unquantized_base(
    flux_pipeline_dir, caption_dir, tmp_path  # noqa: F811
):
    config = qlora_config(flux_pipeline_dir, caption_dir, tmp_path / "run", max_train_steps=12, learning_rate=1e-2)
    start_task, dataset = build_flux_task(config)  # the same seeded start train_flux builds
    start = {k: v.clone() for k, v in start_task.transformer.state_dict().items()}
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    result = train_flux(config)
    task, trained = result["task"], result["pipeline"].transformer.eval()

    # (c) only the LoRA and the stage layers moved; the 4-bit weights and their statistics are bit-identical
    assert type(trained.transformer_blocks[0].attn.to_q.base_layer) is bnb.nn.Linear4bit
    state = trained.state_dict()
    assert state.keys() == start.keys() and any(".absmax" in k for k in state)
    for key, value in state.items():
        if ".lora_B." in key:
            assert value.abs().max() > 0, key
        elif not (".lora_A." in key or key.startswith("stage_layers.")):
            assert torch.equal(value, start[key]), key
    assert not torch.equal(state["stage_layers.heads.1.proj_out.weight"], start["stage_layers.heads.1.proj_out.weight"])
    assert all(p.dtype == torch.float32 for p in trained.parameters() if p.requires_grad)
    start_loss = mean_loss(start_task, start_task.transformer.eval(), batch)
    trained_loss = mean_loss(task, trained, batch)
    assert trained_loss < 0.85 * start_loss, (start_loss, trained_loss)  # measured: 0.72-0.74 per draw
    assert "nf4-quantized base (QLoRA)" in (tmp_path / "run" / "pipeline" / "README.md").read_text()

    # (d) the LoRA export loads onto the unquantized float32 base and predicts what the quantized model predicts, up to
    # the quantization error, while the training moved the predictions by far more than that
    loaded_pipe = DFMPipeline.from_lora_export(result["export_dir"])
    loaded = loaded_pipe.transformer.eval()
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in loaded.modules())
    assert loaded.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float32

    def with_and_without_lora(model):
        with torch.no_grad():
            out = model(**model_inputs())[0]
            model.disable_adapters()
            without = model(**model_inputs())[0]
            model.enable_adapters()
        return out, without

    quantized_out, quantized_without_lora = with_and_without_lora(trained)
    loaded_out, loaded_without_lora = with_and_without_lora(loaded)
    for s in range(2):
        # measured: 0.9% (the nf4 base's own error at init is 1.2%)
        assert relative_error(loaded_out[s], quantized_out[s]) < OUTPUT_TOLERANCE["nf4"], s
        # the LoRA moves the unquantized base's velocities as it moves the quantized base's (measured: 2.3% of the
        # velocity, the two moves agreeing to 11%; a LoRA left out or scaled wrongly differs by ~100%)
        lora_effect = loaded_out[s] - loaded_without_lora[s]
        assert lora_effect.norm() > 0.005 * loaded_out[s].norm(), s
        assert relative_error(lora_effect, quantized_out[s] - quantized_without_lora[s]) < 0.25, s
    loaded_pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(loaded_pipe("a cat", generator=gen(), **SAMPLE).images).all()


@pytest.mark.gpu
def test_nf4_qlora_in_bf16_with_8bit_adam_and_checkpointing_on_gpu(
    flux_pipeline_dir, caption_dir, tmp_path  # noqa: F811
):
    config = qlora_config(flux_pipeline_dir, caption_dir, tmp_path / "gpu", max_train_steps=4, learning_rate=1e-2,
                          mixed_precision="bf16", use_8bit_adam=True, gradient_checkpointing=True, validation_steps=2)
    result = train_flux(config)
    trained = result["pipeline"].transformer
    layer = trained.transformer_blocks[0].attn.to_q.base_layer
    assert type(layer) is bnb.nn.Linear4bit and layer.weight.device.type == "cuda"
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.quant_state.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trained.parameters() if p.requires_grad)
    assert (tmp_path / "gpu" / "samples" / "step_0000004.png").exists()
    loaded = DFMPipeline.from_lora_export(result["export_dir"], torch_dtype=torch.bfloat16).to("cuda")
    assert loaded.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    loaded.set_progress_bar_config(disable=True)
    assert torch.isfinite(loaded("a cat", generator=gen(), **SAMPLE).images).all()
