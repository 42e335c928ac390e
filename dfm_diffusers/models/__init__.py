"""DFM transformers and the per-stage layers they share (loaded on first use)."""

from ..utils import lazy_exports

_EXPORTS = {
    "DIT_PRESETS": ".transformer_dfm_dit",
    "DFMDiTTransformer2DModel": ".transformer_dfm_dit",
    "DFMDiTTransformer2DModelOutput": ".transformer_dfm_dit",
    "DFMTransformer2DModel": ".transformer_dfm_flux",
    "DFMTransformer2DModelOutput": ".transformer_dfm_flux",
    **{name: ".stage_layers" for name in ("DFMStageLayers", "StageOutputHead", "StageTimestepEmbedding", "patchify",
                                          "stage_patch_sizes", "unpatchify")},
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
