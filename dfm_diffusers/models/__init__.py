"""DFM transformers and the per-stage layers they share."""

from .stage_layers import DFMStageLayers, StageOutputHead, StageTimestepEmbedding, patchify, stage_patch_sizes, unpatchify
from .transformer_dfm_flux import DFMTransformer2DModel, DFMTransformer2DModelOutput
from .transformer_dfm_dit import DIT_PRESETS, DFMDiTTransformer2DModel, DFMDiTTransformer2DModelOutput

__all__ = [
    "DIT_PRESETS",
    "DFMDiTTransformer2DModel",
    "DFMDiTTransformer2DModelOutput",
    "DFMTransformer2DModel",
    "DFMTransformer2DModelOutput",
    "DFMStageLayers", "StageOutputHead", "StageTimestepEmbedding", "patchify", "stage_patch_sizes", "unpatchify"]
