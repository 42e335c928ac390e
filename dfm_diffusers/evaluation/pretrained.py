"""Inception FID and DINOv2 Frechet distance (FDD), computed only with weights the user supplies.

Neither network ships with the library and none can be downloaded offline: with no weights these functions
raise :class:`MissingWeightsError` with what to pass; they never fall back to another feature space.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import frechet_distance

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(ValueError):
    """A pretrained-feature metric was asked for without the network's weights."""


def _rgb_uint8_nchw(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def inception_fid(
    real_images: np.ndarray,
    fake_images: np.ndarray,
    weights_path: str | None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> float:
    """FID (torchmetrics' FrechetInceptionDistance, 2048-d pool features) between uint8 [N, H, W, C] sets.

    Args:
        weights_path: local file of the FID Inception-v3 weights (torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``), passed as torchmetrics' ``feature_extractor_weights_path``.
            torchmetrics builds the network with torch-fidelity, which must be installed.
    """
    if not weights_path:
        raise MissingWeightsError(
            "Inception FID needs the FID Inception-v3 weights as a local file (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth): pass weights_path / --inception-fid PATH. "
            "They are not bundled and cannot be downloaded offline; no other network is substituted."
        )
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights file {weights_path} does not exist")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=os.fspath(weights_path))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"Inception FID uses torchmetrics' InceptionV3, which needs torch-fidelity: `pip install torch-fidelity` "
            f"({err})"
        ) from err
    metric = metric.to(device)
    for images, real in ((real_images, True), (fake_images, False)):
        for i in range(0, len(images), batch_size):
            metric.update(_rgb_uint8_nchw(images[i : i + batch_size]).to(device), real=real)
    return float(metric.compute())


def load_dinov2(model_name_or_path: str | None, device: str | torch.device = "cpu"):
    """A transformers Dinov2Model from a local folder or Hub id, in eval mode."""
    if not model_name_or_path:
        raise MissingWeightsError(
            "DINOv2 FD needs a DINOv2 model: pass a local folder or a Hugging Face Hub id (e.g. "
            "facebook/dinov2-large, the FDD network of Stein et al. 2023) as model_name_or_path / --dinov2-fd. "
            "No weights are bundled; no other network is substituted."
        )
    from transformers import Dinov2Model

    try:
        model = Dinov2Model.from_pretrained(model_name_or_path)
    except OSError as err:
        raise OSError(f"could not load a DINOv2 model from {model_name_or_path!r} (a local folder with "
                      f"config.json + weights, or a Hub id reachable online): {err}") from err
    return model.to(device).eval()


@torch.no_grad()
def dinov2_features(model, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """CLS features (``pooler_output``: the final layer-normed CLS token) [N, hidden] of uint8 [N, H, W, C]
    images, resized (bicubic, antialiased) to the model's ``image_size`` and ImageNet-normalized."""
    device = next(model.parameters()).device
    size = model.config.image_size
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    out = []
    for i in range(0, len(images), batch_size):
        x = _rgb_uint8_nchw(images[i : i + batch_size]).to(device).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        out.append(model(pixel_values=(x - mean) / std).pooler_output.float().cpu())
    return torch.cat(out)


def dinov2_frechet_distance(
    real_images: np.ndarray,
    fake_images: np.ndarray,
    model_name_or_path: str | None,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
) -> float:
    """FD_DINOv2 (FDD): the Frechet distance between DINOv2 CLS features of two uint8 [N, H, W, C] sets."""
    model = load_dinov2(model_name_or_path, device)
    return frechet_distance(dinov2_features(model, real_images, batch_size),
                            dinov2_features(model, fake_images, batch_size))
