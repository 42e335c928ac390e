"""dfm_diffusers.data: Fashion-MNIST IDX parsing, the image data set builder, latent shard encoding/reading."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dfm_diffusers.data import (
    FASHION_MNIST_DIR,
    FashionMNISTNotFoundError,
    ImageDataset,
    LatentShardDataset,
    build_image_dataset,
    encode_latent_shards,
    load_fashion_mnist,
    read_idx,
)
from dfm_diffusers.data import latents as latents_module
from dfm_diffusers.data.__main__ import main as data_cli

FM_FILES = [f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
HAVE_FM = all(os.path.isfile(os.path.join(FASHION_MNIST_DIR, f)) for f in FM_FILES)
needs_fm = pytest.mark.skipif(
    not HAVE_FM, reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`"
)


@pytest.fixture(scope="module")
def fm_train():
    return load_fashion_mnist(split="train")


def write_idx(path, array, code=0x08):
    array = np.asarray(array)
    dtype = {0x08: ">u1", 0x0C: ">i4"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def reference_pixels(image_u8, size, channels):
    """Independent reference for the transform: PIL bicubic resize of the shorter side + center crop, [-1, 1]."""
    img = Image.fromarray(image_u8).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    a = np.asarray(img).astype(np.float32)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    a = a[top : top + size, left : left + size]
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a / 127.5 - 1)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST


@needs_fm
def test_load_fashion_mnist_splits(fm_train):
    images, labels = fm_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the first training image is an ankle boot
    assert abs(images.float().mean().item() / 255 - 0.2860) < 1e-3  # the data set's published pixel mean
    test_images, test_labels = load_fashion_mnist(split="test")
    assert test_images.shape == (10000, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    assert test_labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FashionMNISTNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for hint in ("apt-get install dataset-fashion-mnist", "--data-dir", "zalando-datasets/fashion_mnist"):
        assert hint in message
    with pytest.raises(FashionMNISTNotFoundError):
        build_image_dataset("fashion_mnist", 32, data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, split="validation")


def test_idx_parsing_on_written_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)  # uncompressed works too
    x, y = load_fashion_mnist(tmp_path)
    assert torch.equal(x, torch.from_numpy(images)) and y.tolist() == [3, 1, 4, 1, 5]
    ints = rng.integers(-(2**31), 2**31 - 1, (3, 4), dtype=np.int64)
    write_idx(tmp_path / "ints.idx", ints, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), ints)

    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.idx")
    write_idx(tmp_path / "short.idx", images)
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-7])
    with pytest.raises(ValueError, match="follow"):
        read_idx(tmp_path / "short.idx")
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])  # label count mismatch
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError):
        load_fashion_mnist(tmp_path)


@needs_fm
def test_fashion_mnist_dataset_transform(fm_train):
    images, labels = fm_train
    ds = build_image_dataset("fashion_mnist", 32, random_flip=False, max_samples=20)
    assert isinstance(ds, ImageDataset) and len(ds) == 20
    assert (ds.num_classes, ds.channels, ds.class_names[9]) == (10, 1, "Ankle boot")
    for i in (0, 7, 19):
        item = ds[i]
        assert item["pixel_values"].shape == (1, 32, 32) and item["pixel_values"].dtype == torch.float32
        assert item["class_labels"].dtype == torch.long and item["class_labels"].item() == labels[i].item()
        torch.testing.assert_close(item["pixel_values"], reference_pixels(images[i].numpy(), 32, 1))
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    # at 28px nothing is resampled: exactly the raw pixels scaled to [-1, 1]
    raw = build_image_dataset("fashion_mnist", 28, random_flip=False, max_samples=3)
    assert torch.equal(raw[2]["pixel_values"][0], images[2].float() / 127.5 - 1)
    test = build_image_dataset("fashion_mnist", 32, split="test", max_samples=5)
    assert [test[i]["class_labels"].item() for i in range(5)] == [9, 2, 1, 1, 6]


@needs_fm
def test_random_flip(fm_train):
    ds = build_image_dataset("fashion_mnist", 32, random_flip=True, max_samples=4)
    ref = reference_pixels(fm_train[0][3].numpy(), 32, 1)
    assert not torch.equal(ref, ref.flip(-1))
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        x = ds[3]["pixel_values"]
        if torch.allclose(x, ref):
            seen.add("plain")
        elif torch.allclose(x, ref.flip(-1)):
            seen.add("flipped")
        else:
            raise AssertionError("output is neither the image nor its mirror")
    assert seen == {"plain", "flipped"}


# ------------------------------------------------------------------------------------------- folders and Hub


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Class subfolders of small non-square scikit-image crops: 2 'cat', 1 'coffee' (RGB), 1 'camera' (gray)."""
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("imagefolder")
    files = {
        "cat/a.png": skdata.chelsea()[:40, :60],
        "cat/b.jpg": skdata.chelsea()[100:160, 100:140],
        "coffee/c.png": skdata.coffee()[:30, :50],
        "camera/d.png": skdata.camera()[:50, :40],
    }
    for name, array in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(root / name, quality=95)
    return root, {name: np.asarray(Image.open(root / name)) for name in files}


