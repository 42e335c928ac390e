"""The DFM multi-stage sampler."""

from .scheduling_dfm import DFMScheduler, DFMSchedulerOutput, calculate_shift

__all__ = ["DFMScheduler", "DFMSchedulerOutput", "calculate_shift"]
