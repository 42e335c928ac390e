"""``python -m dfm_diffusers.vae {train,diagnose} [--config PATH] [--key value ...]``

train     finetune an AutoencoderKL with the scale-equivariance loss (settings: VAETrainingConfig; `train --help`)
diagnose  spectra, equivariance and reconstruction PSNR of an AutoencoderKL on images (`diagnose --help`)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..training.config import parse_cli, require, run_cli, setting
from .training import VAEImageDataConfig, VAETrainingConfig


@dataclass
class DiagnoseConfig(VAEImageDataConfig):
    """Settings of `python -m dfm_diffusers.vae diagnose`."""

    resolution: int = 256
    output: str = setting("vae_diagnostics", "path prefix of the results: <output>.json and <output>.png")
    factors: list[int] = setting(help="equivariance factors s", default_factory=lambda: [2, 4])
    device: str = setting("auto", "torch device ('auto': cuda when available, else cpu)")

    def validate(self) -> list[str]:
        return require(all(s >= 2 for s in self.factors), "factors", f"must be integers >= 2, got {self.factors}")


def diagnose_main(argv) -> dict:
    import torch

    from .diagnostics import diagnose_vae, summary_line, write_diagnostics
    from .training import diagnostic_images, load_autoencoder

    config = parse_cli(DiagnoseConfig, argv, DiagnoseConfig.__doc__)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_autoencoder(config.vae, config.vae_subfolder).to(device)
    images = diagnostic_images(config, vae.config.in_channels)
    result = diagnose_vae(vae, images, config.factors, batch_size=config.diagnostic_batch_size,
                          num_bins=config.num_frequency_bins)
    json_path, png_path = write_diagnostics(result, config.output, title=os.path.basename(config.vae.rstrip("/")))
    print(summary_line(result))
    print(f"wrote {json_path} and {png_path}")
    return result


def train_main(argv) -> dict:
    from .training import train_vae

    config = parse_cli(VAETrainingConfig, argv, VAETrainingConfig.__doc__)
    result = train_vae(config)
    print(f"finished at step {result['global_step']} (loss {result['loss']:.4f}); VAE: {result['export_dir']}")
    return result


COMMANDS = {"train": train_main, "diagnose": diagnose_main}


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    run_cli(main)
