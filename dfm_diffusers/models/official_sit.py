"""Official SiT-family checkpoints -> DFMDiTTransformer2DModel, exactly (docs/official_checkpoints.md).

Sources (``source`` argument):

- ``"elit-dfm"``: DFM-SiT of the ELIT repository (snap-research/elit, models/sit_dfm.py): per-stage patch
  embedders, timestep embedders and final layers, no stage-index embedding;
- ``"elit-sit"``: the SiT baselines of the ELIT repository (models/sit.py);
- ``"repa"``: REPA's SiT (sihyun-yu/REPA; the same module, its REPA projector heads are dropped);
- ``"sit"``: the original SiT release (willisma/SiT): time runs from noise (t = 0) to data (t = 1) and the model
  predicts data - noise, optionally with DiT's learned-sigma channels.

The weight maps: the final layers' adaLN linear is (shift, scale) there and (scale, shift) in diffusers'
AdaLayerNormContinuous; their output features are ordered (patch row, patch column, channel) there and (channel,
patch row, patch column) here; conv patch embeddings become linears over (channel, row, column) patches. The SiT
family embeds the raw time in [0, 1] (``timestep_scale=1``). For ``"sit"`` the time reversal t = 1 - sigma is a
rotation of every sinusoid pair, folded into the first timestep-MLP weight, and the velocity's sign into the head.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from typing import Any

import torch

from .transformer_dfm_dit import DFMDiTTransformer2DModel

OFFICIAL_SOURCES = ("elit-dfm", "elit-sit", "repa", "sit")

#: Heads of the official model sizes, by the size in the model name ("SiT-XL/2", "DFM-SiT-B/2") and by width.
HEADS_BY_SIZE = {"S": 6, "B": 12, "L": 16, "XL": 16}
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}

#: The only non-tensor objects an official checkpoint may hold (its training arguments); everything else that is
#: not a tensor or a plain container is refused by torch.load(weights_only=True).
ALLOWED_GLOBALS = (argparse.Namespace,)

_PREFIXES = ("module.", "_orig_mod.")
_FREQUENCY_CHANNELS = 256  # the official TimestepEmbedder's sinusoid channels


def load_official_checkpoint(path: str, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an official checkpoint without running pickled code.

    Args:
        path: a ``.pt`` file, either a training checkpoint {"model", "ema", "opt", "args", "steps"} or a plain state
            dict (the released SiT / REPA files), or a ``.safetensors`` state dict.
        weights: "ema" (what the official evaluations use) or "model", for training checkpoints.

    Returns:
        (state dict, the training arguments as a dict, empty when the file has none).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path), {}
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else str(err).splitlines()[0]
        allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in ALLOWED_GLOBALS)
        raise ValueError(
            f"{path}: refusing to unpickle {what}: an official checkpoint holds only tensors, plain containers and "
            f"{allowed}; loading this file would run code that is not on that allow-list"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    if "ema" in obj or "model" in obj:
        if weights not in obj:
            keys = sorted(k for k in obj if isinstance(k, str))
            raise ValueError(f"{path} has no {weights!r} weights (it has {keys})")
        state = obj[weights]
    else:
        state = obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: the {weights!r} entry is not a state dict of tensors")
    return _strip_prefixes(state), args


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _block_indices(state: dict, prefix: str) -> list[int]:
    """Sorted indices i of the keys ``prefix + "i." + ...``."""
    heads = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
    return sorted(int(h) for h in heads if h.isdigit())


def _undo_legacy_repa(state: dict) -> dict:
    """REPA's legacy checkpoints name the blocks after the REPA layer ``decoder_blocks.i``: renumber them."""
    decoder = _block_indices(state, "decoder_blocks.")
    if not decoder:
        return state
    encoder_depth = len(_block_indices(state, "blocks."))
    out = {}
    for key, value in state.items():
        if key.startswith("decoder_blocks."):
            parts = key.split(".")
            key = ".".join(["blocks", str(int(parts[1]) + encoder_depth)] + parts[2:])
        out[key] = value
    return out


def _check_args(source: str, args: dict) -> None:
    """One clear error when the training arguments show a model that this source's weight map does not fit."""
    model = str(args.get("model", ""))
    path_type = args.get("path_type")
    if model.startswith("ELIT-"):
        raise ValueError(f"{model} (ELIT's latent-interface model) is not supported; DFM-SiT and SiT checkpoints are")
    if source == "sit":
        if "enc_type" in args or path_type == "linear":
            raise ValueError(
                "these are REPA / ELIT training arguments (their time runs from data to noise): convert with "
                "--from repa or --from elit-sit, not --from sit"
            )
        if path_type not in (None, "Linear") or args.get("prediction") not in (None, "velocity"):
            raise ValueError(
                f"only SiT's Linear path with velocity prediction maps to flow matching; this checkpoint was "
                f"trained with path_type={path_type!r}, prediction={args.get('prediction')!r}"
            )
        return
    if path_type not in (None, "linear") or args.get("prediction") not in (None, "v"):
        raise ValueError(
            f"only the linear path with v prediction maps to flow matching; this checkpoint was trained with "
            f"path_type={path_type!r}, prediction={args.get('prediction')!r}"
        )
    if args.get("qk_norm"):
        raise ValueError("checkpoints trained with qk_norm are not supported (DFMDiTTransformer2DModel has no qk norm)")


