"""FSDP smoke test of the shared training loop at the FLUX.1-dev configuration (random weights, synthetic inputs).

    # phase 1 (train, checkpoint, consolidated export), then phase 2 (resume from the mid checkpoint):
    accelerate launch --config_file examples/accelerate/fsdp_full_finetune.yaml --num_processes 2 \
        bench/fsdp_smoke.py --out <dir>
    accelerate launch --config_file examples/accelerate/fsdp_full_finetune.yaml --num_processes 2 \
        bench/fsdp_smoke.py --out <dir> --resume
    # the same script, tiny config, anywhere (CPU: 2 gloo processes under DDP; accelerate's FSDP needs GPUs):
    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/ddp_lora.yaml --num_processes 2 \
        --mixed_precision no bench/fsdp_smoke.py --small --out <dir> [--resume]

The model is DFMTransformer2DModel.from_flux of a FLUX.1-dev-shaped transformer with random weights (built on each
rank's device as bench/bench_transformer.py's build_flux does: no FLUX, T5 or VAE weights are needed), trained as a
full finetune by :func:`dfm_diffusers.training.loop.run_training` (the loop train_dfm_flux.py uses) on synthetic
cached inputs: per sample a latent [16, R/8, R/8], T5 embeddings [512, 4096] and a pooled CLIP vector [768], through
the shared DFM objective. Phase 1 trains --steps steps with a checkpoint at --steps // 2 and at the end (sharded under
FSDP), writes the consolidated transformer (bf16 safetensors) to <out>/run/pipeline and loads it back on the main
process alone. Phase 2 resumes <out>/run's mid checkpoint into <out>/resumed and compares the losses of the replayed
steps and the exported weights with phase 1's. Measured per rank: peak GPU memory over the training steps, median
step time, each checkpoint save's and the resume's duration; written to <out>/results_<phase>.json (main process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import parse_flag_from_env  # noqa: E402

from bench.bench_transformer import FLUX_DEV, SMALL, build_flux  # noqa: E402
from bench.common import timed_call  # noqa: E402
from dfm_diffusers import DFMTransformer2DModel, LaplacianDecomposition  # noqa: E402
from dfm_diffusers.training.loop import LoopConfig, run_training  # noqa: E402
from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective  # noqa: E402


@dataclass
class SmokeConfig(LoopConfig, DFMObjectiveConfig):
    """The loop's and the DFM objective's settings (the paper's training distribution by default)."""


class SyntheticCachedInputs(torch.utils.data.Dataset):
    """What the FLUX cache would hold, drawn from a fixed seed per index: latent, T5 and pooled CLIP embeddings."""

    def __init__(self, n: int, config: dict, latent: int, text_len: int):
        self.n, self.config, self.latent, self.text_len = n, config, latent, text_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        c = self.config["in_channels"] // 4
        return {
            "index": i,
            "latents": torch.randn(c, self.latent, self.latent, generator=g),
            "prompt_embeds": torch.randn(self.text_len, self.config["joint_attention_dim"], generator=g) * 0.1,
            "pooled_prompt_embeds": torch.randn(self.config["pooled_projection_dim"], generator=g),
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny FLUX-shaped config, 128 px (runs on CPU too)")
    parser.add_argument("--resume", action="store_true", help="phase 2: resume <out>/run's mid checkpoint")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1, help="per GPU")
    parser.add_argument("--mixed-precision", default=None, help="default: bf16 on GPU, no on CPU")
    parser.add_argument("--blocks", type=int, nargs=2, default=None, metavar=("DOUBLE", "SINGLE"),
                        help="FLUX.1-dev width with fewer blocks (default: all 19 + 38); e.g. where the disk cannot "
                        "hold full-size sharded checkpoints (float32 weights + AdamW states: ~144 GB per save)")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="memory and step time only: no checkpoint (and so no --resume)")
    args = parser.parse_args(argv)

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = state.device
    flux_config = SMALL if args.small else FLUX_DEV
    if args.blocks:
        flux_config = dict(flux_config, num_layers=args.blocks[0], num_single_layers=args.blocks[1])
    resolution = 128 if args.small else args.resolution
    text_len = 16 if args.small else args.text_len
    mixed = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    mid = max(1, args.steps // 2)
    run_dir, resumed_dir = os.path.join(args.out, "run"), os.path.join(args.out, "resumed")
    config = SmokeConfig(
        output_dir=resumed_dir if args.resume else run_dir, seed=0, train_batch_size=args.batch,
        max_train_steps=args.steps, learning_rate=1e-5, use_ema=False, mixed_precision=mixed,
        checkpointing_steps=0 if args.no_checkpoints else mid, checkpoints_total_limit=None, validation_steps=0, log_every=1, report_to="none",
        resume_from_checkpoint=os.path.join(run_dir, "checkpoints", f"checkpoint-{mid}") if args.resume else None,
        gradient_checkpointing=False,  # the FSDP config checkpoints activations per block
    )

    # every rank builds the same random model (same seed) on its own device; fully_shard then keeps its shard
    flux = build_flux(flux_config, device, torch.float32, seed=0)
    model = DFMTransformer2DModel.from_flux(flux, share_weights=True).to(device, torch.float32)
    del flux
    model.requires_grad_(True).train()
    decomposition = LaplacianDecomposition.from_config(model.config)
    num_stages = model.config.num_stages
    config.validate_objective(num_stages)
    dataset = SyntheticCachedInputs(max(8, 2 * state.num_processes * args.batch), flux_config, resolution // 8,
                                    text_len)
    times = {"step": [], "save_state": [], "load_state": []}
    seen = []
    peak = {"reset": False}

    def loss_fn(m, batch):
        if device.type == "cuda" and not peak["reset"]:  # peak over training, not over building / sharding
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            peak["reset"] = True
        seen.extend(int(i) for i in batch["index"])
        bands = decomposition.decompose(batch["latents"].float())
        b = batch["latents"].shape[0]
        embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device)
        guidance = torch.ones(b, device=embeds.device)

        def predict(inputs, draw):
            return m(hidden_states=inputs, encoder_hidden_states=embeds, pooled_projections=pooled,
                     timestep=draw.sigmas, num_active_stages=draw.num_active_stages, guidance=guidance,
                     txt_ids=text_ids, return_dict=False)[0]

        out = dfm_objective(config, bands, predict)
        return out.loss, out.logs

    def timed(name, fn):
        def wrapper(self, *a, **k):
            seconds, result = timed_call(lambda: fn(self, *a, **k), device)
            times[name].append(seconds)
            return result
        return wrapper

    Accelerator.save_state = timed("save_state", Accelerator.save_state)
    Accelerator.load_state = timed("load_state", Accelerator.load_state)

    def export_fn(full, folder):  # the main process, with the consolidated (unsharded) model
        tic = time.perf_counter()
        full.to(torch.bfloat16).save_pretrained(folder)
        times["export_write_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    result = run_training(config, model, dataset, loss_fn, export_fn=export_fn)
    total = time.perf_counter() - tic
    rows = result["log"]
    step_times = [1 / r["it_per_s"] for r in rows[1:]] if len(rows) > 1 else []  # the first step compiles/warms up
    mine = {
        "rank": state.process_index,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "samples": seen,
        "save_state_s": times["save_state"], "load_state_s": times["load_state"],
    }
    # run_training's end_training() has closed the process group: each rank writes its own file
    phase = "resume" if args.resume else "train"
    with open(os.path.join(args.out, f"rank{state.process_index}_{phase}.json"), "w") as f:
        json.dump(mine, f)
    if not state.is_main_process:
        return
    export = os.path.join(config.output_dir, "pipeline")
    tic = time.perf_counter()
    loaded = DFMTransformer2DModel.from_pretrained(export, torch_dtype=torch.bfloat16)  # one process, no sharding
    load_s = time.perf_counter() - tic
    summary = {
        "phase": "resume" if args.resume else "train", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "distributed_type": str(state.distributed_type), "num_processes": state.num_processes,
        "config": "small" if args.small else "FLUX.1-dev", "resolution": resolution, "text_len": text_len,
        "batch_per_process": args.batch, "mixed_precision": mixed,
        "parameters": sum(p.numel() for p in loaded.parameters()),
        "final_step": result["global_step"], "losses": {r["step"]: r["loss"] for r in rows},
        "median_step_s": statistics.median(step_times) if step_times else None,
        "wall_s": total, "export_write_s": times.get("export_write_s"), "export_load_one_process_s": load_s,
    }
    if args.resume:
        with open(os.path.join(args.out, "results_train.json")) as f:
            first = json.load(f)
        replayed = {s: v for s, v in first["losses"].items() if int(s) > mid}
        summary["replayed_steps_max_rel_loss_diff"] = max(
            abs(summary["losses"][int(s)] - v) / max(abs(v), 1e-12) for s, v in replayed.items())
        reference = DFMTransformer2DModel.from_pretrained(os.path.join(run_dir, "pipeline"), torch_dtype=torch.bfloat16)
        ref = reference.state_dict()
        summary["export_max_abs_diff_vs_uninterrupted"] = max(
            (t.float() - ref[k].float()).abs().max().item() for k, t in loaded.state_dict().items())
    deadline = time.time() + 120
    while time.time() < deadline and not all(
            os.path.isfile(os.path.join(args.out, f"rank{r}_{phase}.json")) for r in range(state.num_processes)):
        time.sleep(1)
    ranks = []
    for r in range(state.num_processes):
        try:
            with open(os.path.join(args.out, f"rank{r}_{phase}.json")) as f:
                ranks.append(json.load(f))
        except (OSError, ValueError):
            ranks.append({"rank": r, "missing": True})
    summary["ranks"] = ranks
    path = os.path.join(args.out, f"results_{summary['phase']}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("ranks", "losses")}, indent=1))
    for r in ranks:
        print(f"rank {r['rank']}: peak {r.get('peak_memory_gib')} GiB, save_state {r.get('save_state_s')}, "
              f"load_state {r.get('load_state_s')}")


if __name__ == "__main__":
    main()
