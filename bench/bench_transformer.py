"""Benchmark DFMTransformer2DModel against diffusers' FluxTransformer2DModel (FLUX.1-dev config, random weights).

    python bench/bench_transformer.py --out <dir>              # GPU: FLUX.1-dev config, bf16, 1024px, batch 1
    python bench/bench_transformer.py --small --device cpu --out <dir>   # tiny config, sanity check anywhere

Both models live in one process and share the FLUX parameters (DFMTransformer2DModel.from_flux(...,
share_weights=True)): the DFM model owns only its per-stage layers (~0.4% of FLUX.1-dev), so the GPU holds one
12B-parameter copy. Timed, alternating FLUX and DFM after a warm-up, median of --repeats runs:
  - inference: one forward under torch.no_grad();
  - train: forward + backward of a mean-square loss (all parameters require grad; no optimizer, so no optimizer
    state), without and with gradient checkpointing. Gradients are dropped (set to None) after every run, so each
    run's peak memory is that model's parameters + its gradients + its activations.
Peak memory is torch.cuda.max_memory_allocated (reset before every run), the maximum over the repeats.
FLUX gets the finest latent packed 2x2 (FluxPipeline's layout, 4096 tokens at 1024px); DFM gets both stages of
the same image (2 active; stage 0 carried at the finest resolution: [B, 16, 128, 128] twice, the same 4096
tokens); "DFM 256->1024" is the stage-factor-4 model (same shapes, stage 0's band 32x32). "DFM coarse" /
"DFM coarse 256->1024": the same models with ``coarse_phase_on_coarse_grid``, in their coarse phase (stage 0 alone,
its band at its own resolution: 1/4 resp. 1/16 of the image tokens). Writes results.json to
--out and prints a markdown table. Calls configure_attention_backends() (cuDNN SDPA off).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import FluxTransformer2DModel  # noqa: E402

from bench.common import device_name, sync, write_json  # noqa: E402
from dfm_diffusers import DFMTransformer2DModel, LaplacianDecomposition  # noqa: E402
from dfm_diffusers.utils import configure_attention_backends  # noqa: E402

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SMALL = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
             joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))


def build_flux(config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> FluxTransformer2DModel:
    """FLUX with random weights made directly on `device` in `dtype` (no float32 CPU init of 12B parameters).

    Weights N(0, 1/fan_in), biases 0, norm scales 1: activations stay O(1) through the 57 blocks."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**config)
    flux = torch.nn.Module.to(flux, dtype).to_empty(device=device)  # (ModelMixin.to warns needlessly on meta)
    random_init_(flux, seed)
    for name, b in flux.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}: initialise it here")
    return flux.eval()


