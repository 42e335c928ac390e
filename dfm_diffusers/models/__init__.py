"""DFM transformers and the per-stage layers they share."""

from .stage_layers import DFMStageLayers, StageOutputHead, StageTimestepEmbedding, patchify, stage_patch_sizes, unpatchify

__all__ = ["DFMStageLayers", "StageOutputHead", "StageTimestepEmbedding", "patchify", "stage_patch_sizes", "unpatchify"]
