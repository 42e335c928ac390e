"""Pilot for the DFM-vs-FM reproduction: short parallel runs of several arms on one GPU, scored with FD.

    python bench/pilot_fashion_mnist.py --out DIR --work DIR [--steps 1200] [--data-dir DIR]

Every arm is train_dfm_dit.py with the same model size, token count (256), batch, optimizer and steps; the arms
run as parallel processes on one GPU. Each then draws 500 samples per class at 40 model evaluations and is scored
by the Frechet distance to the test set in a small classifier's features (dfm_diffusers.evaluation). DFM arms are
also sampled with a few threshold / step splits. A quick look before the full multi-seed run, not the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Fashion-MNIST 32px in [-1, 1]: band std 0.665 (stage 0) and 0.185 (stage 1), measured on 4000 training images.
STD = [0.665, 0.185]
ARMS = {
    "fm": dict(model="DiT-S/2", num_stages=1, steps_per_stage=[40]),
    "dfm": dict(model="DFM-DiT-S/2", num_stages=2),
    "dfm_std": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales=STD),
    "dfm_rel": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales=[1.0, STD[1] / STD[0]]),
    "dfm_std_w73": dict(model="DFM-DiT-S/2", num_stages=2, stage_scales=STD, stage_weights=[0.7, 0.3]),
}
SAMPLERS = {"30+10@0.1": ([30, 10], [0.1]), "30+10@0.3": ([30, 10], [0.3]), "20+20@0.1": ([20, 20], [0.1]),
            "20+20@0.3": ([20, 20], [0.3])}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--per-class", type=int, default=500)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    procs, t0 = {}, time.time()
    for name in args.arms:
        cmd = [sys.executable, os.path.join(ROOT, "train_dfm_dit.py"), "--output_dir", os.path.join(args.work, name),
               "--dataset", "fashion_mnist", "--resolution", "32", "--random_flip", "false",
               "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
               "--learning_rate", "3e-4", "--lr_warmup_steps", "200", "--ema_decay", "0.999",
               "--mixed_precision", "bf16", "--checkpointing_steps", str(args.steps), "--validation_steps", "0",
               "--log_every", "100", "--report_to", "none", "--dataloader_num_workers", "2", "--seed", "0"]
        if args.data_dir:
            cmd += ["--data_dir", args.data_dir]
        for k, v in ARMS[name].items():
            cmd += [f"--{k}", json.dumps(v)]
        procs[name] = subprocess.Popen(cmd, stdout=open(os.path.join(args.out, f"{name}.log"), "w"),
                                       stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        proc.wait()
    train_s = time.time() - t0
    print(f"trained {len(procs)} arms x {args.steps} steps in parallel: {train_s:.0f} s", flush=True)

    from dfm_diffusers import DFMDiTPipeline
    from dfm_diffusers.data import build_image_dataset
    from dfm_diffusers.evaluation import (classifier_accuracy, extract_features, frechet_distance,
                                          train_feature_classifier)

    def tensors(split):
        ds = build_image_dataset("fashion_mnist", 32, random_flip=False, split=split, data_dir=args.data_dir)
        items = [ds[i] for i in range(len(ds))]
        return torch.stack([i["pixel_values"] for i in items]), torch.stack([i["class_labels"] for i in items])

    train_x, train_y = tensors("train")
    test_x, test_y = tensors("test")
    clf = train_feature_classifier(train_x, train_y, 10, steps=1500, device="cuda", seed=0)
    result = {"train_seconds_parallel": train_s, "classifier_test_accuracy": classifier_accuracy(clf, test_x, test_y)}
    test_f = extract_features(clf, test_x)
    result["fd_train_vs_test"] = frechet_distance(extract_features(clf, train_x[:10000]), test_f)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    for name in args.arms:
        pipe = DFMDiTPipeline.from_pretrained(os.path.join(args.work, name, "pipeline")).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        samplers = {"40": ([40], None)} if name == "fm" else SAMPLERS
        result[name] = {}
        for sname, (steps, thr) in samplers.items():
            images = []
            for chunk in labels.split(2500):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = pipe(class_labels=chunk.tolist(), steps_per_stage=steps, stage_thresholds=thr,
                               generator=torch.Generator().manual_seed(int(chunk[0])), output_type="pt")
                images.append((out.images.float().clamp(0, 1) * 255).round().cpu() / 127.5 - 1)
            images = torch.cat(images)
            result[name][sname] = {"fd": frechet_distance(extract_features(clf, images), test_f),
                                   "class_acc": classifier_accuracy(clf, images, labels)}
            print(name, sname, result[name][sname], flush=True)
        rows = [json.loads(line) for line in open(os.path.join(args.work, name, "training_log.jsonl"))]
        result[name]["it_per_s"] = [r["it_per_s"] for r in rows]
        result[name]["final_loss"] = rows[-1]["loss"]
    json.dump(result, open(os.path.join(args.out, "pilot.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
