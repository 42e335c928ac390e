"""Text-to-image DFM finetuning of FLUX (paper appendix E), used by train_dfm_flux.py: :func:`train_flux` builds the
data set, the pipeline and the :class:`FluxTask` (all checks first) and trains with the shared loop
(:func:`.loop.run_training`). Settings: :class:`.flux_config.FluxTrainingConfig`; recipes and what a step does:
docs/flux_finetuning.md.
"""

from __future__ import annotations

import logging
import os

import torch

from ..data.bad_samples import report_bad_samples
from ..pipelines.lora_export import LORA_WEIGHT_NAME  # noqa: F401  (public here too)
from .config import ConfigError, check_config, flat_hparams, require, stage_list_problems
from .dit import resolve_stage_scales, write_loss_curve
from .flux_config import (  # noqa: F401  (names re-exported here: this module's public API before the split)
    DTYPES,
    FLUX_ATTENTION_PROJECTIONS,
    FluxTrainingConfig,
    _resolution_check,
    _validation_size_problems,
    inspect_pretrained,
    resolution_multiple,
)
from .flux_model import load_dfm_pipeline, patchify_parameter_names, prepare_trainable  # noqa: F401
from .flux_task import FluxTask, distributed_state
from .loop import run_training

logger = logging.getLogger(__name__)


def build_flux_dataset(config: FluxTrainingConfig, info: dict | None = None):
    """The captioned image data set; with ``resolutions``, in aspect buckets whose sides fit the stages."""
    from ..data.buckets import make_buckets
    from ..data.captions import build_captioned_image_dataset

    buckets = None
    if config.resolutions:
        info = info or inspect_pretrained(config, check_resolution=False)
        buckets = make_buckets(config.resolutions, config.aspect_ratios, resolution_multiple(info))
    return build_captioned_image_dataset(
        config.dataset, resolution=config.resolution, caption_column=config.caption_column,
        image_column=config.image_column, split=config.split, center_crop=config.center_crop,
        random_flip=config.random_flip, max_samples=config.max_samples, data_dir=config.data_dir,
        max_bad_fraction=config.max_bad_sample_fraction, allow_empty_captions=config.allow_empty_captions,
        buckets=buckets, upscale_small_images=config.upscale_small_images,
    )


def build_flux_task(config: FluxTrainingConfig):
    """Check everything, then build (task, dataset): config -> pipeline files -> data set -> model (loaded, LoRA
    added). Every ValueError for bad settings or data is raised here, before training."""
    from accelerate.utils import set_seed

    check_config(config)  # every settings problem at once, before the data set or any model is loaded
    info = inspect_pretrained(config, check_resolution=False)  # a Hub id's config files are first read here
    problems = stage_list_problems(config, info["num_stages"]) + require(*_resolution_check(config.resolution, info))
    problems += _validation_size_problems(config, info)
    problems += require(
        not (info["kind"] == "flux" and config.new_stage_init == "band_split" and config.stage_scales is not None),
        "stage_scales", "must stay unset with new_stage_init band_split (the band-split model is FLUX on the "
        "recomposed latent, in FLUX's units); use new_stage_init x_embedder to standardize the bands")
    if problems:
        raise ConfigError(problems, type(config).__name__)
    dataset = build_flux_dataset(config, info)
    set_seed(config.seed)  # the conversion initialises the new stage layers from the global RNG
    pipe = load_dfm_pipeline(config, info)
    if isinstance(config.stage_scales, str):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        resolve_stage_scales(config, pipe.transformer, dataset, vae=pipe.vae, device=device)
    elif config.stage_scales is not None:
        pipe.transformer.register_to_config(stage_scales=[float(v) for v in config.stage_scales])
    if info["kind"] == "flux" and config.new_stage_init == "x_embedder" and pipe.transformer.config.stage_scales:
        pipe.transformer.scale_new_stage_inputs(pipe.transformer.config.stage_scales)  # scales known only now
    set_seed(config.seed)  # LoRA's Gaussian init draws from the global RNG
    counts = prepare_trainable(config, pipe.transformer)
    logger.info("trainable parameters: %d of %d", counts["trainable"], counts["total"])
    task = FluxTask(config, pipe)
    if config.cache_latents:
        dataset = build_flux_cache(task, dataset)
    return task, dataset


def build_flux_cache(task: FluxTask, dataset):
    """Fill the latent / text cache (the main process first; the others then find it complete) and return the
    cached training data set (:class:`.flux_cache.CachedCaptionedImages`); ``task.cache`` is set."""
    from .flux_cache import CachedCaptionedImages, FluxEmbeddingCache

    c = task.config
    state = distributed_state()
    cache = FluxEmbeddingCache(task, dataset, c.cache_dir or os.path.join(c.output_dir, "cache"))
    with state.main_process_first():
        if not cache.is_complete():
            cache.build(state.device, batch_size=c.cache_batch_size, show_progress=state.is_main_process)
    task._to_device(torch.device("cpu"))  # training reads the cache: the encoders stay off the device
    task.cache = cache
    return CachedCaptionedImages(cache)


def train_flux(config: FluxTrainingConfig) -> dict:
    """Build everything (all checks first) and train with the shared loop. Returns run_training's summary plus
    ``pipeline``: a DFMPipeline around the trained transformer (LoRA attached, last weights, not EMA), and ``task``
    (the :class:`FluxTask`, e.g. to export again)."""
    task, dataset = build_flux_task(config)
    if config.patchify_only_steps:
        held = sum(p.numel() for p in task.held_in_patchify_phase)
        logger.info("steps 1-%d train only the patchification layers (%d trainable parameters held fixed), then "
                    "everything", config.patchify_only_steps, held)
    scales = task.decomposition.stage_scales
    hparams = {**flat_hparams(config), "stage_scales": str(scales)}
    hparams.update({f"stage_scale_{s}": v for s, v in enumerate(scales or [])})
    result = run_training(
        config, task.transformer, dataset, task.loss_fn, sample_fn=task.sample_fn, export_fn=task.export_fn,
        hparams=hparams, batch_buckets=getattr(dataset, "sizes", None),
        held_fixed_fn=task.held_fixed_parameters if config.patchify_only_steps else None,
    )
    if distributed_state().is_main_process:
        write_loss_curve(
            result["log"], os.path.join(config.output_dir, "loss_curve.png"), task.num_stages,
            title="DFM-FLUX training loss",
        )
    result["bad_samples"] = report_bad_samples(dataset)
    result["pipeline"] = task.pipeline(task.transformer)
    result["task"] = task
    return result
