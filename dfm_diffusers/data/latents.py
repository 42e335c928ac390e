"""Pre-encoded VAE latents in safetensors shards: the encoder (``python -m dfm_diffusers.data encode``) and the
training data set that reads them.

Layout of an output folder::

    dfm_latents.json              metadata: VAE id, scaling/shift, count, num_classes, shapes, encoding settings
    shard-00000.safetensors       "latents" [n, C, h, w] and "class_labels" [n] (int64) of samples 0 .. n-1
    shard-00001.safetensors       ...

Latents are stored already normalized, ``(z - shift_factor) * scaling_factor``, i.e. the space diffusion models are
trained in; decode with ``vae.decode(latents / scaling_factor + shift_factor)``. Encoding is resumable: a shard is
written under a temporary name and renamed when complete, and a rerun skips every shard already written.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LATENT_METADATA_FILE = "dfm_latents.json"
LATENT_FORMAT = "dfm-latent-shards"
LATENT_FORMAT_VERSION = 1
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_latent_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by :func:`encode_latent_shards`."""
    return os.path.isfile(os.path.join(os.fspath(path), LATENT_METADATA_FILE))


def shard_path(output_dir: str | os.PathLike, index: int) -> str:
    return os.path.join(os.fspath(output_dir), f"{_SHARD_PREFIX}{index:05d}{_SHARD_SUFFIX}")


def _shard_files(output_dir: str) -> dict[int, str]:
    found = {}
    for name in os.listdir(output_dir):
        if name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX):
            stem = name[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)]
            if stem.isdigit():
                found[int(stem)] = os.path.join(output_dir, name)
    return found


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _read_metadata(path: str) -> dict:
    meta_path = os.path.join(path, LATENT_METADATA_FILE)
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read {meta_path}: {err}") from err
    if metadata.get("format") != LATENT_FORMAT or metadata.get("version") != LATENT_FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} is not a {LATENT_FORMAT} v{LATENT_FORMAT_VERSION} file "
            f"(format {metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    return metadata


def _shard_is_complete(path: str, start: int, count: int) -> bool:
    """A shard counts as written if its header says it holds samples start .. start+count-1."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except Exception:  # unreadable / truncated file: rewrite it
        return False
    return meta.get("start") == str(start) and meta.get("count") == str(count) and {"latents", "class_labels"} <= keys


# ------------------------------------------------------------------------------------------------------ encoding


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``z`` -> the space diffusion models are trained in, ``(z - shift_factor) * scaling_factor`` (float32)."""
    shift = vae.config.shift_factor or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor, posterior_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Normalized latents ``(z - shift_factor) * scaling_factor`` of images in [-1, 1] (float32).

    ``z`` is the posterior mean, or, with ``posterior_seeds`` (one int per image), a posterior sample
    ``mean + std * eps`` whose eps is drawn on the CPU from a generator seeded with the image's seed (so the
    result does not depend on batching, device or resumption).
    """
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.mean
    if posterior_seeds is not None:
        if len(posterior_seeds) != len(z):
            raise ValueError(f"got {len(posterior_seeds)} posterior seeds for {len(z)} images")
        eps = [torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in posterior_seeds]
        z = z + dist.std * torch.stack(eps).to(z)
    return normalize_latents(vae, z)


def posterior_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s posterior noise in an encoding run with ``seed``."""
    return (seed * 1_000_003 + index) % (2**63)


def _load_vae(vae, vae_subfolder, device, dtype):
    from diffusers import AutoencoderKL

    if isinstance(vae, (str, os.PathLike)):
        vae_id = os.path.abspath(vae) if os.path.isdir(vae) else os.fspath(vae)
        try:
            vae = AutoencoderKL.from_pretrained(vae, subfolder=vae_subfolder, dtype=dtype)
        except Exception as err:
            raise ValueError(f"could not load an AutoencoderKL from {vae!r} (subfolder {vae_subfolder!r}): {err}") from err
    else:
        vae_id = vae.config.get("_name_or_path") or f"<in-memory {type(vae).__name__}>"
        vae = vae.to(dtype=dtype)
    return vae.to(device).eval().requires_grad_(False), vae_id


