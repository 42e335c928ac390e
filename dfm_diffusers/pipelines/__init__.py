"""DFM pipelines: text-to-image (FLUX-based) and class-conditional (DiT-based)."""

from .pipeline_dfm import DFMPipeline
from .official import convert_official_checkpoint
from .pipeline_dfm_dit import DFMDiTPipeline
from .stagewise import DFMPipelineOutput

__all__ = ["DFMPipeline", "DFMPipelineOutput", "DFMDiTPipeline", "convert_official_checkpoint"]
