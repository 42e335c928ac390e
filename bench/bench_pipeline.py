"""Wall time per image: DFMPipeline (2 stages, 30 + 10 steps) vs FluxPipeline (40 steps).

    python bench/bench_pipeline.py --out <dir>                 # GPU: FLUX.1-dev config, bf16, 1024px
    python bench/bench_pipeline.py --small --device cpu --out <dir>

Random weights (FLUX.1-dev transformer config and FLUX VAE config), batch 1, text encoding excluded (both
pipelines get the same precomputed prompt embeddings [1, 512, 4096] and pooled [1, 768]). The DFM transformer
shares FLUX's parameters (from_flux(share_weights=True)). Alternates FLUX and DFM after a warm-up and reports
the median of --repeats; each image includes the VAE decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

from bench.bench_transformer import FLUX_DEV, SMALL, build_flux  # noqa: E402
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-stage", type=int, nargs=2, default=[30, 10])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configure_attention_backends()
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
    flux = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), transformer=flux_t, **common)
    steps = list(args.steps_per_stage)
    dfm = DFMPipeline(
        scheduler=DFMScheduler.from_flow_match(flux.scheduler, num_stages=2, steps_per_stage=steps),
        transformer=dfm_t,
        **common,
    )
    dfm_f4_t = DFMTransformer2DModel.from_flux(flux_t, num_stages=2, stage_factors=4, share_weights=True)
    with torch.no_grad():
        for p in dfm_f4_t.stage_layers.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    dfm_f4 = DFMPipeline(  # 256 -> 1024 px (stage factor 4)
        scheduler=DFMScheduler.from_flow_match(flux.scheduler, num_stages=2, steps_per_stage=steps),
        transformer=dfm_f4_t.to(device=device, dtype=dtype).eval(),
        **common,
    )
    for p in (flux, dfm, dfm_f4):
        p.set_progress_bar_config(disable=True)
    gen = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(1, text_len, tcfg["joint_attention_dim"], device=device, dtype=dtype, generator=gen)
    pooled = torch.randn(1, tcfg["pooled_projection_dim"], device=device, dtype=dtype, generator=gen)
    call = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=res, width=res, output_type="pt")

    def run(name):
        sync(device)
        t0 = time.perf_counter()
        if name == "flux":
            out = flux(num_inference_steps=sum(steps), generator=torch.Generator(device).manual_seed(1), **call)
        else:
            pipe = dfm if name == "dfm" else dfm_f4
            out = pipe(steps_per_stage=steps, generator=torch.Generator(device).manual_seed(1), **call)
        sync(device)
        assert torch.isfinite(out.images).all()
        return time.perf_counter() - t0

    names = ("flux", "dfm", "dfm_f4")
    for name in names:  # warm-up
        run(name)
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(run(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "resolution": res,
        "steps": {"flux": sum(steps), "dfm": steps},
        "seconds_per_image": {k: round(v, 4) for k, v in med.items()},
        "all_runs": times,
        "ratio_dfm_over_flux": round(med["dfm"] / med["flux"], 4),
        "ratio_dfm_f4_over_flux": round(med["dfm_f4"] / med["flux"], 4),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pipeline_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("| pipeline | steps | s / image (median) |\n|---|---|---|")
    print(f"| FluxPipeline | {sum(steps)} | {med['flux']:.3f} |")
    print(f"| DFMPipeline | {steps[0]}+{steps[1]} | {med['dfm']:.3f} |")
    print(f"| DFMPipeline 256->1024 (factor 4) | {steps[0]}+{steps[1]} | {med['dfm_f4']:.3f} |")
    print(f"ratio DFM / FLUX = {result['ratio_dfm_over_flux']:.4f}, "
          f"256->1024: {result['ratio_dfm_f4_over_flux']:.4f}")


if __name__ == "__main__":
    main()
