"""The training loop's bookkeeping around a run: the output folder's previous run, the JSON-lines training log, and
Ctrl+C (stop after the current step)."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

import torch

from .checkpointing import OutputDirInUseError, list_checkpoints

if TYPE_CHECKING:
    from .loop_config import LoopConfig


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
