"""Per-stage statistics of a data set's Laplacian bands, and the ``stage_scales`` they suggest.

DFM noises every band with unit Gaussian noise. In pixel space the bands differ a lot in scale (Fashion-MNIST 32px
in [-1, 1]: stage 0 std about 0.66, the detail band about 0.18), so the detail band's signal-to-noise ratio only
reaches 1 at small sigma. ``stage_scales`` (divide band s by scale s in decompose, multiply back in recompose)
fixes that; this module estimates them from data:

- ``"auto"``: scale_s = std_s, every band gets unit variance (the paper's "standardize each band").
- ``"auto_relative"``: scale_0 = 1 and scale_s = std_s / std_0: stage 0 is left as it is and every detail band is
  brought to stage 0's std (the relative balance of "auto" without changing the scale of stage 0).

Command line: ``python -m dfm_diffusers.data band-stats --dataset fashion_mnist --resolution 32 --num_stages 2``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

#: The string values ``stage_scales`` accepts in the trainers' configs (besides a list of floats or null).
STAGE_SCALE_MODES = ("auto", "auto_relative")


@dataclass
class BandStatistics:
    """Statistics of the UNSCALED bands, one entry per stage (coarse to fine), over all channels and positions.

    mean, std: of the band's values; rms: sqrt(E[band^2]); energy_fraction: the band's share of the summed squares
    of all bands of a sample (the bands of a Laplacian pyramid are not orthogonal, so this is a share of the
    pyramid's energy, not of the image's); shapes: [C, H_s, W_s] per stage; num_samples: examples seen.
    """

    mean: list[float]
    std: list[float]
    rms: list[float]
    energy_fraction: list[float]
    shapes: list[list[int]]
    num_samples: int

    def suggested_stage_scales(self, mode: str = "auto") -> list[float]:
        """The ``stage_scales`` of ``mode`` ("auto": the stds; "auto_relative": 1 for stage 0, std_s / std_0)."""
        check_stage_scale_mode(mode)
        if any(not s > 0 for s in self.std):
            raise ValueError(f"a band has zero variance (stds {self.std}): it cannot be standardized")
        if mode == "auto":
            return list(self.std)
        return [1.0] + [s / self.std[0] for s in self.std[1:]]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["suggested_stage_scales"] = {mode: self.suggested_stage_scales(mode) for mode in STAGE_SCALE_MODES}
        return out

    def table(self) -> str:
        """A printable table: one line per stage."""
        lines = [f"{'stage':>5}  {'shape':>12}  {'mean':>9}  {'std':>9}  {'rms':>9}  {'energy':>7}"]
        for s, shape in enumerate(self.shapes):
            lines.append(
                f"{s:>5}  {'x'.join(map(str, shape)):>12}  {self.mean[s]:>9.4f}  {self.std[s]:>9.4f}  "
                f"{self.rms[s]:>9.4f}  {self.energy_fraction[s]:>7.2%}"
            )
        return "\n".join(lines)


def check_stage_scale_mode(mode: str) -> None:
    if mode not in STAGE_SCALE_MODES:
        raise ValueError(f"stage_scales must be a list of positive floats, null, or one of {STAGE_SCALE_MODES}; "
                         f"got {mode!r}")


def _batch_tensor(batch) -> torch.Tensor:
    """The image / latent tensor of a batch: a tensor, or a dict with "latents" or "pixel_values"."""
    if isinstance(batch, torch.Tensor):
        return batch
    for key in ("latents", "pixel_values"):
        if key in batch:
            return batch[key]
    raise ValueError(f"a batch must be a tensor or hold 'latents' or 'pixel_values'; got keys {sorted(batch)}")


def _collate(items: list) -> torch.Tensor:
    return torch.stack([_batch_tensor(item) for item in items])


def _batches(data, num_samples: int, batch_size: int, seed: int, num_workers: int) -> Iterable[torch.Tensor]:
    """Batches of at most ``num_samples`` examples: a seeded random subset of a map-style data set (its own
    generator: the global RNG is not touched), or the first examples of an iterable of batches / examples."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        count = min(num_samples, len(data))
        indices = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(data, indices.tolist()), batch_size=batch_size, shuffle=False, collate_fn=_collate,
            num_workers=num_workers,
        )
        yield from loader
        return
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size)
    for batch in data:
        x = _batch_tensor(batch)
        yield x[None] if x.ndim == 3 else x


