"""Rebuild the official-model fixtures of tests/test_official_checkpoints.py from checkouts of the official code.

    python tests/data/official/make_official_fixtures.py --elit PATH/TO/snap-research/elit \
        --sit PATH/TO/willisma/SiT [--out tests/data/official]

It imports the official model and sampler code from the two checkouts (nothing of it is in this repository; the
official code needs ``timm``), builds tiny random-weight models (float32, fused attention, TF32 off, CPU), and
writes:

- ``dfm_sit_tiny.pt``: a DFM-SiT (2 stages, patch sizes [1, 2]) in the official training-checkpoint format
  ({"model", "ema", "opt", "args": argparse.Namespace, "steps"}), "model" differing from "ema" in one tensor;
- ``sit_repa_tiny.pt``: the ELIT repository's SiT (which is REPA's SiT) with a REPA projector head, same format;
- ``sit_original_tiny.pt``: the original SiT (willisma/SiT) with the learned-sigma head and 10 classes, as a plain
  state dict (the format of its released SiT-XL-2-256x256.pt);
- ``official_outputs.safetensors``: their inputs and outputs: per-stage velocities with one and with both stages
  active, the official DFM Euler sampler (steps [40, 10], threshold 0.1, cfg 1; and steps [6, 4], threshold 0.25,
  cfg 3 with the guidance interval [0.2, 0.7], with every step's model inputs), the official SiT Euler sampler
  (50 steps cfg 1; 8 steps cfg 1.8 with guidance_high 0.7, with every step's model inputs), and the original SiT's
  forward at SiT times t (t = 1 is data there).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch
from safetensors.torch import save_file

HIDDEN, HEADS, MLP_RATIO, NUM_CLASSES, LATENT = 16, 2, 2.0, 1000, 8


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every weight N(0, 1/fan_in), every bias and embedding N(0, 0.3^2); the frozen sin-cos pos_embed is kept.
    (The official init zeroes the adaLN and output layers, which would make every output 0.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            if p.ndim >= 2 and "embedding_table" not in name:
                std = 1.0 / math.sqrt(p[0].numel())
            else:
                std = 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Recorder(torch.nn.Module):
    """Wraps an official model and records the inputs of every call (x, t, drop_mask) during sampling."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x, t, y=None, drop_mask=None, **kwargs):
        xs = [v.clone() for v in x.values()] if isinstance(x, dict) else [x.clone()]
        self.calls.append((xs, t.clone(), None if drop_mask is None else drop_mask.clone()))
        if drop_mask is None:
            return self.model(x, t, y=y, **kwargs)
        return self.model(x, t, y=y, drop_mask=drop_mask, **kwargs)


