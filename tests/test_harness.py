"""The offline harness itself: tokenizers and tiny FLUX components behave like the real ones."""

import os

import torch


def test_offline_environment(hf_home):
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and os.environ["HF_HOME"] == hf_home


def test_tokenizers(tiny_flux_components):
    clip, t5 = tiny_flux_components["tokenizer"], tiny_flux_components["tokenizer_2"]
    ids = clip("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [0, clip.convert_tokens_to_ids("a</w>"), clip.convert_tokens_to_ids("cat</w>")]
    assert t5("a cat").input_ids[-1] == t5.eos_token_id


def test_saved_flux_pipeline_reloads_and_generates_the_same(flux_pipeline_dir, tiny_flux_components):
    from diffusers import FluxPipeline

    assert all(not m.training for m in tiny_flux_components.values() if isinstance(m, torch.nn.Module))
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="pt")
    a = FluxPipeline.from_pretrained(flux_pipeline_dir)("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    b = FluxPipeline(**tiny_flux_components)("a cat", generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.images.shape == (1, 3, 32, 32)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
