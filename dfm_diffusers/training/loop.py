"""The training loop shared by the DFM trainers (accelerate, diffusers' EMAModel, atomic checkpoints).

A trainer script supplies the model, the dataset and three callables:
- ``loss_fn(model, batch) -> (loss, logs)``: logs values are floats or ``(sum, count)`` pairs; each log row holds
  their means over the steps since the previous row (:class:`.log_window.LogWindow`)
- ``sample_fn(model, step) -> None | dict[str, image]`` (writes sample grids; called with EMA weights swapped in);
  a returned dict of images (PIL, or HWC uint8 arrays) is logged to the trackers that log images (TensorBoard, ...)
- ``export_fn(model, folder) -> None`` (writes the final pipeline folder; EMA weights swapped in)
- optionally ``held_fixed_fn(step) -> parameters`` (``step`` = optimizer steps already taken): trainable parameters
  the coming optimizer step must leave exactly as they are (e.g. FLUX's patchify-only adaptation phase); their
  gradients are dropped before clipping, so AdamW skips them altogether (no update, no weight decay, no moments)

Several processes (``accelerate launch``): data sharded across ranks by accelerate, checkpoints through
``accelerator.save_state`` on every rank, the lock, logs, samples and the export on the main process. Under FSDP
(accelerate's FSDP2, ``fsdp_version: 2``; see examples/accelerate/) the sharded forward needs every rank, so
``sample_fn`` runs on all processes in lockstep and must write files only on the main one
(``PartialState().is_main_process``); the export gathers the full state dict (``accelerator.get_state_dict``, on all
ranks) and the main process alone calls ``export_fn`` with a plain, unsharded copy of the model holding it.

Faults it survives: a step whose loss or gradient norm is not finite is skipped (no optimizer, lr or EMA update)
and counted; ``max_consecutive_nonfinite_steps`` of them in a row stop the run (:class:`NonFiniteLossError`), and
nothing holding NaN/inf is ever saved or exported. Checkpoints carry a manifest and ``latest`` takes the newest
one that verifies; one run per output folder (a lock file); a failed save (full disk) removes its partial folder.
See :mod:`.checkpointing`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data.seeded import SeededSamples, already_collated  # noqa: F401  (SeededSamples: public here too)
from ..utils import configure_attention_backends
from .config import did_you_mean, finite, positive_int, require, setting
from .log_window import LogWindow
from .steps import DataClock, StepVerdict, nonfinite_flags, skips_on_device, step_on_device
from .checkpointing import (  # noqa: F401  (list_checkpoints, resolve_resume_path, CHECKPOINT_RE: public here too)
    CHECKPOINT_RE,
    EMA_FILE,
    LOOP_STATE_FILE,
    NonFiniteLossError,
    NonFiniteTrainingError,
    OutputDirInUseError,
    OutputDirLock,
    TrainingInterrupted,
    abandon_failed_save,
    check_random_states,
    list_checkpoints,
    load_ema,
    nonfinite_names,
    remove_checkpoint,
    remove_leftovers,
    resolve_resume_path,
    rotate_checkpoints,
    save_ema,
    write_manifest,
)

logger = logging.getLogger(__name__)


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



def previous_run(output_dir: str) -> str | None:
    """What of an earlier run ``output_dir`` holds (a finished export, checkpoints, a training log), or None."""
    found = []
    if any(os.path.isfile(os.path.join(output_dir, "pipeline", f)) for f in ("model_index.json", "dfm_lora_config.json")):
        found.append("a finished run's pipeline/")
    kept = list_checkpoints(os.path.join(output_dir, "checkpoints"))
    if kept:
        found.append(f"checkpoints up to step {kept[-1][0]}")
    log = os.path.join(output_dir, "training_log.jsonl")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        found.append("training_log.jsonl")
    return ", ".join(found) or None


def check_output_dir(config: LoopConfig) -> str | None:
    """OutputDirInUseError for an output_dir holding a previous run when the config neither resumes nor
    overwrites it; returns what it holds (None if nothing)."""
    found = previous_run(config.output_dir)
    if found and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise OutputDirInUseError(
            f"{config.output_dir} holds a previous run ({found}). Resume it with --resume_from_checkpoint latest, "
            f"start over there with --overwrite_output_dir true (removes its checkpoints, log and pipeline), or "
            f"choose another --output_dir"
        )
    return found


class GracefulInterrupt:
    """While active (main thread only): the first Ctrl+C asks the loop to stop after the current step (it saves a
    checkpoint and raises TrainingInterrupted); a second one aborts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl+C raises KeyboardInterrupt
        print("\nCtrl+C: finishing this step, then saving a checkpoint (Ctrl+C again aborts at once)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def stop_now(self, accelerator) -> bool:
        """Whether any process was interrupted (a collective when there are several processes)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.gather(flag).max() > 0)


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


class TrainingLog:
    """JSON-lines metrics log that survives resumes (entries after the resumed step are dropped)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int):
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        tmp = self.path + ".tmp"  # rewritten atomically: a kill here leaves the old log or the new one
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                if row["step"] <= step:
                    f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


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