def checkpoint(model, args: argparse.Namespace, steps: int) -> dict:
    """The official training-checkpoint layout; "model" differs from "ema" in one tensor (so tests can tell them
    apart), every other tensor is shared (stored once)."""
    ema = model.state_dict()
    raw = dict(ema)
    heads = [k for k in raw if k.startswith("final_layer") and k.endswith("linear.bias")]
    key = min(heads, key=lambda k: raw[k].numel())
    raw[key] = raw[key] + 1.0
    return {"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": args, "steps": steps}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elit", required=True, help="checkout of snap-research/elit")
    parser.add_argument("--sit", required=True, help="checkout of willisma/SiT")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_grad_enabled(False)
    sys.path.insert(0, os.path.abspath(args.elit))
    from dfm_utils.laplacian_decomposer import LaplacianDecomposer2D
    from dfm_utils.samplers_dfm import MultiscaleScheduler, dfm_euler_sampler
    from models.sit import SiT
    from models.sit_dfm import DFMSiT
    from samplers import euler_sampler

    spec = importlib.util.spec_from_file_location("original_sit_models", os.path.join(args.sit, "models.py"))
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)

    block = dict(fused_attn=True, qk_norm=False)
    out: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- DFM-SiT (ELIT repository)
    dfm = DFMSiT(
        input_size=LATENT, num_scales=2, patch_sizes=[1, 2], in_channels=4, hidden_size=HIDDEN,
        decoder_hidden_size=HIDDEN, depth=2, num_heads=HEADS, mlp_ratio=MLP_RATIO, num_classes=NUM_CLASSES,
        use_cfg=True, **block,
    ).eval()
    randomize_(dfm, 0)
    dfm_args = argparse.Namespace(
        model="DFM-SiT-tiny", resolution=LATENT * 8, num_classes=NUM_CLASSES, stages_count=2, path_type="linear",
        prediction="v", enc_type="none", proj_coeff=0.0, fused_attn=True, qk_norm=False, encoder_depth=1,
        stage_weights=[0.9, 0.1], num_steps_per_scale=[40, 10], stage_sampling_thresholds=[0.1],
        mixed_precision="bf16", allow_tf32=False, legacy=False,
    )
    torch.save(checkpoint(dfm, dfm_args, 400000), os.path.join(args.out, "dfm_sit_tiny.pt"))

    g = torch.Generator().manual_seed(1)
    batch = 3
    x = {0: torch.randn(batch, 4, LATENT // 2, LATENT // 2, generator=g)}
    x[1] = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    y = torch.tensor([3, 999, 1000])  # 1000 = the null class
    t0 = torch.rand(batch, generator=g)
    t_partial = torch.stack([t0, torch.ones(batch)], dim=-1)  # stage 1 not yet started: sigma 1
    t_full = torch.stack([0.1 * t0, torch.rand(batch, generator=g)], dim=-1)
    out_partial, _ = dfm(x, t_partial, y=y, drop_mask=torch.tensor([1.0, 0.0]))
    out_full, _ = dfm(x, t_full, y=y, drop_mask=torch.tensor([1.0, 1.0]))
    out.update({"dfm.x0": x[0], "dfm.x1": x[1], "dfm.y": y, "dfm.t_partial": t_partial, "dfm.t_full": t_full})
    for s in range(2):
        out[f"dfm.out_partial.{s}"] = out_partial[s]
        out[f"dfm.out_full.{s}"] = out_full[s]

    recompose = LaplacianDecomposer2D(stages_count=2).recompose
    noise = {0: torch.randn(2, 4, LATENT // 2, LATENT // 2, generator=g)}
    noise[1] = torch.randn(2, 4, LATENT, LATENT, generator=g)
    labels = torch.tensor([7, 412])
    out.update({"dfm.sample.noise0": noise[0], "dfm.sample.noise1": noise[1], "dfm.sample.y": labels})
    schedule = MultiscaleScheduler([40, 10], [0.1]).schedule("cpu")
    out["dfm.sample.eval.times"] = torch.stack([step["times"] for step in schedule])
    final = dfm_euler_sampler(
        dfm, dict(noise), labels, cfg_scale=1.0, num_steps_per_scale=[40, 10], stage_thresholds=[0.1]
    )
    out["dfm.sample.eval.latent"] = recompose({k: v.float() for k, v in final.items()})

    recorder = Recorder(dfm)
    final = dfm_euler_sampler(
        recorder, dict(noise), labels, cfg_scale=3.0, guidance_low=0.2, guidance_high=0.7,
        num_steps_per_scale=[6, 4], stage_thresholds=[0.25],
    )
    out["dfm.sample.cfg.latent"] = recompose({k: v.float() for k, v in final.items()})
    for s in range(2):
        out[f"dfm.sample.cfg.stage{s}"] = final[s].float()
        # the conditional half of every step's model input (the official sampler doubles the batch for CFG)
        out[f"dfm.sample.cfg.inputs{s}"] = torch.stack([xs[s][: len(labels)] for xs, _, _ in recorder.calls])
    out["dfm.sample.cfg.times"] = torch.stack([t[0] for _, t, _ in recorder.calls])
    out["dfm.sample.cfg.drop_masks"] = torch.stack([m for _, _, m in recorder.calls])

    # ---------------------------------------------------------------- SiT with a REPA projector (ELIT repository)
    sit = SiT(
        input_size=LATENT, patch_size=2, in_channels=4, hidden_size=HIDDEN, decoder_hidden_size=HIDDEN,
        encoder_depth=1, depth=2, num_heads=HEADS, mlp_ratio=MLP_RATIO, num_classes=NUM_CLASSES, use_cfg=True,
        enable_repa=True, z_dims=[4], projector_dim=8, **block,
    ).eval()
    randomize_(sit, 2)
    sit_args = argparse.Namespace(
        model="SiT-tiny", resolution=LATENT * 8, num_classes=NUM_CLASSES, path_type="linear", prediction="v",
        enc_type="dinov2-vit-b", proj_coeff=0.5, encoder_depth=1, fused_attn=True, qk_norm=False, legacy=False,
    )
    torch.save(checkpoint(sit, sit_args, 4000000), os.path.join(args.out, "sit_repa_tiny.pt"))
    xs = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    ts = torch.rand(batch, generator=g)
    out.update({"sit.x": xs, "sit.t": ts, "sit.y": y, "sit.out": sit(xs, ts, y=y)[0]})
    noise = torch.randn(2, 4, LATENT, LATENT, generator=g)
    out.update({"sit.sample.noise": noise, "sit.sample.y": labels})
    out["sit.sample.eval.latent"] = euler_sampler(sit, noise, labels, num_steps=50, cfg_scale=1.0).float()
    recorder = Recorder(sit)
    out["sit.sample.cfg.latent"] = euler_sampler(
        recorder, noise, labels, num_steps=8, cfg_scale=1.8, guidance_low=0.0, guidance_high=0.7
    ).float()
    out["sit.sample.cfg.inputs"] = torch.stack([xs_[0][: len(labels)] for xs_, _, _ in recorder.calls])
    out["sit.sample.cfg.times"] = torch.stack([t[0] for _, t, _ in recorder.calls])

    # ---------------------------------------------------------------- original SiT (willisma/SiT), learned sigma
    orig = original.SiT(
        input_size=LATENT, patch_size=2, in_channels=4, hidden_size=HIDDEN, depth=2, num_heads=HEADS,
        mlp_ratio=MLP_RATIO, num_classes=10, learn_sigma=True,
    ).eval()
    for blk in orig.blocks:
        blk.attn.fused_attn = True
    randomize_(orig, 3)
    torch.save(orig.state_dict(), os.path.join(args.out, "sit_original_tiny.pt"))
    t_sit = torch.tensor([0.0, 0.37, 0.93])  # SiT time: 0 = noise, 1 = data
    y_orig = torch.tensor([3, 9, 10])  # 10 = the null class
    out.update({"orig.x": xs, "orig.t": t_sit, "orig.y": y_orig, "orig.out": orig(xs, t_sit, y_orig)})

    out = {k: v.clone().contiguous() for k, v in out.items()}
    save_file(out, os.path.join(args.out, "official_outputs.safetensors"))
    for name in sorted(os.listdir(args.out)):
        if name.endswith((".pt", ".safetensors")):
            print(f"{name}: {os.path.getsize(os.path.join(args.out, name)) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
