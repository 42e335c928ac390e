"""The training loop shared by the DFM trainers (accelerate, diffusers' EMAModel, atomic checkpoints).

A trainer script supplies the model, the dataset and three callables:
- ``loss_fn(model, batch) -> (loss, logs)``: logs values are floats or ``(sum, count)`` pairs; each log row holds
  their means over the steps since the previous row (:class:`.log_window.LogWindow`)
- ``sample_fn(model, step) -> None`` (writes sample grids; called with EMA weights swapped in)
- ``export_fn(model, folder) -> None`` (writes the final pipeline folder; EMA weights swapped in)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..utils import configure_attention_backends
from .config import did_you_mean, finite, positive_int, require, setting
from .log_window import LogWindow

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 turns clipping off")
    use_ema: bool = setting(True, "keep an EMA of the weights (used for samples and the export)")
    ema_decay: float = setting(0.9999, "EMA decay, in (0, 1)")
    ema_warmup: bool = setting(False, "diffusers EMAModel's decay warm-up")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "accelerate mixed precision")
    torch_compile: bool = setting(False, "torch.compile the model")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    dataloader_num_workers: int = setting(0, "data loader worker processes")
    checkpointing_steps: int = setting(500, "save a resumable checkpoint every N steps (and at the end); 0 = never")
    checkpoints_total_limit: int | None = setting(2, "newest checkpoints kept (>= 1); null keeps all")
    validation_steps: int = setting(500, "write sample grids every N steps (and at the end); 0 = only at the end")
    log_every: int = setting(10, "append a training_log.jsonl row every N steps")
    resume_from_checkpoint: str | None = setting(
        None, "'latest' (of output_dir/checkpoints) or a checkpoint folder to resume from (alias: --resume)"
    )
    report_to: str | None = setting("tensorboard", "accelerate tracker (tensorboard, wandb, ...); 'none' for none")
    tracker_project_name: str = setting("dfm", "project name given to the tracker")

    def validate(self) -> list[str]:
        """Range checks of these fields (``key: problem`` lines; see :func:`.config.config_problems`)."""
        from diffusers.optimization import SchedulerType

        schedulers = [t.value for t in SchedulerType]
        problems = require(bool(self.output_dir), "output_dir", "must name a folder")
        problems += require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        problems += positive_int(
            self, "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every"
        )
        problems += positive_int(self, "lr_warmup_steps", "dataloader_num_workers", "checkpointing_steps",
                                 "validation_steps", allow_zero=True)
        problems += positive_int(self, "checkpoints_total_limit", optional=True)
        problems += finite(self, "learning_rate", "adam_epsilon", low=0.0, low_open=True)
        problems += finite(self, "adam_beta1", "adam_beta2", low=0.0, high=1.0, high_open=True)
        problems += finite(self, "adam_weight_decay", "max_grad_norm", low=0.0)
        problems += finite(self, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
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


def list_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """Completed checkpoints as (step, path), oldest first (temporary, half-written folders are ignored)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(checkpoint_dir, name)):
            found.append((int(match.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found)


def resolve_resume_path(resume: str | None, checkpoint_dir: str) -> str | None:
    """``"latest"`` -> the newest completed checkpoint (None if there is none); a path is checked."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1][1] if found else None
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder")
    return resume


def make_optimizer(params, config: LoopConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam`` (needs a CUDA GPU)."""
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
    return torch.optim.AdamW(params, **kwargs)


class TrainingLog:
    """JSON-lines metrics log that survives resumes (entries after the resumed step are dropped)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(self.path, "w", encoding="utf-8") as f:
            for row in rows:
                if row["step"] <= step:
                    f.write(json.dumps(row) + "\n")

    def append(self, row: dict[str, Any]):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[i]`` computed under the CPU torch RNG seeded from (seed, epoch, i); the global state is restored.

    Random augmentations (flips, random crops) then depend only on the sample and the epoch: they neither shift
    the training draws (noise, sigmas, stages) nor depend on the DataLoader's one-batch prefetch, on the number
    of workers, or on where a resumed run restarted. Only torch's CPU generator is seeded (not CUDA's).
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(hash((self.seed, self.epoch, int(index))) & 0xFFFF_FFFF_FFFF_FFFF)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


TRAINABLE_CHECKPOINT_FILE = "trainable_parameters.safetensors"


def checkpoint_trainable_parameters_only(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """With frozen parameters (LoRA, frozen base), checkpoints hold only the trainable ones: megabytes instead of
    a copy of the whole base model (24 GB for FLUX.1-dev) per checkpoint. The frozen weights come from where the
    run started (the pretrained model), so nothing is lost."""
    from safetensors.torch import load_file, save_file

    names = {n for n, p in model.named_parameters() if p.requires_grad}

    def is_ours(m) -> bool:
        return accelerator.unwrap_model(m) is model

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in names}
            save_file(state, os.path.join(output_dir, TRAINABLE_CHECKPOINT_FILE))
        for i in reversed(range(len(models))):
            if is_ours(models[i]) and i < len(weights):
                weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if is_ours(models[i]):
                models.pop(i)
        state = load_file(os.path.join(input_dir, TRAINABLE_CHECKPOINT_FILE))
        if set(state) != names:
            raise ValueError(
                f"{input_dir} holds trainable parameters that do not match this model's "
                f"(missing {sorted(names - set(state))[:5]}, unexpected {sorted(set(state) - names)[:5]})"
            )
        model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def run_training(
    config: LoopConfig,
    model: torch.nn.Module,
    dataset,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    sample_fn: Callable[[torch.nn.Module, int], None] | None = None,
    export_fn: Callable[[torch.nn.Module, str], None] | None = None,
    collate_fn=None,
    hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` for ``config.max_train_steps`` optimizer steps.

    Checkpoints (accelerate save_state, EMA included) go to ``<output_dir>/checkpoints/checkpoint-<step>``,
    written under a temporary name and renamed, so a killed save never replaces the latest good one.
    Returns a summary dict (final step, last loss, export folder).
    """
    configure_attention_backends()
    report_to = None if str(config.report_to).lower() in ("none", "", "false") else config.report_to
    os.makedirs(config.output_dir, exist_ok=True)
    checkpoint_dir = os.path.join(config.output_dir, "checkpoints")
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(config.seed)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(trainable, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    train_data = SeededSamples(dataset, config.seed)
    dataloader = torch.utils.data.DataLoader(
        train_data,
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.train_batch_size * accelerator.num_processes,
        num_workers=config.dataloader_num_workers,
        collate_fn=collate_fn,
        # Its own generator: without one, every new iterator (each epoch, and the skip_first_batches one after a
        # resume) draws its worker base seed from the global torch RNG, shifting the training draws (noise,
        # sigmas, stages) of a resumed run away from those of an uninterrupted one.
        generator=torch.Generator().manual_seed(config.seed),
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if any(not p.requires_grad for p in accelerator.unwrap_model(model).parameters()):
        checkpoint_trainable_parameters_only(accelerator, accelerator.unwrap_model(model))
    ema = None
    if config.use_ema:
        base = accelerator.unwrap_model(model)
        ema = EMAModel(
            [p for p in base.parameters() if p.requires_grad], decay=config.ema_decay, use_ema_warmup=config.ema_warmup
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if config.torch_compile:
        model = torch.compile(model)

    if accelerator.is_main_process and report_to:
        accelerator.init_trackers(config.tracker_project_name, config=hparams or {})

    log = TrainingLog(os.path.join(config.output_dir, "training_log.jsonl"), accelerator.is_main_process)
    steps_per_epoch = max(1, math.ceil(len(dataloader) / config.gradient_accumulation_steps))
    global_step = 0
    resume_path = resolve_resume_path(config.resume_from_checkpoint, checkpoint_dir)
    if config.resume_from_checkpoint and resume_path is None:
        logger.warning("resume_from_checkpoint=latest but no checkpoint exists yet: starting from scratch")
    if resume_path:
        accelerator.load_state(resume_path)
        global_step = int(CHECKPOINT_RE.match(os.path.basename(resume_path)).group(1))
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    log.truncate_after(global_step)  # a fresh run starts a fresh log; a resumed one drops rows past the checkpoint

    def save_checkpoint(step: int):
        accelerator.wait_for_everyone()
        final = os.path.join(checkpoint_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if accelerator.is_main_process:
            os.makedirs(checkpoint_dir, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if config.checkpoints_total_limit:
                for _, old in list_checkpoints(checkpoint_dir)[: -config.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def with_ema_weights(fn: Callable, *args):
        base = accelerator.unwrap_model(model)
        was_training = base.training
        base.eval()
        if ema is not None:
            params = [p for p in base.parameters() if p.requires_grad]
            ema.store(params)
            ema.copy_to(params)
        try:
            return fn(base, *args)
        finally:
            if ema is not None:
                ema.restore(params)
            base.train(was_training)

    progress = tqdm(
        total=config.max_train_steps, initial=global_step, desc="train", disable=not accelerator.is_main_process
    )
    last_loss = float("nan")
    tic, window_start_step = time.perf_counter(), global_step
    window = LogWindow()
    epoch = global_step // steps_per_epoch
    while global_step < config.max_train_steps:
        dataloader.set_epoch(epoch)
        train_data.epoch = epoch  # before the iterator exists, so that worker processes copy it
        skip = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(dataloader, skip) if skip > 0 else dataloader
        for batch in batches:
            with accelerator.accumulate(model):
                loss, logs = loss_fn(model, batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step([p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad])
            last_loss = accelerator.gather(loss.detach()[None]).mean().item()
            window.add({"loss": last_loss, **logs})
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}")
            if global_step % config.log_every == 0 or global_step == config.max_train_steps:
                elapsed = time.perf_counter() - tic
                row = {"step": global_step, **window.pop_means(), "lr": lr_scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row["it_per_s"] = (global_step - window_start_step) / max(elapsed, 1e-9)
                tic, window_start_step = time.perf_counter(), global_step
                log.append(row)
                if report_to:
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
            if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
                save_checkpoint(global_step)
            if sample_fn and config.validation_steps and global_step % config.validation_steps == 0:
                if accelerator.is_main_process:
                    with_ema_weights(sample_fn, global_step)
                accelerator.wait_for_everyone()
            if global_step >= config.max_train_steps:
                break
        epoch += 1
    progress.close()

    if config.checkpointing_steps and global_step % config.checkpointing_steps != 0:
        save_checkpoint(global_step)
    export_dir = os.path.join(config.output_dir, "pipeline")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if sample_fn and (not config.validation_steps or global_step % config.validation_steps != 0):
            with_ema_weights(sample_fn, global_step)
        if export_fn:
            with_ema_weights(export_fn, export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"global_step": global_step, "loss": last_loss, "export_dir": export_dir, "log": log.read()}
