"""Data sets decoded once and kept as one tensor (in RAM or on the training device), read a batch at a time.

:func:`preload_dataset` turns an :class:`~.image_dataset.ImageDataset` (Fashion-MNIST, image folders; center
crops) or a :class:`~.latents.LatentShardDataset` into a :class:`PreloadedDataset`: images are decoded and resized
once (uint8), latent shards read whole; a training batch is then one gather (``index_select``), the [-1, 1]
scaling and the horizontal flips applied to the whole batch on the device holding the data. It yields exactly the
samples of the per-sample path for the same seed (flips decided by the same seeded draw per sample,
:func:`~.seeded.seeded_first_uniforms`), so a resumed run and a run switching paths see the same data.
docs/training_speed.md has the why and the measurements.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch

from .seeded import seeded_first_uniforms

logger = logging.getLogger(__name__)

PRELOAD_MODES = ("auto", "device", "cpu", "off")
#: ``preload: auto`` keeps the data on the training device when it takes at most this share of the device memory
AUTO_DEVICE_FRACTION = 0.2
#: ... and preloads it at all (into RAM) when it takes at most this share of the available RAM
AUTO_RAM_FRACTION = 0.5


class PreloadedDataset(torch.utils.data.Dataset):
    """The samples of ``source`` as one tensor; ``get_batch`` reads a whole batch at once.

    Args:
        source: the data set it was made from (its attributes, e.g. ``num_classes``, ``class_names``,
            ``bad_samples``, are this one's).
        data: uint8 images [N, C, R, R] (returned as ``pixel_values`` in [-1, 1]) or latents [N, C, h, w] of any
            float dtype (returned as float32 ``latents``).
        class_labels: long [N].
        random_flip: horizontal flips (images), drawn as ``source`` draws them: the first ``torch.rand(())``.
        placement: "auto", "device" or "cpu": where :meth:`place` keeps the data.
    """

    def __init__(self, source, data: torch.Tensor, class_labels: torch.Tensor, random_flip: bool = False,
                 placement: str = "auto"):
        if placement not in PRELOAD_MODES[:3]:
            raise ValueError(f"placement must be one of {PRELOAD_MODES[:3]}, got {placement!r}")
        if len(data) != len(class_labels):
            raise ValueError(f"got {len(data)} samples but {len(class_labels)} labels")
        self.source, self.data, self.class_labels = source, data, class_labels.long()
        self.key = "pixel_values" if data.dtype == torch.uint8 else "latents"
        self.random_flip = bool(random_flip) and self.key == "pixel_values"
        self.placement = placement

    def __getattr__(self, name):  # num_classes, channels, class_names, resolution, bad_samples, ... of the source
        if name.startswith("__") or "source" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["source"], name)

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.data.shape[1:]))
        return f"PreloadedDataset({len(self)} x {shape} {self.data.dtype} on {self.data.device}, of {self.source!r})"

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.class_labels.numel() * 8

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0 if self.key == "pixel_values" else x.float()

    def __getitem__(self, index: int) -> dict:
        """One sample, as ``source[index]`` gives it (a flip drawn from torch's CPU RNG)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        x = self._values(self.data[index])
        return {self.key: x.flip(-1) if flip else x, "class_labels": self.class_labels[index]}

    def get_batch(self, indices: Sequence[int], seed: int, epoch: int) -> dict:
        """The collated samples ``indices`` of ``epoch`` (as :class:`~.seeded.SeededSamples` reads them one by one),
        on the data's device: ``{pixel_values | latents: float32 [B, C, H, W], class_labels: long [B]}``."""
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)  # no host sync
        x = self._values(self.data.index_select(0, index))
        if self.random_flip:
            flip = seeded_first_uniforms(seed, epoch, indices) < 0.5
            if self.device.type == "cuda":
                flip = flip.pin_memory().to(self.device, non_blocking=True)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return {self.key: x, "class_labels": self.class_labels.index_select(0, index)}

    def place(self, device: torch.device | str) -> torch.device:
        """Move the data to the training ``device`` as ``placement`` says (auto: when it takes at most
        AUTO_DEVICE_FRACTION of the device memory); returns where it is."""
        device = torch.device(device)
        if device.type == "cpu" or self.placement == "cpu" or device == self.device:
            return self.device
        if self.placement == "auto":
            total = _device_memory(device)
            if total is None or self.nbytes() > AUTO_DEVICE_FRACTION * total:
                logger.info("preload auto: %.2f GiB of data stay in RAM (more than %.0f%% of %s's memory)",
                            self.nbytes() / 2**30, 100 * AUTO_DEVICE_FRACTION, device)
                return self.device
        self.data, self.class_labels = self.data.to(device), self.class_labels.to(device)
        logger.info("preloaded data on %s: %.2f GiB", device, self.nbytes() / 2**30)
        return self.device


def _device_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _available_ram() -> int | None:
    """Available RAM for this process's copy: shared by the training processes of this machine (each keeps one)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None
    return int(psutil.virtual_memory().available) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.decoded(index)


def preload_images(dataset, num_workers: int = 0, batch_size: int = 256, progress: bool = True):
    """Decode every image of an ImageDataset once: (uint8 [N, C, R, R], labels [N]). Unreadable images get their
    replacement (the next readable one, as in training) and are recorded in ``dataset.bad_samples``."""
    from tqdm.auto import tqdm

    n = len(dataset)
    images = torch.empty((n, dataset.channels, dataset.resolution, dataset.resolution), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    loader = torch.utils.data.DataLoader(_Decoded(dataset), batch_size=batch_size, num_workers=num_workers)
    failed = dataset.__dict__.setdefault("_failed_indices", set())
    start = 0
    with tqdm(total=n, desc="preloading images", unit="img", disable=not progress) as bar:
        for x, y, used in loader:
            images[start : start + len(x)], labels[start : start + len(x)] = x, y
            for offset, u in enumerate(used.tolist()):  # failures seen by a worker: recorded here too
                i = start + offset
                for j in (range(i, u) if u >= i else [*range(i, n), *range(u)]):
                    if j not in failed:
                        failed.add(j)
                        dataset.bad_samples.add(dataset.sample_name(j), "unreadable (found while preloading)")
            start += len(x)
            bar.update(len(x))
    return images, labels


def preload_dataset(dataset, mode: str = "auto", num_workers: int = 0, progress: bool = True):
    """``dataset`` decoded once and kept as one tensor (a :class:`PreloadedDataset`), or ``dataset`` itself.

    Args:
        mode: "off" (per-sample reads), "cpu" (in RAM), "device" (on the training device, moved there by the
            training loop through :meth:`PreloadedDataset.place`), or "auto": "device" if the data takes at most
            AUTO_DEVICE_FRACTION of the device's memory, else RAM if at most AUTO_RAM_FRACTION of the available
            RAM (divided among the training processes of the machine: each keeps a copy), else off; also off for
            data sets that cannot be preloaded.
        num_workers: DataLoader workers decoding the images.

    Preloadable: ImageDataset with center crops (random crops differ per epoch) and LatentShardDataset.

    Raises:
        ValueError: unknown mode; "cpu" / "device" for a data set that cannot be preloaded.
    """
    from .image_dataset import ImageDataset
    from .latents import LatentShardDataset

    if mode not in PRELOAD_MODES:
        raise ValueError(f"preload must be one of {PRELOAD_MODES}, got {mode!r}")
    if mode == "off" or isinstance(dataset, PreloadedDataset):
        return dataset
    if isinstance(dataset, LatentShardDataset):
        nbytes, why_not = dataset.nbytes(), None
    elif isinstance(dataset, ImageDataset):
        nbytes = len(dataset) * dataset.channels * dataset.resolution**2
        why_not = None if dataset.center_crop else "random crops (center_crop: false) differ per epoch"
    else:
        nbytes, why_not = 0, f"{type(dataset).__name__} is not an image folder, Fashion-MNIST or latent shards"
    if why_not:
        if mode != "auto":
            raise ValueError(f"preload {mode}: cannot preload this data set: {why_not}; use preload: off")
        logger.info("preload auto: reading samples one by one (%s)", why_not)
        return dataset
    ram = _available_ram()
    if mode == "auto" and ram is not None and nbytes > AUTO_RAM_FRACTION * ram:
        logger.info("preload auto: reading samples one by one (%.1f GiB > %.0f%% of the available RAM)",
                    nbytes / 2**30, 100 * AUTO_RAM_FRACTION)
        return dataset
    if isinstance(dataset, LatentShardDataset):
        data, labels, flip = dataset.read_all(progress=progress), dataset.class_labels, False
    else:
        (data, labels), flip = preload_images(dataset, num_workers, progress=progress), dataset.random_flip
    return PreloadedDataset(dataset, data, labels, random_flip=flip, placement="cpu" if mode == "cpu" else mode)
