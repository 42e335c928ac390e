"""Offline test harness: tiny FLUX components built from configs, tiny local tokenizers, no Hub access."""

import json
import os
import tempfile

# Offline before anything imports huggingface_hub / transformers / datasets.
_HF_HOME = tempfile.mkdtemp(prefix="dfm-test-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is faster than a pool, several times so on a busy machine (measured on 2 shared
# cores: tests/test_flux_band_split.py 11.5 s -> 5.0 s; the diffusers mixin tests 126 s -> 11 s). Set it to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TOKEN_CHARS = list("abcdefghijklmnopqrstuvwxyz")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "slow: end-to-end subprocess runs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_home():
    """The temporary HF_HOME of this test session (its hub cache can be pre-filled by tests)."""
    return _HF_HOME


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Folder with tiny CLIP (BPE) and T5 (unigram) tokenizers saved in `clip/` and `t5/`."""
    return make_tiny_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def make_tiny_tokenizers(root):
    """Save tiny CLIP (BPE) and T5 (unigram) tokenizers into ``root``/clip and ``root``/t5; returns ``root``."""
    from pathlib import Path

    from transformers import CLIPTokenizer, T5Tokenizer

    root = Path(root)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in TOKEN_CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for merged in ["ca", "cat</w>"]:
        vocab[merged] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    clip = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"), model_max_length=77)
    clip.save_pretrained(root / "clip")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -1.0) for c in TOKEN_CHARS] + [(c, -2.0) for c in TOKEN_CHARS] + [("\u2581", -3.0)]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0)
    t5.save_pretrained(root / "t5")
    return root


TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def make_tiny_flux_transformer(seed: int = 0, **overrides):
    """A tiny FluxTransformer2DModel (4 latent channels, 2x2 packing -> in_channels 16), eval mode."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, **overrides})
    # from-config init leaves some layers at exactly zero in diffusers; randomize so tests are not trivial
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def make_tiny_flux_components(tokenizer_root, seed: int = 0):
    """Dict of FluxPipeline components (tiny, random, eval mode, float32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_root / "clip")
    tokenizer_2 = T5Tokenizer.from_pretrained(tokenizer_root / "t5")
    transformer = make_tiny_flux_transformer(seed)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    ).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


@pytest.fixture
def tiny_flux_components(tokenizer_dir):
    """Fresh tiny FLUX components (a new set per test, so tests may modify them)."""
    return make_tiny_flux_components(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_flux_transformer():
    """A shared tiny FluxTransformer2DModel (do not modify in tests)."""
    return make_tiny_flux_transformer(0)


@pytest.fixture(scope="session")
def flux_pipeline_dir(tmp_path_factory, tokenizer_dir):
    """A local FluxPipeline folder (FluxPipeline.save_pretrained) of the tiny components."""
    from diffusers import FluxPipeline

    path = tmp_path_factory.mktemp("tiny-flux-pipeline")
    FluxPipeline(**make_tiny_flux_components(tokenizer_dir)).save_pretrained(path)
    return path


#: Outputs of a pipeline and its reloaded copy agree to this (images in [0, 1]). Reloaded weights are bit-identical,
#: but diffusers memory-maps safetensors, so the reloaded tensors sit at addresses that are not 64-byte aligned,
#: and CPU matmul kernels (oneDNN/MKL on AMD EPYC among others) take other vector paths for them: the last bits of
#: sums differ (measured: 2.4e-7 on latents, 7.2e-7 on images after 5 steps). A weight that did not round-trip
#: moves the images by far more (see test_reload_tolerance_catches_a_changed_weight).
RELOAD_ATOL = 1e-5



# Captioned photographs from the scikit-image wheel: file name -> caption.
CAPTIONED_IMAGES = {"astronaut.png": "an astronaut", "chelsea.png": "a cat", "coffee.png": "a cup of coffee",
                    "camera.png": "a man"}


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    """An image folder with a metadata.jsonl of captions (datasets' imagefolder layout)."""
    import json
    import shutil
    from pathlib import Path

    import skimage

    src = Path(skimage.__file__).parent / "data"
    root = tmp_path_factory.mktemp("captioned")
    with open(root / "metadata.jsonl", "w") as f:
        for name, caption in CAPTIONED_IMAGES.items():
            shutil.copy(src / name, root / name)
            f.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return root


def assert_reloaded_equal(original, loaded):
    """Every named component (nn.Module) of two pipelines holds bit-identical parameters and buffers."""
    for name, module in original.components.items():
        if isinstance(module, torch.nn.Module):
            a, b = module.state_dict(), getattr(loaded, name).state_dict()
            assert a.keys() == b.keys(), name
            for key in a:
                assert torch.equal(a[key], b[key]), f"{name}.{key} changed on reload"


def assert_images_close_after_reload(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=RELOAD_ATOL)
