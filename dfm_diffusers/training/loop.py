"""The training loop shared by the DFM trainers (:func:`run_training`: accelerate, diffusers' EMAModel, atomic
checkpoints).

A trainer supplies the model, the dataset and three callables:
- ``loss_fn(model, batch) -> (loss, logs)``: logs values are floats or ``(sum, count)`` pairs; each log row holds
  their means over the steps since the previous row (:class:`.log_window.LogWindow`)
- ``sample_fn(model, step) -> None | dict[str, image]`` (writes sample grids; called with EMA weights swapped in);
  a returned dict of images (PIL, or HWC uint8 arrays) is logged to the trackers that log images (TensorBoard, ...).
  Under FSDP it runs on every process in lockstep and must write files only on the main one
- ``export_fn(model, folder) -> None`` (writes the final pipeline folder; EMA weights swapped in; main process only)
- optionally ``held_fixed_fn(step) -> parameters`` (``step`` = optimizer steps already taken): trainable parameters
  the coming optimizer step must leave exactly as they are (their gradients are dropped before clipping)

Settings: :class:`.loop_config.LoopConfig`; checkpoint I/O: :mod:`.checkpointing`; FSDP: :mod:`.fsdp`; the output
folder, log and Ctrl+C: :mod:`.run_folder`. Several processes: examples/accelerate/README.md; the faults it
survives: docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Iterable

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
from .log_window import LogWindow
from .steps import DataClock, StepVerdict, nonfinite_flags, skips_on_device, step_on_device
from .checkpointing import (  # noqa: F401  (names re-exported here: the loop's public API before the split)
    CHECKPOINT_RE,
    EMA_FILE,
    LOOP_STATE_FILE,
    TRAINABLE_CHECKPOINT_FILE,
    NonFiniteLossError,
    NonFiniteTrainingError,
    OutputDirInUseError,
    OutputDirLock,
    TrainingInterrupted,
    abandon_failed_save,
    check_random_states,
    checkpoint_trainable_parameters_only,
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
from .fsdp import _local, consolidated_model, fsdp_problems  # noqa: F401
from .loop_config import LoopConfig, make_optimizer  # noqa: F401
from .run_folder import GracefulInterrupt, TrainingLog, check_output_dir, previous_run  # noqa: F401

logger = logging.getLogger(__name__)


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
