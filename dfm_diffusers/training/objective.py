"""The DFM training distribution and loss.

Conventions: sigma = 1 is pure noise; x_sigma = (1 - sigma) * x + sigma * eps; target velocity v = eps - x.
Per sample: s* ~ Categorical(stage_weights) is the stage being generated; stages s < s* are "previous"
stages, partly denoised (sigma biased toward data); stages s > s* are masked (sigma 1, input zeroed, no loss).
With one stage this is ordinary flow matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling

from .config import finite, setting

SIGMA_SAMPLINGS = ("logit_normal", "uniform")
STAGE_SAMPLINGS = ("per_sample", "per_batch")


@dataclass
class DFMTrainingSigmas:
    """sigmas [B, S] float32, stage [B] long (s*), loss_mask [B, S] float32 (1 for s <= s*)."""

    sigmas: torch.Tensor
    stage: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def num_active_stages(self) -> torch.Tensor:
        """[B] long: s* + 1, the model's ``num_active_stages`` input."""
        return self.stage + 1


def small_tensor(values: Sequence[float], dtype: torch.dtype, device) -> torch.Tensor:
    """A few numbers as a tensor on ``device``. A plain ``torch.tensor(..., device="cuda")`` waits for the device
    (its host-to-device copy synchronizes the stream); this one is copied from pinned memory without waiting."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def default_stage_weights(num_stages: int) -> list[float]:
    """The paper's stage weights: [0.9, 0.1] for 2 stages; otherwise 0.9 on stage 0, the rest shared."""
    if num_stages == 1:
        return [1.0]
    if num_stages == 2:
        return [0.9, 0.1]
    return [0.9] + [0.1 / (num_stages - 1)] * (num_stages - 1)


def validate_training_distribution(
    num_stages: int,
    stage_weights: Sequence[float] | None,
    logit_std: float,
    previous_logit_std: float,
    sigma_sampling: str = "logit_normal",
    stage_sampling: str = "per_sample",
) -> list[float]:
    """Check the distribution's parameters; returns the stage weights normalized to sum 1."""
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    weights = default_stage_weights(num_stages) if stage_weights is None else [float(w) for w in stage_weights]
    if len(weights) != num_stages:
        raise ValueError(f"stage_weights must hold num_stages = {num_stages} numbers, got {weights}")
    if any(not w > 0 for w in weights):
        raise ValueError(f"stage_weights must all be positive, got {weights}")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0, got {logit_std}")
    if not previous_logit_std > 0:
        raise ValueError(f"previous_logit_std must be > 0, got {previous_logit_std}")
    if sigma_sampling not in SIGMA_SAMPLINGS:
        raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {sigma_sampling!r}")
    if stage_sampling not in STAGE_SAMPLINGS:
        raise ValueError(f"stage_sampling must be one of {STAGE_SAMPLINGS}, got {stage_sampling!r}")
    total = sum(weights)
    return [w / total for w in weights]