def _num_heads(width: int, args: dict, num_heads: int | None) -> int:
    if num_heads is not None:
        heads = int(num_heads)
    else:
        size = re.search(r"SiT-(S|B|L|XL)/\d+", str(args.get("model", "")))
        heads = HEADS_BY_SIZE[size.group(1)] if size else HEADS_BY_WIDTH.get(width)
        if heads is None:
            raise ValueError(
                f"cannot tell the number of attention heads of a {width}-wide model (not an official size): pass "
                f"num_heads (--num-heads)"
            )
    if heads < 1 or width % heads:
        raise ValueError(f"num_heads {heads} does not divide the width {width}")
    return heads


def _require(state: dict, keys, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"not {what}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")


def official_transformer_config(
    state: dict[str, torch.Tensor], source: str, args: dict | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """The DFMDiTTransformer2DModel config of an official state dict (sizes read from the tensors)."""
    if source not in OFFICIAL_SOURCES:
        raise ValueError(f"source must be one of {OFFICIAL_SOURCES}, got {source!r}")
    args = args or {}
    multiscale = any(k.startswith("x_embedder.embedders.") for k in state)
    if source == "elit-dfm" and not multiscale:
        raise ValueError(
            "not a DFM-SiT checkpoint (no x_embedder.embedders.*): convert it with --from elit-sit / repa / sit"
        )
    if source != "elit-dfm" and multiscale:
        raise ValueError("this is a DFM-SiT checkpoint (x_embedder.embedders.*): convert it with --from elit-dfm")
    _check_args(source, args)
    if multiscale:
        stages = _block_indices(state, "x_embedder.embedders.")
        patch_weights = [state[f"x_embedder.embedders.{s}.proj.weight"] for s in stages]
    else:
        _require(state, ["x_embedder.proj.weight"], "a SiT checkpoint")
        patch_weights = [state["x_embedder.proj.weight"]]
    _require(
        state, ["pos_embed", "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight"], "a SiT-family checkpoint"
    )
    width, in_channels = patch_weights[0].shape[:2]
    patch_sizes = [int(w.shape[-1]) for w in patch_weights]
    num_stages = len(patch_sizes)
    if any(patch_sizes[s + 1] != 2 * patch_sizes[s] for s in range(num_stages - 1)):
        raise ValueError(f"stage patch sizes {patch_sizes} are not a factor 2 apart, as every DFM-SiT's are")
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens: not a square grid")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(args.get("num_classes", rows - 1))
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"the class table has {rows} rows for {num_classes} classes")
    heads = _num_heads(width, args, num_heads)
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        sample_size=grid * patch_sizes[-1],
        in_channels=int(in_channels),
        num_layers=len(_block_indices(state, "blocks.")),
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        mlp_ratio=mlp_hidden / width,
        num_classes=num_classes,
        class_dropout_prob=0.1,
        patch_size=patch_sizes[-1],
        num_stages=num_stages,
        stage_factors=2,
        timestep_scale=1.0,
    )


def _head_weights(weight: torch.Tensor, bias: torch.Tensor, patch: int, channels: int):
    """Output features (py, px, c') -> (c, py, px), keeping channels c < ``channels`` (drops a learned sigma)."""
    stored = weight.shape[0] // (patch * patch)
    if stored not in (channels, 2 * channels) or stored * patch * patch != weight.shape[0]:
        raise ValueError(
            f"final layer has {weight.shape[0]} outputs: not {patch}x{patch} patches of {channels} channels"
        )
    w = weight.reshape(patch, patch, stored, -1)[:, :, :channels].permute(2, 0, 1, 3)
    w = w.reshape(channels * patch * patch, -1)
    b = bias.reshape(patch, patch, stored)[:, :, :channels].permute(2, 0, 1).reshape(-1)
    return w, b


def time_reversal_matrix(num_channels: int = _FREQUENCY_CHANNELS) -> torch.Tensor:
    """M (float64, [C, C]) with emb(1 - s) = M emb(s) for the DiT/SiT sinusoids emb = [cos(f s), sin(f s)],
    f_k = exp(-ln(10000) k / (C / 2)) as computed in float32 by both the official code and diffusers."""
    half = num_channels // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.diag(torch.cos(f)), torch.diag(torch.sin(f))
    return torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)


