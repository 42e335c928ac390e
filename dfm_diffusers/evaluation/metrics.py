"""Distribution metrics: Frechet distance, multiscale sliced Wasserstein distance, k-NN precision/recall.

Conventions: images are uint8 [N, H, W, C] (8-bit quantized, like stored real images; see
:func:`quantize_to_uint8`), features are float [N, D].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..decomposition import LaplacianDecomposition


def quantize_to_uint8(images, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float images -> uint8 [N, H, W, C], rounding like diffusers' ``numpy_to_pil``.

    Args:
        images: torch [N, C, H, W] (the pipelines' ``output_type="pt"``) or numpy [N, H, W, C]
            (``output_type="np"``), with values in ``value_range`` ((0, 1) for pipeline outputs, (-1, 1) for the
            training data's ``pixel_values``); values outside are clipped.
    """
    low, high = value_range
    if torch.is_tensor(images):
        if images.ndim != 4:
            raise ValueError(f"expected a [N, C, H, W] tensor, got shape {tuple(images.shape)}")
        array = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    else:
        array = np.asarray(images, dtype=np.float32)
        if array.ndim != 4:
            raise ValueError(f"expected a [N, H, W, C] array, got shape {array.shape}")
    unit = (array - low) / (high - low)
    return (np.clip(unit, 0.0, 1.0) * 255).round().astype(np.uint8)


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1], exactly the data loader's ``x / 127.5 - 1``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- Frechet distance


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) of features [N, D], in float64."""
    x = torch.as_tensor(features).double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {tuple(x.shape)}")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance_from_statistics(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    The cross term uses the symmetric form, whose square root is that of a PSD matrix (eigendecomposition,
    negative round-off eigenvalues clipped): stable where scipy's sqrtm of the non-symmetric S_a S_b is not.
    """
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(t).double() for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (FID's formula on any features)."""
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


# ------------------------------------------------------------------------- multiscale sliced Wasserstein


def swd_levels(resolution: int, min_resolution: int = 16) -> int:
    """Number of pyramid levels from ``resolution`` down to ``min_resolution`` by factors of 2 (ProGAN: 16)."""
    levels = 1
    while resolution % 2 == 0 and resolution // 2 >= min_resolution:
        resolution //= 2
        levels += 1
    return levels


def _patch_positions(n: int, size: tuple[int, int], patches_per_image: int, patch_size: int, generator):
    """(image index, top, left) [n * patches_per_image] each: random patch positions."""
    h, w = size
    if h < patch_size or w < patch_size:
        raise ValueError(f"pyramid level {h}x{w} is smaller than the {patch_size}x{patch_size} patches")
    count = n * patches_per_image
    image = torch.arange(n).repeat_interleave(patches_per_image)
    top = torch.randint(0, h - patch_size + 1, (count,), generator=generator)
    left = torch.randint(0, w - patch_size + 1, (count,), generator=generator)
    return image, top, left


def _patch_descriptors(band: torch.Tensor, positions, patch_size: int) -> torch.Tensor:
    """band [N, C, H, W] -> patches [P, C, p, p] at ``positions``, each channel normalized to zero mean and unit
    std over all patches of the set (ProGAN's ``finalize_descriptors``)."""
    c = band.shape[1]
    offs = torch.arange(patch_size)
    image, top, left = positions
    image, top, left, offs = (t.to(band.device) for t in (image, top, left, offs))
    rows = (top[:, None] + offs)[:, None, :, None]
    cols = (left[:, None] + offs)[:, None, None, :]
    chans = torch.arange(c, device=band.device)[None, :, None, None]
    desc = band[image[:, None, None, None], chans, rows, cols]
    desc = desc - desc.mean(dim=(0, 2, 3), keepdim=True)
    return desc / desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)


