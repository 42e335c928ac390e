"""Class-labelled image data sets for DFM-DiT training: Fashion-MNIST, image folders, Hub data sets, latent shards.

Every data set built here yields ``dict(pixel_values=float [C, R, R] in [-1, 1], class_labels=long [])`` (or
``latents`` instead of ``pixel_values`` for pre-encoded latent shards) and exposes ``num_classes``, ``channels``
and ``class_names``.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .bad_samples import DEFAULT_MAX_BAD_FRACTION, BadSampleLog, ReplaceUnreadable, scan_image_column
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

logger = logging.getLogger(__name__)

FASHION_MNIST_SOURCES = ("fashion_mnist", "fashion-mnist")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_16BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "png", "jpg", "jpeg")
_LABEL_COLUMN_NAMES = ("label", "labels", "class", "class_label", "class_labels", "fine_label", "y")


# ----------------------------------------------------------------------------------------------- transforms


def to_pil(image) -> Image.Image:
    """A PIL image from a PIL image, a uint8 array/tensor [H, W] or [H, W, C], or a datasets image dict."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        import io

        return Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    array = image.numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"array images must be uint8 [H, W] or [H, W, C], got {array.dtype} {array.shape}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL modes "I;16*", and "I" as PIL opens 16-bit PNGs) -> "L" with 65535 -> 255.

    PIL's own ``convert("L")`` clips these modes at 255 instead of rescaling, so a 16-bit image would come out
    almost white. Other modes are returned unchanged."""
    if image.mode not in _16BIT_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def image_to_uint8(
    image,
    resolution: int | tuple[int, int],
    channels: int,
    center_crop: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize (bicubic, antialiased) to cover ``resolution`` (an int: a square; or (height, width), an aspect
    bucket) and crop it (center, or random from ``generator`` / torch's CPU RNG). -> uint8 [channels, height, width].

    ``channels`` 1 converts to grayscale ("L"), 3 to RGB. :func:`uint8_to_pixels` scales the result to [-1, 1].
    """
    image = to_8bit(to_pil(image))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    w, h = image.size
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left = int(torch.randint(0, w - width + 1, (), generator=generator))
        top = int(torch.randint(0, h - height + 1, (), generator=generator))
    if (w, h) != (width, height):
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def uint8_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1] (``x / 127.5 - 1``; the same values on every device)."""
    return images.float() / 127.5 - 1.0


def preprocess_image(
    image,
    resolution: int | tuple[int, int],
    channels: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize (bicubic, antialiased) to cover ``resolution`` (an int: a square; or (height, width), an aspect
    bucket), crop it (center or random), flip horizontally if asked, and scale to [-1, 1].
    -> float32 [channels, height, width].

    ``channels`` 1 converts to grayscale ("L"), 3 to RGB.
    """
    pixels = uint8_to_pixels(image_to_uint8(image, resolution, channels, center_crop, generator))
    return pixels.flip(-1) if flip else pixels


# ----------------------------------------------------------------------------------------------- the data set


