"""A small analog of the paper's FLUX finetuning experiment (Table 3; issue 10 part 5), on a GPU in one command.

    python bench/flux_finetune_analog.py --out runs/flux-analog            # GPU; resumable: run the same command
                                                                            # again after a time limit to go on
    python bench/flux_finetune_analog.py --out /tmp/a --smoke              # minutes on a CPU: the pipeline works

No FLUX weights exist offline, so the analog uses the FLUX architecture itself: a small FluxTransformer2DModel
(guidance embedding, the test harness's tiny CLIP/T5 text encoders, captions "a photo of a <class name>"), in a
pseudo-latent space (Fashion-MNIST 32x32 in [-1, 1], space-to-depth 2x2 -> 4 x 16 x 16, scaled to unit variance;
FLUX's 2x2 packing then gives 8x8 tokens).

1. pretrain: plain flow matching (the shared DFM objective with one stage, caption dropout 0.1, guidance input 1)
   on data A = classes 0-4, ``--pretrain-steps`` steps;
   (``--task sharpen``: A = classes 0-4 blurred, B = the same images sharp, a task that differs in fine detail);
2. finetune on data B = classes 5-9 for ``--finetune-steps`` equal steps, every method and seed from the same
   pretrained weights, full finetuning, the shared training loop (dfm_diffusers.training.loop.run_training):
   - ``ft``: FM finetuning (DFMTransformer2DModel.from_flux(num_stages=1) == FLUX; the paper's FLUX-FT);
   - ``dfm_old``: DFM, 2 stages at factor 2, the first implementation's conversion (stage_upsampling=[1, 1]:
     stage 0 noised at its own resolution and nearest-upsampled into FLUX);
   - ``dfm_new``: DFM, 2 stages at factor 2, the paper's conversion (stage 0 carried at full resolution), the new
     stage's input projection and head both zero (``new_stage_init="zero"``);
   - ``dfm_embed``: the same with the library's default ``new_stage_init="x_embedder"`` (the new stage's input
     projection starts as FLUX's x_embedder, its head at zero);
   - ``dfm_band``: the band-split conversion (the library's default since issue 17: Haar pyramid, every later stage
     starts as FLUX's input projection and head split into bands, FLUX conditioned on its input's rms noise level),
     the library's objective defaults; ``dfm_band_w``: the same with stage weights [0.7, 0.3];
   - ``dfm_new_bal`` / ``dfm_embed_bal``: with the pixel-space reproduction's fix (issue 9): the detail band
     standardized relative to stage 0 (``stage_scales: auto_relative``; stage 0 unchanged, so the replication holds)
     and stage weights [0.7, 0.3];
   - ``dfm_coarse`` / ``dfm_coarse_bal``: ``dfm_embed`` / ``dfm_embed_bal`` with the coarse phase on the coarse grid
     (``coarse_phase_on_coarse_grid``: phase 0 is the pretrained model at half resolution, 1/4 of the tokens;
     docs/coarse_grid.md). Its step-0 replication compares the coarse phase at the band's sigma of equal
     signal-to-noise ratio (DFMScheduler.band_sigma) with the pretrained model's own error at full resolution. The
     pretrained model here saw only the 16x16 latent: half resolution is new to it (FLUX itself trains at many).
3. report:
   - step 0, "replicates FLUX" measured: for each conversion, the stage-0 clean-estimate error of the converted model
     on held-out B (and A) content at sigma 0.1..0.9, divided by the pretrained model's own error on the same
     low-resolution content presented in distribution (its nearest upsampling + i.i.d. full-resolution noise);
     1.00 = replicates;
   - the pretrained model's own quality on A (FD against A's test set, next to the FD of real A training images:
     the floor), so "pretrained until its samples are good" is a number;
   - FD on B (features of a small classifier trained on all 10 classes, dfm_diffusers.evaluation; no Inception
     offline) of ``--num-samples`` samples at step 0 (the converted model before any finetuning) and 4 checkpoints,
     for each of ``--seeds``; sampling as the paper: true CFG ``--cfg`` (default 3.0) against the empty prompt,
     guidance input 1.0, FM ``--steps`` steps, DFM split 3:1;
   - at step 0 also FD on A (does the converted model generate what the pretrained one knows?);
   - at the last step, FD on B at every static time shift of ``--final-shifts`` (which shift fits each method);
   - sample grids with the stage previews (final checkpoint, seed 0).
The (method, seed) runs are independent processes on the same GPU (``--workers``; a tiny model leaves the GPU idle
between kernel launches, so they overlap well). Everything goes to --out: pretrained/ (FLUX), classifier.pt,
replication.json, pretrained_quality.json, runs/<method>-seed<k>/ (the training loop's checkpoints and logs),
fd.jsonl (one row per method, seed, step), results.json, RESULTS.md, fd_curve.png, grids/*.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import use_test_harness  # noqa: E402

use_test_harness()  # the offline tiny text encoders of the test harness
from conftest import make_tiny_flux_components, make_tiny_tokenizers  # noqa: E402
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

from dfm_diffusers import DFMPipeline, DFMScheduler, DFMTransformer2DModel, LaplacianDecomposition  # noqa: E402
from dfm_diffusers.data.band_stats import estimate_stage_scales  # noqa: E402
from dfm_diffusers.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from dfm_diffusers.evaluation import extract_features, frechet_distance, precision_recall, train_feature_classifier  # noqa: E402
from dfm_diffusers.training.loop import LoopConfig, run_training  # noqa: E402
from dfm_diffusers.training.objective import DFMObjectiveConfig, dfm_objective  # noqa: E402
from dfm_diffusers.visualize import image_grid  # noqa: E402

CLASSES_A, CLASSES_B = list(range(5)), list(range(5, 10))
METHODS = {"ft": dict(num_stages=1),
           "dfm_old": dict(num_stages=2, stage_upsampling=[1, 1], new_stage_init="zero"),
           "dfm_new": dict(num_stages=2, new_stage_init="zero"), "dfm_new_bal": dict(num_stages=2, new_stage_init="zero"),
           "dfm_embed": dict(num_stages=2, new_stage_init="x_embedder"),
           "dfm_embed_bal": dict(num_stages=2, new_stage_init="x_embedder"),
           "dfm_band": dict(num_stages=2, new_stage_init="band_split"),
           "dfm_band_w": dict(num_stages=2, new_stage_init="band_split"),
           "dfm_coarse": dict(num_stages=2, new_stage_init="x_embedder"),
           "dfm_coarse_bal": dict(num_stages=2, new_stage_init="x_embedder"),
           "dfm_band_coarse": dict(num_stages=2, new_stage_init="band_split")}
COARSE = {"dfm_coarse", "dfm_coarse_bal", "dfm_band_coarse"}  # coarse_phase_on_coarse_grid
# objective settings per method (default: the library's): the _bal methods use the pixel-space reproduction's fix
# (issue 9), detail band standardized relative to stage 0 (auto_relative keeps stage 0, so the step-0 replication
# holds) and stage weights [0.7, 0.3]
OBJECTIVE = {"dfm_new_bal": dict(stage_weights=[0.7, 0.3]), "dfm_embed_bal": dict(stage_weights=[0.7, 0.3]),
             "dfm_band_w": dict(stage_weights=[0.7, 0.3]), "dfm_coarse_bal": dict(stage_weights=[0.7, 0.3])}
STAGE_SCALES = {"dfm_new_bal": "auto_relative", "dfm_embed_bal": "auto_relative", "dfm_coarse_bal": "auto_relative"}
MAX_TEXT = 16


@dataclass
class AnalogConfig(LoopConfig, DFMObjectiveConfig):
    """Training settings of one run (the shared loop's and the DFM objective's fields)."""

    caption_dropout: float = 0.1


class LatentDataset(torch.utils.data.Dataset):
    """(latent [4, 16, 16], class label) pairs."""

    def __init__(self, latents, labels):
        self.latents, self.labels = latents, labels

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "label": self.labels[i]}


def load_data(classes, split, data_dir=None, max_per_class=None):
    """Fashion-MNIST images of ``classes``: ([N, 1, 32, 32] in [-1, 1], labels [N])."""
    images, labels = load_fashion_mnist(data_dir, split)
    keep = torch.isin(labels, torch.tensor(classes))
    images, labels = images[keep], labels[keep]
    if max_per_class:
        index = torch.cat([torch.nonzero(labels == c)[:max_per_class, 0] for c in classes])
        images, labels = images[index], labels[index]
    x = F.pad(images.float() / 127.5 - 1, (2, 2, 2, 2), value=-1)[:, None]
    return x, labels.long()


def blur(x):
    """Images without their finest octave: 2x2 box downsampling, bilinear upsampling back."""
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)


class LatentSpace:
    """Images [N, 1, 32, 32] <-> pseudo-latents [N, 4, 16, 16] (space-to-depth, affine to zero mean, unit std)."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std = mean, std

    def encode(self, x):
        return (F.pixel_unshuffle(x, 2) - self.mean) / self.std

    def decode(self, z):
        return F.pixel_shuffle(z * self.std + self.mean, 2).clamp(-1, 1)


