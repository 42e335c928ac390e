"""DFM pipelines: text-to-image (FLUX-based) and class-conditional (DiT-based)."""

from .pipeline_dfm import DFMPipeline, DFMPipelineOutput
from .pipeline_dfm_dit import DFMDiTPipeline

__all__ = ["DFMPipeline", "DFMPipelineOutput", "DFMDiTPipeline"]
