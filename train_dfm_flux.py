"""Finetune FLUX into a Decomposable Flow Matching model (LoRA or full), or finetune an existing DFM-FLUX.

    accelerate launch train_dfm_flux.py --config examples/configs/flux_dfm_finetune_lora.yaml [--key value ...]

``pretrained`` is a FluxPipeline (converted to DFM first: every stage reuses FLUX's layers, split into bands; new_stage_init)
or a DFMPipeline, as a local folder or Hub id; ``dataset`` an image folder with a metadata.jsonl of captions, a
saved / local data set or a Hub data set name. ``num_stages: 1`` finetunes plain flow matching with the same code.
Every setting is a field of dfm_diffusers.training.flux.FluxTrainingConfig; YAML values first, then overrides;
`--help` lists them all. Every bad setting is reported at once, before any data or model is loaded.
The trained pipeline is written to <output_dir>/pipeline (with LoRA: only the LoRA, the DFM stage layers and a JSON
naming the base model, loaded with DFMPipeline.from_lora_export(folder)).
"""


from dfm_diffusers.training.config import parse_cli, run_cli
from dfm_diffusers.training.flux import FluxTrainingConfig, train_flux


def main(argv=None):
    config = parse_cli(FluxTrainingConfig, argv, __doc__)
    result = train_flux(config)
    print(f"finished at step {result['global_step']} (loss {result['loss']:.4f}); pipeline: {result['export_dir']}")
    return result


if __name__ == "__main__":
    run_cli(main)