class TextBank:
    """Prompt embeddings of "a photo of a <class>" for the 10 classes and of the empty prompt (index 10), from the
    harness's tiny CLIP/T5 (frozen, computed once)."""

    def __init__(self, folder: str, device):
        os.makedirs(folder, exist_ok=True)
        components = make_tiny_flux_components(make_tiny_tokenizers(folder))
        pipe = FluxPipeline(**components)
        prompts = [f"a photo of a {name.lower()}" for name in FASHION_MNIST_CLASSES] + [""]
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=MAX_TEXT)
        self.embeds, self.pooled = embeds.to(device), pooled.to(device)
        self.empty = len(prompts) - 1

    def lookup(self, labels, dropout: float = 0.0, generator=None):
        index = labels.clone()
        if dropout > 0:
            drop = torch.rand(len(labels), generator=generator, device=labels.device) < dropout
            index[drop] = self.empty
        return self.embeds[index], self.pooled[index]


def flux_config(args) -> dict:
    return dict(patch_size=1, in_channels=16, num_layers=args.layers, num_single_layers=args.single_layers,
                attention_head_dim=32, num_attention_heads=args.heads, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def run_flux(flux, y, sigma, embeds, pooled):
    """Plain FLUX velocity on [B, 4, H, W] (FluxPipeline's packing and ids, guidance input 1)."""
    b, c, h, w = y.shape
    out = flux(hidden_states=FluxPipeline._pack_latents(y, b, c, h, w), encoder_hidden_states=embeds,
               pooled_projections=pooled, timestep=sigma, guidance=torch.ones(b, device=y.device),
               img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, y.device, y.dtype),
               txt_ids=torch.zeros(embeds.shape[1], 3, device=y.device)).sample
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def convert(flux, method: str, **kwargs) -> DFMTransformer2DModel:
    """The method's conversion of the pretrained model (DFMTransformer2DModel.from_flux with METHODS[method])."""
    model = DFMTransformer2DModel.from_flux(flux, **METHODS[method], **kwargs)
    return model.set_coarse_phase_on_coarse_grid() if method in COARSE else model


