"""Class-conditional DFM-DiT training (the paper's ImageNet recipe), used by train_dfm_dit.py.

Everything generic (optimizer, EMA, checkpoints, logging) is in :mod:`.loop`; the DFM objective is in
:mod:`.objective`. ``num_stages: 1`` trains the plain flow-matching baseline through the same code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate.utils import set_seed

from ..data.bad_samples import report_bad_samples
from ..decomposition import LaplacianDecomposition
from ..schedulers import DFMScheduler
from ..visualize import image_grid, line_plot
from ..utils import normalize_stage_factors
from .config import (
    ConfigError, HubExportConfig, check_config, did_you_mean, finite, flat_hparams, positive_int, require, setting,
    stage_list_problems,
)
from .loop import LoopConfig, run_training
from .objective import DFMObjectiveConfig, dfm_objective


@dataclass
class DiTTrainingConfig(LoopConfig, DFMObjectiveConfig, HubExportConfig):
    """All settings of train_dfm_dit.py (YAML keys / --overrides). The DFM training-distribution fields
    (stage_weights, logit_mean, ..., stage_loss_weights) come from :class:`.objective.DFMObjectiveConfig`."""

    output_dir: str = "outputs/dfm-dit"
    # data
    dataset: str = setting(
        "fashion_mnist", "'fashion_mnist', a folder of class subfolders of images, a latent shard folder or a data set"
    )
    data_dir: str | None = setting(None, "Fashion-MNIST: folder of its IDX files; others: the data set's data_dir")
    split: str = setting("train", "data set split")
    image_column: str | None = setting(None, "image column of a data set (default: found by name)")
    label_column: str | None = setting(None, "class label column of a data set (default: found by name)")
    resolution: int = setting(
        32, "training image size in pixels (square); with no VAE divisible by the finest stage's patch size"
    )
    center_crop: bool = setting(True, "center crop (else random crop) to resolution")
    random_flip: bool = setting(False, "random horizontal flips")
    max_samples: int | None = setting(None, "use only the first N samples")
    preload: Literal["auto", "device", "cpu", "off"] = setting(
        "auto", "decode the data set once and keep it as tensors, read a batch at a time: device (in GPU memory), "
        "cpu (in RAM), auto (device when it takes <= 20% of the GPU memory, else RAM when <= half the free RAM, "
        "else off) or off (samples read one by one). The samples are the same either way; preloaded batches are "
        "read in the training process (dataloader_num_workers then only decode the preload)"
    )
    max_bad_sample_fraction: float = setting(
        0.05, "unreadable images are skipped (each named) up to this fraction of the data set"
    )
    vae: str | None = setting(None, "AutoencoderKL folder or Hub id for latent-space training (data: encoded shards)")
    vae_subfolder: str | None = setting(None, "subfolder of the VAE, e.g. 'vae'")
    # model
    model: str = setting("DFM-DiT-B/2", "DiT preset: DiT-{T,S,B,L,XL}/{1,2,4,8} (1 stage) or DFM-DiT-*/{2,4,8}")
    model_kwargs: dict = setting(
        help="DFMDiTTransformer2DModel arguments overriding the preset, e.g. {num_layers: 2}", default_factory=dict
    )
    num_stages: int | None = setting(None, "number of DFM stages (default: the preset's; 1 = flow-matching baseline)")
    stage_factors: int | list[int] = setting(2, "resolution factor between consecutive stages (int or S - 1 ints)")
    # decomposition (the DFM training distribution's fields are DFMObjectiveConfig's)
    stage_scales: list[float] | str | None = setting(
        "auto", "per-stage standardization: auto (default; each band divided by its std, estimated from "
        "stage_scales_samples training examples before training; no-op with 1 stage), auto_relative (detail bands "
        "brought to stage 0's std), S positive floats, or null (bands as they are). RESULTS.md: auto beats null"
    )
    stage_scales_samples: int = setting(4096, "training examples used to estimate stage_scales auto / auto_relative")
    decomposition_antialias: bool = setting(False, "antialiased downsampling in the Laplacian decomposition")
    # sampling during training and for the exported pipeline
    steps_per_stage: list[int] | None = setting(None, "sampling steps of each stage (scheduler default: [30, 10])")
    stage_thresholds: list[float] | None = setting(None, "sigma at which each later stage starts (S - 1 values)")
    sample_guidance_scale: float = setting(1.0, "classifier-free guidance scale of the sample grids")
    sample_class_labels: list[int] | None = setting(None, "class labels of the sample grids (default: first 10)")
    save_pipeline_at_validation: bool = setting(
        False, "also export the EMA pipeline to <output_dir>/pipeline-<step> at every validation step"
    )
    # hub (push_to_hub, hub_model_id, self_contained_export: HubExportConfig)

    def validate(self) -> list[str]:
        """Range and consistency checks, before any data or model is loaded: the model preset, the stage lists
        against the number of stages, the resolution against the stages' patch sizes, the sample class labels."""
        from ..models.transformer_dfm_dit import DIT_PRESETS

        problems = require(bool(self.dataset), "dataset", "must name a data set")
        problems += positive_int(self, "resolution") + positive_int(self, "max_samples", optional=True)
        problems += finite(self, "sample_guidance_scale", low=0.0)
        problems += finite(self, "max_bad_sample_fraction", low=0.0, high=1.0)
        if self.preload in ("cpu", "device") and not self.center_crop and not _is_latent_dir(self.dataset):
            problems.append(f"preload: {self.preload} keeps one decoded copy per image, which random crops "
                            "(center_crop: false) cannot use; set preload auto or off, or center_crop true")
        problems += positive_int(self, "num_stages", optional=True)
        problems += [f"model_kwargs: {p}" for p in model_kwargs_problems(self.model_kwargs)]
        labels = self.sample_class_labels
        num_classes = KNOWN_NUM_CLASSES.get(self.dataset)
        if labels is not None:
            problems += require(len(labels) > 0, "sample_class_labels", "must hold at least one label (or be null)")
            problems += sample_label_problems(labels, num_classes, self.dataset)
        if self.model not in DIT_PRESETS:
            return problems + [
                f"model: unknown model {self.model!r}; known models: {', '.join(DIT_PRESETS)}"
                f"{did_you_mean(self.model, DIT_PRESETS)}"
            ]
        preset = {**DIT_PRESETS[self.model], **self.model_kwargs}
        num_stages = self.num_stages if self.num_stages is not None else preset["num_stages"]
        if not (isinstance(num_stages, int) and num_stages >= 1):
            return problems
        problems += stage_list_problems(self, num_stages)
        try:
            factors = normalize_stage_factors(num_stages, self.model_kwargs.get("stage_factors", self.stage_factors))
        except (ValueError, TypeError) as e:
            if not any(p.startswith("stage_factors:") for p in problems):
                problems.append(f"stage_factors: {e}")
            return problems
        patch = preset["patch_size"]
        total = math.prod(factors)
        problems += require(
            patch % total == 0, "num_stages" if self.num_stages is not None else "stage_factors",
            f"{num_stages} stages with factors {factors} need the finest patch size to be divisible by {total}, but "
            f"{self.model}'s is {patch}: the coarsest stage's patch size would be fractional",
        )
        if not self.vae and isinstance(self.resolution, int) and self.resolution > 0:  # latents: checked on the shards
            problems += require(
                self.resolution % patch == 0, "resolution",
                f"{self.resolution} must be divisible by {patch}, the finest stage's patch size of {self.model} "
                f"(stage factors {factors})",
            )
        return problems


