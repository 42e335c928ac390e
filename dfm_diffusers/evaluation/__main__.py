"""``python -m dfm_diffusers.evaluation {train-classifier,sample,score}``.

Examples::

    # once: the feature classifier (Fashion-MNIST 32 px, ~1 min on a GPU), saved with its test accuracy;
    # without a GPU add --preset cpu (a smaller classifier, 90.1% test accuracy; 4-17 min on 2 CPU cores)
    python -m dfm_diffusers.evaluation train-classifier --out eval/classifier

    # 10k class-balanced samples from a trained pipeline folder, 8-bit, to .npz
    python -m dfm_diffusers.evaluation sample --pipeline runs/dfm/pipeline --num-samples 10000 \\
        --guidance-scale 1.5 --steps-per-stage 30 10 --stage-thresholds 0.1 --dtype bf16 --out samples.npz

    # FD / SWD per level / precision / recall / class agreement against the test split
    python -m dfm_diffusers.evaluation score samples.npz --classifier eval/classifier --reference fashion_mnist \\
        --split test --out scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def classifier_config(args):
    """The ClassifierTrainingConfig of `train-classifier`'s arguments: the --preset's recipe, with the flags given
    explicitly on the command line overriding its fields."""
    from .classifier import classifier_preset

    config = classifier_preset(args.preset)
    for flag, field_ in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "learning_rate"),
                         ("widths", "widths"), ("blocks_per_stage", "blocks_per_stage"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            setattr(config, field_, getattr(args, flag))
    return config


def _train_classifier(args) -> dict:
    from .classifier import classifier_preset, estimate_training_seconds, format_duration, train_classifier_on_dataset

    device = _device(args.device)
    config = classifier_config(args)
    if device == "cpu" and args.preset != "cpu":
        eta = estimate_training_seconds(classifier_preset("cpu"), 3, args.resolution)
        logging.getLogger(__name__).warning(
            "no GPU: on this CPU `--preset cpu` would train a smaller classifier (90.1%% test accuracy when measured, "
            "score's default gate is 0.9) in about %s (timed just now)", format_duration(eta["total_seconds"]))
    model = train_classifier_on_dataset(args.out, args.dataset, args.resolution, args.data_dir, device,
                                        config, args.max_samples)
    accuracy = model.record["test_accuracy"]
    if accuracy < args.min_test_accuracy:
        raise ValueError(f"the classifier saved to {args.out} reaches only {accuracy:.4f} test accuracy "
                         f"(< {args.min_test_accuracy}): train longer (--steps) or wider (--widths)")
    return {"out": args.out, "test_accuracy": accuracy}


def _sample(args) -> dict:
    from ..pipelines import DFMDiTPipeline
    from .data import save_samples
    from .sampling import sample_pipeline

    device = _device(args.device)
    pipe = DFMDiTPipeline.from_pretrained(args.pipeline).to(device)
    images, labels = sample_pipeline(
        pipe, args.num_samples, batch_size=args.batch_size, seed=args.seed, guidance_scale=args.guidance_scale,
        steps_per_stage=args.steps_per_stage, stage_thresholds=args.stage_thresholds, autocast_dtype=args.dtype,
    )
    sched = pipe.scheduler
    metadata = dict(
        pipeline=os.path.abspath(args.pipeline), num_samples=args.num_samples, seed=args.seed,
        guidance_scale=args.guidance_scale, steps_per_stage=args.steps_per_stage or sched.config.steps_per_stage,
        stage_thresholds=args.stage_thresholds or sched.config.stage_thresholds, dtype=args.dtype, device=device,
        batch_size=args.batch_size,
    )
    save_samples(args.out, images, labels, metadata)
    return {"out": args.out, **metadata}


def _score(args) -> dict:
    from .classifier import load_feature_classifier
    from .data import dataset_images, load_samples
    from .scoring import Reference, score_images

    device = _device(args.device)
    classifier = load_feature_classifier(args.classifier, device, min_test_accuracy=args.min_classifier_accuracy)
    images, labels, metadata = load_samples(args.samples)
    if args.reference.endswith(".npz"):
        name = os.path.abspath(args.reference)

        def reference_images():
            return load_samples(args.reference)[:2]
    else:
        name = f"{args.reference}:{args.split}:{images.shape[1]}px:first-{args.max_reference}"

        def reference_images():
            return dataset_images(args.reference, args.split, images.shape[1], args.data_dir, args.max_reference,
                                  progress=True)
    if args.reference_cache:
        reference = Reference.cached(args.reference_cache, reference_images, classifier, k=args.k, name=name)
    else:
        reference = Reference.build(*reference_images(), classifier, k=args.k, name=name)
    result = score_images(
        images, labels, reference, classifier, swd_seed=args.seed, device=device,
        inception_weights=args.inception_fid, dinov2=args.dinov2_fd,
        swd_kwargs=dict(patches_per_image=args.swd_patches_per_image, min_resolution=args.swd_min_resolution),
    )
    result.update(samples=os.path.abspath(args.samples), sample_metadata=metadata,
                  classifier=os.path.abspath(args.classifier),
                  classifier_test_accuracy=classifier.record["test_accuracy"])
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dfm_diffusers.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-classifier", help="train and save the feature classifier with its test accuracy")
    p.add_argument("--out", required=True, help="folder for classifier.safetensors + classifier.json")
    p.add_argument("--dataset", default="fashion_mnist", help="image source with train and test splits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="default", choices=["default", "cpu"],
                   help="training recipe: default (4000 steps of 256 images, widths 32 64 128, 2 blocks; ~1 min on "
                        "a GPU) or cpu (2000 steps of 128 images, widths 16 32 64, 1 block, crops padded by 2 px, for "
                        "machines without a GPU); the flags below override its fields. The time estimate is printed before training")
    p.add_argument("--steps", type=int, default=None, help="training steps (preset: 4000 / cpu 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="(preset: 256 / cpu 128)")
    p.add_argument("--lr", type=float, default=None, help="(preset: 2e-3 / cpu 3e-3)")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="(preset: 32 64 128 / cpu 16 32 64)")
    p.add_argument("--blocks-per-stage", type=int, default=None, help="(preset: 2 / cpu 1)")
    p.add_argument("--seed", type=int, default=None, help="(preset: 0)")
    p.add_argument("--max-samples", type=int, default=None, help="first N images of each split (quick tests)")
    p.add_argument("--min-test-accuracy", type=float, default=0.9,
                   help="exit with an error (the classifier is still saved) below this test accuracy")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.set_defaults(func=_train_classifier)

    p = sub.add_parser("sample", help="N class-balanced 8-bit samples from a DFMDiTPipeline folder to .npz")
    p.add_argument("--pipeline", required=True, help="folder written by DFMDiTPipeline.save_pretrained")
    p.add_argument("--out", required=True, help=".npz with images (uint8 NHWC), labels, metadata")
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--steps-per-stage", type=int, nargs="+", default=None)
    p.add_argument("--stage-thresholds", type=float, nargs="+", default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.set_defaults(func=_sample)

    p = sub.add_parser("score", help="score an .npz of samples against a data set split or another .npz")
    p.add_argument("samples", help=".npz written by `sample` (or any .npz of uint8 images)")
    p.add_argument("--classifier", required=True, help="folder written by train-classifier")
    p.add_argument("--min-classifier-accuracy", type=float, default=0.9,
                   help="refuse a classifier whose recorded test accuracy is lower")
    p.add_argument("--reference", default="fashion_mnist", help="an .npz, or a data source ('fashion_mnist', ...)")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-reference", type=int, default=None, help="first N images of the reference split")
    p.add_argument("--reference-cache", default=None,
                   help=".npz caching the reference's images and features (rebuilt if made with another classifier)")
    p.add_argument("--k", type=int, default=3, help="k of the k-NN precision/recall manifolds")
    p.add_argument("--swd-patches-per-image", type=int, default=128)
    p.add_argument("--swd-min-resolution", type=int, default=16,
                   help="coarsest SWD pyramid level (16: the levels of a 2-stage DFM model at 32 px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SWD patches and projections")
    p.add_argument("--inception-fid", nargs="?", const="", default=None, metavar="WEIGHTS",
                   help="also compute Inception FID with this local weights file (needs torch-fidelity)")
    p.add_argument("--dinov2-fd", nargs="?", const="", default=None, metavar="MODEL",
                   help="also compute DINOv2 FD (FDD) with this local folder or Hub id")
    p.add_argument("--out", default=None, help="JSON file for the scores (they are printed too)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.set_defaults(func=_score)
    return parser


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (FileNotFoundError, ValueError, ModuleNotFoundError, OSError) as err:
        if argv is not None:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
