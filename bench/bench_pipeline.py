"""Wall time per image: FluxPipeline (40 steps) vs DFMPipeline (2 stages, 30 + 10 steps) on the full token grid and
with the coarse phase on the coarse grid, at stage factors 2 and 4, true CFG off and on.

    python bench/bench_pipeline.py --out <dir>                 # GPU: FLUX.1-dev config, bf16, 1024px
    python bench/bench_pipeline.py --small --device cpu --out <dir>

Random weights (FLUX.1-dev transformer config and FLUX VAE config), batch 1, text encoding excluded (every pipeline
gets the same precomputed prompt embeddings [1, 512, 4096] and pooled [1, 768]; with true CFG also the same
negative ones). The DFM transformers share FLUX's parameters (from_flux(share_weights=True)); their zero-initialised
stage layers are randomised so that every stage does real work. Arms:

- flux: FluxPipeline, 40 steps;
- dfm_f2 / dfm_f4: DFMPipeline 30 + 10, stage factor 2 / 4 (256 -> 1024 px), every step on the finest token grid;
- dfm_coarse_f2 / dfm_coarse_f4: the same with ``coarse_phase_on_coarse_grid`` (phase 0 as FLUX on the band's own
  grid: 1/4 resp. 1/16 of the image tokens; docs/coarse_grid.md).

Every arm makes the same number of transformer evaluations (40, or 80 with true CFG). Each (arm, CFG) cell: one
warm-up image, then the median of --repeats; each image includes the VAE decode. Resumable: results.json in --out is
rewritten after every cell and finished cells are skipped on a re-run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

from bench.bench_transformer import FLUX_DEV, SMALL, build_flux  # noqa: E402
from bench.common import (  # noqa: E402
    cpu_label, device_and_dtype, device_name, load_json, timed_call, versions, write_json,
)
from dfm_diffusers import DFMPipeline, DFMScheduler, DFMTransformer2DModel  # noqa: E402
from dfm_diffusers.utils import configure_attention_backends  # noqa: E402

FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
)
SMALL_VAE = dict(FLUX_VAE, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
#: arm -> (stage factor, coarse phase on the coarse grid); "flux" is FluxPipeline
ARMS = {"flux": None, "dfm_f2": (2, False), "dfm_f4": (4, False), "dfm_coarse_f2": (2, True),
        "dfm_coarse_f4": (4, True)}
TRUE_CFG_SCALE = 3.0


def dfm_transformer(flux_t, factor: int, coarse: bool, device, dtype) -> DFMTransformer2DModel:
    model = DFMTransformer2DModel.from_flux(flux_t, num_stages=2, stage_factors=factor, share_weights=True)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero stage-1 layers so both stages do real work
        for p in model.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.set_coarse_phase_on_coarse_grid(coarse).to(device=device, dtype=dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny transformer and VAE (a sanity run anywhere)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; --small: 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps-per-stage", type=int, nargs=2, default=[30, 10])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--cfg", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help=f"true CFG off (1 evaluation per step) and/or on (scale {TRUE_CFG_SCALE}, 2 per step)")
    args = parser.parse_args(argv)
    device, dtype = device_and_dtype(args.device)
    configure_attention_backends()
    tcfg, vcfg = (SMALL, SMALL_VAE) if args.small else (FLUX_DEV, FLUX_VAE)
    res = args.resolution or (128 if args.small else 1024)
    text_len = 32 if args.small else 512
    steps = list(args.steps_per_stage)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pipeline_results.json")
    results = load_json(path, {"cells": {}})
    results.update(
        device=device_name(device, cpu_label()), **versions(), resolution=res, small=args.small,
        steps={"flux": sum(steps), "dfm": steps}, true_cfg_scale=TRUE_CFG_SCALE, repeats=args.repeats,
    )

    def save():
        write_json(path, results)

    flux_t = build_flux(tcfg, device, dtype, seed=0)
    vae = AutoencoderKL(**vcfg).to(device=device, dtype=dtype).eval()
    common = dict(vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    flux = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), transformer=flux_t, **common)
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = [torch.randn(1, text_len, tcfg["joint_attention_dim"], device=device, dtype=dtype, generator=gen)
              for _ in range(2)]
    pooled = [torch.randn(1, tcfg["pooled_projection_dim"], device=device, dtype=dtype, generator=gen)
              for _ in range(2)]

    for arm in args.arms:
        todo = [c for c in args.cfg if f"{arm}|cfg_{c}" not in results["cells"]]
        if not todo:
            continue
        if ARMS[arm] is None:
            pipe = flux
        else:
            factor, coarse = ARMS[arm]
            pipe = DFMPipeline(
                scheduler=DFMScheduler.from_flow_match(flux.scheduler, num_stages=2, steps_per_stage=steps),
                transformer=dfm_transformer(flux_t, factor, coarse, device, dtype), **common,
            )
        pipe.set_progress_bar_config(disable=True)
        for cfg in todo:
            call = dict(prompt_embeds=embeds[0], pooled_prompt_embeds=pooled[0], height=res, width=res,
                        output_type="pt")
            if cfg == "on":
                call.update(negative_prompt_embeds=embeds[1], negative_pooled_prompt_embeds=pooled[1],
                            true_cfg_scale=TRUE_CFG_SCALE)
            if ARMS[arm] is None:
                call["num_inference_steps"] = sum(steps)
            else:
                call["steps_per_stage"] = steps

            def generate():
                out = pipe(generator=torch.Generator(device).manual_seed(1), **call)
                assert torch.isfinite(out.images).all()
                return out

            def run():
                return timed_call(generate, device)[0]

            run()  # warm-up
            times = [run() for _ in range(args.repeats)]
            results["cells"][f"{arm}|cfg_{cfg}"] = {"seconds_per_image": statistics.median(times), "runs": times}
            print(f"{arm} cfg {cfg}: {statistics.median(times):.3f} s / image", flush=True)
            save()
        if pipe is not flux:
            del pipe
            if device.type == "cuda":
                torch.cuda.empty_cache()

    cells = results["cells"]
    ratios = {}
    for key, cell in cells.items():
        arm, cfg = key.split("|")
        if arm != "flux" and f"flux|{cfg}" in cells:
            ratios[key] = cells[f"flux|{cfg}"]["seconds_per_image"] / cell["seconds_per_image"]
    results["speedup_over_flux"] = ratios
    save()
    print("| pipeline | true CFG | steps | s / image (median) | speed-up over FluxPipeline |\n|---|---|---|---|---|")
    for key, cell in cells.items():
        arm, cfg = key.split("|")
        steps_text = str(sum(steps)) if arm == "flux" else f"{steps[0]}+{steps[1]}"
        speedup = "1" if arm == "flux" else (f"{ratios[key]:.3f}" if key in ratios else "-")
        print(f"| {arm} | {cfg[4:]} | {steps_text} | {cell['seconds_per_image']:.3f} | {speedup} |")


if __name__ == "__main__":
    main()
