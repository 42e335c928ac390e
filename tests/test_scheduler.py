import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dfm_diffusers import DFMScheduler
from dfm_diffusers.schedulers import calculate_shift

FLUX_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)


def test_two_stage_reference_schedule():
    sched = DFMScheduler(num_stages=2, steps_per_stage=[30, 10], stage_thresholds=[0.1])
    sched.set_timesteps()
    sig = sched.sigmas
    assert sig.shape == (41, 2) and sched.timesteps.shape == (40, 2) and sched.num_active_stages.shape == (40,)
    assert (sig[-1] == 0).all()
    # phase 0: stage 0 goes 1 -> 0.1 linearly in 30 steps, stage 1 waits at 1 (masked)
    torch.testing.assert_close(sig[:31, 0], torch.linspace(1, 0.1, 31))
    assert (sig[:31, 1] == 1).all() and (sched.num_active_stages[:30] == 1).all()
    # phase 1: stage 1 goes 1 -> 0 in 10 steps, stage 0 follows 0.1 * sigma_1
    torch.testing.assert_close(sig[30:, 1], torch.linspace(1, 0, 11))
    torch.testing.assert_close(sig[30:, 0], 0.1 * sig[30:, 1])
    assert (sched.num_active_stages[30:] == 2).all()
    torch.testing.assert_close(sched.timesteps, sig[:-1] * 1000)


@pytest.mark.parametrize("S,steps,thresholds", [(2, [5, 3], [0.3]), (3, [4, 3, 2], [0.3, 0.2]),
                                                (4, [3, 2, 2, 2], [0.5, 0.2, 0.1]), (3, [2, 2, 2], [0.1, 0.1])])
@pytest.mark.parametrize("shift_kwargs", [{}, dict(shift=3.0), dict(use_dynamic_shifting=True)])
def test_trajectories_monotone_and_end_together(S, steps, thresholds, shift_kwargs):
    sched = DFMScheduler(num_stages=S, steps_per_stage=steps, stage_thresholds=thresholds, **shift_kwargs)
    sched.set_timesteps(mu=0.8 if shift_kwargs.get("use_dynamic_shifting") else None)
    sig = sched.sigmas
    K = sum(steps)
    assert sig.shape == (K + 1, S)
    assert (sig[1:] <= sig[:-1]).all(), "every trajectory must be monotone non-increasing"
    assert (sig[-1] == 0).all() and (sig[-2] > 0).all(), "all stages reach 0 together, at the last step"
    expected_active = torch.repeat_interleave(torch.arange(1, S + 1), torch.tensor(steps))
    assert torch.equal(sched.num_active_stages, expected_active)
    # a stage is at sigma 1 until its phase, then strictly decreasing
    start = 0
    for i, n in enumerate(steps):
        assert (sig[: start + 1, i] == 1).all()
        assert (sig[start + 1:, i] < sig[start:-1, i]).all()
        start += n
    # the thresholds are actual (shifted) sigmas: stage s starts when stage s-1 is at theta_s
    start = 0
    for i in range(1, S):
        start += steps[i - 1]
        assert abs(sig[start, i - 1].item() - thresholds[i - 1]) < 1e-6


@pytest.mark.parametrize("shift_kwargs,mu", [(dict(shift=3.0), None), (dict(use_dynamic_shifting=True), 1.15),
                                             (dict(use_dynamic_shifting=True, time_shift_type="linear"), 0.7)])
def test_thresholds_hold_after_the_shift(shift_kwargs, mu):
    """The paper's tau = 0.95 at 1024px (sigma 0.05) switches at an actual sigma of 0.05, not at 0.14."""
    steps, thresholds = [30, 10, 6], [0.3, 0.05]
    sched = DFMScheduler(num_stages=3, steps_per_stage=steps, stage_thresholds=thresholds, **shift_kwargs)
    sched.set_timesteps(mu=mu)
    sig = sched.sigmas
    assert abs(sig[30, 0].item() - 0.3) < 1e-6 and abs(sig[40, 1].item() - 0.05) < 1e-6
    assert (sched.num_active_stages[29] == 1) and (sched.num_active_stages[30] == 2) and sched.num_active_stages[40] == 3
    assert (sig[1:] <= sig[:-1]).all() and (sig[-1] == 0).all() and (sig[-2] > 0).all()
    # the shift is still FLUX's map of a linear table: stage 0's first phase is shift(linspace(1, theta_u))
    k = math.exp(mu) if shift_kwargs.get("time_shift_type", "exponential") == "exponential" and mu else (mu or 3.0)
    theta_u = DFMScheduler.unshift_sigma(0.3, k)
    linear = torch.linspace(1, theta_u, 31, dtype=torch.float64)
    torch.testing.assert_close(sig[:31, 0].double(), k / (k + 1 / linear - 1), rtol=0, atol=1e-6)
    # thresholds taken before the shift (the old behaviour) would switch elsewhere: 0.14 at mu 1.15
    assert abs(k / (k + 1 / 0.05 - 1) - 0.05) > 0.01


