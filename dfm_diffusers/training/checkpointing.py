"""Checkpoint folders that prove they are complete, EMA state without pickles, and one run per output folder.

A checkpoint is ``<output_dir>/checkpoints/checkpoint-<step>``: accelerate's ``save_state`` files, ``ema.safetensors``
(diffusers' EMAModel: shadow parameters by name, its scalars as metadata), ``loop_state.json`` and, written last,
``manifest.json`` (every file's relative path, size and sha256). The folder is written as ``checkpoint-<step>.tmp``
and renamed, so a folder under a valid name is always complete; the manifest additionally catches files truncated or
changed afterwards. Nothing here unpickles: accelerate's optimizer, scheduler and RNG files are read with
``weights_only=True``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_FILE = "manifest.json"
EMA_FILE = "ema.safetensors"
LOOP_STATE_FILE = "loop_state.json"
LOCK_FILE = ".lock"
DELETING_SUFFIX = ".deleting"


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, changed after it was written, or not one of ours."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous checkpoints are untouched."""


class NonFiniteTrainingError(RuntimeError):
    """Parameters or EMA weights hold NaN/inf: nothing is saved or exported from them."""


class NonFiniteLossError(NonFiniteTrainingError):
    """Too many consecutive training steps had a non-finite loss or gradient norm."""


class OutputDirLockedError(RuntimeError):
    """Another live run holds the output folder."""


class OutputDirInUseError(ValueError):
    """The output folder holds a previous run and neither resuming nor overwriting it was asked for."""


class TrainingInterrupted(Exception):
    """Ctrl+C: the run stopped after a step, with a checkpoint saved; the message says how to resume."""


# ------------------------------------------------------------------------------------------------ listing, manifest


def list_checkpoints(checkpoint_dir: str) -> list[tuple[int, str]]:
    """Checkpoint folders as (step, path), oldest first. Temporary (``.tmp``) and half-deleted (``.deleting``)
    folders are ignored; whether a listed folder is complete is :func:`verify_checkpoint`'s question."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(checkpoint_dir, name)):
            found.append((int(match.group(1)), os.path.join(checkpoint_dir, name)))
    return sorted(found)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Relative paths (``/``-separated) of every file under ``folder``, the manifest excluded."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str, step: int) -> None:
    """``manifest.json``: path, size and sha256 of every other file in ``folder``; written last (tmp + replace)."""
    files = {rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
             for rel in _files(folder)}
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": "dfm-checkpoint", "version": 1, "step": int(step), "files": files}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def verify_checkpoint(folder: str, hashes: bool = True) -> str | None:
    """None if ``folder`` matches its manifest (same files, sizes and, with ``hashes``, sha256); else the reason."""
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        return f"no {MANIFEST_FILE} (not written by this version of the loop, or the save did not finish)"
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST_FILE}: {e}"
    present = set(_files(folder))
    if set(files) - present:
        return f"missing files {sorted(set(files) - present)}"
    if present - set(files):
        return f"files not in the manifest {sorted(present - set(files))}"
    for rel, entry in files.items():
        size = os.path.getsize(os.path.join(folder, rel))
        if size != entry["size"]:
            return f"{rel} has {size} bytes, the manifest says {entry['size']} (truncated or changed)"
    if hashes:
        for rel, entry in files.items():
            if _sha256(os.path.join(folder, rel)) != entry["sha256"]:
                return f"{rel} does not match its sha256 in the manifest (corrupted or changed)"
    return None


def resolve_resume_path(resume: str | None, checkpoint_dir: str) -> str | None:
    """``"latest"`` -> the newest checkpoint whose manifest verifies (those skipped are logged with the reason;
    None if there is no checkpoint at all); an explicit folder must verify. Raises :class:`CheckpointError` when
    checkpoints exist but none verifies, or the explicit one does not."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        skipped = []
        for _, path in reversed(found):
            reason = verify_checkpoint(path)
            if reason is None:
                for bad, why in skipped:
                    logger.warning("resume: skipped %s: %s", bad, why)
                return path
            skipped.append((path, reason))
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {checkpoint_dir} verifies against its manifest: "
                + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
            )
        return None
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder")
    if not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(resume))):
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder (checkpoint-<step>)")
    reason = verify_checkpoint(resume)
    if reason is not None:
        raise CheckpointError(f"checkpoint {resume} does not verify: {reason}")
    return resume


