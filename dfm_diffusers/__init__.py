"""dfm_diffusers: Decomposable Flow Matching (arXiv 2506.19839) for Hugging Face diffusers."""

__version__ = "0.1.0"

from .decomposition import LaplacianDecomposition
from .models import DFMTransformer2DModel
from .models import DFMDiTTransformer2DModel
from .pipelines import DFMDiTPipeline, DFMPipeline, DFMPipelineOutput, convert_official_checkpoint
from .schedulers import DFMScheduler
from .training import DFMTrainingSigmas, dfm_loss, noise_stages, sample_dfm_training_sigmas

__all__ = [
    "DFMDiTTransformer2DModel",
    "LaplacianDecomposition",
    "DFMTransformer2DModel",
    "DFMScheduler",
    "DFMPipeline",
    "DFMPipelineOutput",
    "DFMDiTPipeline",
    "convert_official_checkpoint",
    "DFMTrainingSigmas",
    "dfm_loss",
    "noise_stages",
    "sample_dfm_training_sigmas",
]