#: Class counts of the built-in data sets, known before they are read.
KNOWN_NUM_CLASSES = {"fashion_mnist": 10}


def sample_label_problems(labels, num_classes: int | None, dataset: str) -> list[str]:
    """``sample_class_labels: ...`` for labels < 0 or (where the data set's class count is known) too large."""
    bad = [c for c in labels if c < 0 or (num_classes is not None and c >= num_classes)]
    if not bad:
        return []
    allowed = f"0 .. {num_classes - 1} ({dataset} has {num_classes} classes)" if num_classes else ">= 0"
    return [f"sample_class_labels: labels must be in {allowed}, got {bad}"]


def model_kwargs_problems(model_kwargs: dict) -> list[str]:
    """Keys of ``model_kwargs`` that DFMDiTTransformer2DModel does not take."""
    import inspect

    from ..models.transformer_dfm_dit import DFMDiTTransformer2DModel

    known = set(inspect.signature(DFMDiTTransformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(set(model_kwargs) - known)
    if not unknown:
        return []
    hints = "".join(did_you_mean(k, known) for k in unknown)
    return [f"unknown keys {unknown}{hints}; DFMDiTTransformer2DModel takes {sorted(known)}"]


def _is_latent_dir(source) -> bool:
    from ..data.latents import is_latent_dir

    return isinstance(source, str) and is_latent_dir(source)


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
    from ..models.transformer_dfm_dit import DFMDiTTransformer2DModel

    problems = model_kwargs_problems(config.model_kwargs)
    if problems:
        raise ConfigError([f"model_kwargs: {p}" for p in problems], type(config).__name__)
    overrides = dict(config.model_kwargs)
    overrides.update(in_channels=in_channels, sample_size=sample_size, num_classes=num_classes)
    if config.num_stages is not None:
        overrides["num_stages"] = config.num_stages
    overrides.setdefault("stage_factors", config.stage_factors)
    overrides.setdefault("stage_scales", None if isinstance(config.stage_scales, str) else config.stage_scales)
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
        grid = image_grid(previews, size=images.shape[-1] * 2, value_range=(0, 1))
        grid.save(os.path.join(self.samples_dir, f"step_{step:07d}.png"))
        if self.config.save_pipeline_at_validation:
            self.pipeline(model).save_pretrained(os.path.join(self.config.output_dir, f"pipeline-{step}"))
        return {"validation/samples_with_stage_previews": grid.convert("RGB")}  # logged to the trackers by the loop

    def export_fn(self, model, folder: str):
        pipe = self.pipeline(model)
        pipe.save_pretrained(folder, self_contained=self.config.self_contained_export)
        if self.config.push_to_hub:
            repo = self.config.hub_model_id or os.path.basename(os.path.abspath(self.config.output_dir))
            pipe.push_to_hub(repo, self_contained=self.config.self_contained_export)


def write_loss_curve(log_rows: list[dict], path: str, num_stages: int, title: str = "DFM-DiT training loss"):
    """loss_curve.png (matplotlib, log y, smoothed): the total loss and, with several stages, each stage's
    conditional loss ``mse_stage_<s>`` (its velocity MSE over the samples where it is in the loss)."""
    if not log_rows:
        return
    series = {"loss": ([r["step"] for r in log_rows], [r["loss"] for r in log_rows])}
    for s in range(num_stages if num_stages > 1 else 0):
        rows = [r for r in log_rows if f"mse_stage_{s}" in r]
        if rows:
            series[f"stage {s} (where active)"] = ([r["step"] for r in rows], [r[f"mse_stage_{s}"] for r in rows])
    line_plot(
        series, path, title=title, xlabel="step", ylabel="velocity MSE", logy=True,
        smoothing=max(0.0, min(0.95, 1 - 20 / len(log_rows))),
    )


def resolve_stage_scales(config, model, dataset, vae=None, device=None) -> dict:
    """``stage_scales: auto`` / ``auto_relative``: estimate the scales from ``dataset`` (the training data, same
    transform) with the model's decomposition, store them in the model's config (so the exported pipeline and the
    previews use them) and print them. Returns hparams to log (empty when the scales are not estimated).
    With one stage there are no bands to balance: the data stays as it is, so ``num_stages: 1`` remains plain flow
    matching (the baseline) whatever ``stage_scales`` says."""
    from ..data.band_stats import estimate_stage_scales

    if not isinstance(config.stage_scales, str) or model.config.num_stages == 1:
        return {}
    decomposition = LaplacianDecomposition.from_config(model.config)
    scales, stats = estimate_stage_scales(
        config.stage_scales, dataset, decomposition, num_samples=config.stage_scales_samples, vae=vae, device=device,
        num_workers=config.dataloader_num_workers,
        batch_size=256 if vae is None else config.train_batch_size,  # the VAE encodes a training batch at a time
    )
    model.register_to_config(stage_scales=scales)
    print(f"stage_scales {config.stage_scales} from {stats.num_samples} training examples:\n{stats.table()}")
    print(f"stage_scales = {[round(v, 6) for v in scales]}")
    hparams = {"stage_scales": str([round(v, 6) for v in scales])}
    hparams.update({f"stage_scale_{s}": v for s, v in enumerate(scales)})
    hparams.update({f"band_std_{s}": v for s, v in enumerate(stats.std)})
    return hparams


def train_dit(config: DiTTrainingConfig) -> dict:
    """Build data, model and task from ``config`` (all checks before any training) and train."""
    check_config(config)  # every settings problem at once, before a possibly large data set or model is loaded
    dataset = build_dataset(config)
    if config.sample_class_labels is not None:
        problems = sample_label_problems(config.sample_class_labels, dataset.num_classes, config.dataset)
        if problems:
            raise ConfigError(problems, type(config).__name__)
    vae = load_vae(config, "cpu")
    from ..data.latents import LatentShardDataset

    if vae is not None and not isinstance(dataset, LatentShardDataset):
        raise ValueError(
            "latent-space training reads pre-encoded latents: encode the dataset first with "
            "`python -m dfm_diffusers.data encode --vae ...` and pass the shard folder as --dataset"
        )
    from ..data.preload import preload_dataset

    dataset = preload_dataset(dataset, config.preload, num_workers=config.dataloader_num_workers)
    sample = dataset[0]
    x = sample["latents"] if "latents" in sample else sample["pixel_values"]
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"training images must be square, got {tuple(x.shape)}")
    # Seed before building: the initial weights come from the global RNG, so without this two runs with the same
    # seed start from different weights (run_training seeds again, after the model exists, for the training draws).
    set_seed(config.seed)
    model = build_model(config, in_channels=x.shape[0], sample_size=x.shape[-1], num_classes=dataset.num_classes)
    hparams = {**flat_hparams(config), **resolve_stage_scales(config, model, dataset)}
    task = DiTTask(config, model, vae=vae)
    result = run_training(
        config, model, dataset, task.loss_fn, sample_fn=task.sample_fn, export_fn=task.export_fn, hparams=hparams,
    )
    write_loss_curve(result["log"], os.path.join(config.output_dir, "loss_curve.png"), model.config.num_stages)
    result["bad_samples"] = report_bad_samples(dataset)
    return result