class ImageDataset(ReplaceUnreadable, torch.utils.data.Dataset):
    """Images + integer class labels with the training transform.

    An image that fails to decode is replaced by the next readable one and recorded in ``bad_samples`` (see
    :mod:`.bad_samples`); unreadable files found when the data set was built are not in it at all.

    Args:
        get_image: index -> image (PIL image, uint8 array, or datasets image dict).
        labels: [N] integer class labels.
        num_classes, channels, class_names: what the model is built for.
        resolution, center_crop, random_flip: see :func:`preprocess_image`; random crops/flips draw from torch's
            CPU RNG; the training loop wraps the data set in SeededSamples, so they depend only on (seed, epoch, i).
        bad_samples: the record of skipped samples (default: an empty one for ``len(labels)`` samples).
        sample_names: index -> the file (or row) name used in warnings.
    """

    def __init__(
        self,
        get_image: Callable[[int], object],
        labels: Sequence[int] | torch.Tensor,
        num_classes: int,
        channels: int,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = True,
        class_names: Sequence[str] | None = None,
        description: str = "",
        bad_samples: BadSampleLog | None = None,
        sample_names: Callable[[int], str] | None = None,
    ):
        self._get_image = get_image
        self.class_labels = torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.class_names = list(class_names) if class_names is not None else None
        self.description = description
        self.bad_samples = bad_samples or BadSampleLog(description, total=len(self.class_labels))
        self._sample_names = sample_names

    def __len__(self) -> int:
        return len(self.class_labels)

    def sample_name(self, index: int) -> str:
        return self._sample_names(index) if self._sample_names else f"image {index} of {self.description}"

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.description}: {len(self)} images, {self.num_classes} classes, "
            f"{self.channels}x{self.resolution}x{self.resolution})"
        )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        flip = self.random_flip and bool(torch.rand(()) < 0.5)

        def load(i):
            pixels = preprocess_image(
                self._get_image(i), self.resolution, self.channels, center_crop=self.center_crop, flip=flip
            )
            return dict(pixel_values=pixels, class_labels=self.class_labels[i])

        return self.load_replacing(index, load)

    def decoded(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What ``self[index]`` holds before scaling and flipping: (uint8 [C, R, R], class label, index of the
        image used: ``index`` or, if it is unreadable, its replacement). Needs ``center_crop`` (no random draw)."""
        if not self.center_crop:
            raise ValueError("decoded() keeps one copy per image: it needs center_crop (random crops differ per epoch)")

        def load(i):
            image = image_to_uint8(self._get_image(i), self.resolution, self.channels, center_crop=True)
            return image, self.class_labels[i], i

        return self.load_replacing(index, load)


# --------------------------------------------------------------------------------------------------- sources


def _fashion_mnist(split, data_dir, max_samples):
    images, labels = load_fashion_mnist(data_dir, split)
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    return (lambda i: images[i].numpy()), labels, len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES), 1


def _has_image_files(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


IMAGE_SOURCES_HINT = (
    "Sources are 'fashion_mnist', a folder of class subfolders of images, a folder of latent shards written by "
    "`python -m dfm_diffusers.data encode`, a folder written by Dataset.save_to_disk, or a datasets.load_dataset name."
)


def load_hf_dataset(source: str, split: str, data_dir: str | None, sources_hint: str = IMAGE_SOURCES_HINT):
    """One split of a `datasets` data set: a save_to_disk folder, an image folder (imagefolder, with its
    metadata.jsonl if any) or a load_dataset name. Every failure becomes one ValueError ending in ``sources_hint``."""
    import datasets

    is_folder = os.path.isdir(source)
    if is_folder and not os.listdir(source):
        raise ValueError(f"dataset folder {source} is empty")
    saved = is_folder and any(os.path.exists(os.path.join(source, f)) for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"split {split!r} not in the saved splits {list(ds)}")
                ds = ds[split]
        elif is_folder and _has_image_files(source):
            ds = datasets.load_dataset("imagefolder", data_dir=source, split=split)
        else:
            ds = datasets.load_dataset(source, split=split, **({"data_dir": data_dir} if data_dir else {}))
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        what = "image folder" if is_folder else "dataset (local folder or Hugging Face Hub name)"
        raise ValueError(
            f"could not load {what} {source!r}, split {split!r}: {type(err).__name__}: {err}. {sources_hint}"
        ) from err
    if isinstance(ds, datasets.DatasetDict):  # split=None style answers
        raise ValueError(f"dataset {source!r} has several splits {list(ds)}; pass split=...")
    return ds


def _pick_column(ds, wanted: str | None, feature_type, names: Sequence[str], what: str, required: bool):
    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{what} column {wanted!r} not in the dataset's columns {columns}")
        return wanted
    for name, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return name
    for name in names:
        if name in columns:
            return name
    if required:
        raise ValueError(f"no {what} column found among {columns}; pass {what}_column=...")
    return None


def _hf_labels(ds, label_column):
    """-> (labels [N] long, num_classes, class_names or None)."""
    import datasets

    if label_column is None:
        logger.warning("dataset has no label column: every image gets class 0 (num_classes = 1)")
        return torch.zeros(len(ds), dtype=torch.long), 1, None
    feature = ds.features[label_column]
    values = ds[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return torch.as_tensor(values, dtype=torch.long), feature.num_classes, list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return torch.as_tensor([index[v] for v in values], dtype=torch.long), len(names), names
    if isinstance(feature, datasets.Value) and ("int" in feature.dtype or feature.dtype == "bool"):
        labels = torch.as_tensor(values, dtype=torch.long)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"label column {label_column!r} holds negative labels (unlabelled data?)")
        return labels, int(labels.max()) + 1 if len(labels) else 0, None
    raise ValueError(f"label column {label_column!r} has type {feature}; expected class labels, ints or strings")


def _hf_images(ds, image_column):
    column = ds.select_columns([image_column])

    def get_image(i):
        return column[i][image_column]

    return get_image


def image_row_names(ds, image_column: str, source: str) -> Callable[[int], str]:
    """index -> the image's file path (or "row i of <source>" for images stored in the data set)."""
    import datasets

    refs = None
    if isinstance(ds.features[image_column], datasets.Image):
        refs = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))

    def name(i: int) -> str:
        path = (refs[i][image_column] or {}).get("path") if refs is not None else None
        return path or f"row {i} of {source}"

    return name


def _infer_channels(get_image, n: int) -> int:
    """1 if the first readable images (up to 8) are all grayscale, else 3 (RGB). Unreadable ones are left to the
    data set, which replaces and counts them."""
    modes = []
    for i in range(n):
        try:
            modes.append(to_pil(get_image(i)).mode)
        except Exception:  # noqa: BLE001 - see ReplaceUnreadable
            continue
        if len(modes) == 8:
            break
    return 1 if modes and all(m in _GRAYSCALE_MODES for m in modes) else 3


