"""``python -m dfm_diffusers.data {encode,info,band-stats}``: encode images into latent shards, describe a data
source, or measure the per-stage scale of its Laplacian bands (and the ``stage_scales`` that standardize them).

Examples::

    # Fashion-MNIST (Debian's dataset-fashion-mnist) through a local VAE, 32px images
    python -m dfm_diffusers.data encode --source fashion_mnist --vae ./my-vae --resolution 32 --output latents/fm

    # ImageNet in an image folder through the FLUX VAE (subfolder of the pipeline repo), 256px
    python -m dfm_diffusers.data encode --source /data/imagenet/train --vae black-forest-labs/FLUX.1-dev \\
        --vae-subfolder vae --resolution 256 --output latents/in256 --batch-size 64 --num-workers 8

    # per-stage std of Fashion-MNIST's 2-stage pyramid at 32px, and the suggested stage_scales
    python -m dfm_diffusers.data band-stats --dataset fashion_mnist --resolution 32 --num_stages 2 --json stats.json

Rerunning an interrupted ``encode`` with the same arguments resumes it: shards already written are skipped.
"""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", "--dataset", dest="source", required=True,
        help="'fashion_mnist', a folder of class subfolders of images, a folder of latent shards, or a "
        "datasets.load_dataset name (e.g. a Hugging Face Hub data set)",
    )
    parser.add_argument("--split", default="train", help="data set split (default: train)")
    parser.add_argument("--image-column", default=None, help="image column (default: detected)")
    parser.add_argument("--label-column", default=None, help="label column (default: detected)")
    parser.add_argument("--max-samples", "--max_samples", type=int, default=None, help="use only the first N examples")
    parser.add_argument(
        "--data-dir", "--data_dir", default=None,
        help="Fashion-MNIST: folder of the IDX files (default /usr/share/datasets/fashion-mnist); "
        "Hub data sets: load_dataset's data_dir",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dfm_diffusers.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser("encode", help="encode images into safetensors latent shards with an AutoencoderKL")
    _add_source_args(encode)
    encode.add_argument("--vae", required=True, help="path or Hub id of a diffusers AutoencoderKL")
    encode.add_argument("--vae-subfolder", default=None, help="subfolder of the VAE inside --vae (e.g. 'vae')")
    encode.add_argument("--resolution", type=int, required=True, help="image resolution (resize + center crop)")
    encode.add_argument("--output", required=True, help="output folder (rerun into it to resume)")
    encode.add_argument("--batch-size", type=int, default=32)
    encode.add_argument("--shard-size", type=int, default=1024, help="latents per shard file")
    encode.add_argument("--sample-posterior", action="store_true",
                        help="store a posterior sample (seeded per image) instead of the posterior mean")
    encode.add_argument("--seed", type=int, default=0, help="seed of --sample-posterior's noise")
    encode.add_argument("--random-crop", action="store_true", help="random instead of center crops")
    encode.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    encode.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="VAE precision")
    encode.add_argument("--save-dtype", choices=list(_DTYPES), default="float32", help="stored latents' dtype")
    encode.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image decoding")

    info = commands.add_parser("info", help="describe a data source (size, classes, channels)")
    _add_source_args(info)
    info.add_argument("--resolution", type=int, default=None,
                      help="checked against latent shards; for images it only sets the transform (default 32)")

    stats = commands.add_parser(
        "band-stats", help="per-stage mean / std / energy of the data's Laplacian bands and the suggested stage_scales"
    )
    _add_source_args(stats)
    stats.add_argument("--resolution", type=int, default=None,
                       help="image resolution (default 32 for images; latent shards keep their own)")
    stats.add_argument("--num-stages", "--num_stages", type=int, default=2)
    stats.add_argument("--stage-factors", "--stage_factors", type=int, nargs="+", default=[2],
                       help="one factor for all stages or one per stage transition (default 2)")
    stats.add_argument("--antialias", action="store_true", help="antialiased downsampling (decomposition_antialias)")
    stats.add_argument("--num-samples", "--num_samples", type=int, default=4096,
                       help="examples to measure (a seeded random subset; default 4096)")
    stats.add_argument("--batch-size", "--batch_size", type=int, default=256)
    stats.add_argument("--vae", default=None, help="measure the latents of this AutoencoderKL (path or Hub id)")
    stats.add_argument("--vae-subfolder", "--vae_subfolder", default=None)
    stats.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    stats.add_argument("--num-workers", "--num_workers", type=int, default=0, help="DataLoader workers")
    stats.add_argument("--json", default=None, help="also write the statistics to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import build_image_dataset, encode_latent_shards

    try:
        if args.command == "encode":
            metadata = encode_latent_shards(
                args.source, args.vae, args.output, args.resolution, vae_subfolder=args.vae_subfolder,
                batch_size=args.batch_size, shard_size=args.shard_size, sample_posterior=args.sample_posterior,
                seed=args.seed, split=args.split, image_column=args.image_column, label_column=args.label_column,
                max_samples=args.max_samples, data_dir=args.data_dir, center_crop=not args.random_crop,
                device=args.device, dtype=_DTYPES[args.dtype], save_dtype=_DTYPES[args.save_dtype],
                num_workers=args.num_workers,
            )
            print(
                f"wrote {metadata['count']} latents {metadata['latent_channels']}x"
                f"{'x'.join(map(str, metadata['latent_size']))} in {metadata['num_shards']} shards to {args.output} "
                f"({metadata['num_classes']} classes; scaling {metadata['scaling_factor']}, "
                f"shift {metadata['shift_factor']})"
            )
        elif args.command == "band-stats":
            _band_stats(args, build_image_dataset)
        else:
            dataset = _info_dataset(args, build_image_dataset)
            print(dataset)
            names = getattr(dataset, "class_names", None)
            print(f"examples: {len(dataset)}  classes: {dataset.num_classes}  channels: {dataset.channels}")
            if names:
                print("class names: " + ", ".join(map(str, names[:20])) + (" ..." if len(names) > 20 else ""))
            if getattr(dataset, "bad_samples", None) and dataset.bad_samples.entries:
                print(f"bad samples: {dataset.bad_samples.summary()}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _band_stats(args, build_image_dataset):
    import json

    from ..decomposition import LaplacianDecomposition
    from .band_stats import STAGE_SCALE_MODES, band_statistics
    from .latents import _load_vae, is_latent_dir

    factors = args.stage_factors[0] if len(args.stage_factors) == 1 else args.stage_factors
    decomposition = LaplacianDecomposition(args.num_stages, factors, antialias=args.antialias)
    vae = None
    if args.vae:
        if is_latent_dir(args.source):
            raise ValueError(f"{args.source} already holds latents: leave out --vae")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae, _ = _load_vae(args.vae, args.vae_subfolder, device, torch.float32)
    channels = vae.config.in_channels if vae is not None and vae.config.in_channels in (1, 3) else None
    resolution = args.resolution or (None if is_latent_dir(args.source) else 32)
    dataset = build_image_dataset(
        args.source, resolution, random_flip=False, split=args.split, image_column=args.image_column,
        label_column=args.label_column, max_samples=args.max_samples, data_dir=args.data_dir, channels=channels,
    )
    stats = band_statistics(dataset, decomposition, num_samples=args.num_samples, batch_size=args.batch_size,
                            vae=vae, device=args.device, num_workers=args.num_workers)
    space = "latents" if vae is not None or is_latent_dir(args.source) else "pixels"
    print(f"{decomposition} on {stats.num_samples} examples of {args.source} ({space}):")
    print(stats.table())
    for mode in STAGE_SCALE_MODES:
        print(f"stage_scales {mode}: [{', '.join(f'{v:.4f}' for v in stats.suggested_stage_scales(mode))}]")
    if args.json:
        result = dict(source=args.source, split=args.split, resolution=resolution, space=space, vae=args.vae,
                      num_stages=args.num_stages, stage_factors=decomposition.factors, antialias=args.antialias,
                      **stats.to_dict())
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


def _info_dataset(args, build_image_dataset):
    from .latents import is_latent_dir

    resolution = args.resolution
    if resolution is None and not is_latent_dir(args.source):
        resolution = 32  # only affects the transform, not what info reports
    return build_image_dataset(
        args.source, resolution, random_flip=False, split=args.split, image_column=args.image_column,
        label_column=args.label_column, max_samples=args.max_samples, data_dir=args.data_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
