"""Pieces of the shared loop's optimizer step that keep it from waiting on the device (docs/training_speed.md).

- :class:`DataClock`: the seconds each step waits for its batch (the ``data_wait_s`` column of the log).
- :func:`nonfinite_flags` / :class:`StepVerdict`: whether a step's losses and gradient norm were finite, computed
  on the device. With an optimizer that can drop an update on the device (torch's fused AdamW reads
  ``found_inf``: no parameter, moment or step-count change), the host reads the verdict one step later, while the
  device already runs the next step's forward and backward (``nonfinite_check: deferred``); otherwise at once.
"""

from __future__ import annotations

import math
import time

import torch

NONFINITE_CHECKS = ("deferred", "every_step")


class DataClock:
    """Wraps a batch iterable; ``pop()`` returns (seconds spent waiting in ``next``, batches) since the last pop."""

    def __init__(self):
        self.waited, self.batches = 0.0, 0

    def timed(self, batches):
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            self.batches += 1
            yield batch

    def pop(self) -> tuple[float, int]:
        out = (self.waited, self.batches)
        self.waited, self.batches = 0.0, 0
        return out


def nonfinite_flags(accelerator, nonfinite_loss: torch.Tensor, grad_norm) -> torch.Tensor:
    """float32 [2] on the device: (any accumulated loss was NaN/inf, the gradient norm was), summed over the
    processes (a collective, no host sync). With fp16's grad scaler an inf gradient norm is the scaler's business
    (it skips the step itself and lowers the scale)."""
    device = nonfinite_loss.device
    if accelerator.scaler is not None or grad_norm is None:
        grad_bad = torch.zeros((), device=device)
    elif torch.is_tensor(grad_norm):
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's DTensor norm (a collective, no host sync)
            grad_norm = grad_norm.full_tensor()
        grad_bad = (~torch.isfinite(grad_norm.detach())).to(device=device, dtype=torch.float32)
    else:  # a float (e.g. DeepSpeed)
        grad_bad = torch.tensor(float(not math.isfinite(grad_norm)), device=device)
    flags = torch.stack([nonfinite_loss.float(), grad_bad.float()])
    return accelerator.reduce(flags, reduction="sum") if accelerator.num_processes > 1 else flags


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer`` (or the one an accelerate wrapper holds) drops an update on the device when its
    ``found_inf`` attribute is 1: torch's Adam / AdamW with ``fused=True``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)


def step_on_device(optimizer, flags: torch.Tensor) -> None:
    """A fused Adam / AdamW step that does nothing (no parameter, moment or step-count change) where ``flags``
    (from :func:`nonfinite_flags`) mark the step as non-finite; decided on the device, no host sync."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (flags.sum() > 0).float()
    inner.step()


class StepVerdict:
    """The device-side outcome of one optimizer step, read on the host later (:meth:`read`).

    On CUDA the flags are copied to pinned memory behind an event: reading waits only for that step's work, not
    for the steps queued after it."""

    def __init__(self, step: int, flags: torch.Tensor, loss: torch.Tensor, logs: dict, grad_norm):
        self.step, self.loss, self.logs, self.grad_norm = step, loss, logs, grad_norm
        self._event, self._read = None, None
        if flags.device.type == "cuda":
            self._flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._flags.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._flags = flags

    def read(self) -> tuple[bool, str]:
        """(the step was finite, what was not: "non-finite loss", "non-finite gradient norm", both or "")."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            loss_bad, grad_bad = (self._flags > 0).tolist()
            why = " and ".join(w for w, bad in (("non-finite loss", loss_bad), ("non-finite gradient norm", grad_bad))
                               if bad)
            self._read = (not (loss_bad or grad_bad), why)
        return self._read
