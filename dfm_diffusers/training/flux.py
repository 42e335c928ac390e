"""Text-to-image DFM finetuning of FLUX (paper appendix E), used by train_dfm_flux.py.

Starts from a FluxPipeline (converted with :meth:`DFMPipeline.from_flux_pipeline`: stage 0 is carried at the full
latent resolution and reuses FLUX's layers verbatim, later stages' heads start at zero; the decomposition hands the
trainer stage 0 nearest-upsampled, so its noise is drawn i.i.d. at full resolution as in FLUX's own training) or from an existing DFMPipeline folder, and trains the DFMTransformer2DModel on
captioned images with the shared DFM objective (:func:`.objective.dfm_objective`) inside the shared loop
(:func:`.loop.run_training`). Per batch: captions -> the pipeline's ``encode_prompt`` (frozen text encoders,
optional caption dropout to the empty prompt), images -> the frozen VAE (FLUX's ``(z - shift) * scale``),
latent -> Laplacian stages -> DFM noise -> transformer -> masked per-stage velocity loss.
``num_stages: 1`` is plain FLUX flow-matching finetuning through the same code.

Adapting to a new autoencoder (``vae``, e.g. one from ``python -m dfm_diffusers.vae train``), as the paper adapts
FLUX before its DFM finetune: ``patchify_only_steps: N`` trains only the patchification layers (every stage's patch
embedding and output projection, FLUX's x_embedder / proj_out) for the first N steps, then everything trainable.

Two modes:
- ``lora: true`` (default): peft LoRA on the FLUX blocks (``lora_target_modules``, default the attention
  projections), the per-stage DFM layers trained fully (``train_stage_layers``; stage 1's head starts at
  zero, so it has to be), every other weight frozen in ``weight_dtype``; trainable parameters in float32. ``quantize_base:
  int8 | nf4`` (QLoRA) keeps the frozen linear layers of the FLUX blocks in 8 / 4 bits (bitsandbytes) under the LoRA.
- ``lora: false``: the whole transformer is trained (float32 master weights; text encoders and VAE frozen).

Export (``<output_dir>/pipeline``, see :meth:`FluxTask.export_fn`): with LoRA, only what was trained (the LoRA in
diffusers' format, the DFM stage layers, a JSON naming the base model and the DFM settings; megabytes, not a copy
of FLUX), loaded with ``DFMPipeline.from_lora_export(folder)`` (converts a plain FLUX base) or
``DFMPipeline.from_pretrained(converted_base).load_dfm_lora(folder)``; ``fuse_lora_on_export: true`` writes a whole
DFMPipeline folder with the LoRA merged instead. A full finetune exports a whole DFMPipeline folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from ..data.bad_samples import report_bad_samples
from ..pipelines.lora_export import LORA_WEIGHT_NAME
from ..utils import normalize_stage_factors
from ..visualize import image_grid
from .config import ConfigError, check_config, finite, flat_hparams, positive_int, require, setting, stage_list_problems
from .dit import resolve_stage_scales, write_loss_curve
from .loop import LoopConfig, run_training
from .objective import DFMObjectiveConfig, DFMObjectiveOutput, dfm_objective, small_tensor
from .quantize import bitsandbytes_problem, quantize_frozen_blocks

logger = logging.getLogger(__name__)

# FLUX's attention projections (image and text streams of the double blocks; the single blocks' to_q/k/v).
FLUX_ATTENTION_PROJECTIONS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIXED_PRECISION_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class FluxTrainingConfig(LoopConfig, DFMObjectiveConfig):
    """All settings of train_dfm_flux.py (YAML keys / --overrides). The DFM training-distribution fields
    (stage_weights, logit_mean, ..., stage_loss_weights) come from :class:`.objective.DFMObjectiveConfig`,
    the optimisation ones (learning_rate, use_8bit_adam, mixed_precision, gradient_checkpointing, ...) from
    :class:`.loop.LoopConfig`."""

    output_dir: str = "outputs/dfm-flux"
    train_batch_size: int = 1
    learning_rate: float = 1e-4
    use_ema: bool = False  # an EMA copy of a full FLUX finetune costs another 48 GB (float32)
    # model
    pretrained: str | None = setting(None, "FluxPipeline (converted here) or DFMPipeline: local folder or Hub id")
    revision: str | None = setting(None, "Hub revision of pretrained")
    num_stages: int | None = setting(None, "DFM stages (default: 2 when converting FLUX; a DFMPipeline's own)")
    stage_factors: int | list[int] | None = setting(None, "factor between stages (default 2 / the folder's own)")
    stage_upsampling: list[int] | None = setting(
        None, "conversion only: per-stage carrier factors (default: the paper's, stage 0 carried at the finest "
        "resolution; [1, 1] is the first implementation's stage 0 at its own resolution, kept for comparisons)"
    )
    coarse_phase_on_coarse_grid: bool | None = setting(
        None, "run phase 0 as FLUX on stage 0's band at its own resolution (1/F^2 of the tokens; "
        "docs/coarse_grid.md); null keeps the pipeline's own setting (off after a conversion)"
    )
    new_stage_init: Literal["band_split", "x_embedder", "zero"] = setting(
        "band_split", "conversion only: how stages >= 1 start. band_split: the converted model samples like FLUX "
        "(Haar pyramid, FLUX's input projection and head split into bands; needs stage_scales unset); x_embedder / "
        "zero: heads at zero (the detail band keeps its noise), input projection FLUX's x_embedder / zero"
    )
    vae: str | None = setting(
        None, "AutoencoderKL (local folder or Hub id, its config.json at the top) replacing the pipeline's VAE for "
        "training, validation and the export (e.g. a scale-equivariant VAE); same latent channels as FLUX's"
    )
    weight_dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "dtype of the frozen weights; auto follows mixed_precision (bf16 -> bfloat16)"
    )
    stage_scales: list[float] | str | None = setting(
        None, "null keeps the pipeline's own (none after a FLUX conversion, as in the paper's FLUX runs); S positive "
        "floats; or auto / auto_relative, estimated through the VAE (posterior mean) before training"
    )
    stage_scales_samples: int = setting(4096, "training images used to estimate stage_scales auto / auto_relative")
    # data
    dataset: str | None = setting(
        None, "image folder with metadata.jsonl captions, a saved / local data set, or a Hub data set name"
    )
    data_dir: str | None = setting(None, "data_dir of a Hub / local data set")
    split: str = setting("train", "data set split")
    image_column: str | None = setting(None, "image column (default: found by name)")
    caption_column: str | None = setting(None, "caption column (default: found by name)")
    resolution: int = setting(512, "training image size in pixels (square); divisible by VAE x packing x stages")
    center_crop: bool = setting(True, "center crop (else random crop) to resolution")
    resolutions: list[int] | None = setting(
        None, "aspect buckets at these resolutions (a bucket's area ~ resolution^2, e.g. [512, 1024]); every batch "
        "from one bucket; null: square `resolution` crops"
    )
    aspect_ratios: list[float] = setting(
        help="width / height of the buckets of each resolution",
        default_factory=lambda: [1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3.0, 1 / 3],
    )
    upscale_small_images: bool = setting(
        False, "with resolutions: upscale images smaller than every bucket (default: skip and count them)"
    )
    validation_sizes: list[list[int]] | None = setting(
        None, "[height, width] pairs of the validation samples (default: [[resolution, resolution]])"
    )
    random_flip: bool = setting(False, "random horizontal flips")
    max_samples: int | None = setting(None, "use only the first N samples")
    caption_dropout: float = setting(
        0.1, "probability of training on the empty prompt (the paper's 10%; enables true CFG at inference)"
    )
    max_bad_sample_fraction: float = setting(
        0.05, "unreadable images and rows without a usable caption are skipped (each named) up to this fraction"
    )
    allow_empty_captions: bool = setting(
        False, "keep rows with an empty/null caption as the empty prompt (still reported); else they are skipped"
    )
    cache_latents: bool = setting(
        False, "encode the images (VAE posterior) and captions (T5 + CLIP, incl. the empty prompt) once into "
        "cache_dir and train from there: the VAE and text encoders then stay off the training device (needs "
        "center_crop and no random_flip: the cached pixels are fixed)"
    )
    cache_dir: str | None = setting(None, "folder of the latent / text cache (default: <output_dir>/cache)")
    cache_batch_size: int = setting(8, "batch size of the cache build")
    # text conditioning
    guidance_scale: float = setting(
        1.0, "value fed to FLUX-dev's distilled-guidance embedding during training (the paper: fixed at 1.0)"
    )
    max_sequence_length: int = setting(512, "T5 tokens (FLUX.1-dev: 512, schnell: 256)")
    # LoRA (lora: false = full finetune)
    lora: bool = setting(True, "LoRA finetune (false: full finetune of the transformer)")
    lora_rank: int = setting(16, "LoRA rank")
    lora_alpha: float | None = setting(None, "LoRA alpha (default: lora_rank, i.e. scale 1)")
    lora_dropout: float = setting(0.0, "LoRA dropout, in [0, 1)")
    lora_target_modules: list[str] = setting(
        help="module names that get a LoRA (default: FLUX's attention projections)",
        default_factory=lambda: list(FLUX_ATTENTION_PROJECTIONS),
    )
    train_stage_layers: bool = setting(True, "with LoRA: train the per-stage DFM layers fully (stage 1 starts at 0)")
    quantize_base: Literal["int8", "nf4"] | None = setting(
        None, "with LoRA (QLoRA): keep the frozen linear layers of FLUX's blocks in 8-bit (int8, LLM.int8) or 4-bit "
        "(nf4, double-quantized) through bitsandbytes; the LoRA and the DFM stage layers stay float32, the embedders "
        "weight_dtype; the LoRA export applies to the unquantized base"
    )
    # adaptation to a new VAE (the paper's FLUX adaptation: 24k steps, the first 4k patchify-only)
    patchify_only_steps: int = setting(
        0, "the first N optimizer steps train only the patchification layers (every stage's patch embedding and "
        "output projection: FLUX's x_embedder / proj_out), then everything trainable; with LoRA these layers are "
        "trained fully and the LoRA waits. For adapting to a new --vae, with or without the DFM conversion"
    )
    fuse_lora_on_export: bool = setting(
        False, "export a whole DFMPipeline folder with the LoRA merged in, not the small LoRA export"
    )
    # validation samples (and the exported scheduler's defaults)
    validation_prompts: list[str] | None = setting(None, "prompts of the validation samples (default: 'a photo')")
    # the paper's sampling settings for a DFM-finetuned FLUX (true CFG 3.0 against the empty prompt, guidance 1.0);
    # also recorded in the exported model card as the recommended ones
    validation_true_cfg_scale: float = setting(3.0, "true classifier-free guidance scale of the validation samples")
    validation_guidance_scale: float = setting(1.0, "FLUX-dev guidance-embedding value of the validation samples")
    steps_per_stage: list[int] | None = setting(None, "sampling steps of each stage (the exported scheduler's)")
    stage_thresholds: list[float] | None = setting(
        None, "sigma at which each later stage starts: 0.05 = the paper's tau 0.95 at 1024px"
    )
    # hub
    push_to_hub: bool = setting(False, "push the exported pipeline to the Hub")
    hub_model_id: str | None = setting(None, "Hub repo id (default: output_dir's name)")
    self_contained_export: bool = setting(
        False, "write the exported pipeline folder (and the pushed repo) with the library's code next to the weights, "
        "so plain diffusers loads it with trust_remote_code=True (a whole pipeline: full finetune or "
        "fuse_lora_on_export)"
    )
    base_model_id: str | None = setting(
        None, "Hub id of the base model, recorded in the LoRA export and the model card when pretrained is a local "
        "folder (e.g. black-forest-labs/FLUX.1-dev); default: pretrained"
    )
    license: str | None = setting(
        None, "license of the exported model (model card); default: the base folder's README license, else 'other'"
    )

    def resolved_weight_dtype(self) -> torch.dtype:
        name = _MIXED_PRECISION_DTYPES.get(self.mixed_precision) if self.weight_dtype == "auto" else self.weight_dtype
        if name not in DTYPES:
            raise ValueError(
                f"weight_dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.weight_dtype!r} "
                f"(mixed_precision={self.mixed_precision!r})"
            )
        return DTYPES[name]

    def validate(self) -> list[str]:
        """Range and consistency checks before anything is loaded: required keys, dtypes, LoRA settings, and, for a
        local ``pretrained`` folder, read from its small JSON files, the stage lists against its number of stages
        and the resolution (for a Hub id these two are checked when build_flux_task reads the files)."""
        problems = require(
            bool(self.pretrained), "pretrained", "is required: a FluxPipeline or DFMPipeline folder or Hub id"
        )
        problems += require(
            bool(self.dataset), "dataset",
            "is required: an image folder with metadata.jsonl captions or a data set name",
        )
        problems += positive_int(self, "resolution", "max_sequence_length", "cache_batch_size")
        problems += positive_int(self, "patchify_only_steps", allow_zero=True)
        if self.resolutions is not None:
            problems += require(
                bool(self.resolutions) and all(isinstance(r, int) and r > 0 for r in self.resolutions), "resolutions",
                f"must be a non-empty list of positive ints, got {self.resolutions}")
            problems += require(
                bool(self.aspect_ratios) and all(isinstance(a, (int, float)) and a > 0 for a in self.aspect_ratios),
                "aspect_ratios", f"must be positive numbers, got {self.aspect_ratios}")
            problems += require(not isinstance(self.stage_scales, str), "stage_scales",
                                "auto / auto_relative needs one square resolution (give the scales with resolutions)")
        if self.validation_sizes is not None:
            problems += require(
                all(isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
                    for v in self.validation_sizes), "validation_sizes",
                f"must be [height, width] pairs of positive ints, got {self.validation_sizes}")
        if self.cache_latents:
            problems += require(not self.random_flip, "random_flip", "must be false with cache_latents (cached "
                                "latents are of the unflipped image)")
            problems += require(self.center_crop, "center_crop", "must be true with cache_latents (cached latents "
                                "are of the center crop)")
        problems += positive_int(self, "max_samples", optional=True)
        problems += positive_int(self, "num_stages", optional=True)
        problems += finite(self, "caption_dropout", "max_bad_sample_fraction", low=0.0, high=1.0)
        problems += finite(self, "guidance_scale", "validation_guidance_scale", low=0.0)
        dtype = self.resolved_weight_dtype()  # both names are Literal-checked, so this resolves
        problems += require(
            dtype == torch.float32 or self.mixed_precision != "no", "weight_dtype",
            f"{self.weight_dtype} needs mixed_precision bf16/fp16: the float32 trainable layers and the {dtype} "
            f"frozen ones only mix under autocast",
        )
        if self.lora:
            problems += positive_int(self, "lora_rank")
            problems += finite(self, "lora_alpha", low=0.0, low_open=True, optional=True)
            problems += finite(self, "lora_dropout", low=0.0, high=1.0, high_open=True)
            problems += require(bool(self.lora_target_modules), "lora_target_modules", "must name at least one module")
        problems += require(
            not (self.self_contained_export and self.lora and not self.fuse_lora_on_export), "self_contained_export",
            "needs a whole pipeline export: a LoRA export (lora without fuse_lora_on_export) holds only the trained "
            "layers and loads with DFMPipeline.from_lora_export; set fuse_lora_on_export: true or train in full",
        )
        if self.quantize_base is not None:
            problems += require(self.lora, "quantize_base", "needs lora: true (the quantized weights stay frozen; a "
                                "full finetune trains them)")
            problems += require(
                not self.fuse_lora_on_export, "fuse_lora_on_export", "must be false with quantize_base (merging would "
                "bake the quantization error into the base weights): export the LoRA, load it onto the unquantized "
                "base with DFMPipeline.from_lora_export and fuse there (pipe.fuse_lora())")
            missing = bitsandbytes_problem()
            problems += require(missing is None, "quantize_base", str(missing))
        num_stages = self.num_stages
        # A local folder's config files are read here; a Hub id's in build_flux_task (validation stays offline).
        well_typed = not any(p.startswith(("resolution:", "num_stages:")) for p in problems)
        if self.pretrained and os.path.isdir(self.pretrained) and well_typed:
            try:
                info = inspect_pretrained(self, check_resolution=False)
            except ValueError as e:
                problems.append(f"pretrained: {e}")
            else:
                num_stages = info["num_stages"]
                problems += require(*_resolution_check(self.resolution, info))
                problems += _validation_size_problems(self, info)
        return problems + stage_list_problems(self, num_stages)


# ------------------------------------------------------------------------------------------- loading


def _pipeline_file(pretrained: str, name: str, revision: str | None = None) -> str:
    """Path of ``name`` inside a local pipeline folder, or downloaded alone from a Hub repo."""
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, name)
        if not os.path.isfile(path):
            raise ValueError(f"pretrained folder {pretrained} has no {name}: not a diffusers pipeline folder")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(pretrained, name, revision=revision)
    except Exception as err:  # RepositoryNotFoundError, EntryNotFoundError, offline errors, ...
        raise ValueError(
            f"pretrained={pretrained!r} is neither a local folder nor a readable Hub repo with {name}: "
            f"{type(err).__name__}: {err}"
        ) from err


def _read_json(pretrained: str, name: str, revision: str | None = None) -> dict:
    with open(_pipeline_file(pretrained, name, revision), encoding="utf-8") as f:
        return json.load(f)


def inspect_pretrained(config: FluxTrainingConfig, check_resolution: bool = True) -> dict:
    """Read the pipeline's small config files and check the stage and resolution settings against them.

    Returns dict(kind="flux" | "dfm", num_stages, stage_factors, vae_scale_factor). ValueError for a pipeline
    that is neither a FluxPipeline nor a DFMPipeline, stage settings the model cannot take, or a resolution
    the stages cannot split (the same rule as DFMPipeline.latent_stage_shapes).
    """
    from ..models.stage_layers import stage_patch_sizes
    from ..models.transformer_dfm_flux import FLUX_PACKING, default_stage_upsampling

    from ..pipelines.hub import pipeline_class_name

    index = _read_json(config.pretrained, "model_index.json", config.revision)
    class_name = pipeline_class_name(index)
    if class_name == "DFMPipeline":
        kind = "dfm"
        tconf = _read_json(config.pretrained, "transformer/config.json", config.revision)
        num_stages = tconf.get("num_stages", 2)
        factors = normalize_stage_factors(num_stages, tconf.get("stage_factors", 2))
        if config.num_stages is not None and config.num_stages != num_stages:
            raise ValueError(
                f"{config.pretrained} is a {num_stages}-stage DFMPipeline but num_stages={config.num_stages}; "
                f"convert the FLUX pipeline again to change the number of stages"
            )
        if config.stage_factors is not None and normalize_stage_factors(num_stages, config.stage_factors) != factors:
            raise ValueError(f"{config.pretrained} has stage_factors {factors}, not {config.stage_factors}")
        folder_upsampling = tconf.get("stage_upsampling") or default_stage_upsampling(num_stages, factors)
        if config.stage_upsampling is not None and list(config.stage_upsampling) != list(folder_upsampling):
            raise ValueError(
                f"{config.pretrained} has stage_upsampling {folder_upsampling}, not {config.stage_upsampling}; it is "
                f"fixed at conversion"
            )
    elif class_name == "FluxPipeline":
        kind = "flux"
        num_stages = 2 if config.num_stages is None else config.num_stages
        factors = normalize_stage_factors(num_stages, 2 if config.stage_factors is None else config.stage_factors)
        upsampling = config.stage_upsampling or default_stage_upsampling(num_stages, factors)
        stage_patch_sizes(num_stages, factors, FLUX_PACKING, upsampling)  # ValueError if no token grid fits
    else:
        raise ValueError(
            f"{config.pretrained} holds a {class_name}; expected a FluxPipeline (converted to DFM here) or a "
            f"DFMPipeline folder"
        )
    vae = _read_json(config.pretrained, "vae/config.json", config.revision)
    if config.vae:
        try:
            own = _read_json(config.vae, "config.json")
        except ValueError as err:
            raise ValueError(f"vae={config.vae!r} is not an AutoencoderKL folder or Hub id: {err}") from err
        if own.get("latent_channels") != vae.get("latent_channels"):
            raise ValueError(
                f"vae {config.vae} has {own.get('latent_channels')} latent channels, the pipeline's transformer "
                f"takes {vae.get('latent_channels')}"
            )
        vae = own
    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    coarse = config.coarse_phase_on_coarse_grid
    if coarse is None:
        coarse = kind == "dfm" and bool(tconf.get("coarse_phase_on_coarse_grid", False))
    info = dict(kind=kind, num_stages=num_stages, stage_factors=factors, vae_scale_factor=vae_scale_factor,
                coarse_phase_on_coarse_grid=coarse)
    ok, key, problem = _resolution_check(config.resolution, info)
    if check_resolution and not ok:
        raise ValueError(f"{key} {problem}")
    return info


def resolution_multiple(info: dict) -> int:
    """What every image side must be a multiple of: VAE factor x FLUX's 2x2 packing x the stage factors (the
    packing applies to stage 0's band too when the coarse phase runs on its own grid)."""
    total = math.prod(info["stage_factors"])
    if info.get("coarse_phase_on_coarse_grid"):
        return info["vae_scale_factor"] * 2 * total
    return info["vae_scale_factor"] * (2 * total // math.gcd(2, total))


def _validation_size_problems(config, info: dict) -> list[str]:
    multiple = resolution_multiple(info)
    bad = [v for v in config.validation_sizes or [] if v[0] % multiple or v[1] % multiple]
    return [f"validation_sizes: {bad} must be multiples of {multiple}"] if bad else []


def _resolution_check(resolution: int, info: dict) -> tuple[bool, str, str]:
    """(ok, "resolution", problem): the resolution the VAE, FLUX's 2x2 packing and the stage factors can split."""
    factors, vae_scale_factor = info["stage_factors"], info["vae_scale_factor"]
    multiple = resolution_multiple(info)
    return (
        resolution % multiple == 0, "resolution",
        f"{resolution} must be divisible by {multiple} (VAE factor {vae_scale_factor} x the 2x2 packing and stage "
        f"factors {factors})",
    )


def load_dfm_pipeline(config: FluxTrainingConfig, info: dict | None = None):
    """The DFMPipeline to train, in ``weight_dtype``: a FluxPipeline converted (DFMPipeline.from_flux_pipeline), or
    a DFMPipeline folder loaded; ``steps_per_stage`` / ``stage_thresholds`` set on its scheduler when given."""
    from diffusers import FluxPipeline

    from ..pipelines.pipeline_dfm import DFMPipeline
    from ..schedulers import DFMScheduler

    info = info or inspect_pretrained(config)
    dtype = config.resolved_weight_dtype()
    components = {}
    if config.vae:
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(config.vae, dtype=dtype)
    factors = info["stage_factors"]  # a list of S - 1 ints
    factors = factors[0] if len(set(factors)) == 1 else (factors or 2)  # [2] -> 2 as the converter stores it
    if info["kind"] == "flux":
        flux = FluxPipeline.from_pretrained(
            config.pretrained, dtype=dtype, revision=config.revision, **components
        )
        pipe = DFMPipeline.from_flux_pipeline(
            flux, num_stages=info["num_stages"], stage_factors=factors, steps_per_stage=config.steps_per_stage,
            stage_thresholds=config.stage_thresholds, stage_upsampling=config.stage_upsampling,
            new_stage_init=config.new_stage_init,
        )
        del flux
    else:
        kwargs = {"revision": config.revision, **components} if config.revision else components
        pipe = DFMPipeline.from_pretrained(config.pretrained, dtype=dtype, **kwargs)
        if config.steps_per_stage is not None or config.stage_thresholds is not None:
            overrides = {}
            if config.steps_per_stage is not None:
                overrides["steps_per_stage"] = config.steps_per_stage
            if config.stage_thresholds is not None:
                overrides["stage_thresholds"] = config.stage_thresholds
            pipe.scheduler = DFMScheduler.from_config(pipe.scheduler.config, **overrides)
    if config.coarse_phase_on_coarse_grid is not None:
        pipe.transformer.set_coarse_phase_on_coarse_grid(config.coarse_phase_on_coarse_grid)
    pipe.latent_stage_shapes(config.resolution, config.resolution)  # authoritative resolution check
    return pipe


def prepare_trainable(
    config: FluxTrainingConfig, transformer, device: torch.device | str | None = None
) -> dict[str, int]:
    """Freeze / adapt ``transformer`` for the configured mode and cast its trainable parameters to float32.

    LoRA: everything frozen, ``transformer.add_adapter(LoraConfig(...))`` on ``lora_target_modules`` (Gaussian A,
    zero B: the model starts exactly at the converted one), plus the per-stage layers when train_stage_layers.
    With ``quantize_base``, the blocks' linear layers are first replaced by bitsandbytes ones
    (:func:`.quantize.quantize_frozen_blocks`), quantized on ``device`` (default: accelerate's), and the LoRA wraps
    them. peft's ``prepare_model_for_kbit_training`` is not needed: it freezes (done here), casts the frozen
    unquantized weights to float32 (they stay in weight_dtype under autocast, as without quantization) and turns on
    gradient checkpointing (the loop's setting). Full finetune: everything trainable. With ``patchify_only_steps``
    the patchification layers are trainable in either mode. Returns counts of trainable / total parameters.
    """
    from diffusers.training_utils import cast_training_params

    if config.lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        if config.quantize_base:
            from accelerate import PartialState

            device = device if device is not None else PartialState().device
            replaced = quantize_frozen_blocks(
                transformer, config.quantize_base, config.resolved_weight_dtype(), device=device
            )
            logger.info("quantize_base %s: %d linear layers of the FLUX blocks quantized on %s",
                        config.quantize_base, len(replaced), device)
        transformer.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules),
            )
        )
        if config.train_stage_layers:
            transformer.stage_layers.requires_grad_(True)
        else:
            logger.warning(
                "train_stage_layers is false: the per-stage layers stay as converted (stages >= 1 output zero "
                "after a FLUX conversion)"
            )
    else:
        transformer.requires_grad_(True)
    if config.patchify_only_steps:
        for name in patchify_parameter_names(transformer):
            transformer.get_parameter(name).requires_grad_(True)
    cast_training_params(transformer, dtype=torch.float32)
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return dict(trainable=trainable, total=sum(p.numel() for p in transformer.parameters()))


