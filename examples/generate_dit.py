"""Generate a class grid with coarse-to-fine previews from a trained DFM-DiT pipeline folder (or Hub repo).

    python examples/generate_dit.py outputs/quickstart/pipeline --classes 0 1 2 3 --per-class 4 --out grid.png

Writes ``--out`` (rows = classes, the final samples) and ``<out>_previews.png`` (rows = classes; columns = the
preview after each stage, coarse to fine, the last being the final image).
"""

import argparse
import os

import torch

from dfm_diffusers import DFMDiTPipeline
from dfm_diffusers.visualize import image_grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="DFMDiTPipeline folder or Hub repo id")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids (default: the first 10)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--steps-per-stage", type=int, nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=64, help="pixel size of each grid tile")
    parser.add_argument("--out", default="dit_grid.png")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DFMDiTPipeline.from_pretrained(args.pipeline).to(device)
    classes = args.classes or list(range(min(10, pipe.transformer.config.num_classes)))
    labels = [c for c in classes for _ in range(args.per_class)]
    out = pipe(class_labels=labels, guidance_scale=args.guidance_scale, steps_per_stage=args.steps_per_stage,
               generator=torch.Generator().manual_seed(args.seed), output_type="pt", return_previews=True)
    images, previews = out.images.cpu(), [p.cpu() for p in out.previews]
    n = args.per_class
    image_grid([images[i * n:(i + 1) * n] for i in range(len(classes))], size=args.tile, value_range=(0, 1)).save(args.out)
    strip = [[p[i * n] for p in previews] for i in range(len(classes))]
    root, ext = os.path.splitext(args.out)
    image_grid(strip, size=args.tile, value_range=(0, 1)).save(f"{root}_previews{ext or '.png'}")
    print(f"wrote {args.out} and {root}_previews{ext or '.png'}")


if __name__ == "__main__":
    main()
