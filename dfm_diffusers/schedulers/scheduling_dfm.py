"""DFMScheduler: the multi-stage Euler schedule of Decomposable Flow Matching.

Phase i runs ``steps_per_stage[i]`` Euler steps. In it the newest stage i goes linearly from sigma 1 to
e_i (e_i = stage_thresholds[i], the sigma at which stage i+1 starts; 0 for the last phase), stages s > i stay
at sigma 1 and are masked, and every earlier stage j follows sigma_j = a_j * sigma_i, a_j being stage j's
sigma when phase i began, so all stages reach 0 together. With one stage the table is FluxPipeline's
linspace(1, 1/N, N) followed by 0.

The time shift (static ``shift`` or FLUX's dynamic ``mu``) is applied to every entry of the table, and
``stage_thresholds`` are actual sigmas after the shift. With ``coarse_phase_factor`` phase 0 runs on stage 0's
band at its own resolution and :meth:`DFMScheduler.coarse_to_carrier` moves it to the carrier at the threshold.
Why one mu for the whole table, and the coarse phase's derivation: docs/sampling.md and docs/coarse_grid.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

_FLOW_MATCH_KEYS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "time_shift_type",
)
_UNSUPPORTED_FLOW_MATCH_OPTIONS = (
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


@dataclass
class DFMSchedulerOutput(BaseOutput):
    """prev_sample: list of S per-stage latents after the step."""

    prev_sample: list


def default_steps_per_stage(num_stages: int) -> list[int]:
    """[30, 10] for 2 stages (the paper's 512px setting); 28 total for 1; 30 then 10 per extra stage."""
    return [28] if num_stages == 1 else [30] + [10] * (num_stages - 1)


def default_stage_thresholds(num_stages: int) -> list[float]:
    """sigma 0.1 (the paper's tau = 0.9) for every stage transition."""
    return [0.1] * (num_stages - 1)


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """FLUX's resolution-dependent mu (diffusers.pipelines.flux.pipeline_flux.calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


class DFMScheduler(SchedulerMixin, ConfigMixin):
    """Multi-stage flow-matching Euler scheduler (sigma = 1 is noise).

    After ``set_timesteps``: ``sigmas`` [K+1, S] (last row zeros), ``timesteps`` [K, S] (= sigma * 1000),
    ``num_active_stages`` [K] (stage i is active from the first step of phase i), ``stage_index`` [K]
    (the phase of each step), with K = sum(steps_per_stage); ``coarse_phase_steps`` (0, or the number of first
    steps that run on stage 0's band at its own resolution, see ``set_timesteps(coarse_phase_factor=...)``).
    """

    order = 1
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        num_stages: int = 2,
        steps_per_stage: Sequence[int] | None = None,
        stage_thresholds: Sequence[float] | None = None,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
    ):
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        steps = default_steps_per_stage(num_stages) if steps_per_stage is None else steps_per_stage
        thresholds = default_stage_thresholds(num_stages) if stage_thresholds is None else stage_thresholds
        self.register_to_config(
            steps_per_stage=self._check_steps(steps), stage_thresholds=self._check_thresholds(thresholds)
        )
        self.init_noise_sigma = 1.0
        self.sigmas = None
        self.timesteps = None
        self.num_active_stages = None
        self.stage_index = None
        self.steps_per_stage = None
        self.stage_thresholds = None
        self.coarse_phase_steps = 0
        self.coarse_phase_factor = None
        self.coarse_end_sigma = None

    # ----------------------------------------------------------------------------------------- validation
    def _check_steps(self, steps_per_stage) -> list[int]:
        S = self.config.num_stages
        if isinstance(steps_per_stage, int) or not hasattr(steps_per_stage, "__len__") or len(steps_per_stage) != S:
            raise ValueError(f"steps_per_stage must be a list of num_stages = {S} ints, got {steps_per_stage!r}")
        if any(int(n) != n or n < 1 for n in steps_per_stage):
            raise ValueError(f"steps_per_stage must all be ints >= 1, got {list(steps_per_stage)}")
        return [int(n) for n in steps_per_stage]

    def _check_thresholds(self, stage_thresholds) -> list[float]:
        S = self.config.num_stages
        if not hasattr(stage_thresholds, "__len__") or len(stage_thresholds) != S - 1:
            raise ValueError(
                f"stage_thresholds must be a list of num_stages - 1 = {S - 1} sigmas, got {stage_thresholds!r}"
            )
        thresholds = [float(t) for t in stage_thresholds]
        if any(not 0.0 < t < 1.0 for t in thresholds):
            raise ValueError(f"stage_thresholds must be sigmas strictly inside (0, 1), got {thresholds}")
        return thresholds

    def split_steps(self, total_steps: int) -> list[int]:
        """Split a total number of steps across stages in the ratio of the config's steps_per_stage."""
        S = self.config.num_stages
        if int(total_steps) != total_steps or total_steps < S:
            raise ValueError(f"num_inference_steps must be an int >= num_stages = {S}, got {total_steps!r}")
        ratio = self.config.steps_per_stage
        exact = [total_steps * n / sum(ratio) for n in ratio]
        steps = [max(1, math.floor(x)) for x in exact]
        by_remainder = sorted(range(S), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
        i = 0
        while sum(steps) < total_steps:
            steps[by_remainder[i % S]] += 1
            i += 1
        while sum(steps) > total_steps:
            j = max(range(S), key=lambda k: steps[k])
            steps[j] -= 1
        return steps

    # ------------------------------------------------------------------------------------------ the table
    def _shift_constant(self, mu: float | None) -> float:
        """k of the shift sigma' = k / (k + 1/sigma - 1): exp(mu) or mu (dynamic), else the static shift."""
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting is True")
            k = math.exp(mu) if self.config.time_shift_type == "exponential" else mu
            if not k > 0:
                raise ValueError(f"the linear time shift needs mu > 0, got {mu}")
            return k
        return self.config.shift

    @staticmethod
    def _shift_sigmas(sigmas: torch.Tensor, k: float) -> torch.Tensor:
        if k == 1.0:
            return sigmas
        inside = (sigmas > 0) & (sigmas < 1)
        s = sigmas.clamp(1e-12, 1.0)
        return torch.where(inside, k / (k + (1 / s - 1)), sigmas)

    @staticmethod
    def unshift_sigma(sigma: float, k: float) -> float:
        """Inverse of the shift with constant k: the unshifted sigma that the shift maps to ``sigma``."""
        if k == 1.0:
            return sigma
        return 1.0 / (1.0 + k * (1.0 / sigma - 1.0))

    def set_timesteps(
        self,
        steps_per_stage: Sequence[int] | int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        stage_thresholds: Sequence[float] | None = None,
        coarse_phase_factor: int | None = None,
        coarse_mu: float | None = None,
    ):
        """Build the per-stage sigma table.

        Args:
            steps_per_stage: Euler steps of each phase; an int total is split in the config's ratio.
            mu: FLUX's dynamic-shift parameter (required when ``use_dynamic_shifting``).
            stage_thresholds: per-call override of the config's thresholds (actual sigmas, after the shift).
            coarse_phase_factor: F >= 2 for a model whose coarse phase runs on stage 0's band at its own resolution
                while stage 0 is otherwise carried F x upsampled (FLUX-DFM with ``coarse_phase_on_coarse_grid``):
                phase 0's column holds the band's own sigmas, from 1 to theta / (F - (F - 1) theta), and its last
                step moves stage 0 to the carrier (see the module docstring). None: the ordinary table.
            coarse_mu: the shift of phase 0 in that mode (FLUX's mu for the band's token count; default ``mu``).
        """
        if steps_per_stage is None:
            steps = list(self.config.steps_per_stage)
        elif isinstance(steps_per_stage, int):
            steps = self.split_steps(steps_per_stage)
        else:
            steps = self._check_steps(steps_per_stage)
        thresholds = (
            list(self.config.stage_thresholds) if stage_thresholds is None else self._check_thresholds(stage_thresholds)
        )
        S = self.config.num_stages
        shift_k = self._shift_constant(mu)
        unshifted = [self.unshift_sigma(t, shift_k) for t in thresholds]
        rows, active, phase_of_step = [], [], []
        current = [1.0] * S
        for i, n in enumerate(steps):
            end = unshifted[i] if i < S - 1 else 0.0
            start = list(current)  # a_j for earlier stages; stage i starts at 1
            for k in range(n):
                sigma_i = 1.0 - k * (1.0 - end) / n
                rows.append([start[j] * sigma_i if j < i else (sigma_i if j == i else 1.0) for j in range(S)])
                active.append(i + 1)
                phase_of_step.append(i)
            current = [start[j] * end if j < i else (end if j == i else 1.0) for j in range(S)]
        rows.append([0.0] * S)
        sigmas = self._shift_sigmas(torch.tensor(rows, dtype=torch.float64), shift_k)
        self.coarse_phase_steps, self.coarse_phase_factor, self.coarse_end_sigma = 0, None, None
        if coarse_phase_factor is not None:
            factor = int(coarse_phase_factor)
            if S < 2 or factor != coarse_phase_factor or factor < 2:
                raise ValueError(f"coarse_phase_factor must be an int >= 2 with 2+ stages, got {coarse_phase_factor}")
            end = self.band_sigma(thresholds[0], factor)
            k_c = self._shift_constant(mu if coarse_mu is None else coarse_mu)
            n0 = steps[0]
            start = self.unshift_sigma(end, k_c)
            phase0 = torch.tensor([1.0 - k * (1.0 - start) / n0 for k in range(n0)], dtype=torch.float64)
            sigmas[:n0, 0] = self._shift_sigmas(phase0, k_c)
            self.coarse_phase_steps, self.coarse_phase_factor, self.coarse_end_sigma = n0, factor, end
        sigmas = sigmas.float()
        self.sigmas = sigmas.to(device)
        self.timesteps = (sigmas[:-1] * self.config.num_train_timesteps).to(device)
        self.num_active_stages = torch.tensor(active, dtype=torch.long, device=device)
        self.stage_index = torch.tensor(phase_of_step, dtype=torch.long, device=device)
        self.steps_per_stage = steps
        self.stage_thresholds = thresholds
        self.num_inference_steps = len(active)

    # -------------------------------------------------------------------------------- the coarse phase
    @staticmethod
    def band_sigma(sigma: float, factor: int) -> float:
        """The sigma of a band noised at its own resolution whose signal-to-noise ratio equals that of its F x F
        nearest-upsampled carrier noised at ``sigma`` (block means carry noise sigma / F): sigma / (F - (F-1) sigma)."""
        return sigma / (factor - (factor - 1) * sigma)

    @staticmethod
    def carrier_sigma(sigma_c: float, factor: int) -> float:
        """Inverse of :meth:`band_sigma`: F sigma_c / (1 + (F - 1) sigma_c)."""
        return factor * sigma_c / (1 + (factor - 1) * sigma_c)

    @classmethod
    def coarse_to_carrier(
        cls, x: torch.Tensor, sigma_c: float, factor: int, generator: torch.Generator | list | None = None
    ) -> torch.Tensor:
        """A band's state x = (1 - sigma_c) band + sigma_c eps_c ([B, C, h, w], noise i.i.d. at its own resolution)
        -> its carrier's state [B, C, h F, w F] at ``carrier_sigma(sigma_c, F)``: (1 - sigma) up(band) + sigma eps
        with eps i.i.d. N(0, 1) at the carrier's resolution, in distribution (exactly for the noise: the block means
        are a * x, a = 1 / (1 + (F - 1) sigma_c); the within-block deviations are fresh noise of std sigma, drawn
        with ``generator``). Computes in float32, returns x's dtype."""
        a = 1.0 / (1.0 + (factor - 1) * sigma_c)
        sigma = factor * sigma_c * a
        b, c, h, w = x.shape
        eps = randn_tensor((b, c, h * factor, w * factor), generator=generator, device=x.device, dtype=torch.float32)
        within = eps - F.interpolate(F.avg_pool2d(eps, factor), scale_factor=factor, mode="nearest")
        carrier = F.interpolate(a * x.float(), scale_factor=factor, mode="nearest") + sigma * within
        return carrier.to(x.dtype)

    # ------------------------------------------------------------------------------------------ the step
    def step(
        self,
        model_output: Sequence[torch.Tensor],
        step_index: int,
        sample: Sequence[torch.Tensor],
        return_dict: bool = True,
        generator: torch.Generator | list | None = None,
    ) -> DFMSchedulerOutput | tuple:
        """Euler step x_s <- x_s + (sigma_next_s - sigma_s) * v_s for every active stage s.

        Inactive stages are returned untouched. Computes in float32, returns each sample's dtype. In the coarse-
        phase mode the last step of phase 0 ends at ``coarse_end_sigma`` and returns stage 0 as its carrier
        (:meth:`coarse_to_carrier`, its within-block noise drawn with ``generator``).
        """
        if self.sigmas is None:
            raise ValueError("call set_timesteps before step")
        S = self.config.num_stages
        if len(model_output) != S or len(sample) != S:
            raise ValueError(f"model_output and sample must be lists of {S} stage tensors")
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"step_index must be in 0..{self.num_inference_steps - 1}, got {step_index}")
        num_active = int(self.num_active_stages[step_index])
        prev = []
        for s in range(S):
            if s >= num_active:
                prev.append(sample[s])
                continue
            transition = s == 0 and step_index == self.coarse_phase_steps - 1
            next_sigma = self.coarse_end_sigma if transition else self.sigmas[step_index + 1, s]
            dt = (next_sigma - self.sigmas[step_index, s]).float()
            x = sample[s].float() + dt.to(sample[s].device) * model_output[s].float()
            if transition:
                x = self.coarse_to_carrier(x, self.coarse_end_sigma, self.coarse_phase_factor, generator)
            prev.append(x.to(sample[s].dtype))
        if not return_dict:
            return (prev,)
        return DFMSchedulerOutput(prev_sample=prev)

    # --------------------------------------------------------------------------------------- conversion
    @classmethod
    def from_flow_match(
        cls,
        scheduler_or_config,
        num_stages: int = 2,
        steps_per_stage: Sequence[int] | None = None,
        stage_thresholds: Sequence[float] | None = None,
    ) -> "DFMScheduler":
        """Build a DFMScheduler from a FlowMatchEulerDiscreteScheduler (or its config), keeping its shift
        settings. Options DFM cannot honour (karras/exponential/beta sigmas, inverted sigmas, terminal
        stretching, stochastic sampling) raise ValueError rather than being dropped silently."""
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        config = dict(config)
        unsupported = [k for k in _UNSUPPORTED_FLOW_MATCH_OPTIONS if config.get(k)]
        if unsupported:
            raise ValueError(f"DFMScheduler cannot convert a flow-match scheduler that sets {unsupported}")
        kwargs = {k: config[k] for k in _FLOW_MATCH_KEYS if k in config and config[k] is not None}
        return cls(
            num_stages=num_stages, steps_per_stage=steps_per_stage, stage_thresholds=stage_thresholds, **kwargs
        )

    def __len__(self) -> int:
        return self.config.num_train_timesteps