def build_image_dataset(
    source: str | os.PathLike,
    resolution: int | None,
    center_crop: bool = True,
    random_flip: bool = True,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    channels: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
):
    """A training data set from one of four sources.

    Args:
        source: "fashion_mnist" (the IDX files, see :func:`load_fashion_mnist`); a local folder of class subfolders
            of images (``datasets.load_dataset("imagefolder", data_dir=source)``); a folder of latent shards written
            by ``python -m dfm_diffusers.data encode`` (-> :class:`~.latents.LatentShardDataset`); or any other
            local data set folder / Hugging Face Hub name (``datasets.load_dataset(source, split=split)``).
        resolution: output size (shorter side resized, then a square crop). For latent shards: the image
            resolution they were encoded at (checked), or None to accept any.
        center_crop: center (True) or random (False) square crop.
        random_flip: random horizontal flips (images only; latent shards are returned as encoded).
        split: data set split ("train"/"test" for Fashion-MNIST).
        image_column, label_column: column names (default: the first Image / ClassLabel column, else common
            names such as "image"/"img" and "label"/"labels"). Without a label column every image is class 0.
        max_samples: keep only the first ``max_samples`` examples.
        data_dir: for "fashion_mnist", the folder of IDX files; for a Hub data set, load_dataset's data_dir.
        channels: 1 (grayscale) or 3 (RGB); default 1 for Fashion-MNIST and for data sets whose first images are
            all grayscale, else 3.
        max_bad_fraction: images are checked here (see :mod:`.bad_samples`); unreadable ones (missing, empty,
            truncated, not an image) are skipped with a warning naming the file, and more than this fraction of
            them is a ValueError. Images failing later are replaced deterministically and counted too.

    Returns:
        a torch Dataset with ``num_classes``, ``channels`` and ``class_names``; items are
        ``dict(pixel_values=[C, R, R] float in [-1, 1], class_labels=long)`` or, for latent shards,
        ``dict(latents=[C, h, w] float, class_labels=long)``.

    Raises:
        ValueError: the source cannot be read, is empty, lacks the columns asked for, or has too many unreadable
            images.
        FashionMNISTNotFoundError: "fashion_mnist" without its files (the message says how to get them).
    """
    from .latents import LatentShardDataset, is_latent_dir

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    source = os.fspath(source)
    if is_latent_dir(source):
        dataset = LatentShardDataset(source, max_samples=max_samples)
        if resolution is not None and dataset.resolution != resolution:
            raise ValueError(
                f"latent shards in {source} were encoded from {dataset.resolution}px images, not {resolution}px"
            )
        if random_flip:
            logger.info("random_flip does not apply to pre-encoded latents; they are returned as encoded")
        return dataset
    if resolution is None or resolution < 1:
        raise ValueError(f"resolution must be a positive int for image sources, got {resolution}")

    sample_names = None
    if source in FASHION_MNIST_SOURCES:
        get_image, labels, num_classes, class_names, default_channels = _fashion_mnist(split, data_dir, max_samples)
        description = f"Fashion-MNIST {split}"
        bad_samples = BadSampleLog(description, total=len(labels), max_fraction=max_bad_fraction)
    else:
        ds = load_hf_dataset(source, split, data_dir)
        if max_samples is not None and max_samples < len(ds):
            ds = ds.select(range(max_samples))
        import datasets

        image_col = _pick_column(ds, image_column, datasets.Image, _IMAGE_COLUMN_NAMES, "image", required=True)
        label_col = _pick_column(ds, label_column, datasets.ClassLabel, _LABEL_COLUMN_NAMES, "label", required=False)
        if label_col == image_col:
            raise ValueError(f"image and label columns are the same column {image_col!r}")
        labels, num_classes, class_names = _hf_labels(ds, label_col)
        description = f"{source} [{split}]"
        bad_samples = BadSampleLog(description, total=len(ds), max_fraction=max_bad_fraction)
        good = scan_image_column(ds, image_col, bad_samples, description)
        if len(good) < len(ds):
            ds, labels = ds.select(good), labels[good]
        get_image = _hf_images(ds, image_col)
        sample_names = image_row_names(ds, image_col, description)
        default_channels = None

    if len(labels) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) has no examples")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (inferred), got {channels}")
    try:
        if channels is None:
            channels = default_channels or _infer_channels(get_image, len(labels))
    except (OSError, ValueError) as err:
        raise ValueError(f"dataset {source!r} is unreadable: {err}") from err
    dataset = ImageDataset(
        get_image, labels, num_classes, channels, resolution, center_crop, random_flip, class_names, description,
        bad_samples=bad_samples, sample_names=sample_names,
    )
    dataset[0]  # a systematic problem fails here, with one clear error, rather than inside a DataLoader worker
    return dataset
