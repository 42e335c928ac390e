"""Encode an image source (Fashion-MNIST, an image folder, a data set) to sharded VAE latents, resumably.

Separate from :mod:`.latents` (reading and writing shards) so that reading latents never imports the image code.
"""

from __future__ import annotations

import math
import os

import torch

from .image_dataset import build_image_dataset
from safetensors import safe_open

from .latents import (
    _SHARD_PREFIX,
    LATENT_FORMAT,
    LATENT_FORMAT_VERSION,
    LATENT_METADATA_FILE,
    is_latent_dir,
    shard_path,
    _shard_files,
    _write_json_atomic,
    _read_metadata,
    _shard_is_complete,
    _save_shard,
    encode_images,
    posterior_seed,
    _load_vae,
    _DTYPES,
)


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
            _save_shard(output_dir, shard, start, lat, lab)
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
