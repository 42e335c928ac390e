"""dfm_diffusers: Decomposable Flow Matching (arXiv 2506.19839) for Hugging Face diffusers.

The public names load on first use (``import dfm_diffusers`` alone imports neither torch nor diffusers)."""

from .utils import drop_bitsandbytes_kernel_notice, lazy_exports

__version__ = "0.1.0"
drop_bitsandbytes_kernel_notice()

_EXPORTS = {
    "LaplacianDecomposition": ".decomposition",
    "DFMTransformer2DModel": ".models.transformer_dfm_flux",
    "DFMDiTTransformer2DModel": ".models.transformer_dfm_dit",
    "DFMPipeline": ".pipelines.pipeline_dfm",
    "DFMDiTPipeline": ".pipelines.pipeline_dfm_dit",
    "DFMPipelineOutput": ".pipelines.stagewise",
    "convert_official_checkpoint": ".pipelines.official",
    "DFMScheduler": ".schedulers",
    "DFMTrainingSigmas": ".training",
    "dfm_loss": ".training",
    "noise_stages": ".training",
    "sample_dfm_training_sigmas": ".training",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
