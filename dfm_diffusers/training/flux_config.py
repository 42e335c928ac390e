"""Settings of FLUX-DFM finetuning (:class:`FluxTrainingConfig`, the keys of train_dfm_flux.py) and their checks
against the pretrained pipeline's small JSON files (stages, VAE factor, resolution)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from ..utils import normalize_stage_factors
from .config import HubExportConfig, finite, positive_int, require, setting, stage_list_problems
from .loop_config import LoopConfig
from .objective import DFMObjectiveConfig
from .quantize import bitsandbytes_problem

# FLUX's attention projections (image and text streams of the double blocks; the single blocks' to_q/k/v).
FLUX_ATTENTION_PROJECTIONS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIXED_PRECISION_DTYPES = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class FluxTrainingConfig(LoopConfig, DFMObjectiveConfig, HubExportConfig):
    """All settings of train_dfm_flux.py (YAML keys / --overrides). The DFM training-distribution fields
    (stage_weights, logit_mean, ..., stage_loss_weights) come from :class:`.objective.DFMObjectiveConfig`,
    the optimisation ones (learning_rate, use_8bit_adam, mixed_precision, gradient_checkpointing, ...) from
    :class:`.loop_config.LoopConfig`."""

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
    # hub (push_to_hub, hub_model_id, self_contained_export: HubExportConfig)
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