@torch.no_grad()
def band_statistics(
    data,
    decomposition,
    num_samples: int = 4096,
    batch_size: int = 256,
    vae: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> BandStatistics:
    """Per-stage mean / std / energy share of the unscaled bands of ``data``, streamed in float64.

    Args:
        data: a map-style torch Dataset of dicts with "pixel_values" [C, H, W] or "latents" (what the trainers read;
            a seeded random subset of ``num_samples`` examples is used), an iterable of batches (tensors
            [B, C, H, W] or dicts; the first ``num_samples`` examples), or a tensor [N, C, H, W].
        num_workers: DataLoader workers reading a map-style data set.
        decomposition: a LaplacianDecomposition (or any object with ``decompose``); its ``stage_scales``, if set,
            are undone, so the statistics are always those of the unscaled bands.
        vae: None (the data already are the training space: pixels in [-1, 1] or latent shards), a diffusers
            AutoencoderKL (images are encoded to their posterior mean, ``(z - shift_factor) * scaling_factor``
            as the trainers do), or any callable pixels -> latents.
        device: where the VAE and the decomposition run (default: the VAE's device, else the CPU).
    """
    from tqdm.auto import tqdm

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if vae is not None and not callable(vae):
        raise ValueError(f"vae must be an AutoencoderKL or a callable, got {type(vae).__name__}")
    if isinstance(vae, torch.nn.Module) and hasattr(vae, "encode"):
        from .latents import encode_images

        model = vae
        device = torch.device(device) if device is not None else model.device
        model.to(device)

        def encode(pixels):
            return encode_images(model, pixels)
    else:
        encode = vae
        device = torch.device(device or "cpu")
    scales = getattr(decomposition, "stage_scales", None)
    sums = sq_sums = counts = None
    shapes, seen = None, 0
    bar = tqdm(total=num_samples, desc="band statistics", unit="img", disable=not progress)
    for x in _batches(data, num_samples, batch_size, seed, num_workers):
        x = x[: num_samples - seen].to(device)
        if encode is not None:
            x = encode(x)
        bands = decomposition.decompose(x.float())
        if scales is not None:
            bands = [band * scale for band, scale in zip(bands, scales)]
        bands = [band.double() for band in bands]
        if sums is None:
            num_stages = len(bands)
            sums, sq_sums, counts = ([0.0] * num_stages for _ in range(3))
            shapes = [list(band.shape[1:]) for band in bands]
        for s, band in enumerate(bands):
            sums[s] += band.sum().item()
            sq_sums[s] += band.square().sum().item()
            counts[s] += band.numel()
        seen += x.shape[0]
        bar.update(x.shape[0])
        if seen >= num_samples:
            break
    bar.close()
    if not seen:
        raise ValueError("band_statistics got no data")
    mean = [t / n for t, n in zip(sums, counts)]
    second = [t / n for t, n in zip(sq_sums, counts)]
    std = [max(m2 - m * m, 0.0) ** 0.5 for m, m2 in zip(mean, second)]
    total_energy = sum(sq_sums)  # the summed squares of a band over all samples: its energy
    return BandStatistics(
        mean=mean, std=std, rms=[m2 ** 0.5 for m2 in second],
        energy_fraction=[e / total_energy if total_energy > 0 else 0.0 for e in sq_sums],
        shapes=shapes, num_samples=seen,
    )


def estimate_stage_scales(
    mode: str, data, decomposition, num_samples: int = 4096, batch_size: int = 256, vae=None, device=None,
    num_workers: int = 0, progress: bool = True,
) -> tuple[list[float], BandStatistics]:
    """``stage_scales: auto`` / ``auto_relative``: (the scales, the statistics they came from)."""
    check_stage_scale_mode(mode)
    stats = band_statistics(data, decomposition, num_samples=num_samples, batch_size=batch_size, vae=vae,
                            device=device, num_workers=num_workers, progress=progress)
    return stats.suggested_stage_scales(mode), stats