def convert_official_state_dict(
    state: dict[str, torch.Tensor], source: str, config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Official tensors -> DFMDiTTransformer2DModel's state dict (``config``: :func:`official_transformer_config`)."""
    S, D, C = config["num_stages"], config["num_attention_heads"] * config["attention_head_dim"], config["in_channels"]
    patches = [config["patch_size"] // 2 ** (S - 1 - s) for s in range(S)]
    multiscale = source == "elit-dfm"
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(key):
        used.add(key)
        return state[key]

    for s in range(S):
        conv = f"x_embedder.embedders.{s}.proj" if multiscale else "x_embedder.proj"
        temb = f"t_embedder.embedders.{s}.mlp" if multiscale else "t_embedder.mlp"
        final = f"final_layer.projections.{s}" if multiscale else "final_layer"
        keys = [f"{conv}.weight", f"{temb}.0.weight", f"{final}.linear.weight"]
        _require(state, keys, f"a complete {source} checkpoint")
        out[f"stage_layers.patch_embedders.{s}.weight"] = take(f"{conv}.weight").reshape(D, -1)
        out[f"stage_layers.patch_embedders.{s}.bias"] = take(f"{conv}.bias")
        ours = f"stage_layers.timestep_embedders.{s}.timestep_embedder"
        linear_1 = take(f"{temb}.0.weight")
        if source == "sit":  # SiT's t = 1 - sigma: emb(t) = M emb(sigma), folded into the first MLP weight
            linear_1 = (linear_1.double() @ time_reversal_matrix(linear_1.shape[1])).to(linear_1.dtype)
        out[f"{ours}.linear_1.weight"] = linear_1
        out[f"{ours}.linear_1.bias"] = take(f"{temb}.0.bias")
        out[f"{ours}.linear_2.weight"] = take(f"{temb}.2.weight")
        out[f"{ours}.linear_2.bias"] = take(f"{temb}.2.bias")
        head = f"stage_layers.heads.{s}"
        ada_w, ada_b = take(f"{final}.adaLN_modulation.1.weight"), take(f"{final}.adaLN_modulation.1.bias")
        out[f"{head}.norm_out.linear.weight"] = torch.cat(ada_w.chunk(2, 0)[::-1])  # (shift, scale) -> (scale, shift)
        out[f"{head}.norm_out.linear.bias"] = torch.cat(ada_b.chunk(2, 0)[::-1])
        w, b = _head_weights(take(f"{final}.linear.weight"), take(f"{final}.linear.bias"), patches[s], C)
        if source == "sit":  # SiT predicts data - noise = -(noise - data)
            w, b = -w, -b
        out[f"{head}.proj_out.weight"] = w
        out[f"{head}.proj_out.bias"] = b
    out["stage_layers.stage_embedding.weight"] = torch.zeros(S, D, dtype=out[f"{head}.proj_out.weight"].dtype)

    table = take("y_embedder.embedding_table.weight")
    if table.shape[0] == config["num_classes"]:  # trained without label dropout: no null class, CFG impossible
        table = torch.cat([table, torch.zeros_like(table[:1])])
    out["class_embedder.embedding_table.weight"] = table
    if any(".q_norm." in k or ".k_norm." in k for k in state):
        raise ValueError("checkpoints trained with qk_norm are not supported (DFMDiTTransformer2DModel has no qk norm)")
    for key in state:
        if key.startswith("blocks."):
            out["transformer_blocks." + key[len("blocks."):]] = take(key)
    used.add("pos_embed")
    dropped = [k for k in state if k.startswith("projectors.")]  # REPA's alignment heads: training only
    unknown = sorted(set(state) - used - set(dropped))
    if unknown:
        raise ValueError(f"the {source} checkpoint has tensors this conversion does not know: {unknown[:6]}")
    return out


def transformer_from_official(
    state: dict[str, torch.Tensor],
    source: str,
    args: dict | None = None,
    num_heads: int | None = None,
) -> DFMDiTTransformer2DModel:
    """A float32 DFMDiTTransformer2DModel (eval mode) holding an official state dict's weights, exactly."""
    state = _undo_legacy_repa(_strip_prefixes(dict(state)))
    config = official_transformer_config(state, source, args, num_heads)
    model = DFMDiTTransformer2DModel(**config)
    converted = {k: v.to(torch.float32) for k, v in convert_official_state_dict(state, source, config).items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"converted weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    grid = config["sample_size"] // config["patch_size"]
    pos = model.positional_embedding((grid, grid), "cpu", torch.float32)
    if not torch.allclose(pos, state["pos_embed"].float().reshape(pos.shape), atol=1e-5):
        raise ValueError(f"the checkpoint's pos_embed is not DiT's sin-cos embedding of a {grid}x{grid} grid")
    return model.eval()
