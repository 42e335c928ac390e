"""The official DFM-SiT, SiT and REPA checkpoints as DFMDiTPipeline folders (docs/official_checkpoints.md).

:func:`convert_official_checkpoint` builds the pipeline (the exact transformer, a DFMScheduler with the official
sampling settings, the SD VAE or a reference to it, the ImageNet class names); :func:`official_model_card` writes
its model card (source, license of the weights, official sampling settings and FID). ``python -m
dfm_diffusers.convert dit --from SOURCE CHECKPOINT --output DIR`` runs both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..models.official_sit import OFFICIAL_SOURCES, load_official_checkpoint, transformer_from_official
from ..schedulers import DFMScheduler
from .imagenet_classes import IMAGENET_CLASSES
from .pipeline_dfm_dit import DFMDiTPipeline

#: The SD VAE the official latents belong to: training encodes with sd-vae-ft-mse, the evaluations decode with
#: sd-vae-ft-ema; both scale latents by 0.18215 with no shift.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_VAE_SCALING = 0.18215


@dataclass(frozen=True)
class OfficialSource:
    """What a converted pipeline's model card says about its source (all from the official repositories)."""

    title: str
    code: str
    weights: str
    license: str  # the weights' license, in words
    license_meta: dict  # model-card metadata keys for it
    steps_per_stage: list  # the official evaluation's Euler steps, as DFMScheduler settings
    guidance_scale: float
    guidance_interval: tuple | None
    official_sampler: str  # how the official numbers were sampled
    ours: str  # what this pipeline's sampler is relative to that
    results: dict = field(default_factory=dict)  # resolution (px) -> the official numbers


_SNAP_LICENSE = dict(
    license="other",
    license_name="snap-non-commercial",
    license_link="https://github.com/snap-research/elit/blob/main/LICENSE",
)
_ELIT_WEIGHTS = "https://huggingface.co/mali6/elit"

SOURCES: dict[str, OfficialSource] = {
    "elit-dfm": OfficialSource(
        title="DFM-SiT (Decomposable Flow Matching, official release in the ELIT repository)",
        code="https://github.com/snap-research/elit (models/sit_dfm.py, dfm_utils/samplers_dfm.py)",
        weights=f"{_ELIT_WEIGHTS} (dfm_sit_imagenet_512px_1k_0400000.pt)",
        license="Snap Inc. Non-Commercial License: non-commercial research use only (the ELIT repository's LICENSE, "
        "which covers the code and the checkpoints it distributes); keep the license text with any redistribution",
        license_meta=_SNAP_LICENSE,
        steps_per_stage=[40, 10],
        guidance_scale=1.0,
        guidance_interval=None,
        official_sampler="Euler ODE, steps per stage [40, 10] (generate.py's default is [30, 10]), stage threshold "
        "0.1, cfg 1.0, 50k samples, latents decoded with sd-vae-ft-ema",
        ours="the same sampler: same per-stage sigma table, Euler steps, per-stage CFG with the null class and the "
        "guidance interval (tests/test_official_checkpoints.py checks it against the official sampler)",
        results={512: "FID 18.74, IS 80.16, precision 0.442, recall 0.537 (400K steps at batch 256)"},
    ),
    "elit-sit": OfficialSource(
        title="SiT-XL/2 flow-matching baseline (official release in the ELIT repository)",
        code="https://github.com/snap-research/elit (models/sit.py, samplers.py)",
        weights=f"{_ELIT_WEIGHTS} (sit_imagenet_256px_1k_0400000.pt, sit_imagenet_512px_1k_0400000.pt)",
        license="Snap Inc. Non-Commercial License: non-commercial research use only (the ELIT repository's LICENSE, "
        "which covers the code and the checkpoints it distributes); keep the license text with any redistribution",
        license_meta=_SNAP_LICENSE,
        steps_per_stage=[50],
        guidance_scale=1.0,
        guidance_interval=None,
        official_sampler="Euler ODE, 50 steps, cfg 1.0, 50k samples, latents decoded with sd-vae-ft-ema",
        ours="the same sampler (one stage: sigma = linspace(1, 0, 51), Euler)",
        results={
            256: "FID 18.97, IS 73.32, precision 0.252, recall 0.530 (400K steps at batch 256)",
            512: "FID 21.82, IS 67.58, precision 0.420, recall 0.495 (400K steps at batch 256)",
        },
    ),
    "repa": OfficialSource(
        title="SiT-XL/2 + REPA (official release)",
        code="https://github.com/sihyun-yu/REPA (models/sit.py, samplers.py)",
        weights="the SiT-XL/2 checkpoint (4M iterations) linked from the REPA README",
        license="MIT, as the REPA repository declares it (check its LICENSE file before redistributing)",
        license_meta=dict(license="mit"),
        steps_per_stage=[50],
        guidance_scale=1.8,
        guidance_interval=(0.0, 0.7),
        official_sampler="the SDE sampler (Euler-Maruyama, 250 steps), cfg 1.8 applied for t <= 0.7 (guidance "
        "interval), latents decoded with sd-vae-ft-ema",
        ours="REPA's deterministic sampler (its --mode ode: Euler, 50 steps) with the same guidance; the SDE sampler "
        "is not implemented here, so the FID below is not what this pipeline was measured at (not measured)",
        results={256: "FID 1.42 (cfg 1.8 with the guidance interval, SDE sampler)"},
    ),
    "sit": OfficialSource(
        title="SiT-XL/2 (original release, Ma et al. 2024)",
        code="https://github.com/willisma/SiT (models.py, transport/)",
        weights="SiT-XL-2-256x256.pt, linked from the SiT README",
        license="MIT (the SiT README: 'This project is under the MIT license')",
        license_meta=dict(license="mit"),
        steps_per_stage=[50],
        guidance_scale=1.5,
        guidance_interval=None,
        official_sampler="the paper's SDE sampler (250 steps) with cfg 1.5 for the FID; sample.py defaults to the "
        "adaptive dopri5 ODE solver. Its CFG guides only the first 3 of the 4 latent channels (DiT's reproducibility "
        "quirk)",
        ours="Euler ODE on the same flow (time reversed and velocity negated in the converted weights), CFG on all "
        "channels: neither the SDE, dopri5 nor the 3-channel CFG is reproduced, so the FID below was not measured "
        "for this pipeline",
        results={256: "FID-50K 2.06 (SiT README; SDE sampler, cfg 1.5)"},
    ),
}


