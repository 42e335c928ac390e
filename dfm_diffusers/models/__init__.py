"""DFM transformers and the per-stage layers they share."""

from .stage_layers import DFMStageLayers, StageOutputHead, StageTimestepEmbedding, patchify, stage_patch_sizes, unpatchify
from .transformer_dfm_flux import DFMTransformer2DModel, DFMTransformer2DModelOutput

__all__ = [
    "DFMTransformer2DModel",
    "DFMTransformer2DModelOutput",
    "DFMStageLayers", "StageOutputHead", "StageTimestepEmbedding", "patchify", "stage_patch_sizes", "unpatchify"]
