"""DFM vs flow matching at equal training compute: Fashion-MNIST 32x32, class-conditional, pixel space.

    python bench/reproduce_fashion_mnist.py --out OUT --work WORK [--arms fm dfm ...] [--seeds 0 1 2]
        [--steps 2400] [--eval-steps 300 600 1200 2400] [--batch-size 128] [--num-samples 5000]
        [--data-dir DIR] [--classifier DIR] [--model-kwargs JSON] [--speed-steps 10]

Every arm is train_dfm_dit.py with the same token count (256 tokens: DiT-S/2 at 32px, DFM-DiT-S/2 with stage 0
at 16px / patch 1 and stage 1 at 32px / patch 2), batch, optimizer, learning-rate schedule, EMA and steps; the
runs go as parallel processes on one GPU. Only the DFM settings differ (see ARMS). Each run exports its EMA
pipeline at every evaluation step; it is then sampled at 40 model evaluations per image (FM: 40 Euler steps;
DFM: the step split and threshold chosen per arm on the validation reference, see below), quantized to 8 bit
and scored against the 10k test images: Frechet distance in the features of a ResNet classifier trained on the
training split (dfm_diffusers.evaluation; >= 90% test accuracy), multiscale SWD and k-NN precision/recall.
Guidance scale 1.0 at every evaluation step and 1.5 at the last.

Sampler choice (DFM arms): on seed 0's last export, every (steps_per_stage, threshold) in SAMPLERS is scored
against VALIDATION_SIZE training images (validation reference; test images are never used for the choice); the
best FD is then used for every seed and step of that arm.

Speed (after the scores, one arm at a time): sampling time per image at 40 model evaluations with the arm's
sampler, and the training step time at --batch-size (results.json "speed", with ratios to FM).
Arms "dfm_coarse*" run the coarse phase on stage 0's own token grid (docs/coarse_grid.md); --model-kwargs shrinks
the trunk of every arm for a quick CPU run.

Re-running with the same --work skips finished training runs and finished evaluations (results.json is
written after each one), so an interrupted run continues. Outputs in --out: results.json, convergence.png,
samples_<arm>.png (seed 0, last step, with DFM's stage previews) and the classifier (if trained here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT  # noqa: E402

ARMS = {
    "fm": dict(model="DiT-S/2", num_stages=1),
    # the library's former defaults: bands as they are (stage_scales null; auto is the DiT default now), [0.9, 0.1]
    "dfm": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales=None),
    "dfm_auto": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto"),  # unit-variance bands
    "dfm_auto_w73": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto", stage_weights=[0.7, 0.3]),
    # the coarse phase on stage 0's own token grid (docs/coarse_grid.md): 1/4 of the tokens whenever stage 0 is alone
    "dfm_coarse": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto",
                       model_kwargs={"coarse_phase_on_coarse_grid": True}),
    "dfm_coarse_own": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto",
                           model_kwargs={"coarse_phase_on_coarse_grid": True, "coarse_grid_positions": "own"}),
    "dfm_coarse_scaled": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto",
                              model_kwargs={"coarse_phase_on_coarse_grid": True, "coarse_grid_positions": "scaled"}),
    "dfm_coarse_w73": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales="auto", stage_weights=[0.7, 0.3],
                           model_kwargs={"coarse_phase_on_coarse_grid": True}),
}
FM_SAMPLER = ([40], None)
SAMPLERS = {f"{a}+{b}@{t}": ([a, b], [t]) for a, b in ((35, 5), (30, 10)) for t in (0.1, 0.3)}
VALIDATION_SIZE = 10000


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def train_command(args, arm: str, seed: int) -> list[str]:
    # args.data_args (optional): other training data, e.g. latent shards + their VAE (bench/vae_equivariance_experiment)
    data = getattr(args, "data_args", None) or ["--dataset", "fashion_mnist", "--resolution", "32"]
    cmd = [
        sys.executable, os.path.join(ROOT, "train_dfm_dit.py"), "--output_dir", os.path.join(args.work, run_name(arm, seed)),
        *data, "--random_flip", "false",
        "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
        "--learning_rate", "3e-4", "--lr_warmup_steps", "200", "--ema_decay", "0.999",
        "--mixed_precision", "bf16" if torch.cuda.is_available() else "no",
        "--checkpointing_steps", "0", "--validation_steps", str(args.eval_steps[0]),
        "--save_pipeline_at_validation", "true", "--log_every", "50", "--report_to", "none",
        "--dataloader_num_workers", "2", "--seed", str(seed),
    ]
    if args.data_dir:
        cmd += ["--data_dir", args.data_dir]
    for key, value in arm_settings(args, arm).items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd + list(getattr(args, "train_args", []))  # extra settings (keys not set above)


def arm_settings(args, arm: str) -> dict:
    """The arm's training settings, with --model-kwargs (e.g. a smaller trunk) merged into its model_kwargs."""
    settings = dict(ARMS[arm])
    extra = json.loads(getattr(args, "model_kwargs", None) or "{}")
    if extra:
        settings["model_kwargs"] = {**extra, **settings.get("model_kwargs", {})}
    return settings


