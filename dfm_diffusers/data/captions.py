"""Captioned image data sets for text-to-image DFM training (train_dfm_flux.py).

Sources: a local image folder whose captions are in a ``metadata.jsonl`` / ``metadata.csv`` next to the images
(datasets' "imagefolder" layout: one ``{"file_name": "0001.png", "text": "a cat"}`` per line), a folder written by
``Dataset.save_to_disk``, any other local data set folder, or a Hugging Face Hub data set name. Every item is
``dict(pixel_values=float [3, R, R] in [-1, 1], captions=str)``; the default collate turns ``captions`` into a
list of strings.

Problem rows are counted in the data set's ``bad_samples`` (see :mod:`.bad_samples`), each with a warning naming
the file: unreadable images and rows whose file is missing are skipped; images of a local folder that have no
metadata.jsonl row are skipped (they have no caption); rows whose caption is empty or null are skipped unless
``allow_empty_captions`` keeps them as the empty prompt ""; a caption that is not a string is skipped.
"""

from __future__ import annotations

import os
import random
from typing import Callable

import torch

from .bad_samples import DEFAULT_MAX_BAD_FRACTION, BadSampleLog, ReplaceUnreadable, scan_image_column
from .image_dataset import IMAGE_EXTENSIONS, _pick_column, image_row_names, load_hf_dataset, preprocess_image

CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "prompts", "description", "sentence", "txt")
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "png", "jpg", "jpeg")


