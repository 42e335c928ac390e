"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
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


# Import-time notices of dependencies about optional parts this library does not use: bitsandbytes' CPU kernel
# (the "kernels" package) and transformers' torchvision image processors (FLUX's pipeline module imports CLIP's).
_IMPORT_NOISE_LOGGERS = ("bitsandbytes", "transformers.utils.import_utils")


@contextlib.contextmanager
def quiet_dependency_imports():
    """Hold the import-time warnings of ``_IMPORT_NOISE_LOGGERS`` back while the library imports its dependencies."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_bitsandbytes_kernel_notice() -> None:
    """Drop bitsandbytes' import-time notice that its optional CPU kernel package ("kernels") is missing, which
    every diffusers model import prints on CPUs with AVX512-BF16 (nothing else that logger says is dropped)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))


def lazy_exports(package: str, exports: dict[str, str]):
    """(``__getattr__``, ``__dir__``) for a package whose public names are imported on first use, as diffusers' own
    lazy modules do: ``exports`` maps each name to the submodule (relative to ``package``) that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        with quiet_dependency_imports():
            module = importlib.import_module(exports[name], package)
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