def run_training(
    config: LoopConfig,
    model: torch.nn.Module,
    dataset,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    sample_fn: Callable[[torch.nn.Module, int], None] | None = None,
    export_fn: Callable[[torch.nn.Module, str], None] | None = None,
    collate_fn=None,
    hparams: dict[str, Any] | None = None,
    batch_buckets: list | None = None,
    held_fixed_fn: Callable[[int], Iterable[torch.nn.Parameter]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` for ``config.max_train_steps`` optimizer steps.

    Checkpoints (accelerate save_state, EMA as safetensors, a manifest written last) go to
    ``<output_dir>/checkpoints/checkpoint-<step>``, written under a temporary name and renamed, so a killed save
    never replaces the latest good one. The main process holds ``<output_dir>/.lock`` for the whole run.
    ``batch_buckets``: a bucket per sample (e.g. its (height, width)); every batch then comes from one bucket
    (:class:`..data.buckets.BucketBatchSampler`, shuffled per epoch from the seed).
    Returns a summary dict (final step, last loss, export folder, log rows, number of skipped non-finite steps).
    """
    configure_attention_backends()
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by accelerate launch (its --config_file's value)
    if launched and launched != config.mixed_precision:
        logger.warning("accelerate launch says mixed_precision=%s, the training config %s: the training config's "
                       "is used", launched, config.mixed_precision)
    report_to = None if str(config.report_to).lower() in ("none", "", "false") else config.report_to
    previous = check_output_dir(config)  # before anything is written there
    os.makedirs(config.output_dir, exist_ok=True)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        # non_blocking: batches pinned by the DataLoader go to the GPU without a host sync
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
    )
    lock = OutputDirLock(config.output_dir) if accelerator.is_main_process else None
    if lock is not None:
        lock.acquire()  # refuses at once if a live run holds the folder
        if previous and config.overwrite_output_dir and not config.resume_from_checkpoint:
            logger.warning("overwrite_output_dir: removing the previous run in %s (%s)", config.output_dir, previous)
            for name in ("checkpoints", "pipeline"):
                shutil.rmtree(os.path.join(config.output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        return _run_training(
            accelerator, report_to, config, model, dataset, loss_fn, sample_fn, export_fn, collate_fn, hparams,
            batch_buckets, held_fixed_fn,
        )
    finally:
        if lock is not None:
            lock.release()


def _run_training(
    accelerator, report_to, config, model, dataset, loss_fn, sample_fn, export_fn, collate_fn, hparams,
    batch_buckets=None, held_fixed_fn=None,
) -> dict[str, Any]:
    checkpoint_dir = os.path.join(config.output_dir, "checkpoints")
    set_seed(config.seed)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    gradient_checkpointing = config.gradient_checkpointing
    if fsdp:
        problems = fsdp_problems(accelerator, model, config)
        if problems:
            raise ValueError("cannot train under FSDP: " + "; ".join(problems))
        if gradient_checkpointing and accelerator.state.fsdp_plugin.activation_checkpointing:
            logger.warning("gradient_checkpointing and fsdp_activation_checkpointing are both on: only FSDP's "
                           "activation checkpointing is used")
            gradient_checkpointing = False
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    fused = config.adam_fused if config.adam_fused is not None else accelerator.device.type == "cuda" and not fsdp
    optimizer = make_optimizer(trainable, config, fused=fused and not config.use_8bit_adam)
    # Under FSDP, prepare() swaps every parameter for its shard: a list still holding the originals would keep a
    # whole unsharded copy of the model alive on every GPU for the entire run.
    del trainable
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    train_data = SeededSamples(dataset, config.seed)
    if hasattr(dataset, "place"):  # preloaded data (data/preload.py) moves to the device when it fits
        dataset.place(accelerator.device)
    drop_last = len(dataset) >= config.train_batch_size * accelerator.num_processes
    if batch_buckets is not None:
        from ..data.buckets import BucketBatchSampler

        batching = dict(batch_sampler=BucketBatchSampler(batch_buckets, config.train_batch_size, config.seed,
                                                         epoch_of=train_data))
    else:
        batching = dict(batch_size=config.train_batch_size, shuffle=True, drop_last=drop_last)
    dataloader = torch.utils.data.DataLoader(
        train_data,
        **batching,
        # a batched data set gathers whole batches of preloaded tensors: no per-sample work left for workers
        num_workers=0 if train_data.batched else config.dataloader_num_workers,
        collate_fn=already_collated if train_data.batched else collate_fn,
        pin_memory=accelerator.device.type == "cuda" and not train_data.batched,
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
            [p for p in base.parameters() if p.requires_grad], decay=config.ema_decay, use_ema_warmup=config.ema_warmup,
            foreach=True,
        )
        ema.to(accelerator.device)
        # Not accelerator.register_for_checkpointing(ema): that writes a pickle accelerate loads with
        # weights_only=False. The EMA goes to ema.safetensors in save_checkpoint instead.
    trainable_names = [n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    if config.torch_compile and accelerator.device.type == "cpu":
        logger.warning("torch_compile is off on the CPU (compiling takes longer than it saves here)")
    elif config.torch_compile:
        compile_kwargs = {"mode": config.torch_compile_mode} if config.torch_compile_mode else {}
        if config.torch_compile_objective:  # the model's forward is traced inside the loss's graph
            loss_fn = torch.compile(loss_fn, **compile_kwargs)
        else:
            model = torch.compile(model, **compile_kwargs)

    if accelerator.is_main_process and report_to:
        accelerator.init_trackers(config.tracker_project_name, config=hparams or {})

    log = TrainingLog(os.path.join(config.output_dir, "training_log.jsonl"), accelerator.is_main_process)
    steps_per_epoch = max(1, math.ceil(len(dataloader) / config.gradient_accumulation_steps))
    global_step = 0
    # skipped non-finite steps: in all (checkpointed, so a resumed run's log goes on counting), and in a row now
    nonfinite = {"nonfinite_steps": 0, "consecutive_nonfinite_steps": 0}
    resume_path = None
    if config.resume_from_checkpoint:  # verified (sha256) once, by the main process
        resume_path = [resolve_resume_path(config.resume_from_checkpoint, checkpoint_dir)
                       if accelerator.is_main_process else None]
        resume_path = broadcast_object_list(resume_path)[0]
        if resume_path is None:
            logger.warning("resume_from_checkpoint=latest but no checkpoint exists yet: starting from scratch")
    if resume_path:
        check_random_states(resume_path, accelerator.process_index)
        accelerator.load_state(resume_path, load_kwargs={"weights_only": True})
        if ema is not None:
            load_ema(ema, trainable_names, os.path.join(resume_path, EMA_FILE))
        with open(os.path.join(resume_path, LOOP_STATE_FILE), encoding="utf-8") as f:
            loop_state = json.load(f)
        nonfinite.update({k: int(loop_state[k]) for k in nonfinite})
        global_step = int(CHECKPOINT_RE.match(os.path.basename(resume_path)).group(1))
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    log.truncate_after(global_step)  # a fresh run starts a fresh log; a resumed one drops rows past the checkpoint

    def check_finite(what: str, step: int):
        """Refuse to save or export weights holding NaN/inf (raises NonFiniteTrainingError). Under FSDP every
        rank checks its shards and the verdict is shared (so it must be called on every rank)."""
        base = accelerator.unwrap_model(model)
        if fsdp:
            bad = sorted(set(gather_object(nonfinite_names(_local(base.named_parameters())))))
        else:
            bad = nonfinite_names(base.named_parameters())
        if ema is not None:
            bad += [f"EMA {n}" for n in nonfinite_names(zip(trainable_names, ema.shadow_params))]
        if bad:
            kept = list_checkpoints(checkpoint_dir)
            raise NonFiniteTrainingError(
                f"step {step}: not writing the {what}: {len(bad)} tensors hold NaN/inf (first: {bad[:3]}). "
                f"Last checkpoint: {kept[-1][1] if kept else 'none'}. Lower the learning rate or set max_grad_norm."
            )

    def save_checkpoint(step: int):
        if nonfinite["consecutive_nonfinite_steps"]:
            # A checkpoint inside a run of skipped steps would, through rotation, push out the last one taken
            # after a good step; the next save after a good step happens as usual.
            kept = list_checkpoints(checkpoint_dir)
            logger.warning(
                "step %d: no checkpoint after %d skipped non-finite step(s) in a row; the newest stays %s",
                step, nonfinite["consecutive_nonfinite_steps"], kept[-1][1] if kept else "none",
            )
            return
        check_finite(f"checkpoint of step {step}", step)
        accelerator.wait_for_everyone()
        final = os.path.join(checkpoint_dir, f"checkpoint-{step}")
        tmp = final + ".tmp"
        if accelerator.is_main_process:
            os.makedirs(checkpoint_dir, exist_ok=True)
            remove_leftovers(checkpoint_dir)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if ema is not None:
                    save_ema(ema, trainable_names, os.path.join(tmp, EMA_FILE))
                with open(os.path.join(tmp, LOOP_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump({"step": step, **nonfinite}, f)
                write_manifest(tmp, step)  # last: a folder with a valid manifest is complete
        except Exception as e:
            if accelerator.is_main_process:
                raise abandon_failed_save(e, tmp, final) from e
            raise
        if accelerator.is_main_process:
            if os.path.isdir(final):  # a replayed step after a resume: never half-delete under the valid name
                remove_checkpoint(final)
            os.replace(tmp, final)
            rotate_checkpoints(checkpoint_dir, config.checkpoints_total_limit)
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

    def log_images(images, step: int):
        """sample_fn's images -> every tracker that logs images (accelerate's TensorBoard / W&B / ... log_images)."""
        if not images or not report_to:
            return
        arrays = {name: np.asarray(image) for name, image in images.items()}
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":  # SummaryWriter.add_images: one batch per name
                tracker.log_images({k: v[None] for k, v in arrays.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):  # W&B, Comet, ...: a list of images per name
                tracker.log_images({k: [v] for k, v in arrays.items()}, step=step)

    def validate(step: int):
        """sample_fn on the main process; under FSDP on every process in lockstep (the sharded forward needs all
        ranks; sample_fn writes on the main one only)."""
        if fsdp or accelerator.is_main_process:
            images = with_ema_weights(sample_fn, step)
            if accelerator.is_main_process:
                log_images(images, step)
        accelerator.wait_for_everyone()

    progress = tqdm(
        total=config.max_train_steps, initial=global_step, desc="train", disable=not accelerator.is_main_process
    )
    last_loss = None
    tic, window_start_step = time.perf_counter(), global_step
    window, clock = LogWindow(), DataClock()
    nonfinite_loss = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # over the accumulated micro-steps
    # deferred: a step's update is dropped on the device when it is not finite (fused AdamW's found_inf) and the
    # host reads the verdict during the next step (steps.py); the lr schedule, EMA and counters follow it then
    deferred = (config.nonfinite_check == "deferred" and skips_on_device(optimizer) and accelerator.scaler is None
                and not fsdp and accelerator.distributed_type != DistributedType.XLA)
    pending = None
    # looked up once: walking the modules (and accelerate's unwrap_model) every step costs milliseconds of host time
    clip_params = list(model.parameters())
    ema_params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]

    def settle(verdict: StepVerdict):
        """The host's part of an optimizer step once its verdict is read: lr schedule, EMA, counters, log row."""
        nonlocal tic, window_start_step
        step_ok, why = verdict.read()
        step = verdict.step
        if step_ok:
            lr_scheduler.step()
            nonfinite["consecutive_nonfinite_steps"] = 0
            if ema is not None and not optimizer.step_was_skipped:  # (fp16: the grad scaler skipped it)
                ema.step(ema_params)
            window.add({"loss": verdict.loss, **verdict.logs})  # a skipped step's NaN/inf would poison the means
        else:
            nonfinite["nonfinite_steps"] += 1
            nonfinite["consecutive_nonfinite_steps"] += 1
            logger.warning("step %d: %s; skipped (no optimizer, lr or EMA update), %d in a row",
                           step, why, nonfinite["consecutive_nonfinite_steps"])
        if step % config.log_every == 0 or step == config.max_train_steps or not step_ok:
            elapsed = time.perf_counter() - tic
            row = {"step": step, **window.pop_means(), "lr": lr_scheduler.get_last_lr()[0]}
            if verdict.grad_norm is not None:
                row["grad_norm"] = float(verdict.grad_norm)
            row["nonfinite_steps"] = nonfinite["nonfinite_steps"]
            steps = max(1, step - window_start_step)
            row["it_per_s"] = steps / max(elapsed, 1e-9)
            waited, _ = clock.pop()
            row["data_wait_s"] = waited / steps  # seconds per step spent waiting for the batch
            tic, window_start_step = time.perf_counter(), step
            log.append(row)
            if "loss" in row:
                progress.set_postfix(loss=f"{row['loss']:.4f}")
            if report_to:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if nonfinite["consecutive_nonfinite_steps"] >= max(1, config.max_consecutive_nonfinite_steps):
            accelerator.end_training()
            kept = list_checkpoints(checkpoint_dir)
            raise NonFiniteLossError(
                f"step {step}: {nonfinite['consecutive_nonfinite_steps']} consecutive steps with a "
                f"non-finite loss or gradient norm ({why}); stopping (max_consecutive_nonfinite_steps="
                f"{config.max_consecutive_nonfinite_steps}). Nothing was saved from them; last checkpoint: "
                f"{kept[-1][1] if kept else 'none'}. Lower the learning rate, set max_grad_norm, or check the data."
            )

    epoch = global_step // steps_per_epoch
    with GracefulInterrupt() as interrupt:
        while global_step < config.max_train_steps:
            dataloader.set_epoch(epoch)
            train_data.epoch = epoch  # before the iterator exists, so that worker processes copy it
            skip = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(dataloader, skip) if skip > 0 else dataloader
            for batch in clock.timed(batches):
                with accelerator.accumulate(model):
                    loss, logs = loss_fn(model, batch)
                    accelerator.backward(loss)
                    nonfinite_loss |= ~torch.isfinite(loss.detach()).all()
                    if accelerator.sync_gradients:
                        if held_fixed_fn is not None:
                            # None, not zero: AdamW would still decay a zero-gradient weight and move it by its moments
                            for p in held_fixed_fn(global_step):
                                p.grad = None
                        # The norm is needed even without clipping: a max_norm of inf scales the gradients by exactly 1.
                        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
                        grad_norm = accelerator.clip_grad_norm_(clip_params, max_norm)
                        flags = nonfinite_flags(accelerator, nonfinite_loss, grad_norm)
                        nonfinite_loss.zero_()
                        if pending is not None:  # the previous step's verdict, read while this step's work is queued
                            settle(pending)
                            pending = None
                        verdict = StepVerdict(global_step + 1, flags, accelerator.gather(loss.detach()[None]).mean(),
                                              logs, grad_norm)
                        last_loss = verdict.loss
                        if deferred:  # (accelerate's optimizer.step adds only checks that do not apply here)
                            step_on_device(optimizer, flags)
                        elif verdict.read()[0]:
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                progress.update(1)
                pending = verdict
                checkpoint_now = bool(config.checkpointing_steps) and global_step % config.checkpointing_steps == 0
                validate_now = bool(sample_fn and config.validation_steps) and global_step % config.validation_steps == 0
                if (not deferred or checkpoint_now or validate_now or global_step % config.log_every == 0
                        or global_step >= config.max_train_steps):
                    settle(pending)
                    pending = None
                if checkpoint_now:
                    save_checkpoint(global_step)
                if validate_now:
                    validate(global_step)
                if interrupt.stop_now(accelerator):
                    if pending is not None:
                        settle(pending)
                        pending = None
                    kept = list_checkpoints(checkpoint_dir)
                    if not kept or kept[-1][0] != global_step:
                        save_checkpoint(global_step)
                    kept = list_checkpoints(checkpoint_dir)
                    accelerator.end_training()
                    raise TrainingInterrupted(
                        f"interrupted after step {global_step}; checkpoint "
                        f"{kept[-1][1] if kept else '(none: a skipped non-finite step)'}. Resume with the same "
                        f"command and --resume_from_checkpoint latest"
                    )
                if global_step >= config.max_train_steps:
                    break
            epoch += 1
        if pending is not None:
            settle(pending)
    progress.close()

    if config.checkpointing_steps and global_step % config.checkpointing_steps != 0:
        save_checkpoint(global_step)
    export_dir = os.path.join(config.output_dir, "pipeline")
    accelerator.wait_for_everyone()
    if sample_fn and (not config.validation_steps or global_step % config.validation_steps != 0):
        validate(global_step)
    if fsdp and export_fn:
        # the full state dict is gathered by every rank (collectives) and lands on the main process, on the CPU
        full_state = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            full = consolidated_model(accelerator.unwrap_model(model), full_state)
            del full_state
            bad = nonfinite_names(full.named_parameters())
            if bad:
                raise NonFiniteTrainingError(
                    f"step {global_step}: not writing the exported pipeline: {len(bad)} tensors hold NaN/inf "
                    f"(first: {bad[:3]})"
                )
            export_fn(full, export_dir)
            del full
    elif accelerator.is_main_process:
        if export_fn:
            def checked_export(base, folder):
                check_finite("exported pipeline", global_step)  # the EMA weights are swapped in here
                export_fn(base, folder)

            with_ema_weights(checked_export, export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    last_loss = float(last_loss) if last_loss is not None else float("nan")
    return {"global_step": global_step, "loss": last_loss, "export_dir": export_dir, "log": log.read(), **nonfinite}
