# Vendored from https://github.com/huggingface/diffusers, file tests/pipelines/testing_utils/__init__.py,
# commit d035dcd7cc7c88e0a154609b62887d50bba9fdc2 (tag v0.40.0). Apache License 2.0 (notice below where upstream has
# one; http://www.apache.org/licenses/LICENSE-2.0).
# Changed for dfm-diffusers: nothing (relative imports resolve to the vendored subset).
from .cache import (
    CacheTesterMixin,
    FasterCacheTesterMixin,
    FirstBlockCacheTesterMixin,
    MagCacheTesterMixin,
    PyramidAttentionBroadcastTesterMixin,
    TaylorSeerCacheTesterMixin,
)
from .common import BasePipelineTesterConfig, PipelineTesterMixin
from .lora import LoraMemoryTesterMixin, LoraTesterMixin, UNetLoraTesterMixin
from .memory import (
    GroupOffloadTesterMixin,
    LayerwiseCastingTesterMixin,
    MemoryTesterMixin,
    PipelineOffloadTesterMixin,
)
from .utils import (
    check_qkv_fused_layers_exist,
    check_qkv_fusion_matches_attn_procs_length,
    check_qkv_fusion_processors_exist,
    check_same_shape,
)


__all__ = [
    "BasePipelineTesterConfig",
    "PipelineTesterMixin",
    "LoraTesterMixin",
    "LoraMemoryTesterMixin",
    "UNetLoraTesterMixin",
    "MemoryTesterMixin",
    "PipelineOffloadTesterMixin",
    "GroupOffloadTesterMixin",
    "LayerwiseCastingTesterMixin",
    "CacheTesterMixin",
    "PyramidAttentionBroadcastTesterMixin",
    "FasterCacheTesterMixin",
    "FirstBlockCacheTesterMixin",
    "TaylorSeerCacheTesterMixin",
    "MagCacheTesterMixin",
    "check_qkv_fused_layers_exist",
    "check_qkv_fusion_matches_attn_procs_length",
    "check_qkv_fusion_processors_exist",
    "check_same_shape",
]
