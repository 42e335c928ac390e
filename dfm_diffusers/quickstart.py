"""`make quickstart`: the embedded default job.

Trains a small 2-stage DFM-DiT on Fashion-MNIST at 32x32 (16x16 -> 32x32) with train_dfm_dit's code and the
config examples/configs/quickstart_fashion_mnist.yaml, then writes into the output folder:
- ``samples.png``: final samples, one row per class;
- ``previews.png``: the coarse-to-fine strip, per class: stage-0 preview (16x16), then the final 32x32 image;
- ``loss_curve.png``: total loss and each stage's loss where it is trained (matplotlib);
- ``pyramid.png`` / ``schedule.png``: a real image (scikit-image wheel) decomposed into a 3-stage pyramid, and
  the default 2-stage sampling schedule;
- ``pipeline/``: the trained DFMDiTPipeline (EMA weights), loadable with from_pretrained.
About 5 minutes on 2 CPU cores; with a CUDA GPU the same command trains a bigger model for longer.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.util import find_spec

import numpy as np
import torch
from PIL import Image

from .decomposition import LaplacianDecomposition
from .schedulers import DFMScheduler
from .visualize import image_grid, line_plot


def sample_image_path(name: str = "astronaut.png") -> str:
    """Path of an image shipped inside the scikit-image wheel (no download)."""
    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed: `pip install scikit-image` (it ships the sample images)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the scikit-image installation")
    return path


def pyramid_demo(output_dir: str, num_stages: int = 3, resolution: int = 256) -> dict[str, str]:
    """Decompose a real image, check the exact round trip, and write the pyramid and schedule figures."""
    os.makedirs(output_dir, exist_ok=True)
    image = Image.open(sample_image_path()).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    dec = LaplacianDecomposition(num_stages, 2)
    bands = dec.decompose(x)
    error = (dec.recompose(bands) - x).abs().max().item()
    previews = [dec.preview(bands, s) for s in range(num_stages)]
    detail = [b / (2 * b.abs().max().clamp_min(1e-6)) for b in bands[1:]]
    rows = [[bands[0][0]] + [d[0] for d in detail], [p[0] for p in previews]]
    paths = {"pyramid": os.path.join(output_dir, "pyramid.png"), "schedule": os.path.join(output_dir, "schedule.png")}
    image_grid(rows, size=resolution).save(paths["pyramid"])
    sched = DFMScheduler(num_stages=2)
    sched.set_timesteps()
    sig = sched.sigmas.numpy()
    line_plot(
        {f"stage {s} sigma": sig[:, s] for s in range(2)}, paths["schedule"],
        title="DFM schedule: 30 + 10 steps, threshold 0.1", xlabel="sampling step", ylabel="sigma",
    )
    print(f"pyramid: {[tuple(b.shape[-2:]) for b in bands]}, round-trip max error {error:.2e} -> {paths['pyramid']}")
    print(f"schedule: {sig.shape[0] - 1} steps -> {paths['schedule']}")
    return paths


# the repository's example config, found from any working directory (the package sits next to examples/)
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs",
                              "quickstart_fashion_mnist.yaml")
#: What the same command changes when a CUDA GPU is present: a longer run of a bigger model.
GPU_OVERRIDES = dict(
    model="DFM-DiT-S/2", model_kwargs={}, train_batch_size=256, max_train_steps=4000, learning_rate=3e-4,
    lr_warmup_steps=500, ema_decay=0.999, mixed_precision="bf16", checkpointing_steps=2000, validation_steps=2000,
    steps_per_stage=[35, 5],
)


def sample_figures(pipeline_dir: str, output_dir: str, per_class: int = 8) -> dict[str, str]:
    """Load the exported pipeline and write samples.png (rows = classes) and previews.png (coarse-to-fine)."""
    from .pipelines import DFMDiTPipeline

    pipe = DFMDiTPipeline.from_pretrained(pipeline_dir)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    num_classes = pipe.transformer.config.num_classes
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    out = pipe(class_labels=labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               output_type="pt", return_previews=True)
    images, previews = out.images.cpu(), [p.cpu() for p in out.previews]
    paths = {"samples": os.path.join(output_dir, "samples.png"), "previews": os.path.join(output_dir, "previews.png")}
    image_grid([images[c * per_class:(c + 1) * per_class] for c in range(num_classes)], size=64, value_range=(0, 1)).save(
        paths["samples"]
    )
    strip = [[p[c * per_class] for p in previews] for c in range(num_classes)]
    image_grid(strip, size=96, value_range=(0, 1)).save(paths["previews"])
    return paths


def main(argv=None):
    from .data.fashion_mnist import FashionMNISTNotFoundError
    from .training.config import ConfigError, check_config, load_config
    from .training.dit import DiTTrainingConfig, train_dit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="DiTTrainingConfig YAML (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, help="overrides the config's output_dir")
    parser.add_argument("--cpu", action="store_true", help="use the CPU settings even if a GPU is present")
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.config):
        print(f"quickstart stopped: config {args.config} not found; pass --config PATH (the repository's is "
              f"examples/configs/quickstart_fashion_mnist.yaml)", file=sys.stderr)
        return 2
    if args.output_dir:
        overrides += ["--output_dir", args.output_dir]
    try:
        config = load_config(DiTTrainingConfig, args.config, overrides)
        if torch.cuda.is_available() and not args.cpu:
            for key, value in GPU_OVERRIDES.items():
                if not any(o.lstrip("-").split("=")[0].replace("-", "_") == key for o in overrides):
                    setattr(config, key, value)
            print(f"CUDA GPU found: a longer run ({config.max_train_steps} steps of {config.model})")
        if not config.resume_from_checkpoint and "--overwrite_output_dir" not in overrides:
            config.overwrite_output_dir = True  # a demo: running it again starts it over
        check_config(config)  # the GPU settings too, before anything is written or loaded
    except ConfigError as e:
        print(f"quickstart stopped: {e}", file=sys.stderr)
        return 2
    os.makedirs(config.output_dir, exist_ok=True)
    pyramid_demo(config.output_dir)
    try:
        result = train_dit(config)
    except FashionMNISTNotFoundError as e:
        print(f"\nquickstart stopped: {e}", file=sys.stderr)
        return 2
    paths = sample_figures(result["export_dir"], config.output_dir)
    print(f"trained {result['global_step']} steps, final loss {result['loss']:.4f}")
    for name in ("samples", "previews"):
        print(f"{name}: {paths[name]}")
    print(f"loss curve: {os.path.join(config.output_dir, 'loss_curve.png')}")
    print(f"pipeline: {result['export_dir']} (DFMDiTPipeline.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
