"""The in-repo feature network: a small ResNet classifier whose penultimate layer is the metric space.

No pretrained image-feature network (Inception, DINOv2) is available offline, so the project measures itself in
the feature space of a classifier trained on the real data (the FID recipe with a domain-specific network).
It is trained once (``python -m dfm_diffusers.evaluation train-classifier``), saved as safetensors + JSON with
its config, training settings and measured test accuracy, and reused by every score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .metrics import frechet_distance, uint8_to_tensor

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class FeatureClassifier(nn.Module):
    """ResNet-style classifier on [B, C, H, W] images in [-1, 1]; ``features(x)`` -> [B, widths[-1]] is the
    penultimate layer (global average pool of the last stage), the space all feature metrics use.

    Args:
        in_channels, num_classes: data shape.
        widths: channels of each stage; every stage after the first halves the resolution.
        blocks_per_stage: residual blocks per stage.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(32, 64, 128), blocks_per_stage: int = 2):
        super().__init__()
        self.config = dict(
            in_channels=int(in_channels), num_classes=int(num_classes), widths=[int(w) for w in widths],
            blocks_per_stage=int(blocks_per_stage),
        )
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, ch = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(_BasicBlock(ch, width, 2 if (i > 0 and j == 0) else 1))
                ch = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(ch, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierTrainingConfig:
    """Training recipe: AdamW with linear warmup + cosine decay, label smoothing, and augmentation by random
    crops of the image padded with background (-1) by ``crop_padding`` pixels and horizontal flips."""

    steps: int = 4000
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    warmup_steps: int = 200
    label_smoothing: float = 0.1
    crop_padding: int = 4
    random_flip: bool = True
    seed: int = 0
    widths: list = field(default_factory=lambda: [32, 64, 128])
    blocks_per_stage: int = 2


# Named training recipes (``train-classifier --preset``). "default" is the GPU recipe every published score uses;
# "cpu" is a smaller, shorter one for machines without a GPU, measured at 90.1% test accuracy on Fashion-MNIST
# 32 px, just above `score`'s default gate of 0.9 (docs/evaluation.md has the times). FD values are only comparable between samples scored
# with the same classifier.
CLASSIFIER_PRESETS = {
    "default": ClassifierTrainingConfig(),
    "cpu": ClassifierTrainingConfig(steps=2000, batch_size=128, learning_rate=3e-3, warmup_steps=100, crop_padding=2,
                                    widths=[16, 32, 64], blocks_per_stage=1),
}


def classifier_preset(name: str) -> ClassifierTrainingConfig:
    """A copy of the named training recipe in ``CLASSIFIER_PRESETS`` ("default" or "cpu")."""
    if name not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier preset {name!r}: choose one of {sorted(CLASSIFIER_PRESETS)}")
    return ClassifierTrainingConfig(**asdict(CLASSIFIER_PRESETS[name]))


def estimate_training_seconds(
    config: ClassifierTrainingConfig,
    in_channels: int,
    resolution: int,
    num_classes: int = 10,
    eval_images: int = 40000,
    device: str | torch.device = "cpu",
    timed_steps: int = 2,
) -> dict:
    """Time ``timed_steps`` training steps (after one warm-up step) and one 1024-image feature pass of a throwaway
    classifier with ``config`` on random data, and extrapolate to ``config.steps`` steps plus ``eval_images``
    evaluated images (``train_classifier_on_dataset`` evaluates about 40k: test and train accuracy, FD floor).

    Returns a dict with ``seconds_per_step``, ``train_seconds``, ``eval_seconds`` and ``total_seconds``.
    """
    model = FeatureClassifier(in_channels, num_classes, config.widths, config.blocks_per_stage).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(config.batch_size, in_channels, resolution, resolution, generator=generator).to(device) * 2 - 1
    y = torch.randint(0, num_classes, (config.batch_size,), generator=generator).to(device)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(timed_steps + 1):
        if step == 1:
            sync()
            start = time.perf_counter()
        loss = F.cross_entropy(model(augment(x, config.crop_padding, config.random_flip, generator)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    per_step = (time.perf_counter() - start) / max(1, timed_steps)
    model.eval()
    with torch.no_grad():
        batch = torch.rand(1024, in_channels, resolution, resolution, generator=generator).to(device)
        sync()
        start = time.perf_counter()
        model.features(batch)
        sync()
        per_image = (time.perf_counter() - start) / 1024
    train_seconds, eval_seconds = per_step * config.steps, per_image * eval_images
    return dict(seconds_per_step=per_step, train_seconds=train_seconds, eval_seconds=eval_seconds,
                total_seconds=train_seconds + eval_seconds)


def format_duration(seconds: float) -> str:
    """'45 s', '7 min', '1 h 52 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the -1-padded images (same size) and random horizontal flips, per image. [B, C, H, W]."""
    b, _, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding,) * 4, value=-1.0)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        images = padded[torch.arange(b, device=images.device)[:, None, None, None],
                        torch.arange(images.shape[1], device=images.device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def train_feature_classifier(
    images,
    labels,
    num_classes: int,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    config: ClassifierTrainingConfig | None = None,
    progress: bool = True,
) -> FeatureClassifier:
    """Train a FeatureClassifier; returns it in eval mode on ``device``.

    Args:
        images: uint8 [N, H, W, C] or float [N, C, H, W] in [-1, 1]; labels: [N] ints.
        steps, batch_size, lr, seed: shortcuts overriding the fields of ``config``.
    """
    config = ClassifierTrainingConfig() if config is None else ClassifierTrainingConfig(**asdict(config))
    for name, value in dict(steps=steps, batch_size=batch_size, learning_rate=lr, seed=seed).items():
        if value is not None:
            setattr(config, name, value)
    x = uint8_to_tensor(images) if isinstance(images, np.ndarray) else torch.as_tensor(images).float()
    y = torch.as_tensor(labels, dtype=torch.long)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = FeatureClassifier(x.shape[1], num_classes, config.widths, config.blocks_per_stage).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step):
        warmup = min(config.warmup_steps, config.steps // 10)  # a short run is not all warm-up
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, config.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    bar = tqdm(range(config.steps), desc="feature classifier", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(x), (config.batch_size,), generator=generator).to(device)
        batch = augment(x[idx], config.crop_padding, config.random_flip, generator)
        loss = F.cross_entropy(model(batch), y[idx], label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.training_config = asdict(config)
    return model.eval()


def _as_input(images) -> torch.Tensor:
    return uint8_to_tensor(images) if isinstance(images, np.ndarray) else torch.as_tensor(images)


@torch.no_grad()
def extract_features(model: FeatureClassifier, images, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features [N, D] (float32, CPU) of uint8 [N, H, W, C] or float [N, C, H, W] images."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model.features(_as_input(images[i : i + batch_size]).float().to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def predict(model: FeatureClassifier, images, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes [N] (CPU)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        out.append(model(_as_input(images[i : i + batch_size]).float().to(device)).argmax(1).cpu())
    return torch.cat(out)


def classifier_accuracy(model: FeatureClassifier, images, labels, batch_size: int = 1024) -> float:
    """Fraction of images whose predicted class is their label."""
    return float((predict(model, images, batch_size) == torch.as_tensor(labels).cpu()).double().mean())


def save_feature_classifier(model: FeatureClassifier, path: str | os.PathLike, test_accuracy: float, **info) -> None:
    """Write ``path/classifier.safetensors`` and ``path/classifier.json`` (model config, training settings,
    measured ``test_accuracy`` and any extra ``info``, e.g. the data set it was trained on)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_NAME))
    record = dict(model_config=model.config, training=getattr(model, "training_config", None),
                  test_accuracy=float(test_accuracy), **info)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(record, f, indent=2)


def load_feature_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu", min_test_accuracy: float | None = None
) -> FeatureClassifier:
    """Load a classifier written by :func:`save_feature_classifier`, in eval mode, with ``record`` (its JSON).

    Raises:
        FileNotFoundError: the folder lacks classifier.safetensors / classifier.json.
        ValueError: the JSON records no test accuracy (an unmeasured feature space is not a metric to trust), or
            one below ``min_test_accuracy``.
    """
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: train the feature classifier first with "
                f"`python -m dfm_diffusers.evaluation train-classifier --out {path}`"
            )
    with open(config_path) as f:
        record = json.load(f)
    accuracy = record.get("test_accuracy")
    if not isinstance(accuracy, (int, float)):
        raise ValueError(f"{config_path} records no test_accuracy: retrain it with `train-classifier`")
    if min_test_accuracy is not None and accuracy < min_test_accuracy:
        raise ValueError(
            f"feature classifier {path} has test accuracy {accuracy:.4f} < {min_test_accuracy}: retrain it longer "
            f"(train-classifier --steps), or accept it with a lower threshold (score --min-classifier-accuracy)"
        )
    model = FeatureClassifier(**record["model_config"])
    model.load_state_dict(load_file(weights_path))
    model.record = record
    return model.to(device).eval()


def train_classifier_on_dataset(
    out: str | os.PathLike | None,
    source: str = "fashion_mnist",
    resolution: int = 32,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    config: ClassifierTrainingConfig | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    estimate: bool = True,
) -> FeatureClassifier:
    """Train on the ``train`` split of a data set, measure accuracy on its ``test`` split, save to ``out``.

    With ``estimate``, logs the expected training + evaluation time (:func:`estimate_training_seconds`, timed
    on this device) before training starts.
    """
    from .data import dataset_images

    config = config or ClassifierTrainingConfig()
    train_x, train_y = dataset_images(source, "train", resolution, data_dir, max_samples, progress=progress)
    test_x, test_y = dataset_images(source, "test", resolution, data_dir, max_samples, progress=progress)
    if estimate:
        eta = estimate_training_seconds(config, train_x.shape[-1], resolution, int(train_y.max()) + 1,
                                        len(test_x) + min(len(train_x), 10000) + 2 * len(test_x), device)
        logger.info("feature classifier: about %s on %s (%d steps x %.2f s, timed just now, + %s evaluation)",
                    format_duration(eta["total_seconds"]), device, config.steps, eta["seconds_per_step"],
                    format_duration(eta["eval_seconds"]))
    start = time.perf_counter()
    model = train_feature_classifier(train_x, train_y, int(train_y.max()) + 1, device=device, config=config,
                                     progress=progress)
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, test_x, test_y)
    train_accuracy = classifier_accuracy(model, train_x[:10000], train_y[:10000])
    # the FD floor: real training images against the real test images
    fd_floor = frechet_distance(extract_features(model, train_x[: len(test_x)]), extract_features(model, test_x))
    logger.info("feature classifier: test accuracy %.4f after %d steps (%.0f s); FD(train, test) = %.3f",
                accuracy, config.steps, seconds, fd_floor)
    if out is not None:
        save_feature_classifier(
            model, out, accuracy, train_accuracy_first_10k=train_accuracy, fd_train_vs_test=fd_floor,
            train_seconds=round(seconds, 1),
            device=str(device), dataset=dict(source=source, resolution=resolution, train_images=len(train_x),
                                             test_images=len(test_x)),
        )
    model.record = dict(test_accuracy=accuracy)
    return model


def load_or_train_classifier(path: str | os.PathLike, device: str | torch.device = "cpu", **train_kwargs):
    """The classifier saved at ``path``, training and saving it there first if there is none."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return load_feature_classifier(path, device)
    train_classifier_on_dataset(path, device=device, **train_kwargs)
    return load_feature_classifier(path, device)