def sample_dfm_training_sigmas(
    batch_size: int,
    num_stages: int,
    stage_weights: Sequence[float] | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    previous_logit_mean: float = 1.5,
    previous_logit_std: float = 1.0,
    sigma_sampling: str = "logit_normal",
    stage_sampling: str = "per_sample",
    tied_timesteps: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> DFMTrainingSigmas:
    """Draw the per-sample DFM training sigmas.

    Args:
        stage_weights: probabilities of s* (normalized; default [0.9, 0.1] for 2 stages).
        logit_mean, logit_std: sigma_{s*} = sigmoid(N(logit_mean, logit_std)).
        previous_logit_mean, previous_logit_std: for s < s*, sigma_s = sigmoid(N(-previous_logit_mean,
            previous_logit_std)), i.e. t = 1 - sigma is logit-normal with location previous_logit_mean
            (the paper's 1.5 "toward data").
        sigma_sampling: "logit_normal" or "uniform" (ablation: every active sigma ~ U(0, 1)).
        stage_sampling: "per_sample" (default) or "per_batch" (one s* for the whole batch; ablation).
        tied_timesteps: ablation in which all stages are generated together with one shared sigma (every
            stage active, no masking; stage_weights is then unused).
        generator: makes the draw reproducible; tensors are drawn on ``generator``'s device.

    Returns:
        DFMTrainingSigmas(sigmas [B, S], stage [B], loss_mask [B, S]).
    """
    weights = validate_training_distribution(
        num_stages, stage_weights, logit_std, previous_logit_std, sigma_sampling, stage_sampling
    )
    draw_device = generator.device if generator is not None else device

    def draw(mean: float, std: float, size: int) -> torch.Tensor:
        scheme = "logit_normal" if sigma_sampling == "logit_normal" else "uniform"
        return compute_density_for_timestep_sampling(
            scheme, size, logit_mean=mean, logit_std=std, device=draw_device, generator=generator
        )

    if tied_timesteps:
        stage = torch.full((batch_size,), num_stages - 1, dtype=torch.long, device=draw_device)
        sigmas = draw(logit_mean, logit_std, batch_size)[:, None].repeat(1, num_stages)
    else:
        probs = small_tensor(weights, torch.float32, draw_device)
        count = batch_size if stage_sampling == "per_sample" else 1
        stage = torch.multinomial(probs, count, replacement=True, generator=generator).expand(batch_size)
        current = draw(logit_mean, logit_std, batch_size)
        previous = draw(-previous_logit_mean, previous_logit_std, batch_size * num_stages).view(batch_size, num_stages)
        index = torch.arange(num_stages, device=draw_device)[None, :]
        sigmas = torch.where(index < stage[:, None], previous, torch.ones_like(previous))
        sigmas = torch.where(index == stage[:, None], current[:, None], sigmas)
    index = torch.arange(num_stages, device=draw_device)[None, :]
    loss_mask = (index <= stage[:, None]).float()
    return DFMTrainingSigmas(
        sigmas=sigmas.float().to(device), stage=stage.contiguous().to(device), loss_mask=loss_mask.to(device)
    )


def noise_stages(
    stage_latents: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    loss_mask: torch.Tensor,
    noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Noise every stage at its sigma and zero the inputs of masked stages.

    Args:
        stage_latents: S clean bands, [B, C, H_s, W_s].
        sigmas: [B, S]; loss_mask: [B, S] (0 marks a masked stage).
        noise: optional S tensors like ``stage_latents``; drawn with ``generator`` otherwise.

    Returns:
        (model inputs, velocity targets eps - x), two lists of S tensors in the latents' dtype.
    """
    if len(stage_latents) != sigmas.shape[1]:
        raise ValueError(f"got {len(stage_latents)} stage tensors but sigmas has {sigmas.shape[1]} stages")
    inputs, targets = [], []
    for s, x in enumerate(stage_latents):
        eps = (
            noise[s]
            if noise is not None
            else torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        ).to(device=x.device, dtype=torch.float32)
        sigma = sigmas[:, s].to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.ndim - 1)))
        keep = loss_mask[:, s].to(device=x.device, dtype=torch.float32).view_as(sigma)
        x32 = x.float()
        inputs.append((((1 - sigma) * x32 + sigma * eps) * keep).to(x.dtype))
        targets.append((eps - x32).to(x.dtype))
    return inputs, targets


def coarse_phase_inputs(
    x0: torch.Tensor, eps0: torch.Tensor, sigma0: torch.Tensor, coarse_rows: torch.Tensor, carrier_factor: int,
    inputs0: torch.Tensor, targets0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 0 of the rows in the coarse phase noised at its band's own resolution, for a model whose stage 0 is
    otherwise carried ``carrier_factor`` (u) x upsampled and whose coarse phase runs on the band
    (``coarse_phase_on_coarse_grid``).

    For those rows (``coarse_rows`` [B] bool): band = avgpool_u(x0), eps_c = u * avgpool_u(eps0) (i.i.d. N(0, 1) at
    the band's resolution, from the same draw), input (1 - sigma) band + sigma eps_c and target eps_c - band, both
    nearest-upsampled back to the carrier's size (the model reads them back by average pooling; the MSE over the
    carrier equals the band's). Other rows keep ``inputs0`` / ``targets0``. Returns (inputs0, targets0) updated.
    """
    u = int(carrier_factor)
    band = F.avg_pool2d(x0.float(), u)
    eps_c = u * F.avg_pool2d(eps0.float(), u)
    sigma = sigma0.to(device=x0.device, dtype=torch.float32).view(-1, 1, 1, 1)
    up = lambda t: F.interpolate(t, scale_factor=u, mode="nearest")  # noqa: E731
    rows = coarse_rows.to(x0.device).view(-1, 1, 1, 1)
    inputs = torch.where(rows, up((1 - sigma) * band + sigma * eps_c).to(inputs0.dtype), inputs0)
    targets = torch.where(rows, up(eps_c - band).to(targets0.dtype), targets0)
    return inputs, targets


def stage_mse(model_output: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, S] float32: per-sample velocity MSE of every stage, mean_{c,h,w}((v_hat - v)^2)."""
    if len(model_output) != len(targets):
        raise ValueError(f"got {len(model_output)} predictions for {len(targets)} stages")
    columns = []
    for pred, target in zip(model_output, targets):
        err = (pred.float() - target.float()) ** 2
        columns.append(err.mean(dim=tuple(range(1, err.ndim))))
    return torch.stack(columns, dim=1)


def masked_stage_loss(
    mse: torch.Tensor, loss_mask: torch.Tensor, stage_loss_weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per_stage [S]) from per-sample stage MSEs [B, S]: term_s = w_s * mean_b(mask_bs * mse_bs)."""
    num_stages = mse.shape[1]
    weights = [1.0] * num_stages if stage_loss_weights is None else [float(w) for w in stage_loss_weights]
    if len(weights) != num_stages:
        raise ValueError(f"stage_loss_weights must hold {num_stages} numbers, got {weights}")
    per_stage = (mse * loss_mask.to(mse)).mean(dim=0)
    if any(w != 1.0 for w in weights):
        per_stage = per_stage * small_tensor(weights, mse.dtype, mse.device)
    return per_stage.sum(), per_stage


def dfm_loss(
    model_output: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    loss_mask: torch.Tensor,
    stage_loss_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked per-stage velocity MSE.

    term_s = w_s * mean_b(mask_bs * mean_{c,h,w}((v_hat - v)^2)); loss = sum_s term_s.
    With one stage this equals ordinary flow-matching MSE.

    Returns:
        (loss: scalar float32, per_stage: [S] float32, the terms that sum to the loss).
    """
    return masked_stage_loss(stage_mse(model_output, targets), loss_mask, stage_loss_weights)


def conditional_stage_losses(
    mse: torch.Tensor, draw: DFMTrainingSigmas
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-stage losses over the samples they concern, as ``(sum, count)`` pairs that pool over steps.

    - ``mse_stage_<s>``: velocity MSE of stage s over the samples where it is in the loss (loss_mask 1, s <= s*):
      unlike the term ``loss_stage_<s>``, it is not diluted by the samples where the stage is masked (for stage 1
      of 2, 90 % of them), so its curve is not a mostly-zero sawtooth.
    - ``mse_generating_stage_<k>`` (S > 1 only): MSE of stage k over the samples generating it (s* = k), i.e. at
      the sigmas of the stage's own sampling phase, without the previous-stage samples at small sigma.
    Unweighted by ``stage_loss_weights``. The values are 0-dim float64 tensors on ``mse``'s device (no host
    sync: the training loop reads them every ``log_every`` steps).
    """
    mse = mse.detach().double()
    mask = draw.loss_mask.to(mse)
    sums, counts = (mse * mask).sum(dim=0), mask.sum(dim=0)
    logs = {f"mse_stage_{s}": (sums[s], counts[s]) for s in range(mse.shape[1])}
    if mse.shape[1] > 1:
        current = (draw.stage[:, None] == torch.arange(mse.shape[1], device=mse.device)).to(mse)  # [B, S]
        sums, counts = (mse * current).sum(dim=0), current.sum(dim=0)
        logs.update({f"mse_generating_stage_{k}": (sums[k], counts[k]) for k in range(mse.shape[1])})
    return logs


# ------------------------------------------------------------------------------ shared by the trainers


@dataclass
class DFMObjectiveConfig:
    """The DFM training-distribution and loss settings, mixed into every trainer's config.

    stage_weights: probabilities of the stage being generated, s* (default [0.9, 0.1] for 2 stages);
    logit_mean / logit_std: sigma of stage s* is sigmoid(N(logit_mean, logit_std));
    previous_logit_mean / previous_logit_std: earlier stages' sigma is sigmoid(N(-previous_logit_mean, std))
    (biased toward data); sigma_sampling "logit_normal" | "uniform"; stage_sampling "per_sample" | "per_batch";
    tied_timesteps: all stages share one sigma (ablation); stage_loss_weights: w_s of the loss (default 1).
    """

    stage_weights: list[float] | None = setting(
        None, "probabilities of the stage being generated, one per stage (default [0.9, 0.1] for 2 stages)"
    )
    logit_mean: float = setting(0.0, "the generated stage's sigma is sigmoid(N(logit_mean, logit_std))")
    logit_std: float = setting(1.0, "std of the generated stage's logit-normal sigma (> 0)")
    previous_logit_mean: float = setting(
        1.5, "earlier stages' sigma is sigmoid(N(-previous_logit_mean, std)), biased toward data"
    )
    previous_logit_std: float = setting(1.0, "std of the earlier stages' logit-normal sigma (> 0)")
    sigma_sampling: Literal["logit_normal", "uniform"] = setting(
        "logit_normal", "sigma distribution (uniform: ablation)"
    )
    stage_sampling: Literal["per_sample", "per_batch"] = setting("per_sample", "draw the stage per sample or per batch")
    tied_timesteps: bool = setting(False, "ablation: all stages share one sigma, none masked")
    stage_loss_weights: list[float] | None = setting(None, "loss weight w_s of each stage (default 1 each)")

    def validate(self) -> list[str]:
        """Range checks of these fields; the stage lists' lengths are checked by the trainer config, which knows
        the number of stages (:func:`.config.stage_list_problems`)."""
        return finite(self, "logit_std", "previous_logit_std", low=0.0, low_open=True) + finite(
            self, "logit_mean", "previous_logit_mean"
        )

    def validate_objective(self, num_stages: int) -> list[float]:
        """ValueError for inconsistent settings; returns the normalized stage weights."""
        weights = validate_training_distribution(
            num_stages, self.stage_weights, self.logit_std, self.previous_logit_std,
            self.sigma_sampling, self.stage_sampling,
        )
        if self.stage_loss_weights is not None and len(self.stage_loss_weights) != num_stages:
            raise ValueError(
                f"stage_loss_weights must hold num_stages = {num_stages} numbers, got {self.stage_loss_weights}"
            )
        return weights


@dataclass
class DFMObjectiveOutput:
    """What :func:`dfm_objective` computed: the loss, its per-stage terms and every intermediate."""

    loss: torch.Tensor
    per_stage: torch.Tensor
    draw: DFMTrainingSigmas
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    prediction: list[torch.Tensor]
    mse: torch.Tensor  # [B, S] per-sample stage MSEs (see stage_mse)

    @property
    def logs(self) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """``loss_stage_<s>``: the terms that sum to the loss; ``mse_stage_<s>`` and ``mse_generating_stage_<k>``:
        the conditional per-stage losses as ``(sum, count)`` pairs (:func:`conditional_stage_losses`; the
        training loop pools them over its log window). 0-dim tensors on the device: reading them is left to the
        loop's log rows, so that a training step never waits for the device."""
        per_stage = self.per_stage.detach()
        logs: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {
            f"loss_stage_{s}": per_stage[s] for s in range(len(self.targets))
        }
        logs.update(conditional_stage_losses(self.mse, self.draw))
        return logs


def dfm_objective(
    config: DFMObjectiveConfig,
    stage_latents: Sequence[torch.Tensor],
    predict,
    noise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    coarse_phase_carrier: int | None = None,
) -> DFMObjectiveOutput:
    """One DFM training objective evaluation, shared by every trainer.

    Draws the per-sample sigmas from ``config`` (:func:`sample_dfm_training_sigmas`), noises the clean stage
    bands and masks the inactive ones (:func:`noise_stages`), calls ``predict(inputs, draw)`` (the task's model
    call; ``draw.sigmas`` [B, S] and ``draw.num_active_stages`` [B] are its timestep inputs) and returns the
    masked per-stage velocity loss (:func:`dfm_loss`). With one stage this is plain flow matching.

    Args:
        stage_latents: S clean bands [B, C, H_s, W_s], coarse to fine (the decomposition's output).
        predict: ``(inputs: list of S tensors, draw: DFMTrainingSigmas) -> list of S velocities``.
        noise: optional S noise tensors (default: drawn with ``generator`` / the global RNG).
        coarse_phase_carrier: for a model with ``coarse_phase_on_coarse_grid`` whose stage 0 is carried u x
            upsampled (FLUX-DFM: u = the total stage factor): the samples generating stage 0 get stage 0 noised at
            its band's own resolution (:func:`coarse_phase_inputs`), which the model runs on the coarse grid in the
            same forward pass. None or 1 (DFM-DiT, whose stage 0 is its band) changes nothing: the model routes
            those samples to the coarse grid by their num_active_stages alone.
    """
    x = stage_latents[0]
    draw = sample_dfm_training_sigmas(
        x.shape[0], len(stage_latents), stage_weights=config.stage_weights, logit_mean=config.logit_mean,
        logit_std=config.logit_std, previous_logit_mean=config.previous_logit_mean,
        previous_logit_std=config.previous_logit_std, sigma_sampling=config.sigma_sampling,
        stage_sampling=config.stage_sampling, tied_timesteps=config.tied_timesteps, generator=generator,
        device=x.device,
    )
    coarse = coarse_phase_carrier is not None and int(coarse_phase_carrier) > 1
    if coarse and noise is None:  # drawn here as noise_stages would, because the coarse rows reuse stage 0's
        noise = [
            torch.randn(s.shape, generator=generator, device=generator.device if generator else s.device)
            for s in stage_latents
        ]
    inputs, targets = noise_stages(stage_latents, draw.sigmas, draw.loss_mask, noise=noise, generator=generator)
    if coarse:
        inputs[0], targets[0] = coarse_phase_inputs(
            stage_latents[0], noise[0].to(stage_latents[0].device), draw.sigmas[:, 0], draw.stage == 0,
            coarse_phase_carrier, inputs[0], targets[0],
        )
    prediction = predict(inputs, draw)
    mse = stage_mse(prediction, targets)
    loss, per_stage = masked_stage_loss(mse, draw.loss_mask, config.stage_loss_weights)
    return DFMObjectiveOutput(loss, per_stage, draw, inputs, targets, list(prediction), mse.detach())
