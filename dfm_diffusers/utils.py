"""Small helpers shared across the package."""

from __future__ import annotations

from typing import Sequence


def normalize_stage_factors(num_stages: int, factors: int | Sequence[int]) -> list[int]:
    """Return the S-1 resolution factors between consecutive stages as a list of ints >= 2."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if isinstance(factors, int):
        factors = [factors] * (num_stages - 1)
    factors = [int(f) for f in factors]
    if len(factors) != num_stages - 1:
        raise ValueError(f"stage_factors must hold num_stages - 1 = {num_stages - 1} ints, got {factors}")
    if any(f < 2 for f in factors):
        raise ValueError(f"stage_factors must be ints >= 2, got {factors}")
    return factors


def configure_attention_backends() -> bool:
    """Disable PyTorch's cuDNN scaled-dot-product-attention backend on CUDA; returns True if it did.

    On the project's GPU machine the cuDNN SDPA backward fails with
    CUBLAS_STATUS_EXECUTION_FAILED ("mha_graph.execute"); the flash / memory-efficient backends work.
    Training scripts and benchmarks call this once at start-up (a process-wide setting); a no-op without CUDA.
    """
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True
