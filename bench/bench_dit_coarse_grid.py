"""Training throughput: DFM-DiT-XL/2 (2 stages) vs DiT-XL/2 (plain flow matching, 1 stage), and DFM-DiT-XL/2 with
the coarse phase on the coarse grid (``coarse_phase_on_coarse_grid``: samples generating stage 0 on 1/4 of the
tokens); plus the forward (sampling step) time of each in phase 0.

    python bench/bench_dit.py --out <dir>                       # GPU: 512px as FLUX-VAE latents [B, 16, 64, 64]
    python bench/bench_dit.py --small --device cpu --out <dir>

One training iteration = Laplacian decomposition + dfm_objective (sigma sampling, noising, forward, loss) +
backward + AdamW step (bf16 autocast, fp32 weights), the same calls as DiTTask.loss_fn; with num_stages 1 it is
plain flow matching. The batch is the largest of --batches that fits all models. Model FLOPs are counted
with torch.utils.flop_counter on one iteration; MFU = FLOPs / time / --peak-tflops. "forward" is one no-grad
forward at the same batch with stage 0 alone active (FM: its only stage), i.e. one sampling step of phase 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_name, timed_call, versions, write_json  # noqa: E402
from dfm_diffusers import DFMDiTTransformer2DModel, LaplacianDecomposition  # noqa: E402
from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective  # noqa: E402
from dfm_diffusers.utils import configure_attention_backends  # noqa: E402


def make_step(model, decomposition, device, autocast_dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = DFMObjectiveConfig()  # the paper's defaults, as DiTTask uses them

    def step(x, labels):
        def predict(inputs, draw):
            return model(inputs, timestep=draw.sigmas, num_active_stages=draw.num_active_stages,
                         class_labels=labels, return_dict=False)[0]

        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = dfm_objective(objective, decomposition.decompose(x), predict).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, optimizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--small-size", type=int, default=16, help="--small: latent size (16: 64 tokens; 32: 256)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 128, 64, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    configure_attention_backends()
    cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if cuda else None
    fm_name, dfm_name = ("DiT-S/2", "DFM-DiT-S/2") if args.small else ("DiT-XL/2", "DFM-DiT-XL/2")
    coarse_name = dfm_name + " coarse grid"
    names = (fm_name, dfm_name, coarse_name)
    channels, size = (4, args.small_size) if args.small else (16, 64)
    batches = [8] if args.small else args.batches

    models = {}
    for name in names:
        torch.manual_seed(0)
        preset = name.replace(" coarse grid", "")
        extra = {"coarse_phase_on_coarse_grid": True} if name == coarse_name else {}
        model = DFMDiTTransformer2DModel.from_preset(preset, in_channels=channels, sample_size=size, **extra)
        model = model.to(device).train()
        dec = LaplacianDecomposition.from_config(model.config)
        models[name] = (model, dec)

    def try_batch(batch):
        x = torch.randn(batch, channels, size, size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        steps = {}
        for name, (model, dec) in models.items():
            steps[name] = make_step(model, dec, device, autocast_dtype)
            steps[name][0](x, labels)  # allocates optimizer state too
        return x, labels, steps

    for batch in batches:
        try:
            x, labels, steps = try_batch(batch)
            break
        except torch.OutOfMemoryError:
            for model, _ in models.values():
                model.zero_grad(set_to_none=True)
            steps = None
            torch.cuda.empty_cache()
    if steps is None:
        raise SystemExit("no batch size fits")

    flops = {}
    for name, (step, _) in steps.items():
        with FlopCounterMode(display=False) as counter:
            step(x, labels)
        flops[name] = counter.get_total_flops()

    def timed(name):
        return timed_call(lambda: steps[name][0](x, labels), device)[0]

    for _ in range(args.warmup):
        for name in names:
            timed(name)
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(timed(name))
    med = {k: statistics.median(v) for k, v in times.items()}

    def forward_time(name):  # one sampling step of phase 0: stage 0 alone
        model, dec = models[name]
        model.eval()
        bands = dec.decompose(x)
        sigmas = torch.rand(x.shape[0], len(bands), device=device)
        ones = torch.ones(x.shape[0], dtype=torch.long, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            seconds, _ = timed_call(lambda: model(bands, timestep=sigmas, num_active_stages=ones, class_labels=labels),
                                    device)
        model.train()
        return seconds

    for _ in range(args.warmup):
        for name in names:
            forward_time(name)
    fwd = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            fwd[name].append(forward_time(name))
    fwd_med = {k: statistics.median(v) for k, v in fwd.items()}
    rows = {}
    for name in names:
        rows[name] = {
            "params_M": round(sum(p.numel() for p in models[name][0].parameters()) / 1e6, 2),
            "s_per_iter": round(med[name], 5),
            "images_per_s": round(batch / med[name], 2),
            "model_tflop_per_iter": round(flops[name] / 1e12, 3),
            "mfu": round(flops[name] / med[name] / (args.peak_tflops * 1e12), 4),
            "forward_s_phase0": round(fwd_med[name], 5),
        }
    fm, dfm, coarse = names
    result = {
        "device": device_name(device),
        **versions(),
        "latent_shape": [channels, size, size],
        "batch": batch,
        "rows": rows,
        "all_runs": times,
        "ratio_dfm_over_fm_time": round(med[dfm] / med[fm], 4),
        "ratio_coarse_over_fm_time": round(med[coarse] / med[fm], 4),
        "ratio_coarse_over_dfm_time": round(med[coarse] / med[dfm], 4),
        "forward_ratio_coarse_over_full_grid_phase0": round(fwd_med[coarse] / fwd_med[dfm], 4),
        "all_forward_runs": fwd,
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "dit_results.json"), result)
    print(f"batch {batch}, latents {channels}x{size}x{size}")
    print("| model | params (M) | s / iter | images / s | TFLOP / iter | MFU | phase-0 forward s |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['params_M']} | {r['s_per_iter']} | {r['images_per_s']} | "
              f"{r['model_tflop_per_iter']} | {r['mfu']:.1%} | {r['forward_s_phase0']} |")
    print(f"ratio DFM / FM time per iteration = {result['ratio_dfm_over_fm_time']:.4f}; coarse grid / FM = "
          f"{result['ratio_coarse_over_fm_time']:.4f}; phase-0 forward coarse / full grid = "
          f"{result['forward_ratio_coarse_over_full_grid_phase0']:.4f}")


if __name__ == "__main__":
    main()
