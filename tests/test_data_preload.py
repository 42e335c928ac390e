"""The preloaded data path (issue 21): data decoded once into one tensor and read a batch at a time yields exactly
the samples of the per-sample path for the same seed (flips included), for Fashion-MNIST, image folders (with an
image that breaks after the build-time check) and latent shards; training on it gives the same weights, and a
resumed run on it the weights of an uninterrupted one."""

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from dfm_diffusers.data import FASHION_MNIST_DIR, build_image_dataset, encode_latent_shards
from dfm_diffusers.data.latents import LatentShardDataset
from dfm_diffusers.data.preload import PreloadedDataset, preload_dataset
from dfm_diffusers.data.seeded import SeededSamples, seeded_first_uniforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults_data_loading import break_png_data, rgb_image  # noqa: E402

HAVE_FM = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fm = pytest.mark.skipif(not HAVE_FM, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def per_sample_batch(dataset, seed, epoch, indices):
    """The reference: the loop's per-sample reads (SeededSamples) collated by the DataLoader's default_collate."""
    reader = SeededSamples(dataset, seed)
    reader.epoch = epoch
    return default_collate([reader[i] for i in indices])


def batched(dataset, seed, epoch, indices):
    reader = SeededSamples(dataset, seed)
    reader.epoch = epoch
    assert reader.batched
    return reader.__getitems__(indices)  # what torch's DataLoader calls for a whole batch


def assert_same_batches(reference, preloaded, seeds=(0, 3), epochs=(0, 1, 7)):
    n = len(reference)
    g = torch.Generator().manual_seed(0)
    for seed in seeds:
        for epoch in epochs:
            indices = torch.randint(0, n, (min(n, 48),), generator=g).tolist() + [0, n - 1, 0]  # repeats too
            want, got = per_sample_batch(reference, seed, epoch, indices), batched(preloaded, seed, epoch, indices)
            assert set(want) == set(got)
            for key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (key, seed, epoch)


@needs_fm
def test_preloaded_fashion_mnist_gives_the_per_sample_batches_flips_included():
    ds = build_image_dataset("fashion_mnist", 32, random_flip=True, max_samples=300)
    pre = preload_dataset(ds, "cpu", progress=False)
    assert isinstance(pre, PreloadedDataset) and pre.data.dtype == torch.uint8 and pre.data.shape == (300, 1, 32, 32)
    assert (pre.num_classes, pre.channels, pre.class_names) == (ds.num_classes, ds.channels, ds.class_names)
    assert_same_batches(ds, pre)
    # the flips really happen, about half of the time, and differ between epochs
    draws = [seeded_first_uniforms(0, epoch, range(300)) < 0.5 for epoch in (0, 1)]
    assert 100 < int(draws[0].sum()) < 200 and not torch.equal(*draws)
    # one sample read alone is the source's too (the same first draw of the seeded RNG)
    reader, reference = SeededSamples(pre, 5), SeededSamples(ds, 5)
    assert all(torch.equal(reader[i]["pixel_values"], reference[i]["pixel_values"]) for i in range(20))


def test_preloaded_image_folder_replaces_a_broken_image_as_training_does(tmp_path, caplog):
    """RGB images of several sizes (resized and center-cropped), one of which decodes badly only after the
    build-time check: the preload (decoded by two workers) replaces it by the next readable image, label too, as
    the per-sample path does, and records it once."""
    root = tmp_path / "classes"
    for c, sizes in (("a", (24, 30, 40)), ("b", (20, 33))):
        (root / c).mkdir(parents=True)
        for i, size in enumerate(sizes):
            image = rgb_image(10 * ord(c) + i, size)
            image.resize((size, size + 7)).save(root / c / f"{i}.png")
    ds = build_image_dataset(root, 16, random_flip=True, max_bad_fraction=0.3)
    broken = 1
    break_png_data(Path(ds.sample_name(broken)))
    with caplog.at_level(logging.WARNING):
        pre = preload_dataset(ds, "auto", num_workers=2, progress=False)
    assert isinstance(pre, PreloadedDataset) and pre.data.shape == (5, 3, 16, 16)
    assert ds.bad_samples.num_skipped == 1 and ds.sample_name(broken) in caplog.text
    assert torch.equal(pre.data[broken], pre.data[broken + 1]) and pre.class_labels[broken] == ds.class_labels[2]
    fresh = build_image_dataset(root, 16, random_flip=True, max_bad_fraction=0.3)  # a per-sample reader that meets the failure itself
    assert_same_batches(fresh, pre, epochs=(0, 2))
    assert pre.bad_samples is ds.bad_samples  # the end-of-run summary counts what the preload met


def test_random_crops_are_not_preloaded(tmp_path):
    root = tmp_path / "c" / "a"
    root.mkdir(parents=True)
    rgb_image(0, 20).resize((20, 30)).save(root / "0.png")
    ds = build_image_dataset(tmp_path / "c", 16, center_crop=False, random_flip=False)
    assert preload_dataset(ds, "auto", progress=False) is ds  # auto falls back to per-sample reads
    with pytest.raises(ValueError, match="random crops"):
        preload_dataset(ds, "device", progress=False)
    with pytest.raises(ValueError, match="preload must be one of"):
        preload_dataset(ds, "gpu", progress=False)


def test_preloaded_latent_shards_are_read_whole_and_give_the_same_batches(tmp_path):
    from diffusers import AutoencoderKL

    folder = tmp_path / "images" / "x"
    folder.mkdir(parents=True)
    for i in range(7):
        rgb_image(i, 16).save(folder / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    encode_latent_shards(tmp_path / "images", vae, tmp_path / "latents", 16, shard_size=3, batch_size=4,
                         save_dtype=torch.bfloat16, progress=False, device="cpu")
    for max_samples in (None, 5):
        shards = LatentShardDataset(tmp_path / "latents", max_samples=max_samples)
        pre = preload_dataset(shards, "auto", progress=False)
        assert pre.data.dtype == torch.bfloat16 and pre.data.shape == (len(shards), 4, 8, 8)
        assert pre.nbytes() == shards.nbytes() + 8 * len(shards)
        assert_same_batches(shards, pre, seeds=(0,), epochs=(0, 1))


def test_placement_moves_the_data_only_where_asked():
    data, labels = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4)
    for placement in ("auto", "device", "cpu"):
        pre = PreloadedDataset(None, data, labels, placement=placement)
        assert pre.place("cpu") == torch.device("cpu")  # the CPU is where it is already
    with pytest.raises(ValueError, match="placement"):
        PreloadedDataset(None, data, labels, placement="off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@needs_fm
def test_preloaded_batches_on_the_gpu_equal_the_per_sample_batches():
    ds = build_image_dataset("fashion_mnist", 32, random_flip=True, max_samples=256)
    pre = preload_dataset(ds, "device", progress=False)
    assert pre.place("cuda").type == "cuda"
    indices = list(range(0, 256, 3))
    want, got = per_sample_batch(ds, 1, 2, indices), batched(pre, 1, 2, indices)
    assert all(torch.equal(got[k].cpu(), want[k]) for k in want)


# ------------------------------------------------------------------------------------------ training on it


@needs_fm
def test_training_on_preloaded_data_gives_the_weights_of_per_sample_training_and_resumes_exactly(tmp_path):
    """A tiny 2-stage DFM-DiT, random flips, 6 steps over 32 images (4 steps per epoch): preload off vs preload
    cpu give identical weights and logs; a preloaded run stopped after step 4, resumed from its step-3 checkpoint
    (mid-epoch), ends on the same weights."""
    from accelerate.utils import set_seed

    from dfm_diffusers.training.dit import DiTTask, DiTTrainingConfig, build_dataset, build_model
    from dfm_diffusers.training.loop import run_training

    def train(name, preload, steps, resume=None):
        config = DiTTrainingConfig(
            output_dir=str(tmp_path / name), model="DFM-DiT-T/4", max_samples=32, train_batch_size=8,
            model_kwargs=dict(num_layers=1, num_attention_heads=2, attention_head_dim=16), random_flip=True,
            max_train_steps=steps, learning_rate=1e-3, checkpointing_steps=3, validation_steps=0, log_every=1,
            report_to="none", stage_scales=None, preload=preload, seed=1, resume_from_checkpoint=resume,
        )
        dataset = preload_dataset(build_dataset(config), preload, progress=False)
        set_seed(config.seed)
        model = build_model(config, 1, 32, dataset.num_classes)
        result = run_training(config, model, dataset, DiTTask(config, model).loss_fn)
        return model.state_dict(), result["log"]

    per_sample, log_a = train("off", "off", 6)
    preloaded, log_b = train("cpu", "cpu", 6)
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert all(torch.equal(per_sample[k], preloaded[k]) for k in per_sample)
    train("resumed", "cpu", 4)
    resumed, log_c = train("resumed", "cpu", 6, resume=str(tmp_path / "resumed" / "checkpoints" / "checkpoint-3"))
    assert [r["loss"] for r in log_c] == [r["loss"] for r in log_b]
    assert all(torch.equal(resumed[k], preloaded[k]) for k in resumed)
    assert all(r["data_wait_s"] >= 0 for r in log_b)


def test_latents_written_from_tensors_read_back_as_shards(tmp_path):
    from dfm_diffusers.data import write_latent_shards

    latents, labels = torch.randn(10, 4, 8, 8).to(torch.float16), torch.arange(10) % 3
    meta = write_latent_shards(tmp_path / "z", latents, labels, 64, shard_size=4)
    shards = LatentShardDataset(tmp_path / "z")
    assert (meta["num_shards"], len(shards), shards.num_classes, shards.latent_size) == (3, 10, 3, (8, 8))
    assert all(torch.equal(shards[i]["latents"], latents[i].float()) and shards[i]["class_labels"] == labels[i]
               for i in range(10))
    with pytest.raises(ValueError, match="not empty"):
        write_latent_shards(tmp_path / "z", latents, labels, 64)
    with pytest.raises(ValueError, match=r"need latents \[N, C, h, w\]"):
        write_latent_shards(tmp_path / "w", latents[0], labels, 64)
