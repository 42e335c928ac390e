"""Per-sample seeding of random augmentations: a sample's flips and crops depend only on (seed, epoch, index)."""

from __future__ import annotations

import torch

_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the CPU torch RNG while sample ``index`` of ``epoch`` is read in a run with ``seed``."""
    return hash((int(seed), int(epoch), int(index))) & _MASK64


def seeded_first_uniforms(seed: int, epoch: int, indices) -> torch.Tensor:
    """float32 [len(indices)]: the first ``torch.rand(())`` each sample's seeded RNG draws (what
    :class:`SeededSamples` gives a data set's first random draw, e.g. ImageDataset's flip), for a whole batch."""
    generator = torch.Generator()
    values = []
    for index in indices:
        generator.manual_seed(sample_seed(seed, epoch, index))
        values.append(torch.rand((), generator=generator))
    return torch.stack(values) if values else torch.zeros(0)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[i]`` computed under the CPU torch RNG seeded from (seed, epoch, i); the global state is restored.

    Random augmentations (flips, random crops) then depend only on the sample and the epoch: they neither shift
    the training draws (noise, sigmas, stages) nor depend on the DataLoader's one-batch prefetch, on the number
    of workers, or on where a resumed run restarted. Only torch's CPU generator is seeded (not CUDA's).

    A data set with ``get_batch(indices, seed, epoch)`` (e.g. :class:`~.preload.PreloadedDataset`) is read a
    batch at a time (``batched`` is True; the DataLoader calls ``__getitems__``): it must return exactly the
    collated samples the per-sample reads would.
    """

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0
        self.batched = callable(getattr(dataset, "get_batch", None))
        if self.batched:  # torch's DataLoader fetches a whole batch through __getitems__ when the instance has it
            self.__getitems__ = self._get_batch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)

    def _get_batch(self, indices):
        return self.dataset.get_batch(indices, self.seed, self.epoch)


def already_collated(batch):
    """The DataLoader collate function of batched data sets: the batch is already one dict of tensors."""
    return batch