def train_all(args, runs: list[tuple[str, int]]) -> dict:
    """Train every run not yet finished, all at once as parallel processes; returns wall time and failures."""
    return train_parallel([(args, arm, seed) for arm, seed in runs])


def train_parallel(jobs: list[tuple[argparse.Namespace, str, int]]) -> dict:
    """(args, arm, seed) runs, each in ``args.work``: those not yet finished, all at once as parallel processes."""
    todo = [(a, arm, s) for a, arm, s in jobs
            if not os.path.isdir(os.path.join(a.work, run_name(arm, s), f"pipeline-{a.eval_steps[-1]}"))]
    procs = {}
    start = time.time()
    for a, arm, seed in todo:
        folder = os.path.join(a.work, run_name(arm, seed))
        os.makedirs(folder, exist_ok=True)
        log = open(os.path.join(folder, "train.log"), "w")
        procs[folder] = subprocess.Popen(train_command(a, arm, seed), stdout=log, stderr=subprocess.STDOUT)
    failed = [folder for folder, p in procs.items() if p.wait() != 0]
    seconds = time.time() - start
    print(f"trained {len(todo)} runs in parallel in {seconds:.0f} s; failed: {failed or 'none'}", flush=True)
    return {"runs_trained": len(todo), "parallel_seconds": round(seconds, 1), "failed": failed}


def load_pipe(args, arm: str, seed: int, step: int):
    from dfm_diffusers import DFMDiTPipeline

    pipe = DFMDiTPipeline.from_pretrained(os.path.join(args.work, run_name(arm, seed), f"pipeline-{step}"))
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def sample(args, pipe, sampler, guidance_scale: float, seed: int, num_samples: int):
    from dfm_diffusers.evaluation import sample_pipeline

    steps, thresholds = sampler
    return sample_pipeline(
        pipe, num_samples, batch_size=args.sample_batch_size, seed=1000 + seed, guidance_scale=guidance_scale,
        steps_per_stage=steps, stage_thresholds=thresholds,
        autocast_dtype="bf16" if torch.cuda.is_available() else None, progress=False,
    )


def summarize(results: dict, arms: list[str], seeds: list[int], eval_steps: list[int]) -> dict:
    """Mean and sample std over seeds of every metric, per arm, step and guidance scale; DFM / FM ratios."""
    table = {}
    for arm in arms:
        for step in eval_steps:
            for cfg in ("1.0", "1.5"):
                rows = [results["evals"].get(f"{arm}|{s}|{step}|{cfg}") for s in seeds]
                rows = [r for r in rows if r]
                if not rows:
                    continue
                cell = {}
                for metric in ("fd", "precision", "recall", "class_agreement"):
                    values = np.array([r[metric] for r in rows], dtype=float)
                    cell[metric] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0]
                swd = np.array([r["swd"]["mean"] for r in rows], dtype=float)
                cell["swd_mean"] = [float(swd.mean()), float(swd.std(ddof=1)) if len(swd) > 1 else 0.0]
                for level in rows[0]["swd"]["levels"]:
                    v = np.array([r["swd"]["levels"][level] for r in rows], dtype=float)
                    cell[f"swd_{level}"] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
                cell["seeds"] = len(rows)
                table[f"{arm}|{step}|{cfg}"] = cell
    ratios = {}
    for arm in arms:
        if arm == "fm":
            continue
        for step in eval_steps:
            for cfg in ("1.0", "1.5"):
                per_seed = [
                    results["evals"][f"{arm}|{s}|{step}|{cfg}"]["fd"] / results["evals"][f"fm|{s}|{step}|{cfg}"]["fd"]
                    for s in seeds
                    if f"{arm}|{s}|{step}|{cfg}" in results["evals"] and f"fm|{s}|{step}|{cfg}" in results["evals"]
                ]
                if per_seed:
                    v = np.array(per_seed)
                    ratios[f"{arm}|{step}|{cfg}"] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                                     len(v)]
    return {"table": table, "fd_ratio_to_fm_same_seed": ratios}


