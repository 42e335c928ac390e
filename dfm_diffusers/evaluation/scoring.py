"""Score uint8 samples against a reference set: FD, SWD per pyramid level, precision/recall, class agreement."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .classifier import FeatureClassifier, extract_features, predict
from .metrics import (
    frechet_distance_from_statistics,
    gaussian_statistics,
    knn_radii,
    precision_recall,
    sliced_wasserstein_distance,
)


@dataclass
class Reference:
    """A reference image set with its features in one classifier's space, computed once and reused.

    images: uint8 [N, H, W, C]; labels: [N] or None; features: [N, D]; mean/cov: their Gaussian statistics;
    radii: k-NN radii (k = ``k``) for precision/recall.
    """

    images: np.ndarray
    labels: np.ndarray | None
    features: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    radii: torch.Tensor
    k: int = 3
    name: str = ""

    @classmethod
    def build(cls, images: np.ndarray, labels, classifier: FeatureClassifier, k: int = 3, name: str = ""):
        features = extract_features(classifier, images)
        mean, cov = gaussian_statistics(features)
        return cls(np.asarray(images), None if labels is None else np.asarray(labels), features, mean, cov,
                   knn_radii(features, k), k, name)

    def save(self, path: str | os.PathLike) -> None:
        """Cache to an .npz (the features belong to the classifier they were computed with)."""
        np.savez(path, images=self.images, labels=self.labels if self.labels is not None else np.zeros(0),
                 features=self.features.numpy(), radii=self.radii.numpy(), k=self.k, name=np.array(self.name))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reference":
        with np.load(path) as data:
            features = torch.from_numpy(data["features"])
            mean, cov = gaussian_statistics(features)
            labels = data["labels"] if data["labels"].size else None
            return cls(data["images"], labels, features, mean, cov, torch.from_numpy(data["radii"]),
                       int(data["k"]), str(data["name"]))


def score_images(
    images: np.ndarray,
    labels: np.ndarray | None,
    reference: Reference | np.ndarray,
    classifier: FeatureClassifier,
    swd_seed: int = 0,
    swd_kwargs: dict | None = None,
    device: str | torch.device | None = None,
    inception_weights: str | None = None,
    dinov2: str | None = None,
) -> dict:
    """All metrics of uint8 samples [N, H, W, C] against a reference (a :class:`Reference`, or uint8 images).

    Returns a JSON-able dict: ``fd`` (Frechet distance in the classifier's penultimate features), ``swd``
    (``{"levels": {resolution: SWD x 1e3}, "mean": ...}``, finest level first), ``precision`` / ``recall``
    (k-NN, k = reference.k), ``class_agreement`` (classifier accuracy on the samples vs their labels; None
    without labels), the sample counts, and ``inception_fid`` / ``dinov2_fd`` when their weights are given.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 [N, H, W, C] (quantize with quantize_to_uint8), got "
                         f"{images.dtype} {images.shape}")
    if not isinstance(reference, Reference):
        reference = Reference.build(np.asarray(reference), None, classifier)
    if images.shape[1:] != reference.images.shape[1:]:
        raise ValueError(f"samples {images.shape[1:]} and reference {reference.images.shape[1:]} differ in shape")
    if device is None:
        device = next(classifier.parameters()).device
    features = extract_features(classifier, images)
    mean, cov = gaussian_statistics(features)
    result = {
        "num_samples": len(images),
        "num_reference": len(reference.images),
        "reference": reference.name,
        "fd": frechet_distance_from_statistics(mean, cov, reference.mean, reference.cov),
        "swd": sliced_wasserstein_distance(images, reference.images, seed=swd_seed, device=device,
                                           **(swd_kwargs or {})),
        **precision_recall(reference.features.to(device), features.to(device), k=reference.k,
                           real_radii=reference.radii.to(device)),
        "class_agreement": None,
    }
    if labels is not None:
        result["class_agreement"] = float((predict(classifier, images) == torch.as_tensor(labels)).double().mean())
    if inception_weights is not None:
        from .pretrained import inception_fid

        result["inception_fid"] = inception_fid(reference.images, images, inception_weights, device=device)
    if dinov2 is not None:
        from .pretrained import dinov2_frechet_distance

        result["dinov2_fd"] = dinov2_frechet_distance(reference.images, images, dinov2, device=device)
    return result
