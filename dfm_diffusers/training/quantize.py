"""A bitsandbytes-quantized frozen base for LoRA finetuning (QLoRA) of the DFM FLUX transformer.

:func:`quantize_frozen_blocks` replaces every ``nn.Linear`` inside FLUX's double and single blocks (attention
projections, feed-forwards, AdaLN modulations: all but a fraction of a percent of FLUX's weights) by the
bitsandbytes layer diffusers' ``BitsAndBytesConfig`` loads (``Linear8bitLt``, LLM.int8 with outlier threshold 6;
or ``Linear4bit`` NF4 with double quantization, computing in ``compute_dtype``), holding the same weights. The DFM
per-stage layers (``stage_layers``: patch embeddings, timestep embedders, heads), the text / timestep embedders and
the norms are left in their dtype. The model is then flagged ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` as
diffusers' own quantizer does, so peft wraps the quantized layers in its bitsandbytes LoRA layers.

Why not ``from_pretrained(quantization_config=...)``: the DFM transformer is built by converting a FLUX checkpoint
(:meth:`DFMTransformer2DModel.from_flux`), which needs the plain weights, and diffusers' bitsandbytes quantizer
refuses to load without a CUDA / XPU device. Quantizing after the conversion serves both a FluxPipeline and a
DFMPipeline base, and each layer is quantized on ``device`` on its way there, so the bf16 transformer never sits on
the accelerator whole. The LoRA export stays what it is (the LoRA and the stage layers): it applies to the
unquantized base.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

#: quantize_base choices -> diffusers BitsAndBytesConfig arguments (QLoRA's NF4 with double quantization)
QUANTIZATION_CONFIGS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
}
#: the FLUX containers whose nn.Linear layers are quantized
QUANTIZED_FLUX_BLOCKS = ("transformer_blocks", "single_transformer_blocks")
MIN_BITSANDBYTES = (0, 50)  # setup.py's lower bound: the oldest version tested


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot be used here (not installed, too old), or None."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install 'bitsandbytes>=0.50,<0.51')"
    version = importlib.metadata.version("bitsandbytes")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_BITSANDBYTES:
        return f"needs bitsandbytes >= {'.'.join(map(str, MIN_BITSANDBYTES))} (installed: {version})"
    return None


def quantize_frozen_blocks(
    transformer: torch.nn.Module, mode: str, compute_dtype: torch.dtype, device: torch.device | str | None = None
) -> list[str]:
    """Replace the ``nn.Linear`` layers of ``transformer``'s FLUX blocks by frozen bitsandbytes layers of ``mode``
    ("int8" | "nf4") holding their weights, quantized on ``device`` (default: where each weight is). Returns the
    names of the replaced layers. The rest of the model (``stage_layers`` included) is untouched."""
    import bitsandbytes as bnb
    from diffusers import BitsAndBytesConfig
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    if mode not in QUANTIZATION_CONFIGS:
        raise ValueError(f"quantization mode must be one of {sorted(QUANTIZATION_CONFIGS)}, got {mode!r}")
    config = BitsAndBytesConfig(**QUANTIZATION_CONFIGS[mode], bnb_4bit_compute_dtype=compute_dtype)
    replaced = []
    for block_name in QUANTIZED_FLUX_BLOCKS:
        blocks = getattr(transformer, block_name)
        originals = {n: m for n, m in blocks.named_modules() if type(m) is torch.nn.Linear}
        replace_with_bnb_linear(blocks, modules_to_not_convert=[], quantization_config=config)  # empty (meta) layers
        for name, layer in blocks.named_modules():
            if name not in originals or layer is originals[name]:
                continue
            old = originals.pop(name)
            weight = old.weight.data
            if mode == "int8":
                layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                layer.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, quant_type=config.bnb_4bit_quant_type,
                    compress_statistics=config.bnb_4bit_use_double_quant,
                    quant_storage=config.bnb_4bit_quant_storage, module=layer,
                )
                # bitsandbytes' CPU inference shortcut (eval mode, no grad, an AVX512-BF16 CPU) repacks the weight in
                # place into another layout with bf16 statistics (and fails for in_features < 64); validation runs
                # between training steps, so the frozen base has to stay as quantized
                layer.support_avx512bf16_for_cpu = False
            layer.bias = None if old.bias is None else torch.nn.Parameter(old.bias.data, requires_grad=False)
            layer.to(device if device is not None else weight.device)  # bitsandbytes quantizes here
            replaced.append(f"{block_name}.{name}")
    transformer.is_loaded_in_8bit = mode == "int8"  # what peft's LoRA dispatch and diffusers' quantizer read
    transformer.is_loaded_in_4bit = mode == "nf4"
    return replaced


def quantized_linear_types() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return bnb.nn.Linear8bitLt, bnb.nn.Linear4bit
