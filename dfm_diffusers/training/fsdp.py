"""FSDP2 support of the training loop: what it cannot do under FSDP, and the unsharded model the export is written
from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from .loop_config import LoopConfig


def fsdp_problems(accelerator: Accelerator, model: torch.nn.Module, config: LoopConfig) -> list[str]:
    """What this loop cannot do under FSDP (each a sentence; empty when the run can go ahead)."""
    problems = []
    if not getattr(accelerator, "is_fsdp2", False):
        problems.append("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                        "(examples/accelerate/fsdp_full_finetune.yaml)")
    if any(not p.requires_grad for p in model.parameters()):
        problems.append("frozen parameters (LoRA, a frozen base) are not supported under FSDP: train LoRA with DDP "
                        "(examples/accelerate/ddp_lora.yaml); FSDP is for full finetuning")
    if config.use_ema:
        problems.append("use_ema is not supported under FSDP (the EMA would be a second unsharded copy of the "
                        "weights): set use_ema false")
    if config.use_8bit_adam:
        problems.append("use_8bit_adam is not supported under FSDP (bitsandbytes' 8-bit AdamW does not take "
                        "FSDP2's sharded DTensor parameters): set use_8bit_adam false")
    return problems


def consolidated_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) instance of ``model``'s class holding ``state_dict`` (a full state dict, e.g. from
    ``accelerator.get_state_dict``), built on the meta device and assigned the tensors (no second initialisation).
    ``model``: a diffusers ModelMixin, possibly turned into an FSDP2 module (``fully_shard`` changes its class)."""
    from torch.distributed.fsdp import FSDPModule

    from ..models.loading import model_from_state_dict

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return model_from_state_dict(cls, model.config, state_dict, "consolidated state dict")


def _local(named_tensors):
    """(name, this rank's shard) for FSDP2's DTensor parameters; other tensors as they are."""
    from torch.distributed.tensor import DTensor

    for name, t in named_tensors:
        yield name, t.to_local() if isinstance(t, DTensor) else t
