import math
import os

import numpy as np
import pytest
import torch

from conftest import ROOT
from diffusion import (PREDICTIONS, Diffusion, ddim_step_reference, ddpm_step_reference, get_beta_schedule,
                       q_sample_reference, rescale_zero_terminal_snr)

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
    """The noise-step references, fed Diffusion's coefficient tables, against float64 numpy values derived
    from the betas alone by another route: alpha_bar as a running product, the posterior q(x_{t-1} | x_t, x0)
    by Bayes' rule for two Gaussians (precisions add), and DDIM by its defining properties (eta 0 puts x0 and
    eps back at t - 1, eta 1 is the DDPM posterior)."""
    betas = get_beta_schedule("cosine", T)
    d = Diffusion(betas)
    alpha_bar, running = np.empty(T), 1.0
    for i, beta in enumerate(betas):
        running *= 1.0 - beta
        alpha_bar[i] = running
    t = np.array([0, 1, 17, 500, 998, T - 1])
    B = len(t)
    ab, alpha, beta = alpha_bar[t], 1.0 - betas[t], betas[t]
    ab_prev = np.where(t > 0, alpha_bar[np.maximum(t - 1, 0)], 1.0)
    rng = np.random.default_rng(0)
    x0, eps, z = rng.uniform(-1, 1, (B, 3, 4, 4)), rng.normal(size=(B, 3, 4, 4)), rng.normal(size=(B, 3, 4, 4))
    col = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    x_t = col(np.sqrt(ab)) * x0 + col(np.sqrt(1 - ab)) * eps  # the definition of q(x_t | x0)

    def posterior(x0_given):  # mean and variance of q(x_{t-1} | x_t, x0) by Bayes; at t = 0 x0 itself
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = 1.0 / (1.0 / (1 - ab_prev) + alpha / beta)
            mean = col(variance) * (col(np.sqrt(ab_prev) / (1 - ab_prev)) * x0_given + col(np.sqrt(alpha) / beta) * x_t)
        return np.where(col(t) > 0, mean, x0_given), np.where(t > 0, variance, 0.0)

    tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    tt = torch.tensor(t)
    recip = [d.coef("sqrt_recip_alpha_bar", tt), d.coef("sqrt_recipm1_alpha_bar", tt)]
    close = dict(rtol=1e-4, atol=2e-4)  # float32 steps against float64 values of order 1

    q = q_sample_reference(tensor(x0), tensor(eps), d.coef("sqrt_alpha_bar", tt), d.coef("sqrt_one_minus_alpha_bar", tt))
    torch.testing.assert_close(q, tensor(x_t), **close)

    mean, variance = posterior(x0)
    sigma = d.coef("posterior_variance", tt).sqrt()
    ddpm = ddpm_step_reference(tensor(x_t), tensor(eps), tensor(z), *recip, d.coef("posterior_mean_coef_x0", tt),
                               d.coef("posterior_mean_coef_xt", tt), sigma, False)
    torch.testing.assert_close(ddpm, tensor(mean + col(np.sqrt(variance)) * z), **close)

    ab_prev_t, ab_t = d.coef("alpha_bar_prev", tt), d.coef("alpha_bar", tt)
    ddim0 = ddim_step_reference(tensor(x_t), tensor(eps), tensor(z), *recip, ab_prev_t.sqrt(), (1 - ab_prev_t).sqrt(),
                                torch.zeros(B), False)
    torch.testing.assert_close(ddim0, tensor(col(np.sqrt(ab_prev)) * x0 + col(np.sqrt(1 - ab_prev)) * eps), **close)
    sigma1 = ((1 - ab_prev_t) / (1 - ab_t) * (1 - ab_t / ab_prev_t)).sqrt()  # DDIM's sigma at eta = 1
    ddim1 = ddim_step_reference(tensor(x_t), tensor(eps), tensor(z), *recip, ab_prev_t.sqrt(),
                                (1 - ab_prev_t - sigma1 ** 2).clamp(min=0).sqrt(), sigma1, False)
    torch.testing.assert_close(ddim1, tensor(mean + col(np.sqrt(variance)) * z), **close)

    # clipping: a prediction whose x0 leaves [-1, 1] steps from the clipped x0 (DDIM re-derives eps from it)
    wild = eps * 40
    x0_wild = col(1 / np.sqrt(ab)) * x_t - col(np.sqrt(1 / ab - 1)) * wild
    x0_clipped = np.clip(x0_wild, -1, 1)
    assert (np.abs(x0_wild) > 1).any()
    ddpm = ddpm_step_reference(tensor(x_t), tensor(wild), tensor(z), *recip, d.coef("posterior_mean_coef_x0", tt),
                               d.coef("posterior_mean_coef_xt", tt), torch.zeros(B), True)
    torch.testing.assert_close(ddpm, tensor(posterior(x0_clipped)[0]), **close)
    eps_clipped = (x_t - col(np.sqrt(ab)) * x0_clipped) / col(np.sqrt(1 - ab))
    ddim0 = ddim_step_reference(tensor(x_t), tensor(wild), tensor(z), *recip, ab_prev_t.sqrt(), (1 - ab_prev_t).sqrt(),
                                torch.zeros(B), True)
    torch.testing.assert_close(ddim0, tensor(col(np.sqrt(ab_prev)) * x0_clipped + col(np.sqrt(1 - ab_prev)) * eps_clipped),
                               **close)


