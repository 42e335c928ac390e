"""Aspect-ratio buckets: several training resolutions and aspect ratios, every batch from one bucket.

A bucket is a (height, width) in pixels whose sides are multiples of what the model needs (VAE factor x FLUX's 2x2
packing x the DFM stage factors), with an area close to ``resolution**2`` for each resolution in ``resolutions`` and
a width / height close to each of ``aspect_ratios``. An image goes to the bucket of the largest resolution it covers
in both sides (no upscaling), with the aspect ratio closest to its own (so a panorama is not cropped to a square);
it is then resized to cover the bucket and center-cropped by at most the rounding. Images smaller than every
bucket are skipped (and counted), or, with ``upscale_small_images``, upscaled into the smallest resolution's bucket.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def make_buckets(resolutions, aspect_ratios, multiple: int) -> dict[int, list[tuple[int, int]]]:
    """resolution -> its buckets [(height, width)], sides multiples of ``multiple``, areas close to resolution**2."""
    buckets = {}
    for resolution in sorted(set(int(r) for r in resolutions)):
        sizes = []
        for ratio in aspect_ratios:
            height = max(multiple, round(resolution / math.sqrt(ratio) / multiple) * multiple)
            width = max(multiple, round(resolution * math.sqrt(ratio) / multiple) * multiple)
            if (height, width) not in sizes:
                sizes.append((height, width))
        buckets[resolution] = sizes
    return buckets


def assign_bucket(width: int, height: int, buckets: dict[int, list[tuple[int, int]]],
                  upscale_small_images: bool = False) -> tuple[int, int] | None:
    """The bucket (height, width) of a width x height image, or None if it is smaller than every bucket (and
    ``upscale_small_images`` is off)."""
    aspect = math.log(width / height)

    def closest(sizes):
        return min(sizes, key=lambda s: (abs(math.log(s[1] / s[0]) - aspect), -s[0] * s[1]))

    for resolution in sorted(buckets, reverse=True):
        fitting = [s for s in buckets[resolution] if s[0] <= height and s[1] <= width]
        if fitting:
            best = closest(buckets[resolution])
            return best if best in fitting else closest(fitting)
    return closest(buckets[min(buckets)]) if upscale_small_images else None


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket, shuffled per epoch from (seed, epoch).

    ``epoch_of``: an object whose ``epoch`` attribute the training loop sets before each epoch's iterator is made
    (the loop's SeededSamples), so an epoch's batches, and a resumed run's, depend only on the seed and the epoch.
    A bucket's last batch may be smaller than ``batch_size`` unless ``drop_last``.
    """

    def __init__(self, bucket_of: list, batch_size: int, seed: int, epoch_of, drop_last: bool = False):
        self.groups = defaultdict(list)
        for index, bucket in enumerate(bucket_of):
            self.groups[tuple(bucket)].append(index)
        self.batch_size, self.seed, self.epoch_of, self.drop_last = int(batch_size), int(seed), epoch_of, drop_last

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(getattr(self.epoch_of, "epoch", 0)))
        batches = []
        for key in sorted(self.groups):
            indices = self.groups[key]
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
