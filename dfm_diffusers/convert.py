"""Convert a FLUX pipeline (local folder or Hub id) into a DFMPipeline folder.

    python -m dfm_diffusers.convert --flux black-forest-labs/FLUX.1-dev --output ./flux-dfm \
        [--num-stages 2] [--stage-factors 2] [--steps-per-stage 30 10] [--stage-thresholds 0.1] \
        [--torch-dtype bfloat16] [--push-to-hub user/flux-dfm]

Stage 0 is carried at the full latent resolution and reuses FLUX's patch embedding, timestep embedder and output
head verbatim (paper appendix E, see DFMTransformer2DModel); later stages' heads start at zero (their input
projections at FLUX's x_embedder, --new-stage-init), so the converted model's stage 0 is FLUX's image,
block-averaged to stage 0's resolution. Any stage factors work
(--stage-factors 4: 256 -> 1024 px; --num-stages 3 --stage-factors 2 2).
"""

from __future__ import annotations

import argparse

import torch
from diffusers import FluxPipeline

from .pipelines.pipeline_dfm import DFMPipeline

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flux", required=True, help="FluxPipeline folder or Hub id")
    parser.add_argument("--output", required=True, help="folder to write the DFMPipeline to")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--stage-factors", type=int, nargs="+", default=[2])
    parser.add_argument("--steps-per-stage", type=int, nargs="+", default=None)
    parser.add_argument("--stage-thresholds", type=float, nargs="+", default=None, help="sigmas (1 - the paper's tau)")
    parser.add_argument("--new-stage-init", choices=["x_embedder", "zero"], default="x_embedder",
                        help="input projection of stages >= 1 (heads start at zero either way)")
    parser.add_argument("--coarse-phase-on-coarse-grid", action="store_true",
                        help="phase 0 as FLUX on stage 0's band at its own resolution (1/F^2 of the tokens, faster "
                             "sampling; docs/coarse_grid.md)")
    parser.add_argument("--torch-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    args = parser.parse_args(argv)

    factors = args.stage_factors[0] if len(args.stage_factors) == 1 else args.stage_factors
    flux = FluxPipeline.from_pretrained(args.flux, torch_dtype=DTYPES[args.torch_dtype], revision=args.revision)
    pipe = DFMPipeline.from_flux_pipeline(
        flux,
        num_stages=args.num_stages,
        stage_factors=factors,
        steps_per_stage=args.steps_per_stage,
        stage_thresholds=args.stage_thresholds,
        new_stage_init=args.new_stage_init,
        coarse_phase_on_coarse_grid=args.coarse_phase_on_coarse_grid,
    )
    pipe.save_pretrained(args.output)
    print(f"wrote DFMPipeline ({args.num_stages} stages) to {args.output}")
    if args.push_to_hub:
        repo = pipe.push_to_hub(args.push_to_hub, base_model=args.flux)
        print(f"pushed to https://huggingface.co/{repo}")
    return pipe


if __name__ == "__main__":
    main()
