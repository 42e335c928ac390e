"""Class-conditional DFM-DiT training (the paper's ImageNet recipe), used by train_dfm_dit.py.

Everything generic (optimizer, EMA, checkpoints, logging) is in :mod:`.loop`; the DFM objective is in
:mod:`.objective`. ``num_stages: 1`` trains the plain flow-matching baseline through the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import set_seed

from ..data.bad_samples import report_bad_samples
from ..decomposition import LaplacianDecomposition
from ..schedulers import DFMScheduler
from ..visualize import image_grid, line_plot
from .config import flat_hparams
from .loop import LoopConfig, run_training
from .objective import DFMObjectiveConfig, dfm_objective


@dataclass
class DiTTrainingConfig(LoopConfig, DFMObjectiveConfig):
    """All settings of train_dfm_dit.py (YAML keys / --overrides). The DFM training-distribution fields
    (stage_weights, logit_mean, ..., stage_loss_weights) come from :class:`.objective.DFMObjectiveConfig`."""

    output_dir: str = "outputs/dfm-dit"
    # data
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    split: str = "train"
    image_column: str | None = None
    label_column: str | None = None
    resolution: int = 32
    center_crop: bool = True
    random_flip: bool = False
    max_samples: int | None = None
    max_bad_sample_fraction: float = 0.05  # unreadable images are skipped (and counted) up to this fraction
    vae: str | None = None
    vae_subfolder: str | None = None
    # model
    model: str = "DFM-DiT-B/2"
    model_kwargs: dict = field(default_factory=dict)
    num_stages: int | None = None
    stage_factors: int | list = 2
    # decomposition (the DFM training distribution's fields are DFMObjectiveConfig's)
    stage_scales: list | None = None
    decomposition_antialias: bool = False
    # sampling during training and for the exported pipeline
    steps_per_stage: list | None = None
    stage_thresholds: list | None = None
    sample_guidance_scale: float = 1.0
    sample_class_labels: list | None = None
    # hub
    push_to_hub: bool = False
    hub_model_id: str | None = None


def build_dataset(config: DiTTrainingConfig):
    from ..data import build_image_dataset

    return build_image_dataset(
        config.dataset,
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        split=config.split,
        image_column=config.image_column,
        label_column=config.label_column,
        max_samples=config.max_samples,
        data_dir=config.data_dir,
        max_bad_fraction=config.max_bad_sample_fraction,
    )


def load_vae(config: DiTTrainingConfig, device):
    if not config.vae:
        return None
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(config.vae, subfolder=config.vae_subfolder)
    return vae.to(device).eval().requires_grad_(False)


def build_model(config: DiTTrainingConfig, in_channels: int, sample_size: int, num_classes: int):
    """The preset named by ``config.model`` sized for the data; stage settings are checked here."""
    import inspect

    from ..models.transformer_dfm_dit import DFMDiTTransformer2DModel

    known = set(inspect.signature(DFMDiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(config.model_kwargs) - known)
    if unknown:
        raise ValueError(f"model_kwargs has unknown keys {unknown}; DFMDiTTransformer2DModel takes {sorted(known)}")
    overrides = dict(config.model_kwargs)
    overrides.update(in_channels=in_channels, sample_size=sample_size, num_classes=num_classes)
    if config.num_stages is not None:
        overrides["num_stages"] = config.num_stages
    overrides.setdefault("stage_factors", config.stage_factors)
    overrides.setdefault("stage_scales", config.stage_scales)
    overrides.setdefault("decomposition_antialias", config.decomposition_antialias)
    return DFMDiTTransformer2DModel.from_preset(config.model, **overrides)


class DiTTask:
    """The DFM-DiT pieces the shared loop calls: loss, sample grids, export."""

    def __init__(self, config: DiTTrainingConfig, model, vae=None):
        self.config, self.vae = config, vae
        mc = model.config
        self.num_stages = mc.num_stages
        self.decomposition = LaplacianDecomposition.from_config(mc)  # the one the pipeline will use
        self.decomposition.stage_shapes(mc.sample_size, mc.sample_size)
        config.validate_objective(mc.num_stages)
        self.scheduler = DFMScheduler(
            num_stages=mc.num_stages, steps_per_stage=config.steps_per_stage, stage_thresholds=config.stage_thresholds
        )
        labels = config.sample_class_labels
        if labels is None:
            labels = [i % mc.num_classes for i in range(min(mc.num_classes, 10))]
        self.sample_labels = labels
        self.samples_dir = os.path.join(config.output_dir, "samples")

    def loss_fn(self, model, batch):
        x = batch["latents"] if "latents" in batch else batch["pixel_values"]
        bands = self.decomposition.decompose(x)

        def predict(inputs, draw):
            return model(
                inputs, timestep=draw.sigmas, num_active_stages=draw.num_active_stages,
                class_labels=batch["class_labels"], return_dict=False,
            )[0]

        out = dfm_objective(self.config, bands, predict)
        return out.loss, out.logs

    def pipeline(self, model):
        from ..pipelines.pipeline_dfm_dit import DFMDiTPipeline

        return DFMDiTPipeline(transformer=model, scheduler=self.scheduler, vae=self.vae)

    def generate(self, model, seed: int = 0):
        """Samples and per-stage previews (tensors in [0, 1]) for the configured class labels."""
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            class_labels=self.sample_labels, guidance_scale=self.config.sample_guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(seed), output_type="pt", return_previews=True,
        )
        return out.images, out.previews

    def sample_fn(self, model, step: int):
        os.makedirs(self.samples_dir, exist_ok=True)
        images, previews = self.generate(model)
        # rows: the preview after each stage (coarse to fine); the last row is the final sample
        image_grid(previews, size=images.shape[-1] * 2, value_range=(0, 1)).save(
            os.path.join(self.samples_dir, f"step_{step:07d}.png")
        )

    def export_fn(self, model, folder: str):
        pipe = self.pipeline(model)
        pipe.save_pretrained(folder)
        if self.config.push_to_hub:
            repo = self.config.hub_model_id or os.path.basename(os.path.abspath(self.config.output_dir))
            pipe.push_to_hub(repo)


def write_loss_curve(log_rows: list[dict], path: str, num_stages: int, title: str = "DFM-DiT training loss (log10)"):
    """loss_curve.png: total loss and per-stage terms over training steps (log scale)."""
    if not log_rows:
        return
    steps = [r["step"] for r in log_rows]
    series = {"loss": [r["loss"] for r in log_rows]}
    for s in range(num_stages):
        key = f"loss_stage_{s}"
        if num_stages > 1 and all(key in r for r in log_rows):
            series[f"stage {s} term"] = [max(r[key], 1e-8) for r in log_rows]
    line_plot(series, x=steps, title=title, logy=True).save(path)


def train_dit(config: DiTTrainingConfig) -> dict:
    """Build data, model and task from ``config`` (all checks before any training) and train."""
    from ..models.transformer_dfm_dit import DIT_PRESETS

    if config.model not in DIT_PRESETS:  # before loading a possibly large data set
        raise ValueError(f"unknown model {config.model!r}; known models: {', '.join(DIT_PRESETS)}")
    dataset = build_dataset(config)
    vae = load_vae(config, "cpu")
    from ..data.latents import LatentShardDataset

    if vae is not None and not isinstance(dataset, LatentShardDataset):
        raise ValueError(
            "latent-space training reads pre-encoded latents: encode the dataset first with "
            "`python -m dfm_diffusers.data encode --vae ...` and pass the shard folder as --dataset"
        )
    sample = dataset[0]
    x = sample["latents"] if "latents" in sample else sample["pixel_values"]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"training images must be square, got {tuple(x.shape)}")
    # Seed before building: the initial weights come from the global RNG, so without this two runs with the same
    # seed start from different weights (run_training seeds again, after the model exists, for the training draws).
    set_seed(config.seed)
    model = build_model(config, in_channels=x.shape[0], sample_size=x.shape[-1], num_classes=dataset.num_classes)
    task = DiTTask(config, model, vae=vae)
    result = run_training(
        config, model, dataset, task.loss_fn, sample_fn=task.sample_fn, export_fn=task.export_fn,
        hparams=flat_hparams(config),
    )
    write_loss_curve(result["log"], os.path.join(config.output_dir, "loss_curve.png"), model.config.num_stages)
    result["bad_samples"] = report_bad_samples(dataset)
    return result