def patchify_parameter_names(transformer) -> list[str]:
    """The patchification layers of a DFMTransformer2DModel: every stage's patch embedding and output projection
    (``stage_layers.patch_embedders.*``, ``stage_layers.heads.*.proj_out.*``; stage 0's are FLUX's x_embedder and
    proj_out). The adaLN modulation of the output norm is not one of them."""
    return [
        name for name, _ in transformer.named_parameters()
        if name.startswith("stage_layers.patch_embedders.")
        or (name.startswith("stage_layers.heads.") and ".proj_out." in name)
    ]


# ------------------------------------------------------------------------------------------- the task


class FluxTask:
    """The FLUX-DFM pieces the shared loop calls: loss, validation samples, export.

    ``pipe`` is the DFMPipeline whose frozen parts (text encoders, tokenizers, VAE, scheduler) the task uses;
    the transformer being trained is passed to every call (possibly wrapped by accelerate).
    """

    def __init__(self, config: FluxTrainingConfig, pipe):
        self.config, self.pipe = config, pipe
        self.transformer = pipe.transformer
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            if module is not None:
                module.requires_grad_(False).eval()
        self.num_stages = self.transformer.config.num_stages
        self.decomposition = pipe.decomposition
        config.validate_objective(self.num_stages)
        self.weight_dtype = config.resolved_weight_dtype()
        self.samples_dir = os.path.join(config.output_dir, "samples")
        self.last_sample, self.last_step = None, None  # the latest validation grid (shown in the model card)
        self.cache = None  # a complete FluxEmbeddingCache when training from cached latents and embeddings
        self._empty_text = None  # the cached empty prompt's embeddings, kept on the training device
        patchify = set(patchify_parameter_names(self.transformer))
        # trainable parameters held fixed during the patchify-only phase (the LoRA, the blocks, the other stage layers)
        self.held_in_patchify_phase = [
            p for n, p in self.transformer.named_parameters() if p.requires_grad and n not in patchify
        ]

    def held_fixed_parameters(self, step: int) -> list[torch.nn.Parameter]:
        """The loop's ``held_fixed_fn``: everything trainable but the patchification layers while fewer than
        ``patchify_only_steps`` optimizer steps are done (``step`` = steps done), then nothing."""
        return self.held_in_patchify_phase if step < self.config.patchify_only_steps else []

    # ---------------------------------------------------------------------------------- frozen encoders
    def _to_device(self, device: torch.device, names=("vae", "text_encoder", "text_encoder_2")):
        for name in names:
            module = getattr(self.pipe, name)
            if module is not None and module.device != device:
                module.to(device)

    @torch.no_grad()
    def encode_text(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, L, D], pooled [B, D], text_ids [L, 3]) from the frozen text encoders."""
        self._to_device(torch.device(device))
        return self.pipe.encode_prompt(
            prompt=list(captions), prompt_2=None, device=device, max_sequence_length=self.config.max_sequence_length
        )

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> FLUX latents (z - shift) * scale, float32 [B, C, H/f, W/f]."""
        vae = self.pipe.vae
        self._to_device(pixel_values.device)
        dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self.latents_from_distribution(dist, sample).to(pixel_values.device)

    def latents_from_distribution(self, dist, sample: bool = True) -> torch.Tensor:
        """A VAE posterior (DiagonalGaussianDistribution) -> FLUX latents (z - shift) * scale, float32."""
        from ..data.latents import normalize_latents

        return normalize_latents(self.pipe.vae, dist.sample() if sample else dist.mode())

    def caption_keep_mask(self, n: int) -> list[bool]:
        """Which of ``n`` captions survive caption dropout (the rest train on the empty prompt)."""
        p = self.config.caption_dropout
        return [True] * n if p <= 0 else (torch.rand(n) >= p).tolist()

    def drop_captions(self, captions: list[str]) -> list[str]:
        return [c if k else "" for c, k in zip(captions, self.caption_keep_mask(len(captions)))]

    def cached_conditioning(self, batch, device):
        """(prompt_embeds, pooled, text_ids) of a cached batch, caption dropout applied with the cached empty prompt."""
        embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled_prompt_embeds"].to(device)
        keep = self.caption_keep_mask(embeds.shape[0])
        if not all(keep):
            if self._empty_text is None or self._empty_text[0].device != embeds.device:
                self._empty_text = self.cache.text_batch([""], device)
            empty_embeds, empty_pooled = self._empty_text
            drop = ~small_tensor(keep, torch.bool, device)  # (no host sync)
            embeds = torch.where(drop[:, None, None], empty_embeds.to(embeds.dtype), embeds)
            pooled = torch.where(drop[:, None], empty_pooled.to(pooled.dtype), pooled)
        # FluxPipeline.encode_prompt's text ids: zeros, one row per T5 token
        return embeds, pooled, torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)

    # ---------------------------------------------------------------------------------------- the loss
    def objective(self, model, batch, noise=None, latents=None) -> DFMObjectiveOutput:
        """The DFM objective on one batch (``latents`` may be given to skip the VAE; ``noise`` per stage)."""
        if "latent_dist" in batch:  # from the cache (flux_cache.CachedCaptionedImages)
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            params = batch["latent_dist"]
            device = params.device
            prompt_embeds, pooled, text_ids = self.cached_conditioning(batch, device)
            if latents is None:
                latents = self.latents_from_distribution(DiagonalGaussianDistribution(params))
        else:
            pixels = batch["pixel_values"]
            device = pixels.device
            prompt_embeds, pooled, text_ids = self.encode_text(self.drop_captions(batch["captions"]), device)
            if latents is None:
                latents = self.encode_images(pixels)
        bands = self.decomposition.decompose(latents.float())
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((latents.shape[0],), float(self.config.guidance_scale), device=device)

        def predict(inputs, draw):
            return model(
                hidden_states=inputs, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                timestep=draw.sigmas, num_active_stages=draw.num_active_stages, guidance=guidance, txt_ids=text_ids,
                return_dict=False,
            )[0]

        carrier = None  # the coarse phase on the band's own grid: stage 0's carrier factor
        if self.transformer.config.get("coarse_phase_on_coarse_grid", False):
            carrier = self.decomposition.upsampling[0]
        return dfm_objective(self.config, bands, predict, noise=noise, coarse_phase_carrier=carrier)

    def loss_fn(self, model, batch):
        out = self.objective(model, batch)
        return out.loss, out.logs

    # --------------------------------------------------------------------------------- sampling, export
    def pipeline(self, model):
        """A DFMPipeline around ``model`` and the task's frozen components."""
        from ..pipelines.pipeline_dfm import DFMPipeline

        components = {k: v for k, v in self.pipe.components.items() if k != "transformer"}
        return DFMPipeline(transformer=model, **components)

    def _autocast(self, device: torch.device):
        if self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.weight_dtype)

    def generate(self, model, prompts: list[str] | None = None, seed: int = 0, size: tuple[int, int] | None = None):
        """Validation samples and per-stage previews (tensors in [0, 1]), one prompt at a time, at ``size``
        (height, width; default resolution x resolution)."""
        prompts = prompts or self.config.validation_prompts or ["a photo"]
        device = next(model.parameters()).device
        # with the cache, the prompts' embeddings come from it and only the VAE (decoding) visits the device
        self._to_device(device, ("vae",) if self.cache is not None else ("vae", "text_encoder", "text_encoder_2"))
        pipe = self.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        images, previews = [], []
        height, width = size or (self.config.resolution, self.config.resolution)
        for i, prompt in enumerate(prompts):
            text = dict(prompt=prompt)
            if self.cache is not None:
                embeds, pooled = self.cache.text_batch([prompt], device)
                empty_embeds, empty_pooled = self.cache.text_batch([""], device)
                text = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=empty_embeds,
                            negative_pooled_prompt_embeds=empty_pooled)
            with self._autocast(device):
                out = pipe(
                    **text, height=height, width=width,
                    guidance_scale=self.config.validation_guidance_scale,
                    true_cfg_scale=self.config.validation_true_cfg_scale, output_type="pt", return_previews=True,
                    generator=torch.Generator(device="cpu").manual_seed(seed + i),
                    max_sequence_length=self.config.max_sequence_length,
                )
            images.append(out.images.float().cpu())
            previews.append([p.float().cpu() for p in out.previews])
        if self.cache is not None:
            self._to_device(torch.device("cpu"), ("vae",))
        per_stage = [torch.cat([p[s] for p in previews]) for s in range(len(previews[0]))]
        return torch.cat(images), per_stage

    def sample_fn(self, model, step: int):
        """samples/step_XXXXXXX.png (with validation_sizes: step_XXXXXXX_HxW.png per size): one column per validation
        prompt, one row per stage preview (coarse to fine; the last row is the final image). Returns the grids for
        the trackers (the loop logs them)."""
        os.makedirs(self.samples_dir, exist_ok=True)
        sizes = self.config.validation_sizes
        logged = {}
        for size in sizes or [None]:
            images, previews = self.generate(model, size=size)
            grid = image_grid(previews, size=min(max(images.shape[-1], 256), 512), value_range=(0, 1))
            suffix = f"_{size[0]}x{size[1]}" if sizes else ""  # one grid per validation size
            path = os.path.join(self.samples_dir, f"step_{step:07d}{suffix}.png")
            if distributed_state().is_main_process:  # under FSDP every rank samples (in lockstep); one writes
                grid.save(path)
            self.last_sample = self.last_sample if suffix and logged else path  # the card shows the first size
            logged[f"validation/samples_with_stage_previews{suffix}"] = grid.convert("RGB")
        self.last_step = step
        return logged

    def export_transformer(self, model, fuse_lora: bool = False):
        """A plain DFMTransformer2DModel (no peft layers) in ``weight_dtype`` on the CPU, built from ``model``'s
        weights: the LoRA is left out, or merged into the base weights with ``fuse_lora``. ``model`` is untouched."""
        from ..models.transformer_dfm_flux import DFMTransformer2DModel

        state = {}
        deltas = {}
        if fuse_lora:
            from peft.tuners.lora import LoraLayer

            for name, module in model.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    deltas[f"{name}.weight"] = module.get_delta_weight("default").detach()
        for key, tensor in model.state_dict().items():
            if ".lora_" in key or "lora_magnitude" in key:
                continue
            key = key.replace(".base_layer.", ".")
            value = tensor.detach()
            if key in deltas:
                value = value.float() + deltas[key].float()
            state[key] = value.to("cpu", self.weight_dtype, copy=True)
        from ..models.loading import model_from_state_dict

        return model_from_state_dict(DFMTransformer2DModel, model.config, state, "exported transformer")

    def recommended_sampling(self) -> dict:
        """The sampling settings the exported model card recommends (the validation ones: by default the paper's
        true_cfg_scale 3.0 with guidance_scale 1.0, the value the guidance input was trained with)."""
        settings = {"true_cfg_scale": float(self.config.validation_true_cfg_scale)}
        if self.transformer.config.guidance_embeds:
            settings["guidance_scale"] = float(self.config.validation_guidance_scale)
        return settings

    def base_reference(self) -> dict:
        """The base model a LoRA export points at: its Hub id (``base_model_id`` or ``pretrained``), the local
        folder it was loaded from, revision, kind (a FluxPipeline converted here, or a DFMPipeline), ``--vae``."""
        c = self.config
        local = os.path.isdir(c.pretrained)
        from ..pipelines.hub import pipeline_class_name

        index = _read_json(c.pretrained, "model_index.json", c.revision)
        kind = "flux" if pipeline_class_name(index) == "FluxPipeline" else "dfm"
        return {
            "base_model": c.base_model_id or (os.path.abspath(c.pretrained) if local else c.pretrained),
            "base_model_path": os.path.abspath(c.pretrained) if local else None,
            "revision": c.revision, "base_kind": kind,
            "vae": (os.path.abspath(c.vae) if os.path.isdir(c.vae) else c.vae) if getattr(c, "vae", None) else None,
        }

    def license(self) -> str:
        """``license``, else the ``license:`` of the base folder's README.md metadata, else "other"."""
        if self.config.license:
            return self.config.license
        readme = os.path.join(self.config.pretrained, "README.md")
        if os.path.isfile(readme):
            with open(readme, encoding="utf-8") as f:
                text = f.read()
            if text.startswith("---"):
                for line in text.split("---")[1].splitlines():
                    if line.strip().startswith("license:"):
                        return line.split(":", 1)[1].strip()
        return "other"

    def model_card(self, repo_id: str, pipe, lora_export: bool = False, revision: str | None = None) -> str:
        c = self.config
        base = self.base_reference()["base_model"]
        if not lora_export:
            card = pipe.model_card(repo_id, base_model=base, sampling=self.recommended_sampling(), revision=revision,
                                   self_contained=c.self_contained_export)
            card = card.replace("license: other", f"license: {self.license()}", 1)
            return card + self.training_card_section()
        sampling = self.recommended_sampling()
        call_kwargs = "".join(f", {k}={v!r}" for k, v in sampling.items())
        lines = [
            "---", "library_name: diffusers", f"license: {self.license()}", f"base_model: {base}",
            "pipeline_tag: text-to-image", "tags:", "- lora", "- decomposable-flow-matching", "- dfm",
            "- dfm-diffusers", "---",
            f"# {repo_id.split('/')[-1]}", "",
            f"A LoRA (rank {c.lora_rank}) and the Decomposable Flow Matching (DFM, arXiv 2506.19839) stage layers "
            f"trained on top of `{base}`. This repo holds only what was trained: `{LORA_WEIGHT_NAME}` (the LoRA), "
            f"the stage layers and `dfm_lora_config.json` (the base model and the DFM settings); the base weights "
            f"come from the base model.", "",
            "## DFM settings", "", f"- base model: `{base}`", *pipe.dfm_settings_lines(), "",
            "## Recommended sampling settings", "", *[f"- `{k}={v!r}`" for k, v in sampling.items()], "",
            "## How to load", "", "```python", "import torch", "from dfm_diffusers import DFMPipeline", "",
            "# converts the base if it is a plain FLUX pipeline, then loads the stage layers and the LoRA",
            f'pipe = DFMPipeline.from_lora_export("{repo_id}", dtype=torch.bfloat16)',
            "# or, with the base already converted: DFMPipeline.from_pretrained(converted).load_dfm_lora(repo)",
            f'image = pipe("a photo of a cat"{call_kwargs}).images[0]', "```", "",
        ]
        return "\n".join(lines) + self.training_card_section()

    def training_card_section(self) -> str:
        c = self.config
        lines = [
            "## Training", "",
            f"- data: `{c.dataset}`" + (f" (split {c.split})" if c.split != "train" else ""),
            f"- resolution: {c.resolution}px, batch size {c.train_batch_size}, learning rate {c.learning_rate}",
            f"- steps: {self.last_step if self.last_step is not None else c.max_train_steps}",
            f"- mode: {'LoRA rank %d' % c.lora_rank if c.lora else 'full finetune'}"
            + (f" on a {c.quantize_base}-quantized base (QLoRA)" if c.quantize_base else "")
            + f", caption dropout {c.caption_dropout}",
            "",
        ]
        if self.last_sample:
            lines += ["## Samples", "", "Columns: validation prompts " + str(c.validation_prompts or ["a photo"])
                      + "; rows: the stage previews, coarse to fine (the last row is the final image).", "",
                      "![validation samples](samples.png)", ""]
        return "\n".join(lines)

    def export_fn(self, model, folder: str):
        """Write the export + README.md (the model card, with the latest validation grid as samples.png).

        LoRA (default): only what was trained (:func:`..pipelines.lora_export.save_lora_export`: the LoRA, the stage
        layers and a JSON naming the base); load it with ``DFMPipeline.from_lora_export(folder)``. Full finetune, or
        LoRA with ``fuse_lora_on_export``: a whole DFMPipeline folder (LoRA merged in). Then pushed when
        ``push_to_hub``.
        """
        import shutil

        c = self.config
        small = c.lora and not c.fuse_lora_on_export
        if small:
            from peft.utils import get_peft_model_state_dict

            from ..pipelines.lora_export import save_lora_export

            pipe = self.pipeline(model)
            save_lora_export(
                folder, model, self.pipe.scheduler, self.base_reference(),
                lora_layers=get_peft_model_state_dict(model), lora_metadata=model.peft_config["default"].to_dict(),
            )
        else:
            pipe = self.pipeline(self.export_transformer(model, fuse_lora=c.lora))
            pipe.save_pretrained(folder, self_contained=c.self_contained_export)
        if self.last_sample and os.path.isfile(self.last_sample):
            shutil.copyfile(self.last_sample, os.path.join(folder, "samples.png"))
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:  # loading code points at the folder
            f.write(self.model_card(os.path.abspath(folder), pipe, lora_export=small))
        if c.push_to_hub:
            from huggingface_hub import HfApi

            from ..pipelines.hub import upload_with_model_card

            api = HfApi()
            name = c.hub_model_id or os.path.basename(os.path.abspath(c.output_dir))
            repo_id = api.create_repo(name, exist_ok=True).repo_id
            what = "DFM LoRA export" if small else "DFMPipeline"
            upload_with_model_card(
                api, repo_id, folder, f"Upload {what} (train_dfm_flux)", False,
                lambda revision: self.model_card(repo_id, pipe, lora_export=small, revision=revision),
            )
            logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)


# ------------------------------------------------------------------------------------------- entry point


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


def distributed_state():
    """accelerate's PartialState as the Accelerator will see it: ``ACCELERATE_USE_CPU=1`` (a CPU run of several
    processes) must reach it, else a torchrun-launched process on a machine without GPUs takes itself for a
    single-process run, and the processes never form one group."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


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