def make_loss_fn(config: AnalogConfig, text: TextBank, decomposition):
    """loss_fn(model, batch) of the shared loop: the DFM objective (one stage = flow matching) on the batch."""

    def loss_fn(model, batch):
        latents = batch["latents"]
        embeds, pooled = text.lookup(batch["label"].to(latents.device), config.caption_dropout)
        base = model.module if hasattr(model, "module") else model

        def predict(inputs, draw):
            if isinstance(base, DFMTransformer2DModel):
                return model(hidden_states=inputs, encoder_hidden_states=embeds, pooled_projections=pooled,
                             timestep=draw.sigmas, num_active_stages=draw.num_active_stages,
                             guidance=torch.ones(len(latents), device=latents.device), return_dict=False)[0]
            return [run_flux(model, inputs[0], draw.sigmas[:, 0], embeds, pooled)]

        bands = decomposition.decompose(latents) if decomposition is not None else [latents]
        carrier = None
        if isinstance(base, DFMTransformer2DModel) and base.config.get("coarse_phase_on_coarse_grid", False):
            carrier = decomposition.upsampling[0]
        out = dfm_objective(config, bands, predict, coarse_phase_carrier=carrier)
        return out.loss, out.logs

    return loss_fn


def make_pipeline(model, steps: int, threshold: float, shift: float = 1.0, split=None):
    num_stages = model.config.num_stages
    split = split or ([steps] if num_stages == 1 else [steps - steps // 4, steps // 4])
    scheduler = DFMScheduler(num_stages=num_stages, steps_per_stage=split,
                             stage_thresholds=[threshold] * (num_stages - 1), shift=shift)
    pipe = DFMPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                       tokenizer_2=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(model, text: TextBank, space: LatentSpace, labels, args, seed: int, previews: bool = False,
             shift: float = 1.0, threshold: float | None = None, split=None):
    """Images [N, 1, 32, 32] for class ``labels`` (true CFG against the empty prompt, guidance input 1)."""
    pipe = make_pipeline(model, args.steps, args.threshold if threshold is None else threshold, shift, split)
    images, stage_previews = [], None
    g = torch.Generator(device=labels.device).manual_seed(seed)
    for chunk in labels.split(args.sample_batch):
        embeds, pooled = text.lookup(chunk)
        empty = torch.full_like(chunk, text.empty)
        neg, neg_pooled = text.lookup(empty)
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                   negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=args.cfg, guidance_scale=1.0,
                   height=16 * pipe.vae_scale_factor, width=16 * pipe.vae_scale_factor, generator=g,
                   output_type="latent", return_previews=previews)
        size = 16 * pipe.vae_scale_factor  # "latent" output is packed as FluxPipeline's; previews are not
        images.append(space.decode(FluxPipeline._unpack_latents(out.images, size, size, pipe.vae_scale_factor).float()))
        if previews and stage_previews is None:
            stage_previews = [space.decode(p.float()) for p in out.previews]
    return torch.cat(images), stage_previews


@torch.no_grad()
def replication(flux, model, text, latents, labels, sigmas, seed=0):
    """Stage-0 clean-estimate error of the converted ``model`` / the pretrained FLUX's own error on the same
    low-resolution content presented in distribution (nearest upsampling + i.i.d. full-resolution noise)."""
    g = torch.Generator(device=latents.device).manual_seed(seed)
    coarse = LaplacianDecomposition(2, 2).decompose(latents)[0]
    carrier = F.interpolate(coarse, scale_factor=2, mode="nearest")
    stage0 = LaplacianDecomposition.from_config(model.config).decompose(latents)[0]
    embeds, pooled = text.lookup(labels)
    b = len(latents)
    rows = []
    on_coarse_grid = model.config.get("coarse_phase_on_coarse_grid", False)
    for s in sigmas:
        sig = torch.full((b,), s, device=latents.device)
        y = (1 - s) * carrier + s * torch.randn(carrier.shape, generator=g, device=latents.device)
        reference = F.avg_pool2d(y - s * run_flux(flux, y, sig, embeds, pooled), 2)
        if on_coarse_grid:  # the band noised at its own resolution, at the sigma of equal signal-to-noise ratio
            s_c = DFMScheduler.band_sigma(s, 2)
            z = (1 - s_c) * coarse + s_c * torch.randn(coarse.shape, generator=g, device=latents.device)
            sig_c = torch.full((b,), s_c, device=latents.device)
            v = model(hidden_states=[z, torch.zeros_like(latents)], encoder_hidden_states=embeds,
                      pooled_projections=pooled, timestep=torch.stack([sig_c, torch.ones_like(sig)], 1),
                      num_active_stages=torch.ones(b, dtype=torch.long, device=latents.device),
                      guidance=torch.ones(b, device=latents.device)).sample[0]
            converted_err = (z - s_c * v - coarse).pow(2).mean().item()
            reference_err = (reference - coarse).pow(2).mean().item()
            rows.append(dict(sigma=s, converted=converted_err, pretrained=reference_err,
                             ratio=converted_err / reference_err))
            continue
        if stage0.shape == carrier.shape:  # the carrier conversion: the very input FLUX got
            z = y
        else:
            z = (1 - s) * stage0 + s * torch.randn(stage0.shape, generator=g, device=latents.device)
        bands = [z, torch.zeros_like(latents)]
        v = model(hidden_states=bands, encoder_hidden_states=embeds, pooled_projections=pooled,
                  timestep=torch.stack([sig, torch.ones_like(sig)], 1),
                  num_active_stages=torch.ones(b, dtype=torch.long, device=latents.device),
                  guidance=torch.ones(b, device=latents.device)).sample[0]
        estimate = z - s * v
        estimate = F.avg_pool2d(estimate, estimate.shape[-1] // coarse.shape[-1]) if estimate.shape != coarse.shape \
            else estimate
        converted_err = (estimate - coarse).pow(2).mean().item()
        reference_err = (reference - coarse).pow(2).mean().item()
        rows.append(dict(sigma=s, converted=converted_err, pretrained=reference_err, ratio=converted_err / reference_err))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--finetune-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256, help="finetuning batch size")
    parser.add_argument("--pretrain-batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--single-layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="finetuning seeds")
    parser.add_argument("--workers", type=int, default=1,
                        help="(method, seed) runs in parallel processes (1: one after another in this process)")
    parser.add_argument("--prepare-only", action="store_true", help="pretrain, replication, classifier; then stop")
    parser.add_argument("--no-summary", action="store_true", help="skip the summary (a worker of --workers)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--sample-batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40, help="sampling steps (DFM: split 3:1 between its stages)")
    parser.add_argument("--threshold", type=float, default=0.2, help="DFM stage threshold (actual sigma)")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--final-shifts", type=float, nargs="*", default=[0.5, 2.0, 3.0],
                        help="static time shifts also sampled at the last step (1.0 is sampled at every checkpoint)")
    parser.add_argument("--task", choices=["classes", "sharpen"], default="classes",
                        help="classes: pretrain on classes 0-4, finetune on 5-9; sharpen: pretrain on classes 0-4 "
                        "blurred (2x box down, bilinear up), finetune on the same images sharp (a change in fine "
                        "detail only: where the coarse stage should matter)")
    parser.add_argument("--eval-steps", type=int, nargs="*", default=None,
                        help="finetuning steps scored (default: 4 evenly spaced; the issue-17 protocol: "
                        "250 500 1000 2000 4000 with --finetune-steps 4000)")
    parser.add_argument("--classifier-steps", type=int, default=2000)
    parser.add_argument("--mixed-precision", default="bf16" if torch.cuda.is_available() else "no")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--step0-sweep", action="store_true",
                        help="after pretraining: FD on A of the band-split conversion at step 0 for every sampler "
                             "setting of --sweep-thresholds x --sweep-splits x --sweep-flux-timesteps (why the converted "
                             "model's samples differ from the pretrained one's), to step0_sweep.jsonl; then stop")
    parser.add_argument("--sweep-thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.7])
    parser.add_argument("--sweep-splits", nargs="+", default=["30,10", "20,20"], help="steps per stage, e.g. 30,10")
    parser.add_argument("--sweep-flux-timesteps", nargs="+", default=["noise_rms"],
                        choices=["noise_rms", "newest", "stage_0"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the whole path in minutes on a CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.finetune_steps, args.batch_size, args.num_samples = 40, 8, 16, 40
        args.pretrain_batch_size = 16
        args.layers, args.single_layers, args.heads, args.classifier_steps, args.sample_batch = 1, 1, 2, 20, 40
        args.steps, args.seeds = 8, args.seeds[:1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    per_class = 200 if args.smoke else None

    text = TextBank(os.path.join(args.out, "tokenizers"), device)
    x_a, y_a = load_data(CLASSES_A, "train", args.data_dir, per_class)
    x_a_test, y_a_test = load_data(CLASSES_A, "test", args.data_dir, per_class)
    if args.task == "classes":  # B: new classes
        classes_b = CLASSES_B
        x_b, y_b = load_data(CLASSES_B, "train", args.data_dir, per_class)
        x_b_test, y_b_test = load_data(CLASSES_B, "test", args.data_dir, per_class)
    else:  # sharpen: A = the same classes blurred (2x box down, bilinear up), B = them sharp
        classes_b = CLASSES_A
        x_b, y_b, x_b_test, y_b_test = x_a, y_a, x_a_test, y_a_test
        x_a, x_a_test = blur(x_a), blur(x_a_test)
    probe = F.pixel_unshuffle(x_a, 2)
    space = LatentSpace(probe.mean().item(), probe.std().item())
    loop = dict(train_batch_size=args.batch_size, mixed_precision=args.mixed_precision, use_ema=False,
                report_to="none", checkpoints_total_limit=1, resume_from_checkpoint="latest", log_every=50,
                lr_warmup_steps=0 if args.smoke else 200)

    # 1) pretrain FLUX with flow matching on A
    pretrained_dir = os.path.join(args.out, "pretrained")
    if not os.path.isfile(os.path.join(pretrained_dir, "config.json")):
        torch.manual_seed(0)
        flux = FluxTransformer2DModel(**flux_config(args))
        config = AnalogConfig(output_dir=os.path.join(args.out, "pretrain_run"), max_train_steps=args.pretrain_steps,
                              **{**loop, "train_batch_size": args.pretrain_batch_size},
                              learning_rate=args.lr, checkpointing_steps=max(args.pretrain_steps // 10, 1),
                              validation_steps=0)
        run_training(config, flux, LatentDataset(space.encode(x_a), y_a), make_loss_fn(config, text, None))
        flux.to("cpu").save_pretrained(pretrained_dir)
    flux = FluxTransformer2DModel.from_pretrained(pretrained_dir).to(device).eval()

    # 2) step-0 replication of the pretrained model's low-resolution predictions
    replication_path = os.path.join(args.out, "replication.json")
    if not os.path.isfile(replication_path) and not args.step0_sweep:
        sigmas = [0.1, 0.3, 0.5, 0.7, 0.9]
        report = {}
        for name in ("dfm_old", "dfm_new", "dfm_coarse"):
            model = convert(flux, name).to(device)
            report[name] = {
                split: replication(flux, model, text, space.encode(x[:1000]).to(device), y[:1000].to(device), sigmas)
                for split, (x, y) in {"B": (x_b_test, y_b_test), "A": (x_a_test, y_a_test)}.items()
            }
        with open(replication_path, "w") as f:
            json.dump(report, f, indent=2)
    replication_report = {}
    if os.path.isfile(replication_path):
        with open(replication_path) as f:
            replication_report = json.load(f)

    # 3) a feature classifier on all 10 classes; the pretrained model's own quality on A
    classifier_path = os.path.join(args.out, "classifier.pt")
    if os.path.isfile(classifier_path):
        classifier = torch.load(classifier_path, weights_only=False).to(device)
    else:
        classifier = train_feature_classifier(torch.cat([x_a, x_b]), torch.cat([y_a, y_b]), 10,
                                              steps=args.classifier_steps, device=device)
        torch.save(classifier.cpu(), classifier_path)
        classifier.to(device)
    real_features = extract_features(classifier, x_b_test.to(device))
    real_features_a = extract_features(classifier, x_a_test.to(device))
    if args.step0_sweep:
        step0_sweep(flux, classifier, real_features_a, text, space, args, device)
        return
    quality_path = os.path.join(args.out, "pretrained_quality.json")
    if not os.path.isfile(quality_path):
        n = min(args.num_samples, len(x_a_test))
        labels_a = torch.tensor(CLASSES_A, device=device).repeat_interleave(n // len(CLASSES_A))
        pretrained_dfm = DFMTransformer2DModel.from_flux(flux, num_stages=1, torch_dtype=torch.float32).to(device)
        samples, _ = generate(pretrained_dfm.eval(), text, space, labels_a, args, seed=999)
        a_test = extract_features(classifier, x_a_test.to(device))
        quality = dict(fd_samples_vs_A_test=frechet_distance(extract_features(classifier, samples.to(device)), a_test),
                       fd_A_train_vs_A_test=frechet_distance(extract_features(classifier, x_a[:n].to(device)), a_test),
                       fd_B_test_vs_A_test=frechet_distance(real_features, a_test), num_samples=n)
        with open(quality_path, "w") as f:
            json.dump(quality, f, indent=2)
        os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
        image_grid(list(samples[:: max(len(samples) // 40, 1)][:40].split(10)), size=64).save(
            os.path.join(args.out, "grids", "pretrained_A.png"))
        del pretrained_dfm
    if args.prepare_only:
        return
    if args.workers > 1:
        jobs = [(m, k) for m in args.methods for k in args.seeds]
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        running = []
        for m, k in jobs:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--methods", m, "--seeds", str(k), "--workers",
                   "1", "--no-summary"]
            log = open(os.path.join(args.out, f"worker-{m}-seed{k}.log"), "a")
            running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            while len([p for p in running if p.poll() is None]) >= args.workers:
                running[[p.poll() is None for p in running].index(True)].wait()
        failed = [p.args for p in running if p.wait() != 0]
        if failed:
            raise SystemExit(f"{len(failed)} worker(s) failed; see {args.out}/worker-*.log")
    fd_path = os.path.join(args.out, "fd.jsonl")
    done = set()
    if os.path.isfile(fd_path):
        with open(fd_path) as f:
            done = {(r["method"], r["seed"], r["step"], r.get("data", "B"), r.get("shift", 1.0))
                for r in map(json.loads, f)}
    eval_labels = torch.tensor(classes_b, device=device).repeat_interleave(args.num_samples // len(classes_b))
    eval_steps = sorted(set(args.eval_steps or [max(args.finetune_steps * k // 4, 1) for k in (1, 2, 3, 4)]))
    eval_steps = [k for k in eval_steps if k <= args.finetune_steps] + [args.finetune_steps]
    checkpoint_every = math.gcd(*eval_steps)

    for method in args.methods if args.workers <= 1 else []:
        for seed in args.seeds:
            run_dir = os.path.join(args.out, "runs", f"{method}-seed{seed}")
            if os.path.isfile(os.path.join(run_dir, "done")):
                continue
            model = convert(flux, method, torch_dtype=torch.float32).train()
            train_data = LatentDataset(space.encode(x_b), y_b)
            if method in STAGE_SCALES:  # estimated first, so the conversion scales the new stage's input projection
                scales, _ = estimate_stage_scales(STAGE_SCALES[method], train_data,
                                                  LaplacianDecomposition.from_config(model.config), progress=False)
                model = convert(flux, method, stage_scales=scales, torch_dtype=torch.float32).train()
                print(f"{method}: stage_scales {STAGE_SCALES[method]} = {scales}", flush=True)
            decomposition = LaplacianDecomposition.from_config(model.config)

            def evaluate(trained, step, method=method, seed=seed):
                if step and step not in eval_steps:
                    return
                trained.eval()
                runs = [("B", 1.0), ("A", 1.0)]  # A: what the converted model knows at step 0, what finetuning forgets
                if step == args.finetune_steps:
                    runs += [("B", k) for k in args.final_shifts if k != 1.0]
                for data, shift in runs:
                    if (method, seed, step, data, shift) in done:
                        continue
                    labels = eval_labels if data == "B" or args.task == "sharpen" else eval_labels - len(CLASSES_A)
                    samples, _ = generate(trained, text, space, labels, args, seed=1000 + seed, shift=shift)
                    reference = real_features if data == "B" else real_features_a
                    features = extract_features(classifier, samples.to(device))
                    fd = frechet_distance(features, reference)
                    pr = precision_recall(reference.to(features), features)
                    with open(fd_path, "a") as f:
                        f.write(json.dumps(dict(method=method, seed=seed, step=step, fd=fd, data=data, shift=shift,
                                                precision=pr["precision"], recall=pr["recall"])) + "\n")
                    print(f"{method} seed {seed} step {step} {data} shift {shift}: FD {fd:.3f}", flush=True)
                if step == args.finetune_steps and seed == 0:
                    labels = torch.tensor(classes_b, device=device).repeat(2)
                    images, previews = generate(trained, text, space, labels, args, seed=7, previews=True)
                    os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
                    image_grid([*(previews or [])[:-1], images], size=64).save(
                        os.path.join(args.out, "grids", f"{method}.png"))
                trained.train()

            if (method, seed, 0, "A", 1.0) not in done:  # the converted model before any finetuning
                evaluate(model.to(device), 0)
                model.to("cpu")
            config = AnalogConfig(output_dir=run_dir, seed=seed, max_train_steps=args.finetune_steps,
                                  learning_rate=args.finetune_lr, checkpointing_steps=checkpoint_every,
                                  validation_steps=checkpoint_every, **loop, **OBJECTIVE.get(method, {}))
            run_training(config, model, train_data, make_loss_fn(config, text, decomposition),
                         sample_fn=evaluate)
            open(os.path.join(run_dir, "done"), "w").close()

    # 4) summary
    if not args.no_summary:
        summarize(args, replication_report)


def step0_sweep(flux, classifier, reference, text, space, args, device):
    """FD on A at step 0: the pretrained model (FM, --steps) and the band-split conversion under each sampler setting;
    one JSON line per setting to <out>/step0_sweep.jsonl as soon as it is scored (resumable)."""
    path = os.path.join(args.out, "step0_sweep.jsonl")
    done = set()
    if os.path.isfile(path):
        with open(path) as f:
            done = {(r["model"], r["flux_timestep"], r["threshold"], tuple(r["split"])) for r in map(json.loads, f)}
    labels = torch.tensor(CLASSES_A, device=device).repeat_interleave(args.num_samples // len(CLASSES_A))
    settings = [("flux", "-", 0.0, (args.steps,))] + [
        ("dfm_band", mode, threshold, tuple(int(k) for k in split.split(",")))
        for mode in args.sweep_flux_timesteps for split in args.sweep_splits for threshold in args.sweep_thresholds]
    for name, mode, threshold, split in settings:
        if (name, mode, threshold, split) in done:
            continue
        if name == "flux":
            model = DFMTransformer2DModel.from_flux(flux, num_stages=1, torch_dtype=torch.float32)
        else:
            model = DFMTransformer2DModel.from_flux(flux, num_stages=2, flux_timestep=mode, torch_dtype=torch.float32)
        samples, _ = generate(model.to(device).eval(), text, space, labels, args, seed=999, threshold=threshold,
                              split=list(split))
        features = extract_features(classifier, samples.to(device))
        row = dict(model=name, flux_timestep=mode, threshold=threshold, split=list(split),
                   fd_A=frechet_distance(features, reference), **precision_recall(reference.to(features), features),
                   num_samples=len(labels))
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(row, flush=True)


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(args, replication_report):
    """results.json, RESULTS.md (mean +- std over seeds; DFM / FT ratios per seed) and fd_curve.png from fd.jsonl."""
    with open(os.path.join(args.out, "fd.jsonl")) as f:
        all_rows = [json.loads(line) for line in f]
    rows = [r for r in all_rows if r.get("data", "B") == "B" and r.get("shift", 1.0) == 1.0]
    fd = {}
    for r in rows:
        fd.setdefault(r["method"], {}).setdefault(r["step"], {})[r["seed"]] = r["fd"]
    fd_a0, fd_shift = {}, {}
    for r in all_rows:
        if r.get("data", "B") == "A":
            fd_a0.setdefault(r["method"], []).append(r["fd"])
        elif r["step"] == args.finetune_steps:
            fd_shift.setdefault(r["method"], {}).setdefault(r.get("shift", 1.0), []).append(r["fd"])
    with open(os.path.join(args.out, "pretrained_quality.json")) as f:
        quality = json.load(f)
    summary = {m: {s: dict(zip(("mean", "std"), _mean_std(list(v.values()))), values=v) for s, v in sorted(st.items())}
               for m, st in fd.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(args=vars(args), replication=replication_report, pretrained_quality=quality, fd=summary,
                       fd_on_A_at_step_0=fd_a0, fd_at_last_step_by_shift=fd_shift), f, indent=2)
    lines = ["# FLUX finetuning analog (bench/flux_finetune_analog.py)", "",
             f"Pretrained model on A: FD {quality['fd_samples_vs_A_test']:.2f} against A's test set "
             f"(real A training images: {quality['fd_A_train_vs_A_test']:.2f}; B's test set: "
             f"{quality['fd_B_test_vs_A_test']:.2f}).", "",
             "## Step 0: converted stage-0 error / pretrained model's own error (in distribution)", "",
             "| sigma | " + " | ".join(f"{m} ({split})" for m in replication_report for split in ("B", "A")) + " |",
             "|---" * (2 * len(replication_report) + 1) + "|"]
    for i, s in enumerate(r["sigma"] for r in next(iter(replication_report.values()))["B"]):
        lines.append(f"| {s} | " + " | ".join(f"{rep[split][i]['ratio']:.3f}" for rep in replication_report.values()
                                              for split in ("B", "A")) + " |")
    steps = sorted({s for m in summary.values() for s in m})
    lines += ["", f"## FD on B, mean +- std over seeds {args.seeds} ({args.num_samples} samples, true CFG {args.cfg})",
              "", "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for m, per_step in summary.items():
        lines.append(f"| {m} | " + " | ".join(
            f"{per_step[s]['mean']:.2f} +- {per_step[s]['std']:.2f}" if s in per_step else "-" for s in steps) + " |")
    if "ft" in fd:
        lines += ["", "## FD / FT's FD, same seed, mean +- std", "",
                  "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for m in fd:
            if m == "ft":
                continue
            cells = []
            for s in steps:
                ratios = [v / fd["ft"][s][k] for k, v in fd[m].get(s, {}).items() if k in fd["ft"].get(s, {})]
                cells.append("%.3f +- %.3f" % _mean_std(ratios) if ratios else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if fd_a0:
        lines += ["", "## Step 0: FD on A (the converted model on what the pretrained one knows), mean +- std", "",
                  "| method | FD on A |", "|---|---|"]
        lines += [f"| {m} | " + "%.2f +- %.2f" % _mean_std(v) + " |" for m, v in fd_a0.items()]
    shifts = sorted({k for per in fd_shift.values() for k in per})
    if len(shifts) > 1:
        lines += ["", f"## Step {args.finetune_steps}: FD on B by static sampling shift, mean +- std", "",
                  "| method | " + " | ".join(f"shift {k}" for k in shifts) + " |", "|---" * (len(shifts) + 1) + "|"]
        for m, per in fd_shift.items():
            lines.append(f"| {m} | " + " | ".join("%.2f +- %.2f" % _mean_std(per[k]) if k in per else "-"
                                                  for k in shifts) + " |")
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, per_step in summary.items():
        xs = sorted(per_step)
        ax.errorbar(xs, [per_step[s]["mean"] for s in xs], yerr=[per_step[s]["std"] for s in xs], label=m,
                    marker="o", capsize=3)
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("FD on B (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("FLUX finetuning analog")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fd_curve.png"), dpi=120)


if __name__ == "__main__":
    main()
