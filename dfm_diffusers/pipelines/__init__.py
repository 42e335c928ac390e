"""DFM pipelines: text-to-image (FLUX-based) and class-conditional (DiT-based). Loaded on first use, so that
DiT-only code does not import FLUX's pipeline (and its text and image encoders' modules)."""

from ..utils import lazy_exports

_EXPORTS = {
    "DFMPipeline": ".pipeline_dfm",
    "DFMDiTPipeline": ".pipeline_dfm_dit",
    "DFMPipelineOutput": ".stagewise",
    "convert_official_checkpoint": ".official",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
