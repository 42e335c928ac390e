"""What diffusers' inference caches buy on DFMPipeline vs FluxPipeline: speed and drift from the uncached output.

    python bench/bench_caches.py --out <dir>                        # GPU: FLUX.1-dev config, bf16, 1024px
    python bench/bench_caches.py --small --device cpu --out <dir>   # smoke run

Same set-up as bench/bench_pipeline.py (random weights in the FLUX.1-dev transformer and VAE configs, batch 1,
precomputed prompt embeddings, VAE decode included; FluxPipeline 40 steps, DFMPipeline 30 + 10 sharing FLUX's
parameters). Every arm (cache x pipeline) is timed as the median of --repeats after one warm-up and compared with
the same pipeline's uncached image on the same seed: max and mean |difference| (images in [0, 1]) and PSNR (dB).
One JSON line per arm is appended to <out>/cache_results.jsonl as soon as it finishes; a re-run skips the arms
already there (resumable). With random weights the drift says how much a cache changes a computation, not how an
image of a trained model looks.

Cache settings (diffusers' documented FLUX settings where there are some): PAB on the double and single blocks,
skip range (100, 800), every 2nd step; FasterCache guidance-distilled (FLUX-dev), skip range (-1, 681); FirstBlockCache
threshold 0.08; TaylorSeer defaults; MagCache with FLUX's ratios (not calibrated for DFM's trajectory); TextKVCache
(exact). PAB and FasterCache follow ``pipe.current_timestep``, which for DFM is the newest active stage's timestep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import AutoencoderKL, FasterCacheConfig, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers import PyramidAttentionBroadcastConfig  # noqa: E402
from diffusers.hooks import (  # noqa: E402
    FirstBlockCacheConfig,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS  # noqa: E402

from bench.bench_pipeline import FLUX_SCHEDULER, FLUX_VAE, SMALL_VAE  # noqa: E402
from bench.bench_transformer import FLUX_DEV, SMALL, build_flux  # noqa: E402
from bench.common import (  # noqa: E402
    append_jsonl, device_and_dtype, device_name, done_keys, read_jsonl, repeat_timed, versions,
)
from dfm_diffusers import DFMPipeline, DFMScheduler, DFMTransformer2DModel  # noqa: E402
from dfm_diffusers.utils import configure_attention_backends  # noqa: E402

CACHES = ("none", "pab", "faster", "first_block", "taylorseer", "magcache", "text_kv")


def cache_config(name: str, pipe, num_steps: int):
    timestep = lambda: pipe.current_timestep  # noqa: E731
    if name == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=["transformer_blocks", "single_transformer_blocks"],
            current_timestep_callback=timestep,
        )
    if name == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            spatial_attention_block_identifiers=["transformer_blocks", "single_transformer_blocks"],
            is_guidance_distilled=True, current_timestep_callback=timestep,
        )
    if name == "first_block":
        return FirstBlockCacheConfig(threshold=0.08)
    if name == "taylorseer":
        return TaylorSeerCacheConfig()
    if name == "magcache":
        return MagCacheConfig(num_inference_steps=num_steps, mag_ratios=FLUX_MAG_RATIOS)
    if name == "text_kv":
        return TextKVCacheConfig()
    raise ValueError(name)


def drift(image: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (image.float() - reference.float()).abs()
    mse = float((diff ** 2).mean())
    return {"max_abs": round(float(diff.max()), 5), "mean_abs": round(float(diff.mean()), 6),
            "psnr_db": round(10 * math.log10(1.0 / mse), 2) if mse > 0 else float("inf")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-stage", type=int, nargs=2, default=[30, 10])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.device)
    configure_attention_backends()
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "cache_results.jsonl")
    done = done_keys(results_path, lambda row: (row["cache"], row["pipeline"]))

    tcfg, vcfg = (SMALL, SMALL_VAE) if args.small else (FLUX_DEV, FLUX_VAE)
    res = args.resolution or (64 if args.small else 1024)
    text_len = 32 if args.small else 512
    flux_t = build_flux(tcfg, device, dtype, seed=0)
    dfm_t = DFMTransformer2DModel.from_flux(flux_t, num_stages=2, share_weights=True)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero stage-1 layers so both stages do real work
        for p in dfm_t.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    dfm_t = dfm_t.to(device=device, dtype=dtype).eval()
    vae = AutoencoderKL(**vcfg).to(device=device, dtype=dtype).eval()
    common = dict(vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    steps = list(args.steps_per_stage)
    pipes = {
        "flux": FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), transformer=flux_t, **common),
        "dfm": DFMPipeline(scheduler=DFMScheduler.from_flow_match(
            FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), num_stages=2, steps_per_stage=steps),
            transformer=dfm_t, **common),
    }
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(1, text_len, tcfg["joint_attention_dim"], device=device, dtype=dtype, generator=gen)
    pooled = torch.randn(1, tcfg["pooled_projection_dim"], device=device, dtype=dtype, generator=gen)
    call = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=res, width=res, output_type="pt",
                num_inference_steps=sum(steps))

    references = {}
    for cache in ["none"] + [c for c in args.caches if c != "none"]:
        for name, pipe in pipes.items():
            if cache != "none" and (cache, name) in done:
                continue
            if cache != "none":
                pipe.transformer.enable_cache(cache_config(cache, pipe, sum(steps)))
            try:
                times, image = repeat_timed(  # one warm-up, then --repeats timed images
                    lambda: pipe(generator=torch.Generator(device).manual_seed(1), **call).images, device,
                    args.repeats, warmup=1)
            finally:
                if cache != "none":
                    pipe.transformer.disable_cache()
            if cache == "none":
                references[name] = image
            row = {"cache": cache, "pipeline": name, "seconds_per_image": round(statistics.median(times), 4),
                   "all_runs": [round(t, 4) for t in times], **drift(image, references[name]),
                   "device": device_name(device, platform.processor()), **versions(),
                   "resolution": res, "steps": steps if name == "dfm" else sum(steps)}
            if (cache, name) not in done:
                append_jsonl(results_path, row)
                done.add((cache, name))
            print(json.dumps(row), flush=True)

    rows = {(r["cache"], r["pipeline"]): r for r in read_jsonl(results_path)}
    print("| cache | FLUX s / image | speed-up | PSNR vs uncached | DFM s / image | speed-up | PSNR vs uncached |")
    print("|---|---|---|---|---|---|---|")
    for cache in CACHES:
        cells = []
        for name in ("flux", "dfm"):
            r, base = rows.get((cache, name)), rows.get(("none", name))
            if r is None or base is None:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{r['seconds_per_image']:.3f}", f"{base['seconds_per_image'] / r['seconds_per_image']:.2f}x",
                      f"{r['psnr_db']}"]
        print(f"| {cache} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