def encode_latent_shards(
    source: str | os.PathLike,
    vae,
    output_dir: str | os.PathLike,
    resolution: int,
    vae_subfolder: str | None = None,
    batch_size: int = 32,
    shard_size: int = 1024,
    sample_posterior: bool = False,
    seed: int = 0,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    center_crop: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    save_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode an image data set with a diffusers AutoencoderKL into safetensors shards (resumable).

    Args:
        source, split, image_column, label_column, max_samples, data_dir, center_crop: the images, as for
            :func:`~.image_dataset.build_image_dataset` (no flips; grayscale is repeated to the VAE's channels).
        vae: a path or Hub id of an AutoencoderKL (``vae_subfolder`` e.g. "vae" inside a pipeline repo), or a
            loaded AutoencoderKL.
        output_dir: where the shards and ``dfm_latents.json`` go; rerunning into it resumes.
        resolution: image resolution (shorter side resized, square center crop).
        batch_size, shard_size: images per VAE call and per shard.
        sample_posterior: store ``mean + std * eps`` (eps seeded per sample from ``seed``) instead of the mean.
        device, dtype: where and in which precision the VAE runs (default cuda if available, float32).
        save_dtype: dtype of the stored latents.
        num_workers: DataLoader workers decoding and resizing images.

    Returns:
        the metadata written to ``dfm_latents.json``.

    Raises:
        ValueError: unreadable source or VAE, bad arguments, or an output folder holding latents encoded with
        different settings.
    """
    from tqdm.auto import tqdm

    from .image_dataset import build_image_dataset

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if is_latent_dir(source):
        raise ValueError(f"{source} already holds latents; encode an image source")
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(save_dtype)
    if dtype_name is None:
        raise ValueError(f"save_dtype must be one of {list(_DTYPES)}, got {save_dtype}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae, vae_id = _load_vae(vae, vae_subfolder, device, dtype)
    vae_channels = vae.config.in_channels
    dataset = build_image_dataset(
        source, resolution, center_crop=center_crop, random_flip=False, split=split, image_column=image_column,
        label_column=label_column, max_samples=max_samples, data_dir=data_dir,
        channels=vae_channels if vae_channels in (1, 3) else None,
    )
    if dataset.channels != vae_channels:
        raise ValueError(f"the images have {dataset.channels} channels but the VAE expects {vae_channels}")

    source_id = os.path.abspath(source) if os.path.isdir(source) else os.fspath(source)
    encoding = dict(
        source=source_id, split=split, image_column=image_column, label_column=label_column, resolution=resolution,
        center_crop=center_crop, vae=vae_id, vae_subfolder=vae_subfolder, sample_posterior=sample_posterior,
        seed=seed if sample_posterior else None, shard_size=shard_size, latents_dtype=dtype_name,
    )
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    meta_path = os.path.join(output_dir, LATENT_METADATA_FILE)
    existing = _shard_files(output_dir)
    if os.path.exists(meta_path):
        previous = _read_metadata(output_dir)
        if previous.get("encoding") != encoding:
            changed = {
                k: (previous.get("encoding", {}).get(k), v)
                for k, v in encoding.items()
                if previous.get("encoding", {}).get(k) != v
            }
            raise ValueError(
                f"{output_dir} holds latents encoded with other settings (setting: (before, now)): {changed}; "
                f"use a new output folder"
            )
    elif existing:
        raise ValueError(f"{output_dir} holds shard files but no {LATENT_METADATA_FILE}; use a new output folder")
    for name in os.listdir(output_dir):  # temporary files of an interrupted run
        if name.startswith(_SHARD_PREFIX) and ".tmp-" in name:
            os.remove(os.path.join(output_dir, name))

    count = len(dataset)
    num_shards = math.ceil(count / shard_size)
    shard_ranges = [(i * shard_size, min((i + 1) * shard_size, count)) for i in range(num_shards)]
    metadata = dict(
        format=LATENT_FORMAT, version=LATENT_FORMAT_VERSION, complete=False, count=count, num_shards=num_shards,
        shard_size=shard_size, num_classes=dataset.num_classes, class_names=dataset.class_names,
        resolution=resolution, image_channels=dataset.channels, vae=vae_id, vae_subfolder=vae_subfolder,
        scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor or 0.0,
        latent_channels=None, latent_size=None, latents_dtype=dtype_name, encoding=encoding,
    )
    if os.path.exists(meta_path):  # keep the shapes known from an earlier run
        previous = _read_metadata(output_dir)
        metadata.update(latent_channels=previous.get("latent_channels"), latent_size=previous.get("latent_size"))
    _write_json_atomic(meta_path, metadata)
    for index, path in existing.items():  # shards beyond this run's count (an earlier, larger run)
        if index >= num_shards:
            os.remove(path)

    todo = [i for i, (a, b) in enumerate(shard_ranges) if not _shard_is_complete(shard_path(output_dir, i), a, b - a)]
    done = count - sum(shard_ranges[i][1] - shard_ranges[i][0] for i in todo)
    batches = [list(range(a, min(a + batch_size, shard_ranges[i][1]))) for i in todo
               for a in range(shard_ranges[i][0], shard_ranges[i][1], batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    bar = tqdm(total=count, initial=done, unit="img", desc="encoding", disable=not progress)
    buffers: dict[int, list] = {}
    for indices, batch in zip(batches, loader):
        shard = indices[0] // shard_size
        seeds = [posterior_seed(seed, i) for i in indices] if sample_posterior else None
        latents = encode_images(vae, batch["pixel_values"], seeds).cpu()
        buffers.setdefault(shard, []).append((latents, batch["class_labels"].long()))
        bar.update(len(indices))
        start, end = shard_ranges[shard]
        if indices[-1] == end - 1:  # shard complete: write it under a temporary name, then rename
            lat = torch.cat([x for x, _ in buffers[shard]]).to(save_dtype).contiguous()
            lab = torch.cat([y for _, y in buffers.pop(shard)]).contiguous()
            assert len(lat) == end - start
            tmp = f"{shard_path(output_dir, shard)}.tmp-{os.getpid()}"
            save_file(
                {"latents": lat, "class_labels": lab}, tmp,
                metadata={"format": LATENT_FORMAT, "start": str(start), "count": str(end - start)},
            )
            os.replace(tmp, shard_path(output_dir, shard))
            metadata.update(latent_channels=lat.shape[1], latent_size=list(lat.shape[2:]))
    bar.close()

    if metadata["latent_channels"] is None:  # every shard was already there: read the shapes from one
        with safe_open(shard_path(output_dir, 0), framework="pt") as f:
            shape = f.get_slice("latents").get_shape()
        metadata.update(latent_channels=shape[1], latent_size=list(shape[2:]))
    metadata["complete"] = True
    _write_json_atomic(meta_path, metadata)
    return metadata


# -------------------------------------------------------------------------------------------------- reading


class LatentShardDataset(torch.utils.data.Dataset):
    """The latents written by :func:`encode_latent_shards`, read lazily (memory-mapped) shard by shard.

    Items are ``dict(latents=float32 [C, h, w], class_labels=long)``. Attributes: ``num_classes``, ``channels``
    (latent channels), ``latent_size``, ``resolution`` (of the encoded images), ``class_names``,
    ``scaling_factor``, ``shift_factor``, ``vae`` and the full ``metadata``.

    Raises ValueError for a folder that is not a complete, consistent set of shards.
    """

    def __init__(self, path: str | os.PathLike, max_samples: int | None = None):
        self.path = os.fspath(path)
        if not is_latent_dir(self.path):
            raise ValueError(f"{self.path} has no {LATENT_METADATA_FILE}: not a folder of encoded latents")
        meta = _read_metadata(self.path)
        if not meta.get("complete"):
            raise ValueError(
                f"the latents in {self.path} are incomplete (interrupted encoding): rerun the same "
                f"`python -m dfm_diffusers.data encode ... --output {self.path}` command to resume"
            )
        self.metadata = meta
        self.shard_size = int(meta["shard_size"])
        count = int(meta["count"])
        labels = []
        for i in range(int(meta["num_shards"])):
            path_i = shard_path(self.path, i)
            expected = min(self.shard_size, count - i * self.shard_size)
            if not _shard_is_complete(path_i, i * self.shard_size, expected):
                raise ValueError(f"{path_i} is missing or does not hold samples {i * self.shard_size}.. (+{expected})")
            with safe_open(path_i, framework="pt") as f:
                labels.append(f.get_tensor("class_labels"))
        self.class_labels = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
        if len(self.class_labels) != count:
            raise ValueError(f"{self.path}: metadata says {count} samples but the shards hold {len(self.class_labels)}")
        if max_samples is not None:
            self.class_labels = self.class_labels[:max_samples]
        if len(self.class_labels) == 0:
            raise ValueError(f"{self.path} holds no latents")
        self.num_classes = int(meta["num_classes"])
        self.channels = int(meta["latent_channels"])
        self.latent_size = tuple(meta["latent_size"])
        self.resolution = int(meta["resolution"])
        self.class_names = meta.get("class_names")
        self.scaling_factor = meta["scaling_factor"]
        self.shift_factor = meta["shift_factor"]
        self.vae = meta["vae"]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.class_labels)

    def __repr__(self) -> str:
        return (
            f"LatentShardDataset({self.path}: {len(self)} latents {self.channels}x{self.latent_size[0]}x"
            f"{self.latent_size[1]} of {self.resolution}px images, {self.num_classes} classes, vae {self.vae})"
        )

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _shard(self, index: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            self._handles[index] = safe_open(shard_path(self.path, index), framework="pt")
        return self._handles[index]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard, row = divmod(index, self.shard_size)
        latents = self._shard(shard).get_slice("latents")[row : row + 1][0]
        return dict(latents=latents.float(), class_labels=self.class_labels[index])