def plot_convergence(results: dict, arms: list[str], eval_steps: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        cells = [results["summary"]["table"].get(f"{arm}|{step}|1.0") for step in eval_steps]
        steps = [s for s, c in zip(eval_steps, cells) if c]
        cells = [c for c in cells if c]
        if not cells:
            continue
        for ax, metric in zip(axes, ("fd", "swd_mean")):
            mean = np.array([c[metric][0] for c in cells])
            std = np.array([c[metric][1] for c in cells])
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=f"{arm} ({cells[0]['seeds']} seeds)")
    for ax, title in zip(axes, ("Frechet distance to test (classifier features)", "SWD x1e3, mean over levels")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(eval_steps, [str(s) for s in eval_steps])
        ax.set_xlabel("training steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST 32px, guidance 1.0, 40 model evaluations; mean +- std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_speed(args, arm: str, sampler) -> dict:
    """Sampling time per image at 40 model evaluations (seed 0's last export, batch --sample-batch-size, median of 3
    after a warm-up) and training step time (decomposition + DFM objective + backward + AdamW at --batch-size on a
    fresh model of the arm's config, median of --speed-steps after 2 warm-up steps), one arm at a time."""
    from dfm_diffusers import LaplacianDecomposition
    from dfm_diffusers.evaluation import sample_pipeline
    from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective

    cuda = torch.cuda.is_available()
    autocast = "bf16" if cuda else None
    pipe = load_pipe(args, arm, args.seeds[0], args.eval_steps[-1])
    steps, thresholds = sampler
    n = args.sample_batch_size

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def draw():
        sample_pipeline(pipe, n, batch_size=n, seed=0, steps_per_stage=steps, stage_thresholds=thresholds,
                        autocast_dtype=autocast, progress=False)

    draw()
    sample_s = [timed(draw) for _ in range(3)]
    model = type(pipe.transformer).from_config(pipe.transformer.config).to(pipe.device).train()
    decomposition = LaplacianDecomposition.from_config(model.config)
    settings = arm_settings(args, arm)
    objective = DFMObjectiveConfig(stage_weights=settings.get("stage_weights"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.config.sample_size
    x = torch.rand(args.batch_size, model.config.in_channels, size, size, device=pipe.device) * 2 - 1
    labels = torch.randint(0, model.config.num_classes, (args.batch_size,), device=pipe.device)

    def train_step():
        def predict(inputs, d):
            return model(inputs, timestep=d.sigmas, num_active_stages=d.num_active_stages, class_labels=labels,
                         return_dict=False)[0]

        with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = dfm_objective(objective, decomposition.decompose(x), predict).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    train_s = [timed(train_step) for _ in range(args.speed_steps)]
    del model, optimizer, pipe
    return {"sample_seconds_per_image": float(np.median(sample_s)) / n, "sample_batch": n,
            "sampler": [steps, thresholds], "model_evaluations": sum(steps),
            "train_step_seconds": float(np.median(train_s)), "train_batch": args.batch_size,
            "sample_runs": sample_s, "train_runs": train_s}


def sample_grid(args, arm: str, sampler, path: str) -> None:
    """Seed 0, last step: per class, DFM's stage previews next to the final image (FM: the final images)."""
    from dfm_diffusers.visualize import image_grid

    pipe = load_pipe(args, arm, args.seeds[0], args.eval_steps[-1])
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(10) for _ in range(6)]
    steps, thresholds = sampler
    out = pipe(class_labels=labels, steps_per_stage=steps, stage_thresholds=thresholds, output_type="pt",
               generator=torch.Generator().manual_seed(0), return_previews=True)
    rows = []
    for c in range(10):
        row = []
        for i in range(c * 6, c * 6 + 6):
            row += [p[i].cpu() for p in out.previews[:-1]] + [out.images[i].cpu()]
        rows.append(row)
    image_grid(rows, size=48, value_range=(0, 1)).save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--eval-steps", nargs="+", type=int, default=[300, 600, 1200, 2400])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--sweep-samples", type=int, default=3000)
    p.add_argument("--sample-batch-size", type=int, default=2500)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--classifier", default=None, help="feature classifier folder (trained there if missing)")
    p.add_argument("--classifier-steps", type=int, default=4000)
    p.add_argument("--model-kwargs", default=None,
                   help='JSON merged into every arm\'s model_kwargs, e.g. \'{"num_layers": 4}\' for a tiny trunk')
    p.add_argument("--speed-steps", type=int, default=10, help="timed training steps per arm (speed section)")
    args = p.parse_args(argv)
    if args.steps != args.eval_steps[-1] or any(s % args.eval_steps[0] for s in args.eval_steps):
        p.error("--eval-steps must be multiples of the first one and end at --steps")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {"evals": {}, "sweeps": {}}

    def save():
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)

    from dfm_diffusers.evaluation import Reference, load_or_train_classifier, score_images
    from dfm_diffusers.evaluation.classifier import ClassifierTrainingConfig
    from dfm_diffusers.evaluation.data import dataset_images

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = [(a, s) for a in args.arms for s in args.seeds]
    # the classifier first (alone on the GPU), then all runs in parallel
    classifier_dir = args.classifier or os.path.join(args.out, "classifier")
    classifier = load_or_train_classifier(classifier_dir, device=device, data_dir=args.data_dir,
                                          config=ClassifierTrainingConfig(steps=args.classifier_steps))
    results["classifier"] = {k: v for k, v in classifier.record.items() if not isinstance(v, dict)}
    results.setdefault("training", []).append(train_all(args, runs))
    results["settings"] = {"arms": {a: arm_settings(args, a) for a in args.arms}, "seeds": args.seeds, "steps": args.steps,
                           "eval_steps": args.eval_steps, "batch_size": args.batch_size,
                           "num_samples": args.num_samples, "sweep_samples": args.sweep_samples,
                           "samplers": {k: v for k, v in SAMPLERS.items()}, "validation_size": VALIDATION_SIZE,
                           "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    save()

    test_x, test_y = dataset_images("fashion_mnist", "test", 32, args.data_dir)
    train_x, train_y = dataset_images("fashion_mnist", "train", 32, args.data_dir)
    rng = np.random.default_rng(0)
    val_idx = rng.choice(len(train_x), VALIDATION_SIZE, replace=False)
    test_ref = Reference.build(test_x, test_y, classifier, name="fashion_mnist test")
    val_ref = Reference.build(train_x[val_idx], train_y[val_idx], classifier, name="fashion_mnist train subset")

    chosen = {"fm": "40"}
    for arm in args.arms:
        if arm == "fm":
            continue
        sweep = results["sweeps"].setdefault(arm, {})
        pipe = None
        for name, sampler in SAMPLERS.items():
            if name in sweep:
                continue
            pipe = pipe or load_pipe(args, arm, args.seeds[0], args.eval_steps[-1])
            images, labels = sample(args, pipe, sampler, 1.0, args.seeds[0], args.sweep_samples)
            sweep[name] = score_images(images, labels, val_ref, classifier)["fd"]
            print(f"sweep {arm} {name}: validation FD {sweep[name]:.4f}", flush=True)
            save()
        chosen[arm] = min(sweep, key=sweep.get)
    results["chosen_sampler"] = chosen

    for step in args.eval_steps:
        for arm, seed in runs:
            cfgs = ["1.0", "1.5"] if step == args.eval_steps[-1] else ["1.0"]
            if all(f"{arm}|{seed}|{step}|{c}" in results["evals"] for c in cfgs):
                continue
            pipe = load_pipe(args, arm, seed, step)
            sampler = FM_SAMPLER if arm == "fm" else SAMPLERS[chosen[arm]]
            for cfg in cfgs:
                key = f"{arm}|{seed}|{step}|{cfg}"
                if key in results["evals"]:
                    continue
                t0 = time.time()
                images, labels = sample(args, pipe, sampler, float(cfg), seed, args.num_samples)
                score = score_images(images, labels, test_ref, classifier)
                score["sample_seconds"] = round(time.time() - t0, 1)
                results["evals"][key] = score
                print(f"{key}: FD {score['fd']:.4f} SWD {score['swd']['mean']:.3f} P {score['precision']:.3f} "
                      f"R {score['recall']:.3f} agree {score['class_agreement']:.3f}", flush=True)
                save()
    results["summary"] = summarize(results, args.arms, args.seeds, args.eval_steps)
    save()
    speed = results.setdefault("speed", {})
    for arm in args.arms:  # sequentially, nothing else running
        if arm not in speed:
            speed[arm] = measure_speed(args, arm, FM_SAMPLER if arm == "fm" else SAMPLERS[chosen[arm]])
            print(f"speed {arm}: {speed[arm]['sample_seconds_per_image'] * 1e3:.3f} ms / image at "
                  f"{speed[arm]['model_evaluations']} evaluations, {speed[arm]['train_step_seconds'] * 1e3:.1f} ms / "
                  f"training step", flush=True)
            save()
    if "fm" in speed:
        for arm in args.arms:
            speed[arm]["sampling_speedup_over_fm"] = speed["fm"]["sample_seconds_per_image"] / speed[arm]["sample_seconds_per_image"]
            speed[arm]["train_step_time_over_fm"] = speed[arm]["train_step_seconds"] / speed["fm"]["train_step_seconds"]
        save()
    plot_convergence(results, args.arms, args.eval_steps, os.path.join(args.out, "convergence.png"))
    for arm in args.arms:
        sample_grid(args, arm, FM_SAMPLER if arm == "fm" else SAMPLERS[chosen[arm]],
                    os.path.join(args.out, f"samples_{arm}.png"))
    for key, (mean, std, n) in results["summary"]["fd_ratio_to_fm_same_seed"].items():
        print(f"FD ratio {key}: {mean:.3f} +- {std:.3f} over {n} seeds")


if __name__ == "__main__":
    main()
