"""Sample-quality metrics that work offline.

No pretrained image-feature network (Inception, DINOv2) is available offline, so the project measures itself with
the Frechet distance in the feature space of a small classifier it trains on the real data (``FeatureClassifier``),
the same recipe as FID with a domain-specific feature extractor. ``frechet_distance`` is the standard closed
form and works on any features (e.g. Inception pool features when a user supplies the network).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D]:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh((m + m.T) / 2)
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


class FeatureClassifier(nn.Module):
    """Small CNN classifier; ``features(x)`` ([B, C, H, W] in [-1, 1] -> [B, feature_dim]) is the metric space."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, feature_dim, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FeatureClassifier:
    """Train a FeatureClassifier on images [N, C, H, W] in [-1, 1] with labels [N]; returns it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FeatureClassifier(images.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="feature classifier", leave=False):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def extract_features(model: FeatureClassifier, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.features(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_accuracy(model: FeatureClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    return correct / len(images)