def check_random_states(folder: str, process_index: int) -> None:
    """accelerate's ``load_state`` skips an unreadable RNG file with an info message, which would make a resume
    silently inexact: read it first (``weights_only=True``, as accelerate does) and fail loudly instead."""
    from accelerate.utils import load

    path = os.path.join(folder, f"random_states_{process_index}.pkl")
    if not os.path.isfile(path):
        logger.warning("%s has no random states for process %d: the resume will not be exact", folder, process_index)
        return
    try:
        load(path)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as random states (weights_only=True): {e}") from e


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint folder without ever leaving a half-deleted one under a valid name: rename, then delete."""
    doomed = f"{path}{DELETING_SUFFIX}-{uuid.uuid4().hex[:8]}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(checkpoint_dir: str) -> None:
    """Folders a killed deletion left behind (``checkpoint-N.deleting-*``)."""
    if os.path.isdir(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            if DELETING_SUFFIX in name:
                shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


def rotate_checkpoints(checkpoint_dir: str, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints that verify (sizes); older verified ones are deleted. Folders that do
    not verify are never counted, so they can never push the last good checkpoint out, and are left alone."""
    if not limit:
        return
    valid = [path for _, path in list_checkpoints(checkpoint_dir) if verify_checkpoint(path, hashes=False) is None]
    for path in valid[:-limit]:
        remove_checkpoint(path)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (torch.save and safetensors wrap it in their own errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


#: Below this much free space after a failed write the disk counts as full: torch.save reports ENOSPC only as
#: "RuntimeError: [enforce fail at inline_container.cc] unexpected pos", without the errno.
NEARLY_FULL_BYTES = 64 * 2**20


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def abandon_failed_save(error: BaseException, tmp: str, final: str) -> CheckpointSaveError:
    """After writing ``tmp`` (to become ``final``) failed: remove the partial folder and return the error to raise,
    which says whether the disk is full (ENOSPC in the chain, or almost no space left before the clean-up) and which
    earlier checkpoint is still usable."""
    checkpoint_dir = os.path.dirname(final)
    free_before = _free_bytes(checkpoint_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    full = is_disk_full(error) or (free_before is not None and free_before < NEARLY_FULL_BYTES)
    previous = list_checkpoints(checkpoint_dir)
    kept = f"the previous checkpoint {previous[-1][1]} is untouched" if previous else "no earlier checkpoint exists"
    free_after = _free_bytes(checkpoint_dir)
    space = (f"{free_before / 2**20:.1f} MiB were free when it failed, {free_after / 2**20:.1f} MiB after removing it"
             if free_before is not None and free_after is not None else "free space unknown")
    what = "the disk is full (no space left on device)" if full else f"{type(error).__name__}: {error}"
    advice = "Free some space, then" if full else "Then"
    return CheckpointSaveError(
        f"saving checkpoint {os.path.basename(final)} failed: {what}; the partial folder was removed and {kept} "
        f"({space}). {advice} resume with --resume_from_checkpoint latest."
    )


# ------------------------------------------------------------------------------------------------ EMA, finiteness


def save_ema(ema, names: list[str], path: str) -> None:
    """diffusers' EMAModel as safetensors: shadow parameters under the trainable parameters' names, the scalars
    (decay, optimization_step, ...) as JSON metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    if len(shadow) != len(names):
        raise ValueError(f"EMA holds {len(shadow)} tensors for {len(names)} trainable parameters")
    metadata = {"format": "dfm-ema", **{k: json.dumps(v) for k, v in state.items()}}
    save_file({n: t.detach().contiguous().cpu() for n, t in zip(names, shadow)}, path, metadata=metadata)


def load_ema(ema, names: list[str], path: str) -> None:
    """Inverse of :func:`save_ema`: copies the shadow parameters in place (device and dtype kept)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "dfm-ema" or set(f.keys()) != set(names):
            raise CheckpointError(
                f"{path} does not hold this model's EMA state (missing {sorted(set(names) - set(f.keys()))[:5]}, "
                f"unexpected {sorted(set(f.keys()) - set(names))[:5]})"
            )
        tensors = [f.get_tensor(n) for n in names]
    scalars = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    ema.load_state_dict(scalars)  # no "shadow_params" key: the tensors are copied below
    with torch.no_grad():
        for shadow, tensor, name in zip(ema.shadow_params, tensors, names):
            if shadow.shape != tensor.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(shadow.shape)}"
                )
            shadow.copy_(tensor)


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors that hold NaN or inf."""
    return [name for name, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


# ------------------------------------------------------------------------------------------------ output-folder lock


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a live run from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputDirLock:
    """``<output_dir>/.lock`` (JSON: pid, host, boot id, process start time), created atomically: a second run on
    the same folder raises :class:`OutputDirLockedError` while the holder lives; the lock of a dead process on
    this host (pid gone, pid reused by another process, or the machine rebooted) is taken over with a warning.
    A lock from another host is never taken over (its process cannot be checked): delete it by hand."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_time": _start_time(pid),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}

    def _create(self) -> bool:
        """Create the lock with its content in one step (hard link of a complete file); False if it exists."""
        tmp = f"{self.path}.{os.getpid()}.{self.token}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._record(), f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
            return True
        finally:
            os.unlink(tmp)

    def _read(self, path: str) -> dict | None:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why ``holder``'s process is certainly dead, or None if it may be alive."""
        if holder is None:
            return None  # unreadable: cannot tell
        if holder.get("host") != socket.gethostname():
            return None
        pid = int(holder.get("pid", -1))
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return f"pid {pid} ran before this machine rebooted"
        if pid <= 0 or not _pid_alive(pid):
            return f"pid {pid} is not running"
        if holder.get("start_time") is not None and _start_time(pid) not in (None, holder["start_time"]):
            return f"pid {pid} is now another process"
        return None

    def acquire(self) -> "OutputDirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(10):
            if self._create():
                self.held = True
                return self
            try:
                holder = self._read(self.path)
            except FileNotFoundError:
                continue  # released meanwhile
            reason = self._stale_reason(holder)
            if reason is None:
                who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}"
                       if holder else "an unreadable lock")
                raise OutputDirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another run ({who}): refusing to start a second "
                    f"run on the same output folder. Pick another --output_dir, or, if that run is dead, delete "
                    f"{self.path}."
                )
            # Take the stale lock over: move it aside first, so that of two runs racing for it only one wins.
            claimed = f"{self.path}.stale.{self.token}"
            try:
                os.rename(self.path, claimed)
            except FileNotFoundError:
                continue
            moved = self._read(claimed)
            if moved is not None and moved.get("token") != (holder or {}).get("token"):
                # someone else's fresh lock was moved: put it back (never over a newer one) and look again
                try:
                    os.link(claimed, self.path)
                except OSError:
                    pass
                os.unlink(claimed)
                continue
            os.unlink(claimed)
            logger.warning("taking over the stale lock %s (%s): %s", self.path, reason, holder)
        raise OutputDirLockedError(f"could not take the lock {self.path} (runs keep racing for it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = self._read(self.path)
        except FileNotFoundError:
            return
        if holder is not None and holder.get("token") == self.token:
            os.unlink(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


TRAINABLE_CHECKPOINT_FILE = "trainable_parameters.safetensors"


def checkpoint_trainable_parameters_only(accelerator, model: torch.nn.Module) -> None:
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