def test_image_folder(image_folder):
    root, arrays = image_folder
    ds = build_image_dataset(str(root), 16, random_flip=False)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.channels == 3
    assert ds.class_names == ["camera", "cat", "coffee"]
    items = [ds[i] for i in range(len(ds))]
    refs = {name: reference_pixels(a, 16, 3) for name, a in arrays.items()}
    for item in items:
        assert item["pixel_values"].shape == (3, 16, 16)
        name = ds.class_names[item["class_labels"]]
        matches = [f for f in refs if f.startswith(name + "/") and torch.allclose(item["pixel_values"], refs[f], atol=1e-6)]
        assert len(matches) == 1, name
    assert sorted(ds.class_names[i["class_labels"]] for i in items) == ["camera", "cat", "cat", "coffee"]

    gray = build_image_dataset(str(root), 16, channels=1, max_samples=2, random_flip=False)
    assert len(gray) == 2 and gray[0]["pixel_values"].shape == (1, 16, 16)


def test_random_crop_stays_inside_the_resized_image(image_folder):
    root, arrays = image_folder
    ds = build_image_dataset(str(root), 16, center_crop=False, random_flip=False)
    idx = next(i for i in range(len(ds)) if ds.class_names[ds.class_labels[i]] == "coffee")
    resized = np.asarray(Image.fromarray(arrays["coffee/c.png"]).resize((27, 16), Image.BICUBIC)).astype(np.float32)
    resized = torch.from_numpy(resized.transpose(2, 0, 1) / 127.5 - 1)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):
        x = ds[idx]["pixel_values"]
        found = [o for o in range(12) if torch.allclose(x, resized[:, :, o : o + 16], atol=1e-6)]
        assert found, "crop is not a window of the resized image"
        offsets.add(found[0])
    assert len(offsets) > 3


def test_hub_style_dataset_columns(tmp_path):
    """A non-image-folder source goes through datasets.load_dataset (a local parquet folder stands in for the Hub)."""
    import datasets

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) for _ in range(5)]
    table = datasets.Dataset.from_dict(
        {"caption": list("abcde"), "img": [Image.fromarray(a) for a in arrays], "fine_label": [4, 0, 2, 4, 1],
         "kind": ["x", "y", "x", "z", "y"]}
    ).cast_column("img", datasets.Image())
    folder = tmp_path / "hub_like"
    folder.mkdir()
    table.to_parquet(str(folder / "train.parquet"))

    ds = build_image_dataset(str(folder), 8, random_flip=False)  # columns detected: Image feature, "fine_label"
    assert (len(ds), ds.num_classes, ds.channels) == (5, 5, 3)
    assert [ds[i]["class_labels"].item() for i in range(5)] == [4, 0, 2, 4, 1]
    torch.testing.assert_close(ds[3]["pixel_values"], reference_pixels(arrays[3], 8, 3), atol=1e-6, rtol=0)
    by_kind = build_image_dataset(str(folder), 8, label_column="kind", max_samples=4)
    assert by_kind.class_names == ["x", "y", "z"] and by_kind.class_labels.tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="not in the dataset's columns"):
        build_image_dataset(str(folder), 8, label_column="coarse_label")
    with pytest.raises(ValueError, match="class labels, ints or strings|image"):
        build_image_dataset(str(folder), 8, image_column="caption")


