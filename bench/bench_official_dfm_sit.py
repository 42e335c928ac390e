"""Sampling speed: the official DFM-SiT sampler vs the converted DFMDiTPipeline, side by side in one run.

    python bench/bench_official_dfm_sit.py --elit PATH/TO/snap-research/elit --out results/official_dfm_sit.jsonl
    python bench/bench_official_dfm_sit.py --elit PATH --small --device cpu --out /tmp/official_dfm_sit.jsonl

Builds the official DFM-SiT-XL/2 (512px: 64x64 latents, stages 32x32 / 64x64, patch sizes [1, 2]; ``--small``: a
2-block 256-wide model at 16x16 latents) from the official code in the checkout (it needs ``timm``), with random
weights, saves it as an official training checkpoint, converts it with ``convert_official_checkpoint`` and times,
on the same noise and labels, each after a warm-up: the official ``dfm_euler_sampler`` (with fused attention on and
off: the official generate.py defaults to ``--no-fused-attn``) and ``DFMDiTPipeline(output_type="latent")``.
Steps [40, 10], threshold 0.1, cfg 1.0 (the official evaluation's; ``--cfg 4.0`` adds guidance). float32 with TF32
on, as the official generate.py runs. One JSON line per arm is appended to --out as soon as the arm finishes; arms
already in --out are skipped, so an interrupted run resumes. Each line also records the largest difference between
that arm's samples and the converted pipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append_jsonl, device_name, done_keys, repeat_timed  # noqa: E402
from dfm_diffusers import convert_official_checkpoint  # noqa: E402
from dfm_diffusers.decomposition import LaplacianDecomposition  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elit", required=True, help="checkout of snap-research/elit (official code)")
    parser.add_argument("--out", required=True, help="JSON-lines file, appended to")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps-per-stage", type=int, nargs=2, default=[40, 10])
    parser.add_argument("--cfg", type=float, default=1.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # generate.py's default (--tf32)
    torch.backends.cudnn.allow_tf32 = True
    torch.set_grad_enabled(False)
    sys.path.insert(0, os.path.abspath(args.elit))
    from dfm_utils.laplacian_decomposer import LaplacianDecomposer2D
    from dfm_utils.samplers_dfm import dfm_euler_sampler
    from models.sit_dfm import DFMSiT

    done = done_keys(args.out, lambda row: row["arm"])
    size = dict(depth=2, hidden_size=256, decoder_hidden_size=256, num_heads=4) if args.small else dict(
        depth=28, hidden_size=1152, decoder_hidden_size=1152, num_heads=16)
    latent = 16 if args.small else 64
    config = dict(input_size=latent, num_scales=2, patch_sizes=[1, 2], in_channels=4, num_classes=1000, use_cfg=True,
                  qk_norm=False, **size)
    models = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = DFMSiT(fused_attn=fused, **config)
        with torch.no_grad():  # the official init zeroes the heads; random heads make the outputs non-trivial
            for name, p in model.named_parameters():
                if name != "pos_embed" and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        models[fused] = model.to(device).eval()
    models[False].load_state_dict(models[True].state_dict())

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dfm_sit_random.pt")
        torch.save({"ema": models[True].state_dict(), "args": argparse.Namespace(model="DFM-SiT-XL/2")}, path)
        pipe = convert_official_checkpoint(path, "elit-dfm", num_heads=size["num_heads"],
                                           steps_per_stage=args.steps_per_stage).to(device)
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = LaplacianDecomposition(2, 2).stage_shapes(latent, latent)
    noise = [torch.randn(args.batch, 4, h, w, generator=g).to(device) for h, w in shapes]
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    recompose = LaplacianDecomposer2D(stages_count=2).recompose

    def official(fused):
        out = dfm_euler_sampler(models[fused], {s: n.clone() for s, n in enumerate(noise)}, labels, cfg_scale=args.cfg,
                                num_steps_per_scale=args.steps_per_stage, stage_thresholds=[0.1])
        return recompose({k: v.float() for k, v in out.items()})

    def ours():
        return pipe(labels, latents=[n.clone() for n in noise], guidance_scale=args.cfg, output_type="latent").images

    arms = {"official_fused_attn": lambda: official(True), "official_unfused_attn": lambda: official(False),
            "dfm_diffusers": ours}
    reference = None
    base = dict(device=device_name(device), batch=args.batch,
                latent=latent, steps_per_stage=args.steps_per_stage, cfg=args.cfg, small=args.small,
                torch=torch.__version__)
    for name, fn in arms.items():
        if name in done:
            continue
        times, out = repeat_timed(fn, device, args.repeats, warmup=1)
        if reference is None:
            reference = ours()
        row = dict(base, arm=name, median_s=statistics.median(times), times_s=times,
                   images_per_s=args.batch / statistics.median(times),
                   max_abs_diff_to_dfm_diffusers=float((out.float() - reference.float()).abs().max()))
        append_jsonl(args.out, row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
