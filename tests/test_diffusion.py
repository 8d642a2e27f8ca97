import math

import numpy as np
import pytest
import torch

from diffusion import (Diffusion, ddim_step_reference, ddpm_step_reference, get_beta_schedule, q_sample_reference)

T = 1000


def test_linear_schedule_is_exactly_linspace():
    betas = get_beta_schedule("linear", T, 1e-4, 0.02)
    assert betas.dtype == np.float64
    np.testing.assert_array_equal(betas, np.linspace(1e-4, 0.02, T))


def test_power_one_schedule_equals_linear():
    np.testing.assert_allclose(get_beta_schedule("polynomial", T, 1e-4, 0.02, power=1.0),
                               get_beta_schedule("linear", T, 1e-4, 0.02), rtol=1e-12)


def test_power_two_schedule_is_ho_quad():
    quad = np.linspace(1e-4 ** 0.5, 0.02 ** 0.5, T) ** 2
    np.testing.assert_allclose(get_beta_schedule("polynomial", T, 1e-4, 0.02, power=2.0), quad, rtol=1e-12)


def test_larger_power_keeps_noise_low_for_longer_with_same_endpoints():
    low, high = (get_beta_schedule("polynomial", T, 1e-4, 0.02, power=p) for p in (2.0, 4.0))
    assert low[0] == pytest.approx(high[0]) and low[-1] == pytest.approx(high[-1])
    assert (high[1:-1] < low[1:-1]).all()


def test_cosine_schedule_matches_closed_form_alpha_bar():
    betas = get_beta_schedule("cosine", T)
    alpha_bar = np.cumprod(1 - betas)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    unclipped = betas < 0.999
    np.testing.assert_allclose(alpha_bar[unclipped], expected[unclipped], rtol=1e-9)
    assert betas.max() <= 0.999
    assert alpha_bar[0] > 0.9999 and alpha_bar[-1] < 1e-4  # starts almost clean, ends almost pure noise


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial"])
def test_alpha_bar_strictly_decreasing_inside_zero_one(name):
    alpha_bar = Diffusion(get_beta_schedule(name, T)).alpha_bar
    assert ((alpha_bar > 0) & (alpha_bar < 1)).all()
    assert (np.diff(alpha_bar) < 0).all()


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="sigmoid"):
        get_beta_schedule("sigmoid", T)


def test_q_sample_statistics_match_closed_form():
    d = Diffusion(get_beta_schedule("linear", T))
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for step in (0, 250, 999):
        t = torch.full((len(x0),), step)
        x_t = d.q_sample(x0, t, torch.randn_like(x0))
        assert x_t.mean().item() == pytest.approx(math.sqrt(d.alpha_bar[step]) * 0.7, abs=0.03)
        assert x_t.var().item() == pytest.approx(1 - d.alpha_bar[step], abs=0.03 + 0.03 * (1 - d.alpha_bar[step]))


def test_posterior_coefficients_match_gaussian_product():
    """q(x_{t-1} | x_t, x_0) from Bayes: precision-weighted combination of q(x_{t-1} | x_0) and q(x_t | x_{t-1})."""
    d = Diffusion(get_beta_schedule("cosine", 100))
    for t in (1, 37, 99):
        alpha, ab_prev = 1 - d.betas[t], d.alpha_bar_prev[t]
        precision = 1 / (1 - ab_prev) + alpha / d.betas[t]
        assert d.posterior_variance[t] == pytest.approx(1 / precision, rel=1e-9)
        assert d.posterior_mean_coef_x0[t] == pytest.approx(math.sqrt(ab_prev) / (1 - ab_prev) / precision, rel=1e-9)
        assert d.posterior_mean_coef_xt[t] == pytest.approx(math.sqrt(alpha) / d.betas[t] / precision, rel=1e-9)


def test_respace_keeps_alpha_bar_at_kept_timesteps():
    d = Diffusion(get_beta_schedule("linear", T))
    r = d.respace(50)
    assert r.num_steps == 50 and r.timestep_map[0] == 0 and r.timestep_map[-1] == T - 1
    np.testing.assert_allclose(r.alpha_bar, d.alpha_bar[r.timestep_map], rtol=1e-10)
    assert d.respace(T) is d


def oracle_model(diffusion, x0):
    """Predicts exactly the noise that turns x_t into x0, at the model's (original) timestep."""
    alpha_bar = torch.tensor(diffusion.alpha_bar, dtype=torch.float32)

    def predict(x_t, t, y):
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return predict


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 40), ("ddim", 50), ("ddim", 7)])
def test_samplers_recover_known_image_with_oracle(sampler, steps):
    full = Diffusion(get_beta_schedule("linear", T))
    x0 = torch.rand(3, 3, 8, 8) * 1.6 - 0.8
    model = oracle_model(full, x0)
    out = full.respace(steps).sample(model, x0.shape, torch.zeros(3, dtype=torch.long), sampler=sampler, eta=0.5)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_guidance_combines_conditional_and_unconditional():
    d = Diffusion(get_beta_schedule("linear", 10))
    null = 10
    model = lambda x, t, y: torch.where((y == null).view(-1, 1, 1, 1), -torch.ones_like(x), torch.ones_like(x))  # noqa: E731
    x, t, y = torch.zeros(2, 1, 2, 2), torch.tensor([3, 3]), torch.tensor([1, 4])
    for scale in (1.0, 3.0):
        eps = d.guided_prediction(model, x, t, y, scale, null)
        torch.testing.assert_close(eps, torch.full_like(x, -1 + scale * 2))


def test_training_loss_is_per_sample_and_zero_for_oracle():
    d = Diffusion(get_beta_schedule("linear", T))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss, t = d.training_losses(oracle_model(d, x0), x0, torch.zeros(4, dtype=torch.long))
    assert loss.shape == (4,) and t.shape == (4,)
    assert loss.max().item() < 1e-6
    loss, _ = d.training_losses(lambda x, t, y: torch.zeros_like(x), x0, None)
    assert 0.8 < loss.mean().item() < 1.2  # a model that predicts zeros pays the noise's variance


def test_noise_step_references_agree_with_closed_forms():
    B = 5
    x_t, eps, noise = torch.randn(3, B, 3, 4, 4).unbind(0)
    c = torch.rand(7, B) + 0.1
    out = q_sample_reference(x_t, eps, c[0], c[1])
    torch.testing.assert_close(out, c[0].view(-1, 1, 1, 1) * x_t + c[1].view(-1, 1, 1, 1) * eps)
    x0 = (c[0].view(-1, 1, 1, 1) * x_t - c[1].view(-1, 1, 1, 1) * eps)
    ddpm = ddpm_step_reference(x_t, eps, noise, c[0], c[1], c[2], c[3], c[4], False)
    torch.testing.assert_close(ddpm, c[2].view(-1, 1, 1, 1) * x0 + c[3].view(-1, 1, 1, 1) * x_t
                               + c[4].view(-1, 1, 1, 1) * noise)
    ddim = ddim_step_reference(x_t, eps, noise, c[0], c[1], c[2], c[3], c[4], False)
    torch.testing.assert_close(ddim, c[2].view(-1, 1, 1, 1) * x0 + c[3].view(-1, 1, 1, 1) * eps
                               + c[4].view(-1, 1, 1, 1) * noise, rtol=1e-5, atol=1e-5)
    clipped = ddpm_step_reference(x_t * 50, eps, noise, c[0], c[1], torch.ones(B), torch.zeros(B), torch.zeros(B), True)
    assert clipped.abs().max().item() <= 1.0
