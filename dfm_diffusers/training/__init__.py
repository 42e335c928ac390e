"""Training core shared by train_dfm_flux.py and train_dfm_dit.py."""

from .config import ConfigError, check_config, load_config
from .objective import (
    DFMObjectiveConfig,
    DFMObjectiveOutput,
    DFMTrainingSigmas,
    default_stage_weights,
    dfm_loss,
    dfm_objective,
    noise_stages,
    sample_dfm_training_sigmas,
    validate_training_distribution,
)

__all__ = [
    "ConfigError",
    "check_config",
    "load_config",
    "DFMObjectiveConfig",
    "DFMObjectiveOutput",
    "DFMTrainingSigmas",
    "default_stage_weights",
    "dfm_loss",
    "dfm_objective",
    "noise_stages",
    "sample_dfm_training_sigmas",
    "validate_training_distribution",
]