def random_init_(module: torch.nn.Module, seed: int):
    """In place: weights N(0, 1/fan_in), biases 0, other 1-d parameters (norm scales) 1."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:  # RMSNorm / LayerNorm scales
                p.fill_(1.0)


def make_inputs(config: dict, height: int, width: int, text_len: int, batch: int, device, dtype, seed: int,
                stage_shapes=((None, None),)):
    """Matching inputs for FLUX (packed finest latent) and DFM (all stages active, shaped ``stage_shapes``, coarse to
    fine: the DFM model's LaplacianDecomposition.stage_shapes; stage 0 is carried at the finest resolution).
    height/width: latent size."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c = config["in_channels"] // 4
    x1 = torch.randn(batch, c, height, width, device=device, generator=gen, dtype=dtype)
    stages = [torch.randn(batch, c, h, w, device=device, generator=gen, dtype=dtype) for h, w in stage_shapes[:-1]]
    num_stages = len(stages) + 1
    text = torch.randn(batch, text_len, config["joint_attention_dim"], device=device, generator=gen, dtype=dtype)
    pooled = torch.randn(batch, config["pooled_projection_dim"], device=device, generator=gen, dtype=dtype)
    sigmas = torch.rand(batch, num_stages, device=device, generator=gen)
    guidance = torch.full((batch,), 3.5, device=device)
    gh, gw = height // 2, width // 2
    img_ids = torch.zeros(gh, gw, 3, device=device)
    img_ids[..., 1] = torch.arange(gh, device=device)[:, None]
    img_ids[..., 2] = torch.arange(gw, device=device)[None, :]
    packed = x1.view(batch, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, gh * gw, c * 4)
    flux_inputs = dict(
        hidden_states=packed,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=sigmas[:, -1],
        img_ids=img_ids.reshape(gh * gw, 3),
        txt_ids=torch.zeros(text_len, 3, device=device),
        guidance=guidance,
    )
    dfm_inputs = dict(
        hidden_states=[*stages, x1],
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=sigmas,
        num_active_stages=torch.full((batch,), num_stages, device=device, dtype=torch.long),
        guidance=guidance,
    )
    return flux_inputs, dfm_inputs


def outputs_of(model, inputs) -> list[torch.Tensor]:
    out = model(**inputs).sample
    return out if isinstance(out, list) else [out]


class Runner:
    """Times one model's inference or training step; returns (seconds, peak bytes or None)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        sync(self.device)

    def run(self, model, inputs, mode: str, all_params) -> tuple[float, int | None]:
        for p in all_params:
            p.grad = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        if mode == "inference":
            with torch.no_grad():
                outputs_of(model, inputs)
        else:
            loss = sum(v.float().pow(2).mean() for v in outputs_of(model, inputs))
            loss.backward()
        self.sync()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        for p in all_params:
            p.grad = None
        return seconds, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--small", action="store_true", help="tiny config and 64x64 latent (sanity run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--resolution", type=int, default=1024, help="image size in pixels (latent = /8)")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default="inference,train,train_ckpt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cudnn_sdp_disabled = configure_attention_backends()
    config = SMALL if args.small else FLUX_DEV
    resolution = 256 if args.small and args.resolution == 1024 else args.resolution
    text_len = 32 if args.small and args.text_len == 512 else args.text_len
    latent = resolution // 8
    if latent % 8:
        parser.error("--resolution must be a multiple of 64 (2x2-packed latents, stage factor 4)")

    t0 = time.perf_counter()
    flux = build_flux(config, device, dtype, args.seed)
    dfm = DFMTransformer2DModel.from_flux(flux, share_weights=True)
    dfm_f4 = DFMTransformer2DModel.from_flux(flux, stage_factors=4, share_weights=True)  # 256 -> 1024 px
    coarse_f2 = DFMTransformer2DModel.from_flux(flux, share_weights=True).set_coarse_phase_on_coarse_grid()
    coarse_f4 = DFMTransformer2DModel.from_flux(flux, stage_factors=4, share_weights=True).set_coarse_phase_on_coarse_grid()
    build_s = time.perf_counter() - t0
    flux_params = {id(p): p for p in flux.parameters()}
    dfm_params = {id(p): p for p in dfm.parameters()}
    dfm_f4_params = {id(p): p for p in dfm_f4.parameters()}
    coarse_params = {id(p): p for m in (coarse_f2, coarse_f4) for p in m.parameters()}
    shared = len(set(flux_params) & set(dfm_params))
    all_params = list({**flux_params, **dfm_params, **dfm_f4_params, **coarse_params}.values())
    n_flux = sum(p.numel() for p in flux_params.values())
    n_dfm = sum(p.numel() for p in dfm_params.values())

    def inputs_for(model):
        shapes = LaplacianDecomposition.from_config(model.config).stage_shapes(latent, latent)
        return make_inputs(config, latent, latent, text_len, args.batch, device, dtype, args.seed + 1, shapes)

    flux_inputs, dfm_inputs = inputs_for(dfm)
    runner = Runner(device)
    def coarse_inputs_for(model):
        """The coarse phase: stage 0 alone, its band at its own resolution (noise drawn there)."""
        inputs = dict(inputs_for(model)[1])
        band = LaplacianDecomposition.from_config(model.config).band_shapes(latent, latent)[0]
        stage0 = inputs["hidden_states"][0]
        inputs["hidden_states"] = [torch.randn(*stage0.shape[:2], *band, device=device, dtype=dtype),
                                   *inputs["hidden_states"][1:]]
        inputs["num_active_stages"] = torch.ones_like(inputs["num_active_stages"])
        return inputs

    models = {"FLUX": (flux, flux_inputs), "DFM": (dfm, dfm_inputs), "DFM 256->1024": (dfm_f4, inputs_for(dfm_f4)[1]),
              "DFM coarse": (coarse_f2, coarse_inputs_for(coarse_f2)),
              "DFM coarse 256->1024": (coarse_f4, coarse_inputs_for(coarse_f4))}
    results = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in ("inference", "train", "train_ckpt"):
            parser.error(f"unknown mode {mode}")
        for model, _ in models.values():
            if mode == "train_ckpt":
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
            model.train(mode != "inference")
            for p in model.parameters():
                p.requires_grad_(mode != "inference")
        times = {name: [] for name in models}
        peaks = {name: [] for name in models}
        errors = {}
        for i in range(args.warmup + args.repeats):
            for name, (model, inputs) in models.items():
                if name in errors:
                    continue
                try:
                    seconds, peak = runner.run(model, inputs, mode, all_params)
                except torch.OutOfMemoryError as e:
                    errors[name] = f"OOM: {str(e).splitlines()[0]}"
                if name in errors:  # outside the except clause, so the failed step's tensors are released
                    for p in all_params:
                        p.grad = None
                    if runner.cuda:
                        torch.cuda.empty_cache()
                    continue
                if i >= args.warmup:
                    times[name].append(seconds)
                    peaks[name].append(peak)
        for name in models:
            row = dict(model=name, mode=mode)
            if name in errors:
                row.update(error=errors[name])
            else:
                row.update(
                    median_ms=1000 * statistics.median(times[name]),
                    min_ms=1000 * min(times[name]),
                    times_ms=[1000 * t for t in times[name]],
                    peak_gib=None if peaks[name][0] is None else max(peaks[name]) / 2**30,
                )
            results.append(row)
        print(f"done: {mode}", flush=True)

    report = dict(
        config=config,
        small=args.small,
        device=str(device),
        device_name=device_name(device, platform.processor() or platform.machine()),
        dtype=args.dtype,
        resolution=resolution,
        latent=[config["in_channels"] // 4, latent, latent],
        image_tokens=(latent // 2) ** 2,
        text_tokens=text_len,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        torch=torch.__version__,
        cudnn_sdp_disabled=cudnn_sdp_disabled,
        params_flux=n_flux,
        params_dfm=n_dfm,
        params_shared_tensors=shared,
        build_and_convert_s=build_s,
        results=results,
    )
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), report)

    print(
        f"\n{report['device_name']} | {args.dtype} | {resolution}px: {report['image_tokens']} image + {text_len} text "
        f"tokens | batch {args.batch} | FLUX {n_flux / 1e6:,.1f}M params, DFM {n_dfm / 1e6:,.1f}M "
        f"({shared} tensors shared) | "
        f"median of {args.repeats} after {args.warmup} warm-up\n"
    )
    print("| model | mode | ms | / FLUX | peak GiB | / FLUX |")
    print("|---|---|---|---|---|---|")
    by = {(r["model"], r["mode"]): r for r in results}

    def cell(r, key, fmt):
        return r.get("error", "-") if key not in r or r[key] is None else format(r[key], fmt)

    def ratio(r, f, key):
        return f"{r[key] / f[key]:.3f}" if r.get(key) is not None and f.get(key) is not None else "-"

    for mode in dict.fromkeys(r["mode"] for r in results):
        f = by[("FLUX", mode)]
        for name in models:
            r = by[(name, mode)]
            print(
                f"| {name} | {mode} | {cell(r, 'median_ms', '.1f')} | {ratio(r, f, 'median_ms')} | "
                f"{cell(r, 'peak_gib', '.2f')} | {ratio(r, f, 'peak_gib')} |"
            )
    print(f"\nwrote {os.path.join(args.out, 'results.json')}")
    return report


if __name__ == "__main__":
    main()
