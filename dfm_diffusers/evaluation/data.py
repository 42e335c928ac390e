"""Real images and sample files as the metrics see them: uint8 [N, H, W, C] + int64 labels [N]."""

from __future__ import annotations

import json
import os

import numpy as np
from tqdm.auto import tqdm


def dataset_images(
    source: str = "fashion_mnist",
    split: str = "test",
    resolution: int = 32,
    data_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A data set split exactly as training presents it (``build_image_dataset(source, resolution)``: for
    Fashion-MNIST 28 -> 32 px bicubic, center crop, no flips), back in uint8 -> (images [N, R, R, C], labels [N]).

    The training transform ends in ``uint8 / 127.5 - 1``, so the uint8 values are recovered exactly.
    """
    from ..data import build_image_dataset

    dataset = build_image_dataset(source, resolution, center_crop=True, random_flip=False, split=split,
                                  data_dir=data_dir, max_samples=max_samples)
    if not hasattr(dataset, "channels"):
        raise ValueError(f"{source!r} is not an image data set (latent shards cannot be scored)")
    images = np.empty((len(dataset), resolution, resolution, dataset.channels), dtype=np.uint8)
    labels = np.empty(len(dataset), dtype=np.int64)
    for i in tqdm(range(len(dataset)), desc=f"loading {source} {split}", disable=not progress):
        item = dataset[i]
        images[i] = ((item["pixel_values"] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        labels[i] = int(item["class_labels"])
    return images, labels


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, metadata: dict) -> None:
    """Write an .npz with ``images`` (uint8 NHWC), ``labels`` (int64) and ``metadata`` (a JSON string)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, images=images, labels=np.asarray(labels, dtype=np.int64), metadata=np.array(json.dumps(metadata)))


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read an .npz of images -> (uint8 [N, H, W, C], labels [N] or None, metadata dict).

    Besides files written by :func:`save_samples`, accepts any .npz whose ``images`` (or only array) is uint8
    NHWC, or NCHW with 1 or 3 channels.
    """
    with np.load(path, allow_pickle=False) as data:
        key = "images" if "images" in data.files else (data.files[0] if len(data.files) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: no 'images' array among {data.files}")
        images = data[key]
        labels = data["labels"] if "labels" in data.files else None
        metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, C] (8-bit, like real images), got "
                         f"{images.dtype} {images.shape}")
    return np.ascontiguousarray(images), labels, metadata


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Class labels 0, 1, ..., C-1, 0, 1, ... (every class within one of num_samples / C)."""
    return np.arange(num_samples, dtype=np.int64) % num_classes


