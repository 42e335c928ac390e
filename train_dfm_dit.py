"""Train a class-conditional DFM-DiT (or, with num_stages: 1, the plain flow-matching baseline).

    accelerate launch train_dfm_dit.py --config examples/configs/dfm_dit_b2_imagenet512.yaml [--key value ...]

Every setting is a field of dfm_diffusers.training.dit.DiTTrainingConfig; YAML values first, then overrides;
`--help` lists them all. Every bad setting is reported at once, before any data or model is loaded.
"""

from dfm_diffusers.training.config import parse_cli, run_cli
from dfm_diffusers.training.dit import DiTTrainingConfig, train_dit


def main(argv=None):
    config = parse_cli(DiTTrainingConfig, argv, __doc__)
    result = train_dit(config)
    print(f"finished at step {result['global_step']} (loss {result['loss']:.4f}); pipeline: {result['export_dir']}")


if __name__ == "__main__":
    run_cli(main)
