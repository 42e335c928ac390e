"""FLUX.1-dev finetuning at real scale (issue 11): peak memory, step time and MFU of train_dfm_flux's own code paths.

    python bench/bench_flux_finetune.py --out <dir> --modes full lora16 lora64 lora16_fm full_fm   # GPU
    python bench/bench_flux_finetune.py --out <dir> --modes lora16 --batches 1 2 4 8 --checkpointing both  # batch
    python bench/bench_flux_finetune.py --out <dir> --small --device cpu --modes lora16 full       # sanity run

Every (mode, batch, checkpointing) arm writes <dir>/<mode>_b<batch>[_nockpt].json when it finishes and is skipped
when that file exists: rerunning a stopped command goes on where it stopped. An arm that runs out of GPU memory
records ``"oom": true`` (and where: the bare or the trainer step).

Random weights at the FLUX.1-dev configuration (no weights exist offline; memory and time are the same). Each mode
runs in its own process (clean peak memory). What is run is the trainer's code, not a re-implementation:
  - the pipeline: DFMTransformer2DModel.from_flux (FLUX.1-dev config), the FLUX VAE, T5-XXL and CLIP-L (random, bf16)
    with small tokenizers (T5 still pads to 512 tokens, so its cost is the real one);
  - the cache: ``build_flux_cache`` on ``--images`` synthetic 1024px JPEGs with captions (datasets' imagefolder
    layout), timed: images/s; and the uncached per-step cost it removes (VAE encode + T5/CLIP encode of one batch);
  - the trainer step: ``run_training`` (accelerate, bf16 autocast, the DFM objective, gradient clipping, the
    configured optimizer) on the cached data; the median of the per-step times after ``--warmup`` steps;
  - the bare step: the same model and optimizer, one forward of all stages + MSE + backward + optimizer step, no
    objective, no loop (the issue's reference: the trainer step should be within 1.10x of it);
  - MFU: model FLOPs (3 x the forward's, counted by torch.utils.flop_counter; recomputation not counted) / bare-step
    time / 989 TFLOP/s (H100/H200 dense bf16).
Modes: full (full finetune, 8-bit AdamW, gradient checkpointing), lora16 / lora64 (LoRA rank 16 / 64 on the bf16
base, gradient checkpointing), qlora_nf4 / qlora_int8 (``quantize_base``, when the trainer has it), and *_fm (the
same with ``num_stages 1``: plain FLUX finetuning). ``--checkpointing off`` trains without gradient checkpointing
(more memory, no recomputation). Prints a markdown table: peak memory, s/step, samples/s, MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_and_dtype, repeat_timed, timed_call, use_test_harness, write_json  # noqa: E402
from bench_transformer import FLUX_DEV, SMALL, build_flux, random_init_  # noqa: E402

use_test_harness()

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
SMALL_VAE = dict(FLUX_VAE, block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
MODES = {
    "full": dict(lora=False, use_8bit_adam=True, num_stages=2),
    "full_fm": dict(lora=False, use_8bit_adam=True, num_stages=1),
    "lora16": dict(lora=True, lora_rank=16, num_stages=2),
    "lora16_fm": dict(lora=True, lora_rank=16, num_stages=1),
    "lora64": dict(lora=True, lora_rank=64, num_stages=2),
    "qlora_nf4": dict(lora=True, lora_rank=16, num_stages=2, quantize_base="nf4"),
    "qlora_int8": dict(lora=True, lora_rank=16, num_stages=2, quantize_base="int8"),
}
PEAK_TFLOPS = 989.0
PHASE = ["setup"]  # what run_mode is doing (recorded with an out-of-memory error)


def build_on(device, dtype, make):
    """A transformers / diffusers model made on the meta device, then materialized randomly on ``device``."""
    with torch.device("meta"):
        model = make()
    model = torch.nn.Module.to(model, dtype).to_empty(device=device)
    random_init_(model, 0)  # (transformers' own init is slow at 4.7B parameters and not needed for timing)
    for name, buffer in model.named_buffers():  # e.g. CLIP's position ids
        if "position_ids" in name:
            buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
    return model.eval()


def write_images(folder: str, n: int, size: int):
    """``n`` random-texture JPEGs of ``size`` px with captions (metadata.jsonl)."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            name = f"img{i:04d}.jpg"
            if not os.path.isfile(os.path.join(folder, name)):
                small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BICUBIC).save(os.path.join(folder, name), quality=90)
            f.write(json.dumps({"file_name": name, "text": f"a photo of texture number {i}"}) + "\n")