# -----------------------------------------------------------------------------
# the three targets, min-SNR and zero terminal SNR

SCHEDULES = [("linear", False), ("cosine", False), ("polynomial", False), ("linear", True), ("cosine", True)]


def process(schedule, zero_terminal_snr=False, steps=T, **kwargs):
    betas = get_beta_schedule(schedule, steps)
    return Diffusion(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, **kwargs)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule,zero_terminal_snr", SCHEDULES)
def test_each_target_converts_back_to_the_x0_and_noise_it_came_from(prediction, schedule, zero_terminal_snr):
    if zero_terminal_snr and prediction == "eps":
        pytest.skip("eps says nothing of x0 at alpha_bar_T = 0 (config.py refuses it)")
    d = process(schedule, zero_terminal_snr, prediction=prediction)
    x0, noise = torch.rand(64, 3, 4, 4) * 2 - 1, torch.randn(64, 3, 4, 4)
    t = torch.cat([torch.tensor([0, T - 1]), torch.randint(0, T, (62,))])
    if zero_terminal_snr:
        t = t.clamp(max=T - 2) if prediction == "eps" else t
    x_t = d.q_sample(x0, t, noise)
    x0_back, noise_back = d.predict_x0_eps(d.target(x0, noise, t), x_t, t)
    # float32 round-off, times what the conversion amplifies it by: 1 / sqrt(alpha_bar) from eps to x0,
    # 1 / sqrt(1 - alpha_bar) from x0 to eps
    amplification = {"eps": d.sqrt_recip_alpha_bar, "x0": 1 / d.sqrt_one_minus_alpha_bar, "v": np.ones(T)}
    tolerance = torch.tensor(1e-5 * np.maximum(amplification[prediction][t.numpy()], 1), dtype=torch.float32)
    assert ((x0_back - x0).abs().amax(dim=(1, 2, 3)) < tolerance).all()
    assert ((noise_back - noise).abs().amax(dim=(1, 2, 3)) < tolerance).all()


