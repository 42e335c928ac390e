"""DiT training speed (issue 21): the trainer against a bare loop, the data path, DiT-XL/2 MFU and DFM / FM.

    python bench/bench_dit.py --out OUT --suite loop   # train_dit vs a bare loop: DiT-S/2 on Fashion-MNIST (32px,
                                                       # batch 256) and DiT-B/2 on latent shards (4x32x32, batch 256)
    python bench/bench_dit.py --out OUT --suite xl     # DiT-XL/2 (FM) and DFM-DiT-XL/2 at 256px and 512px latent
                                                       # token counts (16x32x32, 16x64x64): s/step, MFU, DFM / FM
    python bench/bench_dit.py --out OUT --suite data   # the data path alone: samples/s, per-sample vs preloaded
    python bench/bench_dit.py --out OUT --suite all --small --device cpu    # tiny models: a sanity run on the CPU

One command per suite, resumable: every arm runs in its own process (clean memory, compile caches) and writes
<out>/<suite>/<arm>.json as it finishes; arms whose file exists are skipped, so rerunning the command after a stop
goes on where it stopped (``--arms PATTERN`` picks arms by fnmatch pattern). A summary table is printed and
written to <out>/<suite>/summary.md at the end.

Arms:
  - ``trainer``: the library's ``train_dit`` (data built and preloaded as configured, accelerate, bf16 autocast,
    the DFM objective, clipping, fused AdamW, EMA, logging every 10 steps); s/step = 1 / the median ``it_per_s`` of
    the log windows after the warm-up steps; ``data_wait_s`` from the same rows. ``trainer_per_sample``: the same
    with ``preload: off`` and 4 DataLoader workers (the per-sample path the loop had before). ``xl`` trainer arms
    run ``run_training`` with DiTTask's loss, as train_dit does, on preloaded random latents (no sampling/export).
  - ``bare``: the same model, optimizer (fused AdamW on CUDA) and DiTTask loss on one random batch already on the
    device: forward + loss + backward + optimizer step, timed over ``--steps`` steps with one synchronization at
    each end; no clipping, EMA, logging or data.
  - ``*_compile``: ``torch.compile`` of the model (``torch_compile: true``) in the trainer or the bare loop;
    ``trainer_compile_objective``: of the whole loss, objective and model in one graph (``torch_compile_objective``).
  - MFU = model FLOPs of one step (forward + backward, counted by torch.utils.flop_counter on the bare step) /
    s per step / ``--peak-tflops`` (989: H100/H200 dense bf16).
Fashion-MNIST comes from /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist); without it a
synthetic set of the same size and format is written and the result says so. Latent shards are random (the
data path's cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_name, git_commit, now, sync, versions, write_json  # noqa: E402

PEAK_TFLOPS = 989.0
TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16)


def settings(small: bool) -> dict:
    """Data and model sizes of the suites (``small``: a CPU sanity run)."""
    if small:
        return dict(
            s2=dict(model="DiT-S/2", model_kwargs=TINY, batch=16, samples=512, warmup=10, steps=20),
            b2=dict(model="DiT-B/2", model_kwargs=TINY, batch=16, samples=512, latent=(4, 8, 8), resolution=64,
                    warmup=10, steps=20),
            xl=dict(models=("DiT-S/2", "DFM-DiT-S/2"), model_kwargs=TINY, channels=4, sizes={256: 8, 512: 16},
                    batches={256: 8, 512: 4}, warmup=2, steps=4),
            data=dict(samples=2048, batch=64, latent=(4, 8, 8), batches=16),
        )
    return dict(
        s2=dict(model="DiT-S/2", model_kwargs={}, batch=256, samples=None, warmup=30, steps=200),
        b2=dict(model="DiT-B/2", model_kwargs={}, batch=256, samples=16384, latent=(4, 32, 32), resolution=256,
                warmup=30, steps=150),
        xl=dict(models=("DiT-XL/2", "DFM-DiT-XL/2"), model_kwargs={}, channels=16, sizes={256: 32, 512: 64},
                batches={256: 256, 512: 64}, warmup=10, steps=30),
        data=dict(samples=None, batch=256, latent=(4, 32, 32), batches=100),
    )


def arms(small: bool) -> dict[str, list[str]]:
    xl = [f"xl{res}.{m}.{mode}" for res in (256, 512) for m in ("fm", "dfm")
          for mode in ("bare", "bare_compile", "trainer_compile", "trainer_compile_objective")]
    if small:  # (compiling on the CPU takes minutes and is off in the trainer there)
        xl = [a for a in xl if "compile" not in a] + [f"xl{res}.{m}.trainer" for res in (256, 512) for m in ("fm", "dfm")]
    loop = [f"{d}.{mode}" for d in ("s2_fmnist", "b2_latents")
            for mode in ("bare", "trainer", "trainer_per_sample")
            + (() if small else ("bare_compile", "trainer_compile", "trainer_compile_objective"))]
    data = [f"{d}.{mode}" for d in ("fmnist", "latents") for mode in ("per_sample_w0", "per_sample_w4", "preloaded")]
    return {"loop": loop, "xl": xl, "data": data}


# ------------------------------------------------------------------------------------------------------ data


def write_idx(path: str, array) -> None:
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.tobytes())


def fashion_mnist_dir(out: str) -> tuple[str, bool]:
    """(folder of the Fashion-MNIST IDX files, whether they are synthetic)."""
    import numpy as np

    from dfm_diffusers.data import FASHION_MNIST_DIR

    if os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        return FASHION_MNIST_DIR, False
    folder = os.path.join(out, "data", "fashion-mnist-synthetic")
    if not os.path.isfile(os.path.join(folder, "train-labels-idx1-ubyte.gz")):
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng(0)
        write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (60000, 28, 28)))
        write_idx(os.path.join(folder, "train-labels-idx1-ubyte.gz"), rng.integers(0, 10, 60000))
    return folder, True


def latent_dir(out: str, count: int, shape, resolution: int) -> str:
    """Random bf16 latent shards (1000 classes), written once."""
    from dfm_diffusers.data import is_latent_dir, write_latent_shards

    folder = os.path.join(out, "data", f"latents-{count}-{'x'.join(map(str, shape))}")
    if not is_latent_dir(folder):
        g = torch.Generator().manual_seed(0)
        tmp = folder + f".tmp-{os.getpid()}"
        write_latent_shards(tmp, torch.randn(count, *shape, generator=g).bfloat16(),
                            torch.randint(0, 1000, (count,), generator=g), resolution, num_classes=1000)
        os.replace(tmp, folder)
    return folder


# ------------------------------------------------------------------------------------------------ one arm


def dit_config(args, arm: str, output_dir: str):
    """The DiTTrainingConfig of a loop / xl arm."""
    from dfm_diffusers.training.dit import DiTTrainingConfig

    s = settings(args.small)
    group, mode = arm.split(".")[0], arm.split(".")[-1]
    cuda = args.device.startswith("cuda")
    common = dict(output_dir=output_dir, mixed_precision="bf16" if cuda else "no", report_to="none", log_every=10,
                  checkpointing_steps=0, validation_steps=0, stage_scales=None, learning_rate=1e-4,
                  torch_compile="compile" in mode, torch_compile_objective="compile_objective" in mode, preload="off" if "per_sample" in mode else "auto",
                  dataloader_num_workers=4 if "per_sample" in mode else 0, seed=0)
    if group == "s2_fmnist":
        c = s["s2"]
        data_dir, synthetic = fashion_mnist_dir(args.out)
        config = DiTTrainingConfig(dataset="fashion_mnist", data_dir=data_dir, resolution=32, model=c["model"],
                                   model_kwargs=c["model_kwargs"], train_batch_size=c["batch"],
                                   max_samples=c["samples"], max_train_steps=c["warmup"] + c["steps"], **common)
        return config, dict(synthetic_data=synthetic, warmup=c["warmup"])
    if group == "b2_latents":
        c = s["b2"]
        folder = latent_dir(args.out, c["samples"], c["latent"], c["resolution"])
        config = DiTTrainingConfig(dataset=folder, resolution=c["resolution"], model=c["model"],
                                   model_kwargs=c["model_kwargs"], train_batch_size=c["batch"],
                                   max_train_steps=c["warmup"] + c["steps"], **common)
        return config, dict(synthetic_data=True, warmup=c["warmup"])
    c = s["xl"]  # xl256.fm.bare ...
    res, kind = int(group[2:]), arm.split(".")[1]
    config = DiTTrainingConfig(dataset="random", resolution=res, model=c["models"][kind == "dfm"],
                               model_kwargs=c["model_kwargs"], train_batch_size=c["batches"][res],
                               max_train_steps=c["warmup"] + c["steps"], **common)
    return config, dict(latent=(c["channels"], c["sizes"][res], c["sizes"][res]), warmup=c["warmup"],
                        tokens=(c["sizes"][res] // 2) ** 2)


def trainer_rows_summary(rows: list[dict], warmup: int) -> dict:
    timed = [r for r in rows if r["step"] > warmup and "it_per_s" in r]
    it_per_s = statistics.median(r["it_per_s"] for r in timed)
    return dict(s_per_step=1 / it_per_s, it_per_s=it_per_s, data_wait_s=statistics.median(r["data_wait_s"] for r in timed),
                windows=[round(r["it_per_s"], 3) for r in timed])


def run_trainer(args, arm: str) -> dict:
    from dfm_diffusers.training.dit import train_dit

    config, info = dit_config(args, arm, os.path.join(args.out, "runs", arm))
    t0 = time.perf_counter()
    result = train_dit(config)
    return dict(kind="trainer", model=config.model, batch=config.train_batch_size, preload=config.preload,
                workers=config.dataloader_num_workers, compile=config.torch_compile, total_s=time.perf_counter() - t0,
                **trainer_rows_summary(result["log"], info["warmup"]), **{k: v for k, v in info.items() if k != "warmup"})


def bare_batch(config, info, device, num_classes):
    g = torch.Generator().manual_seed(0)
    b = config.train_batch_size
    if "latent" in info:
        x = {"latents": torch.randn(b, *info["latent"], generator=g)}
    else:
        x = {"pixel_values": torch.rand(b, 1, config.resolution, config.resolution, generator=g) * 2 - 1}
    x["class_labels"] = torch.randint(0, num_classes, (b,), generator=g)
    return {k: v.to(device) for k, v in x.items()}


def build_for(config, info, device):
    """(model, DiTTask, in_channels, sample size, num_classes) of an arm, the model on ``device``."""
    from accelerate.utils import set_seed

    from dfm_diffusers.training.dit import DiTTask, build_model

    if "latent" in info:
        channels, size, num_classes = info["latent"][0], info["latent"][1], 1000
    else:  # Fashion-MNIST
        channels, size, num_classes = 1, config.resolution, 10
    set_seed(config.seed)
    model = build_model(config, channels, size, num_classes).to(device).train()
    return model, DiTTask(config, model), num_classes


def run_bare(args, arm: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dfm_diffusers.training.loop import make_optimizer

    device = torch.device(args.device)
    config, info = dit_config(args, arm, os.path.join(args.out, "runs", arm))
    if arm.startswith("b2"):
        info["latent"] = settings(args.small)["b2"]["latent"]
    model, task, num_classes = build_for(config, info, device)
    batch = bare_batch(config, info, device, num_classes)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config, fused=device.type == "cuda")
    forward = torch.compile(model) if config.torch_compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    def step():
        with autocast:
            loss, _ = task.loss_fn(forward, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    s = settings(args.small)["xl" if arm.startswith("xl") else arm.split("_")[0]]
    for _ in range(s["warmup"]):
        step()
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss, _ = task.loss_fn(model, batch)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    sync(device)
    seconds = (time.perf_counter() - t0) / s["steps"]
    flops = counter.get_total_flops()
    out = dict(kind="bare", model=config.model, batch=config.train_batch_size, compile=config.torch_compile,
               s_per_step=seconds, it_per_s=1 / seconds, samples_per_s=config.train_batch_size / seconds,
               model_tflop_per_step=flops / 1e12, mfu=flops / seconds / (args.peak_tflops * 1e12),
               params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               **{k: v for k, v in info.items() if k != "warmup"})
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_xl_trainer(args, arm: str) -> dict:
    """run_training with DiTTask's loss (what train_dit runs) on random latents preloaded on the device."""
    from dfm_diffusers.data.preload import PreloadedDataset
    from dfm_diffusers.training.loop import run_training

    config, info = dit_config(args, arm, os.path.join(args.out, "runs", arm))
    model, task, num_classes = build_for(config, info, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n = config.train_batch_size * 4
    data = PreloadedDataset(None, torch.randn(n, *info["latent"], generator=g).bfloat16(),
                            torch.randint(0, num_classes, (n,), generator=g), placement="auto")
    result = run_training(config, model, data, task.loss_fn)
    return dict(kind="trainer", model=config.model, batch=config.train_batch_size, compile=config.torch_compile,
                **trainer_rows_summary(result["log"], info["warmup"]),
                **{k: v for k, v in info.items() if k != "warmup"})


def run_data(args, arm: str) -> dict:
    """Batches/s of the loop's data path alone: SeededSamples over the data set in a DataLoader as run_training
    builds it (shuffled, per-sample reads with 0 or 4 workers, or whole preloaded batches), on the CPU."""
    from dfm_diffusers.data import LatentShardDataset, build_image_dataset, preload_dataset
    from dfm_diffusers.data.seeded import SeededSamples, already_collated

    c = settings(args.small)["data"]
    group, mode = arm.split(".")
    t0 = time.perf_counter()
    if group == "fmnist":
        data_dir, synthetic = fashion_mnist_dir(args.out)
        dataset = build_image_dataset("fashion_mnist", 32, random_flip=True, data_dir=data_dir, max_samples=c["samples"])
    else:
        synthetic = True
        dataset = LatentShardDataset(latent_dir(args.out, c["samples"] or 16384, c["latent"], 256))
    if mode == "preloaded":
        dataset = preload_dataset(dataset, "cpu", progress=False)
    setup_s = time.perf_counter() - t0
    reader = SeededSamples(dataset, 0)
    workers = 4 if mode.endswith("w4") else 0
    loader = torch.utils.data.DataLoader(
        reader, batch_size=c["batch"], shuffle=True, drop_last=True, num_workers=workers,
        collate_fn=already_collated if reader.batched else None, generator=torch.Generator().manual_seed(0),
        persistent_workers=workers > 0,
    )
    batches, seen, t0 = 0, 0, None
    while batches < c["batches"] + 5:
        for batch in loader:
            if batches == 5:  # the workers started, the first batches out
                t0 = time.perf_counter()
            batches += 1
            seen += len(batch["class_labels"]) if batches > 5 else 0
            if batches >= c["batches"] + 5:
                break
        reader.epoch += 1
    seconds = time.perf_counter() - t0
    return dict(kind="data", mode=mode, workers=workers, batch=c["batch"], samples_per_s=seen / seconds,
                s_per_batch=seconds / c["batches"], setup_s=setup_s, synthetic_data=synthetic, threads=torch.get_num_threads())


def run_arm(args, suite: str, arm: str) -> dict:
    if suite == "data":
        out = run_data(args, arm)
    elif arm.endswith(("bare", "bare_compile")):
        out = run_bare(args, arm)
    elif suite == "xl":
        out = run_xl_trainer(args, arm)
    else:
        out = run_trainer(args, arm)
    device = torch.device(args.device)
    out.update(arm=arm, suite=suite, small=args.small, **versions(), commit=git_commit(), date=now(),
               device=device_name(device, f"cpu ({os.cpu_count()} cores)"))
    return out


# ------------------------------------------------------------------------------------------------ summary


def summary(suite: str, rows: dict[str, dict]) -> str:
    lines = []
    if suite == "loop":
        lines += ["| data | arm | s / step | it / s | data wait s / step | trainer / bare |", "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            data, mode = name.split(".")
            bare = rows.get(f"{data}.bare_compile" if "compile" in mode else f"{data}.bare")  # (vs the compiled model)
            ratio = f"{r['s_per_step'] / bare['s_per_step']:.3f}" if bare and r["kind"] == "trainer" else ""
            lines.append(f"| {data} | {mode} | {r['s_per_step']:.4f} | {r['it_per_s']:.2f} | "
                         f"{r.get('data_wait_s', 0):.4f} | {ratio} |")
    elif suite == "xl":
        lines += ["| tokens | model | arm | batch | s / step | samples / s | TFLOP / step | MFU | DFM / FM |",
                  "|---|---|---|---|---|---|---|---|---|"]
        flops = {n.split(".")[0] + "." + n.split(".")[1]: r["model_tflop_per_step"] for n, r in rows.items()
                 if "model_tflop_per_step" in r}
        for name, r in rows.items():
            res, kind, mode = name.split(".")
            tflop = r.get("model_tflop_per_step", flops.get(f"{res}.{kind}"))
            mfu = f"{tflop / r['s_per_step'] / PEAK_TFLOPS:.1%}" if tflop else ""
            other = rows.get(f"{res}.fm.{mode}") if kind == "dfm" else None
            ratio = f"{r['s_per_step'] / other['s_per_step']:.3f}" if other else ""
            lines.append(f"| {r.get('tokens', '')} | {r['model']} | {mode} | {r['batch']} | {r['s_per_step']:.4f} | "
                         f"{r['batch'] / r['s_per_step']:.1f} | {tflop or 0:.3g} | {mfu} | {ratio} |")
    else:
        lines += ["| data | path | workers | samples / s | s / batch |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name.split('.')[0]} | {r['mode']} | {r['workers']} | {r['samples_per_s']:.0f} | "
                         f"{r['s_per_batch']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--suite", choices=["loop", "xl", "data", "all"], default="all")
    parser.add_argument("--arms", default="*", help="fnmatch pattern of the arms to run, e.g. 's2_fmnist.*'")
    parser.add_argument("--small", action="store_true", help="tiny models and data (a sanity run, e.g. on the CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run this one arm in this process
    args = parser.parse_args(argv)
    suites = ["data", "loop", "xl"] if args.suite == "all" else [args.suite]
    if args.arm:
        (suite,) = suites
        result = run_arm(args, suite, args.arm)
        write_json(os.path.join(args.out, suite, f"{args.arm}.json"), result)
        return
    from dfm_diffusers.utils import configure_attention_backends

    configure_attention_backends()
    for suite in suites:
        os.makedirs(os.path.join(args.out, suite), exist_ok=True)
        names = [a for a in arms(args.small)[suite] if fnmatch.fnmatch(a, args.arms)]
        rows = {}
        for arm in names:
            path = os.path.join(args.out, suite, f"{arm}.json")
            if not os.path.isfile(path):
                cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--suite", suite, "--arm", arm,
                       "--device", args.device, "--peak-tflops", str(args.peak_tflops)] + (["--small"] if args.small else [])
                print(f"[{suite}] {arm} ...", flush=True)
                code = subprocess.call(cmd, env=dict(os.environ, TQDM_DISABLE="1"))
                if code != 0 or not os.path.isfile(path):
                    print(f"[{suite}] {arm}: failed (exit {code})", flush=True)
                    continue
            with open(path) as f:
                rows[arm] = json.load(f)
        table = summary(suite, rows)
        print(f"\n{suite}:\n{table}\n", flush=True)
        with open(os.path.join(args.out, suite, "summary.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
