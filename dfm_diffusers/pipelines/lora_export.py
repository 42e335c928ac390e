"""Small LoRA exports of a DFM-finetuned FLUX: only what was trained, plus a reference to the base model.

A LoRA export folder holds
- ``pytorch_lora_weights.safetensors``: the LoRA in diffusers' format (``load_lora_weights`` reads it);
- ``dfm_trained_weights.safetensors``: every ``stage_layers.*`` tensor of the transformer (the per-stage patch
  embeddings, heads and stage embeddings: trained, or initialised at conversion, which is not reproducible from the
  base alone) and any other trained tensor outside the LoRA, under the plain transformer's names, float32;
- ``dfm_lora_config.json``: the base model (Hub id or folder, revision, FluxPipeline or DFMPipeline), the
  transformer config (num_stages, stage_factors, stage_upsampling, stage_scales, ...) and the scheduler config.

Everything outside ``stage_layers`` of a converted DFM transformer is FLUX's own (see
:meth:`DFMTransformer2DModel.from_flux`), so base + these three files give back the trained model exactly.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers.loaders import FluxLoraLoaderMixin

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRAINED_WEIGHT_NAME = "dfm_trained_weights.safetensors"
LORA_EXPORT_CONFIG_NAME = "dfm_lora_config.json"


def _jsonable(config) -> dict:
    return json.loads(json.dumps(dict(config), default=list))


def save_lora_export(folder: str, transformer, scheduler, base: dict, lora_layers: dict, lora_metadata: dict) -> dict:
    """Write the three files of a LoRA export of ``transformer`` (peft LoRA attached) into ``folder``.

    ``base``: dict(base_model=Hub id or folder, revision, kind="flux" | "dfm", ...) recorded as is;
    ``lora_layers``: peft's state dict of the LoRA (``get_peft_model_state_dict``). Returns the JSON written.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    FluxLoraLoaderMixin.save_lora_weights(
        folder, transformer_lora_layers=lora_layers, transformer_lora_adapter_metadata=lora_metadata,
        weight_name=LORA_WEIGHT_NAME,
    )
    trainable = {name for name, p in transformer.named_parameters() if p.requires_grad}
    tensors = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        name = key.replace(".base_layer.", ".")
        if name.startswith("stage_layers.") or key in trainable:
            tensors[name] = value.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, os.path.join(folder, TRAINED_WEIGHT_NAME), metadata={"format": "pt"})
    info = {
        "format": "dfm-lora-export",
        **base,
        "lora_weight_name": LORA_WEIGHT_NAME,
        "trained_weight_name": TRAINED_WEIGHT_NAME,
        "transformer_config": _jsonable(transformer.config),
        "scheduler_config": _jsonable(scheduler.config),
    }
    with open(os.path.join(folder, LORA_EXPORT_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info


def read_lora_export(folder: str) -> dict:
    path = os.path.join(folder, LORA_EXPORT_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no {LORA_EXPORT_CONFIG_NAME}: not a DFM LoRA export (train_dfm_flux.py)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _local(folder: str) -> str:
    if os.path.isdir(folder):
        return folder
    from huggingface_hub import snapshot_download

    return snapshot_download(folder)


class DFMLoraExportMixin:
    """``from_lora_export`` / ``load_dfm_lora`` for DFMPipeline."""

    def load_dfm_lora(self, folder: str, adapter_name: str = "default"):
        """Load a LoRA export into this pipeline (the base it names, already converted to DFM): the transformer gets
        the export's config (stage_scales, ...) and trained tensors, the scheduler the export's config, then the
        LoRA through ``load_lora_weights`` (as ``adapter_name``, by default peft's "default", the trainer's name). Returns
        self."""
        from safetensors.torch import load_file

        from ..models.transformer_dfm_flux import DFMTransformer2DModel
        from ..schedulers import DFMScheduler

        folder = _local(str(folder))
        info = read_lora_export(folder)
        old = self.transformer
        if hasattr(old, "peft_config"):
            raise ValueError("this pipeline's transformer already has a LoRA: load the export into a fresh base")
        trained = load_file(os.path.join(folder, info["trained_weight_name"]))
        config = info["transformer_config"]
        for key in ("num_stages", "stage_factors", "stage_upsampling"):
            if key in config and json.loads(json.dumps(old.config.get(key), default=list)) != config[key]:
                raise ValueError(
                    f"{folder} was trained with {key}={config[key]}, this pipeline's transformer has "
                    f"{old.config.get(key)}: load the base named in {LORA_EXPORT_CONFIG_NAME} "
                    f"({info.get('base_model')}) or use DFMPipeline.from_lora_export"
                )
        state = old.state_dict()
        unknown = sorted(set(trained) - set(state))
        if unknown:
            raise ValueError(f"{folder}: {unknown[:4]} are not tensors of this transformer")
        dtype, device = old.dtype, old.device
        state.update({k: v.to(device, dtype) for k, v in trained.items()})
        with torch.device("meta"):
            transformer = DFMTransformer2DModel.from_config(config)
        transformer.load_state_dict(state, strict=True, assign=True)
        self.register_modules(transformer=transformer.eval())
        self.register_modules(scheduler=DFMScheduler.from_config(info["scheduler_config"]))
        self.load_lora_weights(folder, weight_name=info["lora_weight_name"], adapter_name=adapter_name)
        return self

    @classmethod
    def from_lora_export(
        cls, folder: str, base: str | None = None, dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None, **kwargs,
    ):
        """The trained pipeline of a LoRA export: its base (``base``, default the one named in the export: a
        FluxPipeline is converted with the export's num_stages / stage_factors / stage_upsampling, a DFMPipeline
        loaded) + :meth:`load_dfm_lora`. ``kwargs`` go to the base's from_pretrained."""
        from diffusers import FluxPipeline

        dtype = dtype if dtype is not None else torch_dtype  # torch_dtype: diffusers' older name
        folder = _local(str(folder))
        info = read_lora_export(folder)
        if base is None:
            local = info.get("base_model_path")
            base = local if local and os.path.isdir(local) else info["base_model"]
        if "revision" not in kwargs and info.get("revision") and base == info["base_model"]:
            kwargs["revision"] = info["revision"]
        base_path = _local(str(base))
        if info.get("vae") and "vae" not in kwargs:  # trained with --vae: that autoencoder replaces the base's
            from diffusers import AutoencoderKL

            kwargs["vae"] = AutoencoderKL.from_pretrained(info["vae"], dtype=dtype)
        from .hub import pipeline_class_name

        with open(os.path.join(base_path, "model_index.json"), encoding="utf-8") as f:
            class_name = pipeline_class_name(json.load(f))
        if class_name == "FluxPipeline":
            config = info["transformer_config"]
            flux = FluxPipeline.from_pretrained(base_path, dtype=dtype, **kwargs)
            factors = config["stage_factors"]
            if isinstance(factors, list):
                factors = factors[0] if len(set(factors)) == 1 else (factors or 2)
            pipe = cls.from_flux_pipeline(
                flux, num_stages=config["num_stages"], stage_factors=factors,
                stage_upsampling=config.get("stage_upsampling"),
            )
        else:
            pipe = cls.from_pretrained(base_path, dtype=dtype, **kwargs)
        return pipe.load_dfm_lora(folder)
