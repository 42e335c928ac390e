"""Convert models into DFM pipeline folders.

FLUX (local folder or Hub id) -> DFMPipeline:

    python -m dfm_diffusers.convert [flux] --flux black-forest-labs/FLUX.1-dev --output ./flux-dfm \
        [--num-stages 2] [--stage-factors 2] [--steps-per-stage 30 10] [--stage-thresholds 0.1] \
        [--torch-dtype bfloat16] [--self-contained] [--push-to-hub user/flux-dfm]

Stage 0 is carried at the full latent resolution and reuses FLUX's patch embedding, timestep embedder and output
head verbatim (paper appendix E, see DFMTransformer2DModel); by default (--new-stage-init band_split) later stages
reuse them too, split into bands, so the converted model samples like FLUX before any finetuning. Any stage factors
work (--stage-factors 4: 256 -> 1024 px; --num-stages 3 --stage-factors 2 2). --self-contained writes the library's
code next to the weights (local folder and pushed repo), so plain diffusers loads them with trust_remote_code=True.

An official DFM-SiT / SiT / REPA checkpoint -> DFMDiTPipeline with the official model's outputs
(docs/official_checkpoints.md):

    python -m dfm_diffusers.convert dit --from {elit-dfm,elit-sit,repa,sit} CHECKPOINT --output DIR \
        [--vae stabilityai/sd-vae-ft-ema | PATH | none] [--push-to-hub user/dfm-sit-xl-2-512]
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dit"]:
        return main_dit(argv[1:])
    if argv[:1] == ["flux"]:
        argv = argv[1:]
    return main_flux(argv)


def main_flux(argv):
    from diffusers import FluxPipeline

    from .models.transformer_dfm_flux import NEW_STAGE_INITS
    from .pipelines.pipeline_dfm import DFMPipeline

    parser = argparse.ArgumentParser(
        prog="python -m dfm_diffusers.convert [flux]", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--flux", required=True, help="FluxPipeline folder or Hub id")
    parser.add_argument("--output", required=True, help="folder to write the DFMPipeline to")
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--stage-factors", type=int, nargs="+", default=[2])
    parser.add_argument("--steps-per-stage", type=int, nargs="+", default=None)
    parser.add_argument("--stage-thresholds", type=float, nargs="+", default=None, help="sigmas (1 - the paper's tau)")
    parser.add_argument("--new-stage-init", choices=list(NEW_STAGE_INITS), default="band_split",
                        help="how stages >= 1 start: band_split (default: the converted model samples like FLUX; "
                        "Haar pyramid, FLUX's input projection and head split into bands), x_embedder or zero "
                        "(their heads start at zero: the detail band keeps its noise)")
    parser.add_argument("--coarse-phase-on-coarse-grid", action="store_true",
                        help="phase 0 as FLUX on stage 0's band at its own resolution (1/F^2 of the tokens, faster "
                             "sampling; docs/coarse_grid.md)")
    parser.add_argument("--torch-dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    parser.add_argument("--self-contained", action="store_true",
                        help="also write the pipeline's code (for DiffusionPipeline.from_pretrained(..., "
                        "trust_remote_code=True))")
    args = parser.parse_args(argv)

    factors = args.stage_factors[0] if len(args.stage_factors) == 1 else args.stage_factors
    flux = FluxPipeline.from_pretrained(args.flux, dtype=DTYPES[args.torch_dtype], revision=args.revision)
    pipe = DFMPipeline.from_flux_pipeline(
        flux,
        num_stages=args.num_stages,
        stage_factors=factors,
        steps_per_stage=args.steps_per_stage,
        stage_thresholds=args.stage_thresholds,
        new_stage_init=args.new_stage_init,
        coarse_phase_on_coarse_grid=args.coarse_phase_on_coarse_grid,
    )
    pipe.save_pretrained(args.output, self_contained=args.self_contained)
    print(f"wrote DFMPipeline ({args.num_stages} stages) to {args.output}")
    if args.push_to_hub:
        repo = pipe.push_to_hub(args.push_to_hub, base_model=args.flux, self_contained=args.self_contained)
        print(f"pushed to https://huggingface.co/{repo}")
    return pipe


def main_dit(argv):
    from .models.official_sit import OFFICIAL_SOURCES
    from .pipelines.official import DEFAULT_VAE, convert_official_checkpoint, save_official_pipeline

    parser = argparse.ArgumentParser(
        prog="python -m dfm_diffusers.convert dit",
        description="Convert an official DFM-SiT (elit-dfm), SiT baseline of the ELIT repository (elit-sit), REPA "
        "SiT (repa) or original SiT (sit) checkpoint into a DFMDiTPipeline folder with a model card. The file is "
        "read with torch.load(weights_only=True): no pickled code runs.",
    )
    parser.add_argument("checkpoint", help="the official .pt file (training checkpoint or state dict) or .safetensors")
    parser.add_argument("--from", dest="source", required=True, choices=OFFICIAL_SOURCES, help="which official code")
    parser.add_argument("--output", required=True, help="folder to write the DFMDiTPipeline to")
    parser.add_argument("--vae", default=DEFAULT_VAE,
                        help=f"the SD VAE to include: a Hub id or local folder (default {DEFAULT_VAE}, what the "
                             f"official evaluations decode with), or 'none' to record it without including it")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema",
                        help="which weights of a training checkpoint (the official evaluations use ema)")
    parser.add_argument("--num-heads", type=int, default=None, help="only for non-standard model widths")
    parser.add_argument("--steps-per-stage", type=int, nargs="+", default=None,
                        help="Euler steps per stage (default: the official evaluation's)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    args = parser.parse_args(argv)

    try:
        pipe = convert_official_checkpoint(
            args.checkpoint, args.source, vae=None if args.vae.lower() == "none" else args.vae,
            num_heads=args.num_heads, weights=args.weights, steps_per_stage=args.steps_per_stage,
        )
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    repo_id = None
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(args.push_to_hub, exist_ok=True).repo_id
    save_official_pipeline(pipe, args.output, args.source, args.checkpoint, repo_id=repo_id)
    config = pipe.transformer.config
    print(f"wrote DFMDiTPipeline ({args.source}: {config.num_stages} stage(s), {config.num_layers} blocks) with its "
          f"model card to {args.output}")
    if repo_id:
        api.upload_folder(repo_id=repo_id, folder_path=args.output, commit_message="Upload DFMDiTPipeline")
        print(f"pushed to https://huggingface.co/{repo_id}")
    return pipe


if __name__ == "__main__":
    main()
