"""Draw evaluation samples from a DFMDiTPipeline: balanced classes, seeded per sample, 8-bit output."""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import balanced_labels
from .metrics import quantize_to_uint8

AUTOCAST_DTYPES = {"fp32": None, "no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from (seed, sample index): a sample's noise does not depend on the
    batch size, and different seeds never share noise."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
            for i in indices]


def sample_pipeline(
    pipe,
    num_samples: int,
    batch_size: int = 256,
    seed: int = 0,
    guidance_scale: float = 1.0,
    steps_per_stage: Sequence[int] | int | None = None,
    stage_thresholds: Sequence[float] | None = None,
    class_labels: Sequence[int] | np.ndarray | None = None,
    autocast_dtype: str | torch.dtype | None = None,
    progress: bool = True,
    **pipe_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` images from a class-conditional DFM pipeline -> (uint8 [N, H, W, C], labels int64 [N]).

    Args:
        class_labels: default :func:`balanced_labels` over the model's classes.
        autocast_dtype: None/"fp32", "bf16" or "fp16" (or a torch dtype): autocast on the pipeline's device.
        steps_per_stage, stage_thresholds, guidance_scale, pipe_kwargs: passed to the pipeline call.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    labels = (balanced_labels(num_samples, pipe.transformer.config.num_classes) if class_labels is None
              else np.asarray(class_labels, dtype=np.int64))
    if len(labels) != num_samples:
        raise ValueError(f"{len(labels)} class labels for {num_samples} samples")
    if isinstance(autocast_dtype, str):
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be one of {sorted(AUTOCAST_DTYPES)} or a torch dtype")
        autocast_dtype = AUTOCAST_DTYPES[autocast_dtype]
    device = pipe._execution_device
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    pipe.set_progress_bar_config(disable=True)
    images = []
    with tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            batch = labels[start : start + batch_size]
            with autocast:
                out = pipe(
                    class_labels=torch.from_numpy(batch),
                    guidance_scale=guidance_scale,
                    steps_per_stage=steps_per_stage,
                    stage_thresholds=stage_thresholds,
                    generator=sample_generators(seed, range(start, start + len(batch))),
                    output_type="pt",
                    **pipe_kwargs,
                )
            images.append(quantize_to_uint8(out.images.float(), (0.0, 1.0)))
            bar.update(len(batch))
    return np.concatenate(images), labels