def test_single_stage_matches_flux_pipeline_schedule():
    N = 7
    mu = calculate_shift(1024)
    ref = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N), mu=mu)
    ours = DFMScheduler.from_flow_match(ref, num_stages=1, steps_per_stage=[N])
    ours.set_timesteps(mu=mu)
    torch.testing.assert_close(ours.sigmas[:, 0], ref.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.timesteps[:, 0], ref.timesteps, rtol=0, atol=1e-3)
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N))
    ours = DFMScheduler(num_stages=1, steps_per_stage=[N], shift=3.0)
    ours.set_timesteps()
    torch.testing.assert_close(ours.sigmas[:, 0], static.sigmas, rtol=0, atol=1e-6)


def test_step_is_euler_on_active_stages_only():
    sched = DFMScheduler(num_stages=2, steps_per_stage=[2, 2], stage_thresholds=[0.5])
    sched.set_timesteps()
    x = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)]
    v = [torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)]
    out = sched.step(v, 0, x).prev_sample
    torch.testing.assert_close(out[0], x[0] + (sched.sigmas[1, 0] - sched.sigmas[0, 0]) * v[0])
    assert out[1] is x[1]  # stage 1 is not active in phase 0
    out = sched.step(v, 3, x).prev_sample
    assert out[1].dtype == torch.bfloat16
    expected = (x[1].float() + (sched.sigmas[4, 1] - sched.sigmas[3, 1]) * v[1].float()).to(torch.bfloat16)
    assert torch.equal(out[1], expected)
    assert isinstance(sched.step(v, 3, x, return_dict=False), tuple)


def test_integrating_exact_velocity_recovers_data():
    """With the true velocity v = eps - x of a linear path, the sampler lands exactly on the data."""
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)]
    eps = [torch.randn_like(d) for d in data]
    sched = DFMScheduler(num_stages=3, steps_per_stage=[5, 4, 3], stage_thresholds=[0.4, 0.2], shift=2.0)
    sched.set_timesteps()
    x = [e.clone() for e in eps]
    for k in range(sched.num_inference_steps):
        x = sched.step([e - d for e, d in zip(eps, data)], k, x).prev_sample
    for a, b in zip(x, data):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_int_total_is_split_in_config_ratio_and_overrides():
    sched = DFMScheduler(num_stages=2)
    assert sched.config.steps_per_stage == [30, 10] and sched.config.stage_thresholds == [0.1]
    assert sched.split_steps(40) == [30, 10] and sched.split_steps(20) == [15, 5] and sum(sched.split_steps(7)) == 7
    sched.set_timesteps(8, stage_thresholds=[0.3])
    assert sched.steps_per_stage == [6, 2] and sched.num_inference_steps == 8
    assert abs(sched.sigmas[6, 0].item() - 0.3) < 1e-6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_stages=2, steps_per_stage=[3]), "steps_per_stage"),
        (dict(num_stages=2, steps_per_stage=[3, 0]), "steps_per_stage"),
        (dict(num_stages=2, stage_thresholds=[0.1, 0.2]), "stage_thresholds"),
        (dict(num_stages=2, stage_thresholds=[1.0]), "stage_thresholds"),
        (dict(num_stages=2, stage_thresholds=[0.0]), "stage_thresholds"),
        (dict(num_stages=0), "num_stages"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DFMScheduler(**kwargs)


def test_bad_calls_raise():
    sched = DFMScheduler(num_stages=2, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="steps_per_stage"):
        sched.set_timesteps([1, 2, 3], mu=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1, mu=1.0)
    with pytest.raises(ValueError, match="stage_thresholds"):
        sched.set_timesteps(stage_thresholds=[1.5], mu=1.0)
    with pytest.raises(ValueError, match="cannot convert"):
        DFMScheduler.from_flow_match(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))


def test_save_load_round_trip_and_flux_conversion(tmp_path):
    flux = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    sched = DFMScheduler.from_flow_match(flux, num_stages=3, steps_per_stage=[6, 3, 2], stage_thresholds=[0.3, 0.1])
    for key, value in FLUX_CONFIG.items():
        assert sched.config[key] == value
    sched.save_pretrained(tmp_path)
    loaded = DFMScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(sched.config)
    sched.set_timesteps(mu=1.0)
    loaded.set_timesteps(mu=1.0)
    assert torch.equal(sched.sigmas, loaded.sigmas)