def _sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, repeats: int, directions: int, generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between projections of a, b [M, D]."""
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=generator).to(a.device)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        proj_a, _ = torch.sort(a @ dirs, dim=0)
        proj_b, _ = torch.sort(b @ dirs, dim=0)
        results.append((proj_a - proj_b).abs().mean())
    return float(torch.stack(results).mean())


def sliced_wasserstein_distance(
    images_a: np.ndarray,
    images_b: np.ndarray,
    min_resolution: int = 16,
    patches_per_image: int = 128,
    patch_size: int = 7,
    repeats: int = 4,
    directions: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_images: int = 4096,
) -> dict:
    """Multiscale sliced Wasserstein distance (Karras et al. 2018, ProGAN) between two uint8 image sets.

    Each set is split into a Laplacian pyramid by the library's own :class:`LaplacianDecomposition` (bilinear,
    factor 2), so with ``min_resolution`` = the coarsest DFM stage, the levels are exactly a DFM model's stages;
    finest level first, the coarsest level is the low-pass. Per level: ``patches_per_image`` random
    ``patch_size`` x ``patch_size`` patches per image (the same positions in both sets), each channel
    normalized over its set, then the sliced
    Wasserstein distance over ``repeats`` x ``directions`` random projections. Seeded and deterministic; the
    larger set is subsampled (seeded) to the smaller set's size. No learned weights.

    Returns:
        ``{"levels": {"32": swd, "16": swd, ...}, "mean": mean over levels}`` keyed by level resolution, in
        ProGAN's reporting unit (x 1e3). Lower is better; identical sets give 0.
    """
    images_a, images_b = np.asarray(images_a), np.asarray(images_b)
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"image sets differ in shape: {images_a.shape[1:]} vs {images_b.shape[1:]}")
    generator = torch.Generator().manual_seed(seed)
    n = min(len(images_a), len(images_b))
    picked = []
    for images in (images_a, images_b):
        index = torch.randperm(len(images), generator=generator)[:n].sort().values.numpy()
        picked.append(images[index] if len(images) > n else images)
    resolution = images_a.shape[1]
    num_levels = swd_levels(resolution, min_resolution)
    pyramid = LaplacianDecomposition(num_levels, 2)
    if images_a.shape[1] != images_a.shape[2]:
        raise ValueError(f"SWD expects square images, got {images_a.shape[1]}x{images_a.shape[2]}")
    level_sizes = [h for h, _ in pyramid.stage_shapes(resolution, resolution)]

    # The same positions for both sets (the sets are unordered, so this is still a random draw for each):
    # identical sets score exactly 0, and the comparison has less variance.
    positions = [_patch_positions(n, (size, size), patches_per_image, patch_size, generator) for size in level_sizes]
    descriptors: list[list[torch.Tensor]] = []  # [set][level] -> [n * patches, C * p * p]
    for images in picked:
        bands_per_level = [[] for _ in range(num_levels)]
        for i in range(0, n, batch_images):
            bands = pyramid.decompose(uint8_to_tensor(images[i : i + batch_images]).to(device))
            for level, band in enumerate(bands):
                bands_per_level[level].append(band)
        set_descriptors = []
        for level in range(num_levels):
            band = torch.cat(bands_per_level[level])
            set_descriptors.append(_patch_descriptors(band, positions[level], patch_size).flatten(1))
        descriptors.append(set_descriptors)

    levels = {}
    for level in reversed(range(num_levels)):  # finest first
        swd = _sliced_wasserstein(descriptors[0][level], descriptors[1][level], repeats, directions, generator)
        levels[str(level_sizes[level])] = swd * 1e3
    return {"levels": levels, "mean": float(np.mean(list(levels.values())))}


# ----------------------------------------------------------------------------------- precision / recall


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor, batch_size: int):
    for i in range(0, len(a), batch_size):
        yield i, torch.cdist(a[i : i + batch_size], b)


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance of every point of features [N, D] to its k-th nearest other point -> [N]."""
    if len(features) <= k:
        raise ValueError(f"need more than k = {k} points, got {len(features)}")
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    for i, dist in _pairwise_distances(features, features, batch_size):
        radii[i : i + len(dist)] = dist.kthvalue(k + 1, dim=1).values  # +1: the point itself at distance 0
    return radii


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of query points inside at least one support point's k-NN ball."""
    inside = 0
    for _, dist in _pairwise_distances(query, support, batch_size):
        inside += int((dist <= radii[None]).any(dim=1).sum())
    return inside / len(query)


def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 3,
    batch_size: int = 1024,
    real_radii: torch.Tensor | None = None,
) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds in a feature space.

    precision = fraction of fake points inside the real manifold (the union of balls around real points
    reaching their k-th nearest real neighbour); recall = fraction of real points inside the fake manifold.
    ``real_radii`` (from :func:`knn_radii`) can be passed to reuse a cached reference.
    """
    real = torch.as_tensor(real_features).float()
    fake = torch.as_tensor(fake_features).float().to(real.device)
    if real_radii is None:
        real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    return {
        "precision": _coverage(fake, real, real_radii.to(real.device), batch_size),
        "recall": _coverage(real, fake, fake_radii, batch_size),
    }


__all__: Sequence[str] = (
    "quantize_to_uint8",
    "uint8_to_tensor",
    "gaussian_statistics",
    "frechet_distance_from_statistics",
    "frechet_distance",
    "swd_levels",
    "sliced_wasserstein_distance",
    "knn_radii",
    "precision_recall",
)
