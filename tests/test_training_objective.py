import math

import pytest
import torch

from dfm_diffusers import dfm_loss, noise_stages, sample_dfm_training_sigmas

N = 20000


def logit(p):
    return torch.log(p) - torch.log1p(-p)


def test_stage_frequencies_and_masking():
    draw = sample_dfm_training_sigmas(N, 3, stage_weights=[0.7, 0.2, 0.1], generator=torch.Generator().manual_seed(0))
    assert draw.sigmas.shape == (N, 3) and draw.loss_mask.shape == (N, 3) and draw.stage.shape == (N,)
    freqs = torch.bincount(draw.stage, minlength=3).float() / N
    assert torch.allclose(freqs, torch.tensor([0.7, 0.2, 0.1]), atol=0.01)
    idx = torch.arange(3)[None]
    masked = idx > draw.stage[:, None]
    assert (draw.sigmas[masked] == 1).all()
    assert (draw.loss_mask[masked] == 0).all() and (draw.loss_mask[~masked] == 1).all()
    torch.testing.assert_close(draw.num_active_stages, draw.stage + 1)
    active = draw.sigmas[~masked]
    assert (active > 0).all() and (active < 1).all()


def test_default_weights_are_the_papers():
    draw = sample_dfm_training_sigmas(N, 2, generator=torch.Generator().manual_seed(1))
    assert abs((draw.stage == 1).float().mean().item() - 0.1) < 0.01


def test_logit_normal_parameters_of_current_and_previous_stages():
    draw = sample_dfm_training_sigmas(
        4 * N, 2, stage_weights=[0.5, 0.5], logit_mean=0.3, logit_std=0.8,
        previous_logit_mean=1.5, previous_logit_std=1.2, generator=torch.Generator().manual_seed(2),
    )
    cur = torch.cat([draw.sigmas[draw.stage == 0, 0], draw.sigmas[draw.stage == 1, 1]])
    prev = draw.sigmas[draw.stage == 1, 0]
    z_cur, z_prev = logit(cur.double()), logit(prev.double())
    assert abs(z_cur.mean() - 0.3) < 0.02 and abs(z_cur.std() - 0.8) < 0.02
    # previous stages are biased toward data: sigma = sigmoid(N(-1.5, 1.2))
    assert abs(z_prev.mean() + 1.5) < 0.03 and abs(z_prev.std() - 1.2) < 0.03
    # quantiles against the closed form sigmoid(mu + std * Phi^-1(q))
    for q in (0.1, 0.5, 0.9):
        zq = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1.0)).item()
        expected = 1 / (1 + math.exp(-(-1.5 + 1.2 * zq)))
        assert abs(torch.quantile(prev, q).item() - expected) < 0.01


def test_generator_makes_it_reproducible():
    a = sample_dfm_training_sigmas(64, 2, generator=torch.Generator().manual_seed(7))
    b = sample_dfm_training_sigmas(64, 2, generator=torch.Generator().manual_seed(7))
    c = sample_dfm_training_sigmas(64, 2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.stage, b.stage)
    assert not torch.equal(a.sigmas, c.sigmas)


def test_ablations_uniform_per_batch_tied():
    uni = sample_dfm_training_sigmas(N, 1, sigma_sampling="uniform", generator=torch.Generator().manual_seed(3))
    assert abs(uni.sigmas.mean().item() - 0.5) < 0.01 and abs(uni.sigmas.var().item() - 1 / 12) < 0.005
    per_batch = sample_dfm_training_sigmas(32, 2, stage_weights=[0.5, 0.5], stage_sampling="per_batch",
                                           generator=torch.Generator().manual_seed(4))
    assert per_batch.stage.unique().numel() == 1
    tied = sample_dfm_training_sigmas(32, 3, tied_timesteps=True, generator=torch.Generator().manual_seed(5))
    assert (tied.stage == 2).all() and (tied.loss_mask == 1).all()
    assert torch.equal(tied.sigmas[:, 0], tied.sigmas[:, 1]) and torch.equal(tied.sigmas[:, 1], tied.sigmas[:, 2])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_stages=0), "num_stages"),
        (dict(num_stages=2, stage_weights=[1.0]), "stage_weights"),
        (dict(num_stages=2, stage_weights=[1.0, 0.0]), "positive"),
        (dict(num_stages=2, stage_weights=[1.0, -1.0]), "positive"),
        (dict(num_stages=2, logit_std=0.0), "logit_std"),
        (dict(num_stages=2, previous_logit_std=-1.0), "previous_logit_std"),
        (dict(num_stages=2, sigma_sampling="beta"), "sigma_sampling"),
        (dict(num_stages=2, stage_sampling="per_epoch"), "stage_sampling"),
    ],
)
def test_invalid_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_dfm_training_sigmas(4, **kwargs)


def test_single_stage_loss_is_plain_flow_matching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    pred = torch.randn(6, 4, 8, 8, generator=g)
    draw = sample_dfm_training_sigmas(6, 1, generator=g)
    assert (draw.loss_mask == 1).all()
    inputs, targets = noise_stages([x], draw.sigmas, draw.loss_mask, noise=[eps])
    sigma = draw.sigmas[:, 0].view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs[0], (1 - sigma) * x + sigma * eps, rtol=0, atol=0)
    loss, per_stage = dfm_loss([pred], targets, draw.loss_mask)
    reference = torch.nn.functional.mse_loss(pred, eps - x)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert per_stage.shape == (1,)


def test_masked_stages_get_zero_input_and_no_loss():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, 8, 8, generator=g)]
    sigmas = torch.tensor([[0.3, 1.0], [0.2, 0.6], [0.9, 1.0], [0.1, 0.4]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    inputs, targets = noise_stages(xs, sigmas, mask, generator=g)
    assert (inputs[1][[0, 2]] == 0).all() and (inputs[1][[1, 3]] != 0).all()
    preds = [t + 1.0 for t in targets]  # error 1 everywhere
    loss, per_stage = dfm_loss(preds, targets, mask, stage_loss_weights=[1.0, 2.0])
    torch.testing.assert_close(per_stage, torch.tensor([1.0, 2.0 * 0.5]))
    torch.testing.assert_close(loss, per_stage.sum())
    # a masked stage's prediction does not change the loss
    preds[1][0] += 100
    torch.testing.assert_close(dfm_loss(preds, targets, mask, [1.0, 2.0])[0], loss)
    with pytest.raises(ValueError):
        dfm_loss(preds[:1], targets, mask)