class CaptionedImageDataset(ReplaceUnreadable, torch.utils.data.Dataset):
    """Images with captions, resized/cropped to ``resolution`` (RGB, [-1, 1]).

    A caption cell may hold a list of captions: one is picked at random per access (Python's ``random``,
    seeded by accelerate's set_seed). Random crops/flips use torch's global RNG. An image that fails to decode
    is replaced by the next readable one (with its caption) and recorded in ``bad_samples``.
    """

    def __init__(self, ds, image_column: str, caption_column: str, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, description: str = "", bad_samples: BadSampleLog | None = None,
                 sample_names: Callable[[int], str] | None = None):
        self._ds = ds.select_columns([image_column, caption_column])
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution = int(resolution)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.channels = 3
        self.description = description
        self.bad_samples = bad_samples or BadSampleLog(description, total=len(self._ds))
        self._sample_names = sample_names
        self.sizes: list[tuple[int, int]] | None = None  # per image (height, width) with aspect buckets

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) image ``index`` is resized and cropped to: its bucket, or resolution x resolution."""
        return tuple(self.sizes[index]) if self.sizes is not None else (self.resolution, self.resolution)

    def sample_name(self, index: int) -> str:
        return self._sample_names(index) if self._sample_names else f"image {index} of {self.description}"

    def __len__(self) -> int:
        return len(self._ds)

    def __repr__(self) -> str:
        return f"CaptionedImageDataset({self.description}: {len(self)} images, 3x{self.resolution}x{self.resolution})"

    def caption(self, index: int) -> str:
        return _as_caption(self._ds[index][self.caption_column], index)

    def caption_choices(self, index: int) -> list[str]:
        """Every caption ``__getitem__`` may return for ``index`` (one, or each usable one of a list cell)."""
        value = self._ds[index][self.caption_column]
        if isinstance(value, (list, tuple)):
            return [v for v in value if isinstance(v, str) and v.strip()] or [""]
        return [_as_caption(value, index)]

    def image_keys(self) -> list[str]:
        """One key per image that changes when the image does (for caches of its latents): the file's real path,
        size and modification time, or the sha256 of the bytes of an image stored inside the data set."""
        import hashlib

        import datasets

        if not isinstance(self._ds.features[self.image_column], datasets.Image):  # arrays stored in the data set
            import numpy as np

            return ["sha256:" + hashlib.sha256(np.asarray(row[self.image_column]).tobytes()).hexdigest()
                    for row in self._ds]
        refs = self._ds.select_columns([self.image_column]).cast_column(self.image_column, datasets.Image(decode=False))
        keys = []
        for ref in refs[self.image_column]:
            ref = ref or {}
            path = ref.get("path")
            if ref.get("bytes") is None and path and os.path.isfile(path):
                stat = os.stat(path)
                keys.append(f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}")
            else:
                keys.append("sha256:" + hashlib.sha256(ref.get("bytes") or b"").hexdigest())
        return keys

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        flip = self.random_flip and bool(torch.rand(()) < 0.5)

        def load(i):
            row = self._ds[i]
            pixels = preprocess_image(row[self.image_column], self.target_size(index), 3, center_crop=self.center_crop,
                                      flip=flip)
            return dict(pixel_values=pixels, captions=_as_caption(row[self.caption_column], i))

        return self.load_replacing(index, load)


def _caption_problem(value) -> str | None:
    """"empty" / "null" / "not a string" for captions that cannot be trained on as they are, else None."""
    if value is None:
        return "null caption"
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            return f"caption list holds non-strings: {value!r}"
        return None if any(v.strip() for v in value) else "empty caption"
    if not isinstance(value, str):
        return f"caption is a {type(value).__name__}, not a string: {value!r}"
    return None if value.strip() else "empty caption"


def _image_sizes(ds, image_column: str) -> list[tuple[int, int]]:
    """(width, height) of every image, from the file headers (no decoding of the pixels)."""
    import io

    import datasets
    from PIL import Image

    if not isinstance(ds.features[image_column], datasets.Image):
        return [to_pil_size(row[image_column]) for row in ds]
    sizes = []
    for ref in ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))[image_column]:
        source = io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"]
        with Image.open(source) as image:
            sizes.append(image.size)
    return sizes


def to_pil_size(value) -> tuple[int, int]:
    from .image_dataset import to_pil

    return to_pil(value).size


def _unlisted_images(source: str, split: str, listed_paths) -> list[str]:
    """Image files of a local folder with metadata.jsonl / metadata.csv that no metadata row names (datasets'
    imagefolder drops them silently). Files under a folder named after another split are not counted."""
    split_names = {"train", "test", "validation", "valid", "val", "eval"} - {split}
    listed = {os.path.realpath(p) for p in listed_paths if p}
    found = []
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        rel_parts = set(os.path.relpath(folder, source).split(os.sep))
        if rel_parts & split_names:
            continue
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.realpath(path) not in listed:
                found.append(path)
    return found


def _has_metadata_file(source: str) -> bool:
    return any(f in ("metadata.jsonl", "metadata.csv") for _, _, files in os.walk(source) for f in files)


def _as_caption(value, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = [v for v in value if isinstance(v, str) and v.strip()]
        value = random.choice(value) if value else ""
    if not isinstance(value, str):
        raise ValueError(f"caption {index} is a {type(value).__name__}, not a string: {value!r}")
    return value


CAPTION_SOURCES_HINT = (
    'Captioned sources are a folder of images with a metadata.jsonl ({"file_name": ..., "text": ...} per line), a '
    "folder written by Dataset.save_to_disk, or a datasets.load_dataset name."
)


def _load(source: str, split: str, data_dir: str | None):
    return load_hf_dataset(source, split, data_dir, sources_hint=CAPTION_SOURCES_HINT)


def _pick_caption_column(ds, wanted: str | None, image_column: str) -> str:
    import datasets

    columns = list(ds.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"caption column {wanted!r} not in the dataset's columns {columns}")
        return wanted
    for name in CAPTION_COLUMN_NAMES:
        if name in columns and name != image_column:
            return name
    for name, feature in ds.features.items():
        if name not in (image_column, "file_name") and isinstance(feature, datasets.Value) and feature.dtype in (
            "string", "large_string"
        ):
            return name
    raise ValueError(
        f"no caption column found among the dataset's columns {columns}; pass caption_column=... (an image folder "
        f"needs a metadata.jsonl next to the images with one {{\"file_name\": \"x.png\", \"text\": \"a caption\"}} "
        f"line per image)"
    )


def build_captioned_image_dataset(
    source: str | os.PathLike,
    resolution: int,
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str = "train",
    center_crop: bool = True,
    random_flip: bool = False,
    max_samples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    allow_empty_captions: bool = False,
    buckets: dict[int, list[tuple[int, int]]] | None = None,
    upscale_small_images: bool = False,
) -> CaptionedImageDataset:
    """A captioned image data set (see the module docstring for the sources).

    Args:
        resolution: output size (shorter side resized to it, then a square crop, center or random).
        caption_column, image_column: column names; default: the first of "text", "caption", "prompt", ... (else
            the first string column), and the first Image column (else "image", "img", ...).
        max_samples: keep only the first ``max_samples`` examples.
        data_dir: load_dataset's ``data_dir`` for Hub / local data set sources.
        max_bad_fraction: problem rows (see the module docstring) are skipped with a warning naming the file;
            more than this fraction of skipped rows is a ValueError.
        allow_empty_captions: keep rows with an empty or null caption as the empty prompt "" (still counted and
            reported) instead of skipping them.
        buckets: aspect buckets (:func:`.buckets.make_buckets`): each image is resized / cropped to its bucket
            (``dataset.sizes``); images smaller than every bucket are skipped and counted, unless
            ``upscale_small_images``.

    Raises:
        ValueError: the source cannot be loaded, is empty, lacks the image or caption column, has too many problem
            rows, or its first example cannot be read (checked here, before any training).
    """
    import datasets

    if resolution is None or int(resolution) < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    source = os.fspath(source)
    if os.path.isfile(source) and source.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"dataset must be a folder or a data set name, got the image file {source}")
    ds = _load(source, split, os.fspath(data_dir) if data_dir else None)
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) has no examples")
    image_col = _pick_column(ds, image_column, datasets.Image, _IMAGE_COLUMN_NAMES, "image", required=True)
    caption_col = _pick_caption_column(ds, caption_column, image_col)
    if caption_col == image_col:
        raise ValueError(f"image and caption columns are the same column {image_col!r}")

    description = f"{source} [{split}]"
    unlisted = []  # with max_samples the folder is subset on purpose: images beyond it are not "unlisted"
    is_image_folder = os.path.isdir(source) and isinstance(ds.features[image_col], datasets.Image)
    if is_image_folder and max_samples is None and _has_metadata_file(source):
        refs = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))[image_col]
        unlisted = _unlisted_images(source, split, [(ref or {}).get("path") for ref in refs])
    log = BadSampleLog(description, total=len(ds) + len(unlisted), max_fraction=max_bad_fraction)
    for path in unlisted:
        log.add(path, "no metadata.jsonl row (no caption)", when="found when the data set was built", check=False)
    names = image_row_names(ds, image_col, description)
    good = []
    for row, value in enumerate(ds[caption_col]):
        problem = _caption_problem(value)
        if problem is None:
            good.append(row)
            continue
        keep = allow_empty_captions and problem in ("empty caption", "null caption")
        log.add(names(row), problem + (" (trained as the empty prompt)" if keep else ""), kept=keep,
                when="found when the data set was built", check=False)
        if keep:
            good.append(row)
    if len(good) < len(ds):
        ds = ds.select(good)
    rows = scan_image_column(ds, image_col, log, description)
    if len(rows) < len(ds):
        ds = ds.select(rows)
    sizes = None
    if buckets:
        from .buckets import assign_bucket

        names = image_row_names(ds, image_col, description)
        sizes, keep = [], []
        for row, (width, height) in enumerate(_image_sizes(ds, image_col)):
            bucket = assign_bucket(width, height, buckets, upscale_small_images)
            if bucket is None:
                log.add(names(row), f"{width}x{height} is smaller than every aspect bucket (upscale_small_images: "
                        f"false)", when="found when the data set was built", check=False)
                continue
            keep.append(row)
            sizes.append(bucket)
        if len(keep) < len(ds):
            ds = ds.select(keep)
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) has no usable examples: {log.summary()}")
    dataset = CaptionedImageDataset(ds, image_col, caption_col, resolution, center_crop, random_flip,
                                    description=description, bad_samples=log,
                                    sample_names=image_row_names(ds, image_col, description))
    dataset.sizes = sizes
    try:  # fail here, with one clear error, rather than inside a DataLoader worker
        dataset[0]
    except (OSError, ValueError) as err:
        raise ValueError(f"dataset {source!r} is unreadable: {err}") from err
    return dataset
