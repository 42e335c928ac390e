"""Training core shared by train_dfm_flux.py and train_dfm_dit.py."""

from .config import ConfigError, check_config, load_config
from .log_window import LogWindow
from .objective import (
    DFMObjectiveConfig,
    DFMObjectiveOutput,
    DFMTrainingSigmas,
    conditional_stage_losses,
    default_stage_weights,
    dfm_loss,
    dfm_objective,
    masked_stage_loss,
    noise_stages,
    sample_dfm_training_sigmas,
    stage_mse,
    validate_training_distribution,
)

__all__ = [
    "ConfigError",
    "check_config",
    "load_config",
    "DFMObjectiveConfig",
    "DFMObjectiveOutput",
    "DFMTrainingSigmas",
    "LogWindow",
    "conditional_stage_losses",
    "default_stage_weights",
    "dfm_loss",
    "dfm_objective",
    "masked_stage_loss",
    "noise_stages",
    "sample_dfm_training_sigmas",
    "stage_mse",
    "validate_training_distribution",
]
