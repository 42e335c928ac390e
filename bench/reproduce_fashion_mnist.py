"""Small-scale reproduction: DFM vs plain flow matching at equal training compute, Fashion-MNIST 32x32.

    python bench/reproduce_fashion_mnist.py --out <dir> [--steps 2000] [--data-dir DIR]

Both models are trained by train_dfm_dit's code with identical settings; only the stages differ:
FM = DiT-S/2 (1 stage), DFM = DFM-DiT-S/2 (2 stages, 16x16 -> 32x32, stage weights [0.9, 0.1]). Each generates
1000 samples per class with the same number of model evaluations (FM 40 steps, DFM 30 + 10). Quality is the
Frechet distance to the 10k test images in the feature space of the evaluation classifier trained on the training
set (dfm_diffusers.evaluation; no Inception network offline), with multiscale SWD and k-NN precision/recall.
Lower FD/SWD is better. "train vs test" is the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dfm_diffusers import DFMDiTPipeline  # noqa: E402
from dfm_diffusers.evaluation import (  # noqa: E402
    ClassifierTrainingConfig,
    Reference,
    dataset_images,
    load_or_train_classifier,
    sample_pipeline,
    score_images,
)
from dfm_diffusers.training.dit import DiTTrainingConfig, train_dit  # noqa: E402

METHODS = {
    "fm": dict(model="DiT-S/2", num_stages=1, steps_per_stage=[40]),
    "dfm": dict(model="DFM-DiT-S/2", num_stages=2, steps_per_stage=[30, 10], stage_thresholds=[0.1]),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--methods", nargs="+", default=["fm", "dfm"], choices=sorted(METHODS))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", default=None,
                        help="evaluation classifier folder (default <out>/classifier; trained there if missing)")
    parser.add_argument("--classifier-steps", type=int, default=4000)
    parser.add_argument("--max-samples", type=int, default=None, help="use only this many train/test images")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)

    classifier = load_or_train_classifier(
        args.classifier or os.path.join(args.out, "classifier"), device, data_dir=args.data_dir,
        max_samples=args.max_samples, config=ClassifierTrainingConfig(steps=args.classifier_steps, seed=args.seed),
    )
    train_x, train_y = dataset_images("fashion_mnist", "train", 32, args.data_dir, args.max_samples)
    test_x, test_y = dataset_images("fashion_mnist", "test", 32, args.data_dir, args.max_samples)
    reference = Reference.build(test_x, test_y, classifier, name="fashion_mnist:test")
    result = {"classifier_test_accuracy": classifier.record["test_accuracy"],
              "train_vs_test": score_images(train_x[:10000], train_y[:10000], reference, classifier)}
    result["fd_train_vs_test"] = result["train_vs_test"]["fd"]
    print(f"feature classifier: test accuracy {result['classifier_test_accuracy']:.4f}; "
          f"FD(train, test) = {result['fd_train_vs_test']:.3f}")

    for name in args.methods:
        config = DiTTrainingConfig(
            output_dir=os.path.join(args.out, name), dataset="fashion_mnist", data_dir=args.data_dir, resolution=32,
            max_samples=args.max_samples,
            random_flip=False, max_train_steps=args.steps, train_batch_size=args.batch_size, learning_rate=3e-4,
            lr_warmup_steps=200, ema_decay=0.999, mixed_precision="bf16" if device == "cuda" else "no",
            checkpointing_steps=args.steps, validation_steps=0, log_every=50, report_to=None,
            dataloader_num_workers=args.workers, seed=args.seed, **METHODS[name],
        )
        t0 = time.perf_counter()
        trained = train_dit(config)
        train_s = time.perf_counter() - t0
        pipe = DFMDiTPipeline.from_pretrained(trained["export_dir"]).to(device)
        samples, labels = sample_pipeline(pipe, 10 * args.per_class, batch_size=1000, seed=args.seed,
                                          guidance_scale=args.guidance_scale)
        scores = score_images(samples, labels, reference, classifier)
        result[name] = {
            "model": config.model,
            "train_steps": args.steps,
            "train_seconds": round(train_s, 1),
            "final_loss": trained["loss"],
            "fd_to_test": scores["fd"],
            "class_accuracy_of_samples": scores["class_agreement"],
            "scores": scores,
            "model_evaluations_per_sample": sum(config.steps_per_stage),
        }
        print(f"{name}: {result[name]}")
    with open(os.path.join(args.out, "reproduction.json"), "w") as f:
        json.dump(result, f, indent=2)
    if "fm" in result and "dfm" in result:
        change = result["dfm"]["fd_to_test"] / result["fm"]["fd_to_test"] - 1
        print(f"DFM vs FM: FD {result['dfm']['fd_to_test']:.3f} vs {result['fm']['fd_to_test']:.3f} "
              f"(DFM / FM - 1 = {change:+.1%}; negative means DFM is better)")


if __name__ == "__main__":
    main()