def run_mode(args, mode: str) -> dict:
    import diffusers
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    from conftest import make_tiny_tokenizers
    from dfm_diffusers import DFMPipeline, DFMScheduler, DFMTransformer2DModel
    from dfm_diffusers.training.flux import (
        FluxTask, FluxTrainingConfig, build_flux_cache, build_flux_dataset, prepare_trainable,
    )
    from dfm_diffusers.training.loop import make_optimizer, run_training
    from dfm_diffusers.utils import configure_attention_backends

    settings = dict(MODES[mode])
    num_stages = settings.pop("num_stages")
    device, dtype = device_and_dtype(args.device)
    cuda = device.type == "cuda"
    configure_attention_backends()
    tcfg = SMALL if args.small else FLUX_DEV
    res = args.resolution
    data_dir = os.path.join(args.out, "data")
    write_images(data_dir, args.images, res)
    config = FluxTrainingConfig(
        output_dir=os.path.join(args.out, "runs", mode), pretrained=f"random/flux-dev-config{'-small' if args.small else ''}",
        dataset=data_dir, resolution=res, train_batch_size=args.batch, max_train_steps=args.warmup + args.steps,
        mixed_precision="bf16" if cuda else "no", gradient_checkpointing=args.checkpointing == "on",
        checkpointing_steps=0,
        validation_steps=0, report_to="none", log_every=1, learning_rate=1e-5, cache_latents=True,
        cache_dir=os.path.join(args.out, "cache"), cache_batch_size=args.cache_batch, caption_dropout=0.1,
        weight_dtype="bfloat16" if cuda else "float32", max_sequence_length=512 if not args.small else 32,
        **settings,
    )
    result = dict(mode=mode, num_stages=num_stages, resolution=res, batch=args.batch,
                  gradient_checkpointing=config.gradient_checkpointing, **settings)

    torch.manual_seed(0)
    flux = build_flux(tcfg, device, dtype, seed=0)
    transformer = DFMTransformer2DModel.from_flux(flux, num_stages=num_stages, share_weights=True).to(device, dtype)
    del flux
    vae = AutoencoderKL(**(SMALL_VAE if args.small else FLUX_VAE)).to(device, dtype).eval()
    os.makedirs(os.path.join(args.out, "tokenizers"), exist_ok=True)
    tokenizers = make_tiny_tokenizers(os.path.join(args.out, "tokenizers"))
    need_text = not os.path.isfile(os.path.join(args.out, "cache", "complete"))
    text_encoder = text_encoder_2 = None
    if need_text:
        clip = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=32) if args.small else CLIP_L
        t5 = dict(T5_XXL, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4) if args.small else T5_XXL
        text_encoder = build_on(device, dtype, lambda: CLIPTextModel(CLIPTextConfig(**clip)))
        text_encoder_2 = build_on(device, dtype, lambda: T5EncoderModel(T5Config(**t5)))
    pipe = DFMPipeline(
        scheduler=DFMScheduler(num_stages=num_stages), vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "clip"), text_encoder_2=text_encoder_2,
        tokenizer_2=T5Tokenizer.from_pretrained(tokenizers / "t5"), transformer=transformer,
    )
    counts = prepare_trainable(config, transformer, device=device)  # (quantize_base: the trainer's QLoRA path)
    result.update(trainable_params=counts["trainable"], total_params=counts["total"])
    task = FluxTask(config, pipe)
    dataset = build_flux_dataset(config)

    if need_text:  # the cache build, timed, and the per-step encoding it saves
        pixels = torch.stack([dataset[i]["pixel_values"] for i in range(args.batch)]).to(device)
        captions = [dataset[i]["captions"] for i in range(args.batch)]
        (saved,), _ = repeat_timed(lambda: (task.encode_images(pixels), task.encode_text(captions, device)), device,
                                   repeats=1, warmup=1)
        result["uncached_encode_s_per_step"] = saved
        elapsed, dataset = timed_call(lambda: build_flux_cache(task, dataset), device)
        result.update(cache_images=args.images, cache_build_s=elapsed, cache_images_per_s=args.images / elapsed)
        open(os.path.join(args.out, "cache", "complete"), "w").close()
        task.pipe.text_encoder = task.pipe.text_encoder_2 = None
        del text_encoder, text_encoder_2
    else:
        dataset = build_flux_cache(task, dataset)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # the bare step: all stages active, fixed inputs, MSE, backward, optimizer step
    batch = [dataset[i] for i in range(args.batch)]
    latents = task.latents_from_distribution(
        DiagonalGaussianDistribution(torch.stack([b["latent_dist"] for b in batch]).to(device)))
    bands = task.decomposition.decompose(latents)
    embeds = torch.stack([b["prompt_embeds"] for b in batch]).to(device)
    pooled = torch.stack([b["pooled_prompt_embeds"] for b in batch]).to(device)
    b = latents.shape[0]
    sigmas = torch.full((b, num_stages), 0.5, device=device)
    inputs = [0.5 * x + 0.5 * torch.randn_like(x) for x in bands]
    call = dict(hidden_states=inputs, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigmas,
                num_active_stages=torch.full((b,), num_stages, device=device), txt_ids=torch.zeros(embeds.shape[1], 3,
                device=device), guidance=torch.ones(b, device=device))
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = make_optimizer([p for p in transformer.parameters() if p.requires_grad], config,
                               fused=cuda and not config.use_8bit_adam)  # (as the trainer's default on CUDA)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def bare_step():
        with autocast:
            out = transformer(**call).sample
        loss = sum(torch.nn.functional.mse_loss(o.float(), x) for o, x in zip(out, bands))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    PHASE[0] = "bare step"
    times, _ = repeat_timed(bare_step, device, args.steps, warmup=args.warmup)
    result["bare_step_s"] = statistics.median(times)
    result["bare_step_runs"] = times
    if cuda:
        result["bare_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    with torch.no_grad(), autocast, torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        transformer(**call)
    result["model_tflop_per_step"] = 3 * counter.get_total_flops() / 1e12
    result["mfu"] = result["model_tflop_per_step"] / result["bare_step_s"] / PEAK_TFLOPS
    del optimizer
    for p in transformer.parameters():
        p.grad = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # the trainer step (the shared loop; gradient checkpointing, optimizer and autocast as configured)
    PHASE[0] = "trainer step"
    config.resume_from_checkpoint = None
    train = run_training(config, transformer, dataset, task.loss_fn)
    per_step = [1 / row["it_per_s"] for row in train["log"] if row["step"] > args.warmup]
    result["trainer_step_s"] = statistics.median(per_step)
    result["trainer_step_runs"] = per_step
    if cuda:
        result["trainer_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["device"] = torch.cuda.get_device_name(device)
    result["trainer_over_bare"] = result["trainer_step_s"] / result["bare_step_s"]
    result["trainer_mfu"] = result["model_tflop_per_step"] / result["trainer_step_s"] / PEAK_TFLOPS
    result["samples_per_s"] = args.batch / result["trainer_step_s"]
    result.update(torch=torch.__version__, diffusers=diffusers.__version__)
    return result


def arm_name(mode: str, batch: int, checkpointing: str) -> str:
    return f"{mode}_b{batch}" + ("" if checkpointing == "on" else "_nockpt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", nargs="+", default=["full", "lora16", "lora64", "lora16_fm", "full_fm"],
                        choices=list(MODES))
    parser.add_argument("--small", action="store_true", help="tiny configs and 64px (sanity run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes, one arm each")
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="on",
                        help="gradient checkpointing (both: one arm each)")
    parser.add_argument("--images", type=int, default=64, help="synthetic images in the cache build")
    parser.add_argument("--cache-batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--in-process", action="store_true", help="run the single given arm in this process")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or (64 if args.small else 1024)
    os.makedirs(args.out, exist_ok=True)
    if args.in_process:
        (mode,), (args.batch,) = args.modes, args.batches
        try:
            result = run_mode(args, mode)
        except torch.OutOfMemoryError as err:  # recorded: the batch does not fit
            result = dict(mode=mode, batch=args.batch, gradient_checkpointing=args.checkpointing == "on", oom=True,
                          where=PHASE[0], error=str(err)[:400])
        write_json(os.path.join(args.out, arm_name(mode, args.batch, args.checkpointing) + ".json"), result)
        return
    rows = []
    checkpointing = ["on", "off"] if args.checkpointing == "both" else [args.checkpointing]
    for mode in args.modes:
        for ckpt in checkpointing:
            for batch in args.batches:
                path = os.path.join(args.out, arm_name(mode, batch, ckpt) + ".json")
                if not os.path.isfile(path):
                    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--device", args.device,
                           "--in-process", "--modes", mode, "--batches", str(batch), "--checkpointing", ckpt,
                           *(["--small"] if args.small else [])]
                    for name in ("resolution", "images", "cache_batch", "warmup", "steps"):
                        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
                    code = subprocess.call(cmd)
                    if code != 0 or not os.path.isfile(path):
                        print(f"{arm_name(mode, batch, ckpt)}: failed (exit {code})", flush=True)
                        continue
                with open(path) as f:
                    rows.append(json.load(f))
    print("\n| mode | stages | batch | ckpt | trainable M | trainer peak GiB | trainer s/step | samples/s | bare s/step "
          "| trainer / bare | MFU (bare) | MFU (trainer) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['mode']} | | {r['batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | | out of memory "
                  f"({r['where']}) | | | | | | |")
            continue
        print(f"| {r['mode']} | {r['num_stages']} | {r['batch']} | {'on' if r['gradient_checkpointing'] else 'off'} "
              f"| {r['trainable_params'] / 1e6:.1f} | {r.get('trainer_peak_gib', 0):.1f} | {r['trainer_step_s']:.3f} "
              f"| {r['samples_per_s']:.2f} | {r['bare_step_s']:.3f} | {r['trainer_over_bare']:.3f} | {r['mfu']:.1%} "
              f"| {r['trainer_mfu']:.1%} |")
    by_arm = {(r["mode"], r["batch"], r.get("gradient_checkpointing")): r for r in rows if not r.get("oom")}
    for (mode, batch, ckpt), r in by_arm.items():
        fm = by_arm.get((f"{mode}_fm", batch, ckpt))
        if fm:
            print(f"DFM / FM trainer step, {mode} batch {batch} gradient checkpointing {'on' if ckpt else 'off'}: "
                  f"{r['trainer_step_s'] / fm['trainer_step_s']:.4f}")
    for r in rows:
        if "cache_images_per_s" in r:
            print(f"cache build: {r['cache_images_per_s']:.2f} images/s ({r['cache_images']} images, batch "
                  f"{args.cache_batch}); uncached encoding per step: {r['uncached_encode_s_per_step']:.3f} s")


if __name__ == "__main__":
    main()
