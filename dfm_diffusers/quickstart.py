"""`make quickstart`: the embedded default job.

Writes ``pyramid.png`` (a real image from the scikit-image wheel decomposed into a 3-stage Laplacian pyramid,
with the coarse-to-fine previews) and ``schedule.png`` (the per-stage sigmas of the default 2-stage sampler).
"""

from __future__ import annotations

import argparse
import os
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
    line_plot({f"stage {s} sigma": sig[:, s] for s in range(2)}, title="DFM schedule: 30 + 10 steps, threshold 0.1").save(
        paths["schedule"]
    )
    print(f"pyramid: {[tuple(b.shape[-2:]) for b in bands]}, round-trip max error {error:.2e} -> {paths['pyramid']}")
    print(f"schedule: {sig.shape[0] - 1} steps -> {paths['schedule']}")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    args = parser.parse_args(argv)
    pyramid_demo(args.output_dir)


if __name__ == "__main__":
    main()