def test_bad_sources_raise_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_image_dataset(str(tmp_path / "empty"), 16)
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"1 of 1 samples .* unusable .*x\.png: not an image"):
        build_image_dataset(str(tmp_path / "broken"), 16)
    with pytest.raises(ValueError, match="could not load"):
        build_image_dataset("no-such-user/no-such-dataset", 16)  # the Hub is unreachable offline, too
    with pytest.raises(ValueError, match="max_samples"):
        build_image_dataset("fashion_mnist", 16, max_samples=0)
    with pytest.raises(ValueError, match="resolution"):
        build_image_dataset("fashion_mnist", None)


# --------------------------------------------------------------------------------------------- latent shards


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=1.5, shift_factor=0.1,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return str(path)


def direct_latents(vae_dir, pixels, posterior_noise=None):
    """Reference: diffusers' AutoencoderKL called directly, (mean - shift) * scale."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    z = dist.mean if posterior_noise is None else dist.mean + dist.std * posterior_noise
    return (z - 0.1) * 1.5


def age_files(paths, stamp=1_000_000_000):
    for p in paths:
        os.utime(p, ns=(stamp * 10**9, stamp * 10**9))
    return {p: os.stat(p).st_mtime_ns for p in paths}


@needs_fm
def test_encode_resume_and_read(tmp_path, tiny_vae_dir, fm_train):
    out = tmp_path / "latents"
    kw = dict(resolution=16, batch_size=3, shard_size=4, progress=False, device="cpu")
    meta = encode_latent_shards("fashion_mnist", tiny_vae_dir, out, max_samples=6, **kw)
    assert (meta["count"], meta["num_shards"], meta["complete"]) == (6, 2, True)
    shard = [latents_module.shard_path(out, i) for i in range(3)]
    old = age_files(shard[:2])
    # the full run: shard 0 is complete and kept; shard 1 held 2 of its 4 samples and is rewritten; shard 2 is new
    meta = encode_latent_shards("fashion_mnist", tiny_vae_dir, out, max_samples=10, **kw)
    assert (meta["count"], meta["num_shards"]) == (10, 3)
    assert os.stat(shard[0]).st_mtime_ns == old[shard[0]]
    assert os.stat(shard[1]).st_mtime_ns != old[shard[1]] and os.path.exists(shard[2])
    # a rerun of the finished encoding rewrites nothing; a corrupt shard is rewritten
    old = age_files(shard)
    with open(shard[2], "wb") as f:
        f.write(b"garbage")
    encode_latent_shards("fashion_mnist", tiny_vae_dir, out, max_samples=10, **kw)
    assert [os.stat(p).st_mtime_ns == old[p] for p in shard] == [True, True, False]

    ds = LatentShardDataset(out)
    assert len(ds) == 10 and (ds.num_classes, ds.channels, ds.latent_size, ds.resolution) == (10, 4, (8, 8), 16)
    assert (ds.scaling_factor, ds.shift_factor, ds.vae) == (1.5, 0.1, os.path.abspath(tiny_vae_dir))
    images, labels = fm_train
    assert ds.class_labels.tolist() == labels[:10].tolist()
    pixels = torch.stack([reference_pixels(images[i].numpy(), 16, 3) for i in range(10)]).float()
    expected = direct_latents(tiny_vae_dir, pixels)
    got = torch.stack([ds[i]["latents"] for i in range(10)])
    assert got.dtype == torch.float32 and expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ds[9]["class_labels"].item() == labels[9].item()

    # the builder recognises the folder; resolution is checked; the data set survives pickling (DataLoader workers)
    assert isinstance(build_image_dataset(str(out), 16), LatentShardDataset)
    with pytest.raises(ValueError, match="16px"):
        build_image_dataset(str(out), 32)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5]["latents"], ds[5]["latents"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["latents"].shape == (4, 4, 8, 8) and batch["class_labels"].tolist() == labels[:4].tolist()


@needs_fm
def test_interrupted_encoding_resumes(tmp_path, tiny_vae_dir, monkeypatch):
    out, fresh = tmp_path / "interrupted", tmp_path / "fresh"
    kw = dict(resolution=16, batch_size=2, shard_size=3, max_samples=7, progress=False, device="cpu")
    real_save = latents_module.save_file
    calls = []

    def crash_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # write half a file under the temporary name, then die
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(latents_module, "save_file", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode_latent_shards("fashion_mnist", tiny_vae_dir, out, **kw)
    assert ".tmp-" in calls[1]  # shards are written under a temporary name ...
    names = sorted(os.listdir(out))
    assert "shard-00000.safetensors" in names and "shard-00001.safetensors" not in names  # ... and renamed
    assert any(".tmp-" in n for n in names)
    with pytest.raises(ValueError, match="incomplete"):
        LatentShardDataset(out)

    monkeypatch.setattr(latents_module, "save_file", real_save)
    first = age_files([latents_module.shard_path(out, 0)])
    meta = encode_latent_shards("fashion_mnist", tiny_vae_dir, out, **kw)
    assert meta["complete"] and meta["num_shards"] == 3
    assert os.stat(latents_module.shard_path(out, 0)).st_mtime_ns == first[latents_module.shard_path(out, 0)]
    assert not any(".tmp-" in n for n in os.listdir(out))
    encode_latent_shards("fashion_mnist", tiny_vae_dir, fresh, **kw)
    a, b = LatentShardDataset(out), LatentShardDataset(fresh)
    assert all(torch.equal(a[i]["latents"], b[i]["latents"]) for i in range(7))


def test_encode_cli_posterior_sampling_and_settings_guard(tmp_path, tiny_vae_dir, image_folder, capsys):
    root, arrays = image_folder
    out = tmp_path / "cli"
    rc = data_cli(["encode", "--source", str(root), "--vae", tiny_vae_dir, "--resolution", "16", "--output",
                   str(out), "--batch-size", "3", "--shard-size", "2", "--sample-posterior", "--seed", "3",
                   "--device", "cpu"])
    assert rc == 0 and "wrote 4 latents 4x8x8 in 2 shards" in capsys.readouterr().out
    cli = LatentShardDataset(out)
    assert (len(cli), cli.num_classes, cli.class_names) == (4, 3, ["camera", "cat", "coffee"])
    # posterior samples are seeded per image: another batch size gives the same latents
    other = encode_latent_shards(str(root), tiny_vae_dir, tmp_path / "api", 16, batch_size=4, shard_size=3,
                                 sample_posterior=True, seed=3, progress=False, device="cpu")
    assert other["num_shards"] == 2
    api = LatentShardDataset(tmp_path / "api")
    for i in range(4):  # (batch composition changes the VAE's float rounding slightly)
        torch.testing.assert_close(cli[i]["latents"], api[i]["latents"], atol=1e-5, rtol=1e-5)
    # ... equal to mean + std * eps with eps from the documented per-image seed
    images = build_image_dataset(str(root), 16, random_flip=False, channels=3)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(4)])
    eps = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(latents_module.posterior_seed(3, i)))
                       for i in range(4)])
    expected = direct_latents(tiny_vae_dir, pixels, eps)
    torch.testing.assert_close(torch.stack([cli[i]["latents"] for i in range(4)]), expected, atol=1e-5, rtol=1e-5)
    # the noise recovered from the stored latents is standard normal and different for every image
    mean, std = direct_latents(tiny_vae_dir, pixels), direct_latents(tiny_vae_dir, pixels, torch.ones(4, 4, 8, 8))
    std = (std - mean) / 1.5
    recovered = (torch.stack([cli[i]["latents"] for i in range(4)]) - mean) / 1.5 / std
    assert all(abs(e.mean().item()) < 0.3 and 0.7 < e.std().item() < 1.3 for e in recovered)
    assert all(not torch.allclose(recovered[i], recovered[j], atol=0.1) for i in range(4) for j in range(i))

    # the same folder with other settings is refused (exit code 2, message on stderr)
    rc = data_cli(["encode", "--source", str(root), "--vae", tiny_vae_dir, "--resolution", "8", "--output",
                   str(out), "--device", "cpu"])
    assert rc == 2 and "other settings" in capsys.readouterr().err
    rc = data_cli(["info", "--source", str(out)])
    assert rc == 0 and "classes: 3" in capsys.readouterr().out
