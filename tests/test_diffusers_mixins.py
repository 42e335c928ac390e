"""diffusers' own pipeline tester mixins run on a two-stage DFMPipeline, so a diffusers change that breaks a
convention DFMPipeline follows is caught here.

The mixins are vendored (unchanged, see tests/diffusers_mixins/README.md) from the tests diffusers runs on its own
FluxPipeline: PipelineTesterMixin, the PyramidAttentionBroadcast / FasterCache / FirstBlockCache / TaylorSeer /
MagCache testers and the LoRA tester, with the same test configuration as diffusers' Flux tests (same call
signature requirements, same FasterCache settings, same LoRA checks). The components are the suite's tiny offline
FLUX ones (tests/conftest.py) converted to two DFM stages, with the new stage's zero-initialised layers given values
so stage 1 changes the output. Where DFM differs from what a mixin expects, mark the test xfail (strict) with the
reason and list the difference in docs/diffusers_conventions.md; at diffusers 0.42.1 none is (every test that runs on
CPU passes; the skips are diffusers' accelerator-only tests).
"""

import functools
import tempfile
from pathlib import Path

import diffusers.pipelines
import pytest
import torch
from diffusers import FluxPipeline

from conftest import make_tiny_flux_components, make_tiny_flux_transformer, make_tiny_tokenizers
from diffusers_mixins.pipelines.testing_utils import (
    BasePipelineTesterConfig,
    FasterCacheTesterMixin,
    FirstBlockCacheTesterMixin,
    LoraTesterMixin,
    MagCacheTesterMixin,
    MemoryTesterMixin,
    PipelineTesterMixin,
    PyramidAttentionBroadcastTesterMixin,
    TaylorSeerCacheTesterMixin,
)
from diffusers_mixins.testing_utils import torch_device
from dfm_diffusers import DFMPipeline


_TOKENIZERS = tempfile.TemporaryDirectory(prefix="dfm-mixin-tokenizers-")  # removed when the module is freed


@functools.lru_cache(maxsize=1)
def tokenizer_root():
    """Tiny CLIP / T5 tokenizers, saved once (the mixins call get_dummy_components outside fixtures)."""
    return make_tiny_tokenizers(Path(_TOKENIZERS.name))


class DFMPipelineTesterConfig(BasePipelineTesterConfig):
    """diffusers' BasePipelineTesterConfig contract for a two-stage DFMPipeline (as FluxPipelineTesterConfig)."""

    pipeline_class = DFMPipeline
    # FluxPipelineTesterConfig's values.
    required_input_params_in_call_signature = frozenset(
        ["prompt", "height", "width", "guidance_scale", "prompt_embeds", "pooled_prompt_embeds"]
    )
    batch_input_params = frozenset(["prompt"])
    # 16 px: 8x8 latents with the tiny VAE (factor 2), 4x4 latents in the coarse stage (factor 2), both packable.
    output_shape = (3, 16, 16)

    @pytest.fixture(autouse=True)
    def cleanup(self):
        """Upstream frees accelerator memory around each test (two gc passes); on CPU there is none to free, and the
        passes cost about 0.5 s a test on the shared CPU, so they run only on an accelerator."""
        if torch_device != "cpu":
            yield from BasePipelineTesterConfig.cleanup.__wrapped__(self)
        else:
            yield

    def get_dummy_components(self, num_layers: int = 1, num_single_layers: int = 1):
        components = make_tiny_flux_components(tokenizer_root())
        if (num_layers, num_single_layers) != (1, 1):  # the cache testers ask for deeper transformers
            components["transformer"] = make_tiny_flux_transformer(
                0, num_layers=num_layers, num_single_layers=num_single_layers
            )
        flux = FluxPipeline(**components)
        pipe = DFMPipeline.from_flux_pipeline(flux, num_stages=2, steps_per_stage=[1, 1], stage_thresholds=[0.3])
        # The new stage's layers start at zero (DFM's initialisation); give them values so stage 1 does something.
        torch.manual_seed(1)
        with torch.no_grad():
            for p in pipe.transformer.stage_layers.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        return dict(pipe.components)

    def get_dummy_inputs(self):
        return {
            "prompt": "a cat",
            "generator": self.get_generator(0),
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "height": 16,
            "width": 16,
            "max_sequence_length": 16,
            "output_type": "pt",
        }


class TestDFMPipeline(DFMPipelineTesterConfig, PipelineTesterMixin):
    def test_encode_prompt_works_in_isolation(self, monkeypatch):
        # diffusers' helper that reads encode_prompt's return names (ReturnNameVisitor.get_ast_tree) looks the class
        # up by name in `diffusers.pipelines`, where a pipeline from another package is not: register it there.
        monkeypatch.setattr(diffusers.pipelines, DFMPipeline.__name__, DFMPipeline, raising=False)
        super().test_encode_prompt_works_in_isolation()


class TestDFMPipelineMemory(DFMPipelineTesterConfig, MemoryTesterMixin):
    """Offloading / layerwise casting (diffusers runs these on an accelerator only: skipped on CPU)."""


class TestDFMPipelinePyramidAttentionBroadcast(DFMPipelineTesterConfig, PyramidAttentionBroadcastTesterMixin):
    pass


class TestDFMPipelineFasterCache(DFMPipelineTesterConfig, FasterCacheTesterMixin):
    # FLUX is guidance-distilled: diffusers' Flux tests use these settings.
    FASTER_CACHE_CONFIG = {
        "spatial_attention_block_skip_range": 2,
        "spatial_attention_timestep_skip_range": (-1, 901),
        "unconditional_batch_skip_range": 2,
        "attention_weight_callback": lambda _: 0.5,
        "is_guidance_distilled": True,
    }


class TestDFMPipelineFirstBlockCache(DFMPipelineTesterConfig, FirstBlockCacheTesterMixin):
    pass


class TestDFMPipelineTaylorSeerCache(DFMPipelineTesterConfig, TaylorSeerCacheTesterMixin):
    pass


class TestDFMPipelineMagCache(DFMPipelineTesterConfig, MagCacheTesterMixin):
    pass


class TestDFMPipelineLoRA(DFMPipelineTesterConfig, LoraTesterMixin):
    pass