def _load_vae(vae):
    """None, an AutoencoderKL, or a local folder / Hub id -> (AutoencoderKL or None, its reference string)."""
    if vae is None:
        return None, DEFAULT_VAE
    if isinstance(vae, str):
        from diffusers import AutoencoderKL

        # a Hub id names the VAE; a local folder is a copy of the SD VAE, recorded by its Hub id
        reference = DEFAULT_VAE if os.path.isdir(vae) else vae
        try:
            vae = AutoencoderKL.from_pretrained(vae)
        except Exception as err:  # noqa: BLE001 - every failure gets the same advice
            raise ValueError(
                f"could not load the VAE {vae!r} ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
                f"pass a local copy of {DEFAULT_VAE} (--vae PATH), or no VAE (--vae none: the pipeline then records "
                f"{DEFAULT_VAE!r} and decodes once one is passed)"
            ) from None
    else:
        reference = DEFAULT_VAE
    return vae, reference


def _check_vae(vae, in_channels: int) -> None:
    cfg = vae.config
    if cfg.latent_channels != in_channels:
        raise ValueError(f"the VAE has {cfg.latent_channels} latent channels, the transformer {in_channels}")
    if abs(cfg.scaling_factor - SD_VAE_SCALING) > 1e-9 or (cfg.get("shift_factor", None) or 0.0) != 0.0:
        raise ValueError(
            f"the official latents are SD-VAE latents x {SD_VAE_SCALING} with no shift; this VAE's config has "
            f"scaling_factor={cfg.scaling_factor}, shift_factor={cfg.get('shift_factor', None)}"
        )


def convert_official_checkpoint(
    checkpoint: str,
    source: str,
    vae=None,
    num_heads: int | None = None,
    weights: str = "ema",
    steps_per_stage: list[int] | None = None,
) -> DFMDiTPipeline:
    """An official checkpoint file -> DFMDiTPipeline (float32), its outputs the official model's.

    Args:
        checkpoint: the official ``.pt`` (training checkpoint or plain state dict) or a ``.safetensors`` file.
        source: "elit-dfm" (DFM-SiT), "elit-sit" (the ELIT repository's SiT baselines), "repa" or "sit" (willisma/SiT).
        vae: None (no VAE in the pipeline; it records the SD VAE it needs), a diffusers AutoencoderKL, or its
            local folder / Hub id. Its config must scale latents by 0.18215 with no shift (the SD VAE's).
        num_heads: attention heads, needed only for non-standard widths (official sizes are read from the name).
        weights: "ema" (the official evaluations' weights) or "model", for training checkpoints.
        steps_per_stage: Euler steps per stage (default: the official evaluation's, e.g. [40, 10] for DFM-SiT).

    The scheduler holds the official steps and stage threshold 0.1; the official guidance is listed by
    :func:`official_model_card` (and ``SOURCES[source]``) and passed at call time.
    """
    if source not in OFFICIAL_SOURCES:
        raise ValueError(f"source must be one of {OFFICIAL_SOURCES}, got {source!r}")
    state, args = load_official_checkpoint(checkpoint, weights=weights)
    transformer = transformer_from_official(state, source, args, num_heads=num_heads)
    vae, reference = _load_vae(vae)
    if vae is not None:
        _check_vae(vae, transformer.config.in_channels)
    num_stages = transformer.config.num_stages
    steps = list(steps_per_stage) if steps_per_stage is not None else list(SOURCES[source].steps_per_stage)
    if len(steps) != num_stages:
        raise ValueError(f"steps_per_stage must have {num_stages} entries (one per stage), got {steps}")
    scheduler = DFMScheduler(num_stages=num_stages, steps_per_stage=steps, stage_thresholds=[0.1] * (num_stages - 1))
    classes = transformer.config.num_classes
    id2label = dict(enumerate(IMAGENET_CLASSES)) if classes == len(IMAGENET_CLASSES) else None
    return DFMDiTPipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label, vae_reference=reference
    )