def test_v_target_is_the_rotation_of_noise_and_image():
    d = process("linear", prediction="v")
    x0, noise, t = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4), torch.randint(0, T, (8,))
    ab = np.cumprod(1 - get_beta_schedule("linear", T))[t.numpy()]
    a, s = (torch.tensor(np.sqrt(c), dtype=torch.float32).view(-1, 1, 1, 1) for c in (ab, 1 - ab))
    torch.testing.assert_close(d.target(x0, noise, t), a * noise - s * x0)
    # |v|^2 = |eps|^2 + |x0|^2 per (eps, x0) pair, as for any rotation
    torch.testing.assert_close(d.target(x0, noise, t).pow(2) + d.target(noise, -x0, t).pow(2),
                               x0.pow(2) + noise.pow(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_loss_is_min_snr_gamma_times_the_x0_error(prediction):
    """Whatever the target, the weighted loss is min(SNR, gamma) * mean (x0 - x0_pred)^2, computed here in
    float64 from the betas."""
    gamma = 5.0
    d = process("cosine", prediction=prediction, loss_weighting="min_snr", min_snr_gamma=gamma)
    x0, noise = torch.rand(200, 3, 4, 4) * 2 - 1, torch.randn(200, 3, 4, 4)
    t = torch.arange(0, T, 5)
    guess = torch.randn(200, 3, 4, 4)
    loss, _ = d.training_losses(lambda x_t, model_t, y: guess, x0, None, t, noise)
    ab = np.cumprod(1 - get_beta_schedule("cosine", T))[t.numpy()].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise.double().numpy()
    g = guess.double().numpy()
    x0_pred = {"eps": (x_t - np.sqrt(1 - ab) * g) / np.sqrt(ab), "x0": g,
               "v": np.sqrt(ab) * x_t - np.sqrt(1 - ab) * g}[prediction]
    snr = (ab / (1 - ab)).ravel()
    expected = np.minimum(snr, gamma) * ((x0.double().numpy() - x0_pred) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-3, atol=1e-6)
    assert snr.min() < gamma < snr.max()  # both sides of the clip were exercised


def test_unweighted_loss_is_the_plain_mse_on_the_target():
    d = process("linear", prediction="v")
    x0, noise, t = torch.rand(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.randint(0, T, (6,))
    loss, _ = d.training_losses(lambda x_t, model_t, y: torch.zeros_like(x_t), x0, None, t, noise)
    torch.testing.assert_close(loss, d.target(x0, noise, t).pow(2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial"])
def test_zero_terminal_snr_keeps_the_start_ends_at_zero_and_is_affine_in_sqrt_alpha_bar(schedule):
    betas = get_beta_schedule(schedule, T)
    rescaled = rescale_zero_terminal_snr(betas)
    before, after = np.sqrt(np.cumprod(1 - betas)), np.sqrt(np.cumprod(1 - rescaled))
    assert after[-1] == 0 and after[0] == pytest.approx(before[0], rel=1e-12)
    assert ((rescaled > 0) & (rescaled <= 1)).all() and rescaled[-1] == 1
    slope, intercept = np.polyfit(before, after, 1)
    np.testing.assert_allclose(after, slope * before + intercept, atol=1e-12)
    assert (np.diff(after) < 0).all()


# -----------------------------------------------------------------------------
# the samplers on Gaussian data N(m, s^2), where the best predictor of every target is known exactly

M, S = 0.2, 0.3


def gaussian_model(d, m=M, s=S):
    """The exact posterior-mean predictor of d's target for data N(m, s^2 I): E[x0 | x_t] is linear in x_t."""
    alpha_bar = torch.tensor(d.alpha_bar, dtype=torch.float64)

    def predict(x_t, t, y):
        ab = alpha_bar[t].view(-1, *[1] * (x_t.dim() - 1))
        a, sigma, x = ab.sqrt(), (1 - ab).sqrt(), x_t.double()
        x0 = m + a * s ** 2 / (ab * s ** 2 + 1 - ab) * (x - a * m)
        eps = (x - a * x0) / sigma
        return {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[d.prediction].float()
    return predict


def draw(d, steps, sampler, n, seed=0, shape=(3, 4, 4), **kwargs):
    return d.sample(gaussian_model(d), (n,) + shape, torch.zeros(n, dtype=torch.long), sampler=sampler, steps=steps,
                    clip_denoised=False, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("schedule,zero_terminal_snr", SCHEDULES[:2] + SCHEDULES[3:4])
@pytest.mark.parametrize("sampler,steps,rms", [("ddim", T, 0.003), ("dpm++2m", 50, 0.003)])
def test_deterministic_samplers_follow_the_exact_probability_flow(prediction, schedule, zero_terminal_snr,
                                                                    sampler, steps, rms):
    """For N(m, s^2) data the probability-flow ODE maps x_T to m + s (x_T - a_T m) / sqrt(a_T^2 s^2 + 1 - a_T^2):
    each sample, not only the spread, must land there."""
    if zero_terminal_snr and prediction == "eps":
        pytest.skip("eps with zero terminal SNR is refused")
    d = process(schedule, zero_terminal_snr, prediction=prediction)
    n = 400
    x_T = torch.randn((n, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    a_T = math.sqrt(d.alpha_bar[-1])
    exact = M + S * (x_T - a_T * M) / math.sqrt(a_T ** 2 * S ** 2 + 1 - a_T ** 2)
    out = draw(d, steps, sampler, n, eta=0.0)
    assert (out - exact).pow(2).mean().sqrt().item() < rms
    assert out.std().item() == pytest.approx(exact.std().item(), rel=0.01)


@pytest.mark.parametrize("sampler", ["dpm++2m", "ddim"])
def test_the_obvious_call_samples_on_the_samplers_own_grid(sampler):
    """respace(20).sample(sampler=...) and sample(steps=20) both run on the sampler's grid (DPM-Solver++ evenly
    in log-SNR): on the linear schedule, DPM-Solver++ evenly in t overshoots and spreads N(m, s^2) data wider."""
    d = process("linear")
    n = 4000
    x_T = dict(generator=torch.Generator().manual_seed(3))
    shape, y = (n, 3, 4, 4), torch.zeros(n, dtype=torch.long)
    respaced = d.respace(20).sample(gaussian_model(d), shape, y, sampler=sampler, clip_denoised=False, **x_T)
    x_T = dict(generator=torch.Generator().manual_seed(3))
    direct = d.sample(gaussian_model(d), shape, y, sampler=sampler, steps=20, clip_denoised=False, **x_T)
    assert torch.equal(respaced, direct)
    if sampler == "dpm++2m":  # DDIM's 20 steps fall short of the spread on either grid
        assert respaced.std().item() == pytest.approx(S, rel=0.03)
        assert respaced.mean().item() == pytest.approx(M, abs=0.01)
    grid = d.respace(20).for_sampler(sampler)
    assert grid.respaced_from == (d, "logsnr" if sampler == "dpm++2m" else "uniform") and grid.num_steps <= 20
    on_grid = d.for_sampler(sampler, 20)
    assert on_grid.for_sampler(sampler) is on_grid  # already on the sampler's grid: kept


def test_ddpm_marginals_follow_the_forward_process():
    """Each intermediate x_t of DDPM-1000 has the forward process's marginal N(sqrt(ab) m, ab s^2 + 1 - ab)."""
    d = process("linear")
    n = 2500
    seen = {}
    d.sample(gaussian_model(d), (n, 2, 4, 4), torch.zeros(n, dtype=torch.long), sampler="ddpm", clip_denoised=False,
             generator=torch.Generator().manual_seed(1), callback=lambda i, x: seen.update({T - 2 - i: x.clone()}))
    for t in (900, 600, 300, 100, 20):
        ab = d.alpha_bar[t]
        assert seen[t].mean().item() == pytest.approx(math.sqrt(ab) * M, abs=0.01)
        assert seen[t].var().item() == pytest.approx(ab * S ** 2 + 1 - ab, rel=0.02)
    final = seen[-1]
    assert final.mean().item() == pytest.approx(M, abs=0.005)
    assert final.std().item() == pytest.approx(S, rel=0.02)  # fixed-small variance: 1.2% short at 1000 steps


def closed_form_std(d, steps, sampler, eta=0.0, variance="small", m=M, s=S):
    """(mean, std) of a DDPM or DDIM sample for N(m, s^2) data, propagated exactly through the affine steps
    in float64 from the betas alone: each step is x' = A x + c + sigma n."""
    r = d.respace(steps)
    ab_all = np.cumprod(1 - d.betas)
    ab = ab_all[r.timestep_map]
    ab_prev = np.append(1.0, ab[:-1])
    mean, var = 0.0, 1.0
    for i in range(len(ab) - 1, -1, -1):
        a, sigma_t = math.sqrt(ab[i]), math.sqrt(1 - ab[i])
        k = a * s ** 2 / (ab[i] * s ** 2 + 1 - ab[i])  # x0_pred = m + k (x_t - a m)
        x0_slope, x0_offset = k, m - k * a * m
        if sampler == "ddpm":
            beta = 1 - ab[i] / ab_prev[i]
            c0 = math.sqrt(ab_prev[i]) * beta / (1 - ab[i])
            ct = math.sqrt(1 - beta) * (1 - ab_prev[i]) / (1 - ab[i])
            noise_var = 0.0 if i == 0 else (beta * (1 - ab_prev[i]) / (1 - ab[i]) if variance == "small" else beta)
            slope, offset = c0 * x0_slope + ct, c0 * x0_offset
        else:
            noise_var = eta ** 2 * (1 - ab_prev[i]) / (1 - ab[i]) * (1 - ab[i] / ab_prev[i])
            ce = math.sqrt(max(1 - ab_prev[i] - noise_var, 0.0))
            eps_slope, eps_offset = (1 - a * x0_slope) / sigma_t, -a * x0_offset / sigma_t
            slope = math.sqrt(ab_prev[i]) * x0_slope + ce * eps_slope
            offset = math.sqrt(ab_prev[i]) * x0_offset + ce * eps_offset
        mean, var = slope * mean + offset, slope ** 2 * var + noise_var
    return mean, math.sqrt(var)


STOCHASTIC = [("ddpm", 7, {}), ("ddpm", 100, {}), ("ddpm", 50, {"variance": "large"}), ("ddim", 50, {"eta": 1.0}),
              ("ddim", 13, {"eta": 0.5}), ("ddim", 50, {"eta": 0.0})]


def mismatch(d, sampler, steps, options, n=20000):
    """How many standard errors the sampled std lies from the closed form."""
    out = draw(d, steps, sampler, n, shape=(1, 2, 2), **options)
    _, expected = closed_form_std(d, steps, sampler, **options)
    return abs(out.std().item() - expected) / (expected / math.sqrt(2 * out.numel()))


@pytest.mark.parametrize("sampler,steps,options", STOCHASTIC)
def test_ddpm_and_ddim_spread_equals_its_closed_form_at_any_step_count(sampler, steps, options):
    assert mismatch(process("linear"), sampler, steps, options) < 4.5


@pytest.mark.parametrize("table,factor,sampler,options", [
    ("posterior_variance", 1.1, "ddpm", {}), ("posterior_mean_coef_x0", 1.01, "ddpm", {}),
    ("betas", 1.1, "ddpm", {"variance": "large"}), ("sqrt_recipm1_alpha_bar", 1.01, "ddim", {"eta": 1.0}),
    ("alpha_bar", 1.01, "ddim", {"eta": 1.0})])
def test_the_closed_form_check_catches_a_perturbed_coefficient(monkeypatch, table, factor, sampler, options):
    original = Diffusion.respace

    def perturbed(self, steps, spacing="uniform"):
        r = original(self, steps, spacing)
        setattr(r, table, getattr(r, table) * factor)
        return r
    monkeypatch.setattr(Diffusion, "respace", perturbed)
    assert mismatch(process("linear"), sampler, 50, options) > 6


def test_todays_50_step_samplers_shrink_the_spread_of_a_perfect_model():
    """DDIM-50 (eta 0: 0.275, eta 1: 0.252) and DDPM-100 (0.272) lose 8-16% of the data's std 0.3 even with
    the exact predictor; DPM-Solver++(2M) at 20 log-SNR steps keeps it within 2%."""
    d = process("linear")
    assert closed_form_std(d, 50, "ddim", eta=0.0)[1] == pytest.approx(0.275, abs=0.002)
    assert closed_form_std(d, 50, "ddim", eta=1.0)[1] == pytest.approx(0.252, abs=0.002)
    assert closed_form_std(d, 100, "ddpm")[1] == pytest.approx(0.272, abs=0.002)
    assert draw(d, 20, "dpm++2m", 2000).std().item() == pytest.approx(S, rel=0.02)


PRESETS = sorted(os.path.join("configs", name) for name in os.listdir(os.path.join(ROOT, "configs")))


@pytest.mark.parametrize("preset", ["config.yaml"] + PRESETS)
def test_the_default_sampler_reproduces_the_data_spread(preset):
    from config import load_config
    cfg = load_config(["--config", os.path.join(ROOT, preset)])
    s, dc = cfg["sampling"], cfg["diffusion"]
    d = Diffusion.from_config(dc)
    out = draw(d, s["steps"], s["sampler"], 4000, eta=s["eta"], variance=s["variance"])
    assert out.std().item() == pytest.approx(S, rel=0.02), (s["sampler"], s["steps"], dc["noise_schedule"])
    assert out.mean().item() == pytest.approx(M, abs=0.02 * S)


def test_logsnr_spacing_is_even_in_log_snr_and_keeps_both_ends():
    d = process("linear")
    r = d.respace(20, "logsnr")
    assert r.timestep_map[0] == 0 and r.timestep_map[-1] == T - 1 and len(r.timestep_map) == 20
    lam = 0.5 * np.log(r.alpha_bar / (1 - r.alpha_bar))
    gaps = -np.diff(lam)
    assert gaps.max() < 1.3 * gaps.mean() and (gaps > 0).all()
    with pytest.raises(ValueError, match="quadratic"):
        d.respace(20, "quadratic")


# -----------------------------------------------------------------------------
# guidance and the eps path of old checkpoints


def test_guidance_interval_guides_only_inside_it():
    d = process("linear").respace(20)
    batches = []

    def model(x, t, y):
        batches.append((len(x), int(t[0])))
        return torch.zeros_like(x)
    interval = (0.5, 3.0)
    d.sample(model, (2, 1, 2, 2), torch.zeros(2, dtype=torch.long), sampler="ddim", guidance_scale=3.0,
             null_class=10, guidance_interval=interval)
    full_ab = process("linear").alpha_bar
    for size, t in batches:
        sigma = math.sqrt((1 - full_ab[t]) / full_ab[t])
        assert size == (4 if interval[0] < sigma <= interval[1] else 2), (t, sigma)
    assert {size for size, _ in batches} == {2, 4}


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_guiding_any_target_is_guiding_x0(prediction):
    d = process("cosine", prediction=prediction)
    null = 10
    cond, uncond = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    model = lambda x, t, y: torch.where((y == null).view(-1, 1, 1, 1), uncond.repeat(len(x) // 2, 1, 1, 1)[:len(x)],  # noqa: E731
                                        cond.repeat(len(x) // 2, 1, 1, 1)[:len(x)])
    x, t, y = torch.randn(2, 3, 2, 2), torch.tensor([400, 400]), torch.tensor([1, 2])
    guided = d.predict_x0_eps(d.guided_prediction(model, x, t, y, 2.5, null), x, t)[0]
    x0_cond, x0_uncond = d.predict_x0_eps(cond, x, t)[0], d.predict_x0_eps(uncond, x, t)[0]
    torch.testing.assert_close(guided, x0_uncond + 2.5 * (x0_cond - x0_uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_eps_models_sample_exactly_as_the_plain_eps_loop(sampler, eta):
    """The loop as it was before targets existed, written out with the reference steps: an eps checkpoint
    draws bit for bit the same images."""
    d = process("linear").respace(25)
    model = lambda x, t, y: torch.sin(3 * x + t.view(-1, 1, 1, 1) / 100)  # noqa: E731
    y = torch.zeros(3, dtype=torch.long)
    got = d.sample(model, (3, 3, 4, 4), y, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x = torch.randn((3, 3, 4, 4), generator=g)
    for step in range(d.num_steps - 1, -1, -1):
        t = torch.full((3,), step)
        eps = model(x, d.model_timesteps(t), y)
        noise = torch.randn((3, 3, 4, 4), generator=g)
        c = lambda name: d.coef(name, t)  # noqa: E731
        if sampler == "ddpm":
            x = ddpm_step_reference(x, eps, noise, c("sqrt_recip_alpha_bar"), c("sqrt_recipm1_alpha_bar"),
                                    c("posterior_mean_coef_x0"), c("posterior_mean_coef_xt"),
                                    c("posterior_variance").sqrt() * (t > 0), True)
        else:
            ab, ab_prev = c("alpha_bar"), c("alpha_bar_prev")
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
            x = ddim_step_reference(x, eps, noise, c("sqrt_recip_alpha_bar"), c("sqrt_recipm1_alpha_bar"),
                                    ab_prev.sqrt(), (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt(), sigma, True)
    torch.testing.assert_close(got, x, atol=2e-6, rtol=0)


# ---- training timesteps (diffusion.timestep_sampling)

def test_uniform_timesteps_draw_what_randint_draws():
    """uniform draws the very numbers the training step drew before the option existed, so runs at a fixed
    seed, and resumed runs, are unchanged."""
    d = Diffusion(get_beta_schedule("linear", T))
    torch.manual_seed(3)
    drawn = d.sample_timesteps(4096, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(0, T, (4096,)))


@pytest.mark.parametrize("schedule,zero_terminal_snr,steps", [("linear", False, 1000), ("cosine", False, 1000),
                                                              ("linear", True, 1000), ("linear", False, 7)])
def test_lognormal_timesteps_are_the_steps_nearest_each_drawn_noise_level(schedule, zero_terminal_snr, steps):
    betas = get_beta_schedule(schedule, steps)
    d = Diffusion(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, timestep_sampling="lognormal")
    torch.manual_seed(5)
    t = d.sample_timesteps(20000, torch.device("cpu"))
    torch.manual_seed(5)
    wanted = (torch.randn(20000) * 1.2 - 1.2).double()
    with np.errstate(divide="ignore"):
        log_sigma = torch.as_tensor(0.5 * np.log((1 - d.alpha_bar) / d.alpha_bar))
    distance = (log_sigma[None, :] - wanted[:, None]).abs()
    nearest = distance.argmin(dim=1)
    # a tie to float32 rounding may go either way; everything else is the nearest step
    chosen = distance.gather(1, t[:, None]).squeeze(1)
    assert (chosen - distance.min(dim=1).values).max() < 1e-5
    assert (t == nearest).float().mean() > 0.999
    assert t.min() >= 0 and t.max() < steps


@pytest.mark.parametrize("mean, std", [(-1.2, 1.2), (0.0, 1.2), (1.0, 0.8), (-2.5, 0.5)])
def test_lognormal_timesteps_have_the_asked_noise_levels_where_the_schedule_reaches(mean, std):
    """On the linear schedule log sigma spans about -4.6 to 5.1, so each N(mean, std^2) here lies inside it and
    the drawn steps' log sigma has its mean and spread; half the draws fall below sigma = exp(mean)."""
    d = Diffusion(get_beta_schedule("linear", T), timestep_sampling="lognormal", lognormal_mean=mean,
                  lognormal_std=std)
    t = d.sample_timesteps(50000, torch.device("cpu"))
    log_sigma = torch.as_tensor(0.5 * np.log((1 - d.alpha_bar) / d.alpha_bar))[t]
    assert abs(log_sigma.mean().item() - mean) < 0.03
    assert abs(log_sigma.std().item() - std) < 0.03
    assert abs((log_sigma < mean).double().mean().item() - 0.5) < 0.01


def test_a_respaced_process_keeps_its_timestep_sampling():
    d = Diffusion(get_beta_schedule("linear", T), timestep_sampling="lognormal", lognormal_mean=0.5,
                  lognormal_std=0.7)
    respaced = d.respace(50)
    assert (respaced.timestep_sampling, respaced.lognormal_mean, respaced.lognormal_std) == ("lognormal", 0.5, 0.7)
    with pytest.raises(ValueError, match="timestep_sampling='beta'"):
        Diffusion(get_beta_schedule("linear", T), timestep_sampling="beta")
