import math

import torch

from dfm_diffusers.evaluation import FeatureClassifier, classifier_accuracy, frechet_distance, train_feature_classifier


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    n, d = 200000, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-9
    # N(mu_a, diag(s_a^2)) vs N(mu_b, diag(s_b^2)): |mu_a - mu_b|^2 + sum (s_a - s_b)^2
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 3.0])
    mu_a, mu_b = torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    x = mu_a + s_a * torch.randn(n, d, generator=g)
    y = mu_b + s_b * torch.randn(n, d, generator=g)
    expected = float((mu_a - mu_b).pow(2).sum() + (s_a - s_b).pow(2).sum())
    assert math.isclose(frechet_distance(x, y), expected, rel_tol=0.02)
    # symmetric, and invariant to a common rotation
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    assert math.isclose(frechet_distance(y, x), frechet_distance(x, y), rel_tol=1e-6)
    assert math.isclose(frechet_distance(x @ q, y @ q), frechet_distance(x, y), rel_tol=1e-6)


def test_feature_classifier_learns_a_separable_toy_task():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (512,), generator=g)
    images = torch.randn(512, 1, 16, 16, generator=g) * 0.3
    images[labels == 1, :, :8] += 1.0  # class 1: bright top half
    model = train_feature_classifier(images, labels, 2, steps=60, batch_size=64, lr=3e-3)
    assert isinstance(model, FeatureClassifier) and model.features(images[:3]).shape == (3, 128)
    assert classifier_accuracy(model, images, labels) > 0.95