def official_sampling_kwargs(source: str) -> dict:
    """The official guidance as DFMDiTPipeline call arguments (steps and thresholds live in the scheduler)."""
    src = SOURCES[source]
    kwargs = {"guidance_scale": src.guidance_scale}
    if src.guidance_interval is not None:
        kwargs["guidance_interval"] = src.guidance_interval
    return kwargs


def official_model_card(pipe: DFMDiTPipeline, source: str, checkpoint: str, repo_id: str | None = None) -> str:
    """Markdown model card (with YAML metadata) of a converted official checkpoint."""
    src = SOURCES[source]
    t, s = pipe.transformer.config, pipe.scheduler.config
    resolution = t.sample_size * (pipe.vae_scale_factor if pipe.vae is not None else 8)
    name = repo_id or os.path.basename(os.path.normpath(checkpoint))
    meta = ["---", "library_name: diffusers", *(f"{k}: {v}" for k, v in src.license_meta.items())]
    meta += ["pipeline_tag: unconditional-image-generation", "tags:", "- dfm-diffusers", "- sit", "- imagenet"]
    if t.num_stages > 1:
        meta += ["- decomposable-flow-matching", "- dfm"]
    meta.append("---")
    call = "".join(f", {k}={v!r}" for k, v in official_sampling_kwargs(source).items())
    result = src.results.get(resolution)
    lines = [
        f"# {name}",
        "",
        f"{src.title}, converted to a `DFMDiTPipeline` of dfm-diffusers. The transformer reproduces the official "
        f"model's outputs (to float32 rounding); nothing was retrained.",
        "",
        "## Source and license",
        "",
        f"- code: {src.code}",
        f"- weights: {src.weights}; converted file: `{os.path.basename(checkpoint)}`",
        f"- license of the weights: {src.license}",
        "",
        "## What you get",
        "",
        f"- ImageNet-1k class-conditional generation at {resolution}x{resolution} ({t.num_classes} classes, "
        f"class {t.num_classes} is the null class for guidance); `pipe.get_label_ids(\"golden retriever\")` or class "
        f"names in `class_labels`",
        f"- {t.num_stages} stage(s), {t.num_layers} blocks, width {t.num_attention_heads * t.attention_head_dim}, "
        f"patch size {t.patch_size}",
        f"- latents of the SD VAE x {SD_VAE_SCALING}: {pipe.config.vae_reference}"
        + ("" if pipe.vae is not None else " (not included: pass `vae=AutoencoderKL.from_pretrained(...)`)"),
        f"- official result: {result}" if result else f"- official results (other resolutions): {src.results}",
        "",
        "## Sampling settings",
        "",
        f"- official: {src.official_sampler}",
        f"- this pipeline: {src.ours}",
        f"- scheduler: Euler, steps per stage {list(s.steps_per_stage)}, stage thresholds {list(s.stage_thresholds)}",
        f"- call: `pipe(class_labels=[207]{call})`",
        "",
        "## How to load",
        "",
        "```python",
        "from dfm_diffusers import DFMDiTPipeline",
        "",
        f'pipe = DFMDiTPipeline.from_pretrained("{repo_id or "PATH_TO_THIS_FOLDER"}")',
        f'image = pipe(class_labels=["golden retriever"]{call}).images[0]',
        "```",
        "",
        "Install with `pip install dfm-diffusers`.",
    ]
    return "\n".join(meta + lines) + "\n"


def save_official_pipeline(pipe: DFMDiTPipeline, output: str, source: str, checkpoint: str, repo_id: str | None = None):
    """save_pretrained + README.md (the model card)."""
    pipe.save_pretrained(output)
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(official_model_card(pipe, source, checkpoint, repo_id=repo_id))
