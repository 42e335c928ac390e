"""Settings common to every DFM trainer (:class:`LoopConfig`) and the optimizer they build."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from .config import did_you_mean, finite, positive_int, require, setting


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings common to every DFM trainer."""

    output_dir: str = setting("outputs/dfm", "folder of checkpoints, logs, samples and the exported pipeline")
    seed: int = setting(0, "seed of the weights' initialisation, data order and training draws")
    train_batch_size: int = setting(32, "samples per device per forward pass")
    gradient_accumulation_steps: int = setting(1, "forward passes per optimizer step")
    max_train_steps: int = setting(1000, "optimizer steps to train for")
    learning_rate: float = setting(1e-4, "peak learning rate (> 0)")
    lr_scheduler: str = setting("constant_with_warmup", "diffusers.optimization scheduler name")
    lr_warmup_steps: int = setting(0, "linear warm-up steps of the learning rate")
    adam_beta1: float = setting(0.9, "AdamW beta1, in [0, 1)")
    adam_beta2: float = setting(0.999, "AdamW beta2, in [0, 1)")
    adam_weight_decay: float = setting(0.0, "AdamW decoupled weight decay (>= 0)")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon (> 0)")
    use_8bit_adam: bool = setting(False, "bitsandbytes' 8-bit AdamW (needs a CUDA GPU)")
    adam_fused: bool | None = setting(
        None, "torch's fused AdamW kernel; default (null): on a CUDA device without FSDP. It also lets the loop read "
        "a step's non-finite verdict one step later (nonfinite_check)"
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 turns clipping off")
    use_ema: bool = setting(True, "keep an EMA of the weights (used for samples and the export)")
    ema_decay: float = setting(0.9999, "EMA decay, in (0, 1)")
    ema_warmup: bool = setting(False, "diffusers EMAModel's decay warm-up")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "accelerate mixed precision")
    torch_compile: bool = setting(False, "torch.compile the model (on a GPU; ignored on the CPU)")
    torch_compile_mode: str | None = setting(
        None, "torch.compile mode, e.g. max-autotune-no-cudagraphs (default: torch's default mode)"
    )
    torch_compile_objective: bool = setting(
        False, "with torch_compile: compile the whole loss (the DFM objective around the model; one graph for the "
        "DiT trainer) instead of the model alone"
    )
    nonfinite_check: Literal["deferred", "every_step"] = setting(
        "deferred", "when the host reads whether a step's loss and gradient norm were finite: deferred (one step "
        "later, the update dropped on the device; needs the fused AdamW, else every_step) or every_step (a host "
        "sync per step)"
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    dataloader_num_workers: int = setting(0, "data loader worker processes")
    checkpointing_steps: int = setting(500, "save a resumable checkpoint every N steps (and at the end); 0 = never")
    checkpoints_total_limit: int | None = setting(2, "newest checkpoints kept (>= 1); null keeps all")
    validation_steps: int = setting(500, "write sample grids every N steps (and at the end); 0 = only at the end")
    log_every: int = setting(10, "append a training_log.jsonl row every N steps")
    resume_from_checkpoint: str | None = setting(
        None, "'latest' (of output_dir/checkpoints) or a checkpoint folder to resume from (alias: --resume)"
    )
    overwrite_output_dir: bool = setting(
        False, "start over in an output_dir that holds a previous run (its checkpoints, log and pipeline are "
        "removed first); without it, or resume_from_checkpoint, such a folder is refused"
    )
    report_to: str | None = setting("tensorboard", "accelerate tracker (tensorboard, wandb, ...); 'none' for none")
    tracker_project_name: str = setting("dfm", "project name given to the tracker")

    max_consecutive_nonfinite_steps: int = setting(
        5, "steps whose loss or gradient norm is NaN/inf are skipped; this many in a row stop the run"
    )

    def validate(self) -> list[str]:
        """Range checks of these fields (``key: problem`` lines; see :func:`.config.config_problems`)."""
        from diffusers.optimization import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        problems = require(bool(self.output_dir), "output_dir", "must name a folder")
        problems += require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        problems += positive_int(
            self, "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every",
            "max_consecutive_nonfinite_steps"
        )
        problems += positive_int(self, "lr_warmup_steps", "dataloader_num_workers", "checkpointing_steps",
                                 "validation_steps", allow_zero=True)
        problems += positive_int(self, "checkpoints_total_limit", optional=True)
        problems += finite(self, "learning_rate", "adam_epsilon", low=0.0, low_open=True)
        problems += finite(self, "adam_beta1", "adam_beta2", low=0.0, high=1.0, high_open=True)
        problems += finite(self, "adam_weight_decay", "max_grad_norm", low=0.0)
        problems += finite(self, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
        problems += require(not self.torch_compile_objective or self.torch_compile, "torch_compile_objective",
                            "needs torch_compile: true")
        problems += require(
            self.lr_scheduler in schedulers, "lr_scheduler",
            f"must be one of {', '.join(schedulers)}, got {self.lr_scheduler!r}"
            f"{did_you_mean(self.lr_scheduler, schedulers)}",
        )
        resume = self.resume_from_checkpoint
        problems += require(
            not resume or resume == "latest" or os.path.isdir(resume), "resume_from_checkpoint",
            f"{resume!r} is not a checkpoint folder (or 'latest')",
        )
        return problems


def make_optimizer(params, config: LoopConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (``fused``: torch's fused kernel; default ``config.adam_fused``, else torch's choice), or
    bitsandbytes' 8-bit AdamW with ``use_8bit_adam`` (needs a CUDA GPU)."""
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
            raise ImportError("use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = config.adam_fused if fused is None else fused
    return torch.optim.AdamW(params, **kwargs, **({"fused": True} if fused else {}))
