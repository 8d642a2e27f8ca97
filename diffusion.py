"""
DDPM on top of any denoising model: beta schedules, the forward process q(x_t | x_0), the training loss,
and the DDPM, DDIM and DPM-Solver++(2M) samplers with classifier-free guidance. One file, read top to bottom.

Notation follows Ho et al. (2020): alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, and
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. Timesteps are 0-based: t = 0 is the least noisy step.
The model predicts one of three targets (diffusion.prediction), all linear in x_t and each other:
  eps  the noise (Ho et al.);
  x0   the clean image;
  v    sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022): at high noise it is close to
       -x_0 and at low noise close to eps, so neither end amplifies the model's error, whereas
       x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) multiplies an eps error by up to
       1 / sqrt(alpha_bar_T), about 150 on the linear schedule.
Every sampler turns the prediction into x_0 and eps first, so every target works with every sampler.
"""
import math

import numpy as np
import torch

from csrc import extension as _C, supports

# -----------------------------------------------------------------------------
# beta schedules


def get_beta_schedule(name, num_steps, beta_start=1e-4, beta_end=0.02, power=2.0):
    """float64 numpy betas of length num_steps."""
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if name == "polynomial":
        # power 1 is linear, power 2 is Ho et al.'s "quad"; a larger power keeps noise low for longer
        p = float(power)
        return np.linspace(beta_start ** (1 / p), beta_end ** (1 / p), num_steps, dtype=np.float64) ** p
    if name == "cosine":
        # Nichol & Dhariwal (2021), eq. 17; the clip at 0.999 avoids a singularity at t = T
        def alpha_bar(t):
            return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(num_steps)],
                        dtype=np.float64)
    raise ValueError(f"noise_schedule={name!r} is not one of linear, cosine, polynomial")


def rescale_zero_terminal_snr(betas):
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so that it keeps its first value and
    ends at exactly 0. The last step is then pure noise, as at sampling time, so the model cannot learn to
    read the image's mean colour from the signal the linear schedule leaves at t = T (sqrt(alpha_bar_T) is
    about 0.006 there). eps is undefined at t = T afterwards: use v or x0 prediction."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab ** 2
    return 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])


# -----------------------------------------------------------------------------
# noise steps: elementwise with per-sample coefficients (B,), so a batch may mix timesteps.
# The fused csrc kernels compute exactly these formulas; the tests hold them to the same numbers.


def _per_sample(coef, x):
    return coef.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample_reference(x0, noise, coef_x0, coef_noise):
    return _per_sample(coef_x0, x0) * x0 + _per_sample(coef_noise, x0) * noise


def predict_x0_reference(x_t, eps, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, clip):
    x0 = _per_sample(sqrt_recip_alpha_bar, x_t) * x_t - _per_sample(sqrt_recipm1_alpha_bar, x_t) * eps
    return x0.clamp(-1, 1) if clip else x0


def ddpm_step_reference(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar,
                        mean_coef_x0, mean_coef_xt, sigma, clip):
    """x_{t-1} = mean of q(x_{t-1} | x_t, x0_pred) + sigma * noise."""
    x0 = predict_x0_reference(x_t, eps, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, clip)
    mean = _per_sample(mean_coef_x0, x_t) * x0 + _per_sample(mean_coef_xt, x_t) * x_t
    return mean + _per_sample(sigma, x_t) * noise


def ddim_step_reference(x_t, eps, noise, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar,
                        sqrt_alpha_bar_prev, coef_eps, sigma, clip):
    """Song et al. (2021) eq. 12; coef_eps = sqrt(1 - alpha_bar_prev - sigma^2)."""
    x0 = predict_x0_reference(x_t, eps, sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar, clip)
    # re-derive eps from the (possibly clipped) x0 so the step stays on the line through x_t and x0
    eps = (_per_sample(sqrt_recip_alpha_bar, x_t) * x_t - x0) / _per_sample(sqrt_recipm1_alpha_bar, x_t)
    return (_per_sample(sqrt_alpha_bar_prev, x_t) * x0 + _per_sample(coef_eps, x_t) * eps
            + _per_sample(sigma, x_t) * noise)


def q_sample_op(x0, noise, coef_x0, coef_noise):
    if not supports("q_sample", x0):
        return q_sample_reference(x0, noise, coef_x0, coef_noise)
    return _C.q_sample(x0, noise, coef_x0, coef_noise)


def ddpm_step(*args):
    return _C.ddpm_step(*args) if supports("ddpm_step", args[0]) else ddpm_step_reference(*args)


def ddim_step(*args):
    return _C.ddim_step(*args) if supports("ddim_step", args[0]) else ddim_step_reference(*args)


# -----------------------------------------------------------------------------
# the diffusion process


PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "lognormal")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


class Diffusion:
    """Coefficient tables for one beta schedule and one prediction target, plus the loss and samplers that
    use them.

    timestep_map translates this process's step index into the timestep the model was trained on; it is
    the identity unless the process was made by respace().
    """

    def __init__(self, betas, timestep_map=None, prediction="eps", loss_weighting="none", min_snr_gamma=5.0,
                 timestep_sampling="uniform", lognormal_mean=-1.2, lognormal_std=1.2):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r} is not one of {', '.join(LOSS_WEIGHTINGS)}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is not one of {', '.join(TIMESTEP_SAMPLINGS)}")
        self.prediction, self.loss_weighting, self.min_snr_gamma = prediction, loss_weighting, float(min_snr_gamma)
        self.timestep_sampling = timestep_sampling
        # of log sigma; EDM's P_mean and P_std (Karras et al. 2022) by default
        self.lognormal_mean, self.lognormal_std = float(lognormal_mean), float(lognormal_std)
        self.num_steps = len(betas)
        self.timestep_map = np.arange(self.num_steps) if timestep_map is None else np.asarray(timestep_map)
        self.respaced_from = None  # (process, spacing) for a process made by respace()
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        self.betas, self.alpha_bar, self.alpha_bar_prev = betas, alpha_bar, alpha_bar_prev
        self.sqrt_alpha_bar = np.sqrt(alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(1.0 - alpha_bar)
        with np.errstate(divide="ignore"):  # infinite at t = T under zero terminal SNR, where eps says nothing of x0
            self.sqrt_recip_alpha_bar = np.sqrt(1.0 / alpha_bar)
            self.sqrt_recipm1_alpha_bar = np.sqrt(1.0 / alpha_bar - 1)
        self.snr = alpha_bar / (1.0 - alpha_bar)  # signal-to-noise ratio alpha_bar / (1 - alpha_bar)
        with np.errstate(divide="ignore"):
            self.log_sigma = -0.5 * np.log(self.snr)  # increasing in t; +inf at t = T under zero terminal SNR
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef_x0 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef_xt = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar)
        self._device_tables = {}

    @classmethod
    def from_config(cls, diffusion_cfg):
        c = diffusion_cfg
        betas = get_beta_schedule(c["noise_schedule"], c["num_steps"], c["beta_start"], c["beta_end"], c["power"])
        if c["zero_terminal_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, prediction=c["prediction"], loss_weighting=c["loss_weighting"],
                   min_snr_gamma=c["min_snr_gamma"], timestep_sampling=c["timestep_sampling"], lognormal_mean=c["lognormal_mean"],
                   lognormal_std=c["lognormal_std"])

    def respace(self, steps, spacing="uniform"):
        """A process over `steps` timesteps of this one, with betas that keep alpha_bar. spacing uniform: evenly
        spaced in t; logsnr: evenly spaced in lambda = log(alpha / sigma), as DPM-Solver's steps are, which
        on the linear schedule puts more of them at low noise (both always keep t = 0 and t = T)."""
        if steps >= self.num_steps:
            return self
        if spacing == "uniform":
            use = np.unique(np.linspace(0, self.num_steps - 1, steps).round().astype(np.int64))
        elif spacing == "logsnr":
            with np.errstate(divide="ignore"):
                lam = 0.5 * np.log(self.snr)  # decreasing in t; -inf at t = T under zero terminal SNR
            finite = lam[np.isfinite(lam)]
            wanted = np.linspace(lam[0], finite[-1], steps)
            nearest = np.abs(finite[None, :] - wanted[:, None]).argmin(axis=1)
            use = np.unique(np.append(nearest, self.num_steps - 1))
        else:
            raise ValueError(f"spacing={spacing!r} is not one of uniform, logsnr")
        alpha_bar = self.alpha_bar[use]
        betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
        process = Diffusion(betas, self.timestep_map[use], self.prediction, self.loss_weighting, self.min_snr_gamma,
                            self.timestep_sampling, self.lognormal_mean, self.lognormal_std)
        process.respaced_from = (self, spacing)
        return process

    def for_sampler(self, sampler, steps=None):
        """The process that sampler steps through, steps long (default: as long as this one). The grid is the
        sampler's: DPM-Solver++ steps evenly in log-SNR, since evenly in t its second-order step overshoots on
        the linear schedule, where the last steps span most of the log-SNR range; DDPM and DDIM step evenly in
        t. A process respaced on another grid is respaced again from the one it came from, so
        respace(20).sample(sampler="dpm++2m") runs on DPM-Solver++'s grid."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
        spacing = "logsnr" if sampler == "dpm++2m" else "uniform"
        steps = steps or self.num_steps
        if self.respaced_from is None:
            return self.respace(steps, spacing)
        source, source_spacing = self.respaced_from
        if steps == self.num_steps and source_spacing == spacing:
            return self
        return source.for_sampler(sampler, steps)

    def coef(self, name, t):
        """Table `name` gathered at integer timesteps t (B,), as float32 on t's device."""
        key = (name, t.device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.as_tensor(getattr(self, name), dtype=torch.float32, device=t.device)
        return self._device_tables[key][t]

    def model_timesteps(self, t):
        """The trained-on timesteps of step indices t; the table is copied to t's device once, not every step."""
        key = ("timestep_map", t.device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.as_tensor(self.timestep_map, device=t.device)
        return self._device_tables[key][t]

    # ---- the three targets, and what each says about x0 and eps

    def target(self, x0, noise, t):
        """What the model learns to predict from x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return _per_sample(self.coef("sqrt_alpha_bar", t), x0) * noise - \
            _per_sample(self.coef("sqrt_one_minus_alpha_bar", t), x0) * x0

    def predict_x0_eps(self, prediction, x_t, t):
        """(x0, eps) implied by the model's prediction of its target at x_t."""
        if self.prediction == "eps":
            return predict_x0_reference(x_t, prediction, self.coef("sqrt_recip_alpha_bar", t),
                                        self.coef("sqrt_recipm1_alpha_bar", t), False), prediction
        a = _per_sample(self.coef("sqrt_alpha_bar", t), x_t)
        s = _per_sample(self.coef("sqrt_one_minus_alpha_bar", t), x_t)
        if self.prediction == "x0":
            return prediction, (x_t - a * prediction) / s
        return a * x_t - s * prediction, s * x_t + a * prediction  # v: the rotation of (x0, eps) by alpha_bar

    # ---- training

    def sample_timesteps(self, batch, device):
        """Training timesteps (batch,). uniform: every step alike. lognormal: log sigma drawn from
        N(lognormal_mean, lognormal_std^2) and rounded to the step with the nearest log sigma, which spends the
        training on the middle noise levels, where the image's content is decided, and little on the
        nearly clean and nearly pure-noise ends."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_steps, (batch,), device=device)
        if self.num_steps == 1:
            return torch.zeros(batch, dtype=torch.long, device=device)
        table = self.coef("log_sigma", torch.arange(self.num_steps, device=device))
        wanted = torch.randn(batch, device=device) * self.lognormal_std + self.lognormal_mean
        above = torch.searchsorted(table, wanted).clamp(1, self.num_steps - 1)  # table[above - 1] < wanted <= ...
        nearer_below = (wanted - table[above - 1]) < (table[above] - wanted)
        return above - nearer_below.long()

    def q_sample(self, x0, t, noise):
        return q_sample_op(x0, noise, self.coef("sqrt_alpha_bar", t), self.coef("sqrt_one_minus_alpha_bar", t))

    def loss_weight(self, t):
        """min-SNR-gamma (Hang et al. 2023) as a factor on the target's MSE: every target's loss becomes
        min(SNR, gamma) ||x0 - x0_pred||^2, since an eps error is SNR times, and a v error SNR + 1 times, the
        x0 error it implies. The clip at gamma stops the nearly clean timesteps, easy and plentiful, from
        dominating the gradient."""
        snr = self.coef("snr", t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]

    def training_losses(self, model, x0, y, t=None, noise=None):
        """Per-sample (weighted) MSE between the model's prediction and its target, shape (B,), and the
        timesteps used."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        prediction = model(x_t, self.model_timesteps(t), y)
        loss = (prediction.float() - self.target(x0, noise, t).float()).pow(2).mean(dim=(1, 2, 3))
        if self.loss_weighting == "min_snr":
            loss = loss * self.loss_weight(t)
        return loss, t

    # ---- sampling

    def guided_prediction(self, model, x, t, y, guidance_scale, null_class):
        """Classifier-free guidance: uncond + s * (cond - uncond) of the model's target; s = 1 is the plain
        model. Guiding the target guides x0 and eps alike: both are affine in it with weights summing to 1."""
        model_t = self.model_timesteps(t)
        if guidance_scale == 1.0:
            return model(x, model_t, y).float()
        out = model(torch.cat([x, x]), torch.cat([model_t, model_t]),
                    torch.cat([y, torch.full_like(y, null_class)])).float()
        cond, uncond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def guided_at(self, step, guidance_interval):
        """Whether guidance applies at this step: everywhere when the interval is empty, else where the noise
        level sigma = sqrt((1 - alpha_bar) / alpha_bar) lies in (low, high] (Kynkaanniemi et al. 2024):
        guidance at the highest noise levels fixes the global colour and layout too early and too hard, at
        the lowest it only sharpens noise. Unguided steps cost one model evaluation, not two."""
        if not guidance_interval:
            return True
        low, high = guidance_interval
        ab = self.alpha_bar[step]
        sigma = math.inf if ab == 0 else math.sqrt((1 - ab) / ab)
        return low < sigma <= high

    def dpm_solver_coefficients(self):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on this process's timesteps, as float64 tables over
        step index i (the step from i to i - 1, the last one to the clean image): x_next = coef_x[i] * x +
        coef_x0[i] * D with D = x0_i + mix[i] * (x0_i - x0_{i+1}). In log-SNR time lambda = log(alpha / sigma)
        the solution is exact for a constant x0 prediction; mix = 1 / (2 r), r = h_{i+1} / h_i, adds the
        linear term. The first step and the last (to sigma = 0, h infinite) are first order."""
        alpha = np.append(1.0, self.sqrt_alpha_bar)  # index i + 1 is step i; index 0 the clean image
        sigma = np.append(0.0, self.sqrt_one_minus_alpha_bar)
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = np.log(alpha) - np.log(sigma)  # +inf for the clean image, -inf at zero terminal SNR
            h = lam[:-1] - lam[1:]  # h[i]: the step from i to i - 1
            coef_x = sigma[:-1] / sigma[1:]
            coef_x0 = -alpha[:-1] * np.expm1(-h)
            mix = h / (2.0 * np.append(h[1:], np.nan))  # after an infinite first step (zero terminal SNR): 0
        mix[0] = mix[-1] = 0.0  # the last step (to sigma = 0) and the first (no previous x0) are first order
        return coef_x, coef_x0, mix

    @torch.no_grad()
    def sample(self, model, shape, y, sampler="ddpm", steps=None, eta=0.0, guidance_scale=1.0, clip_denoised=True,
               null_class=None, generator=None, callback=None, progress=False, guidance_interval=(),
               variance="small"):
        """Draw x_0 from pure noise in steps steps (default: this process's length) on the sampler's grid
        (for_sampler). callback(i, x) sees the current x after each of the steps (i counts up from 0), which
        is how the timestep grids record the reverse process. variance is DDPM's: small, the posterior's (Ho et
        al.'s fixed small), or large, beta_t (their fixed large, which keeps more of the spread when the
        process is respaced to few steps)."""
        if variance not in ("small", "large"):
            raise ValueError(f"variance={variance!r} is not one of small, large")
        process = self.for_sampler(sampler, steps)
        if process is not self:
            return process.sample(model, shape, y, sampler, None, eta, guidance_scale, clip_denoised, null_class,
                                  generator, callback, progress, guidance_interval, variance)
        device = y.device
        x = torch.randn(shape, device=device, generator=generator)
        steps = range(self.num_steps - 1, -1, -1)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc=f"{sampler} {self.num_steps} steps", leave=False)
        if sampler == "dpm++2m":
            coef_x, coef_x0, mix = self.dpm_solver_coefficients()
            x0_before = None
        for i, step in enumerate(steps):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            scale = guidance_scale if self.guided_at(step, guidance_interval) else 1.0
            prediction = self.guided_prediction(model, x, t, y, scale, null_class)
            if sampler == "dpm++2m":
                x0 = self.predict_x0_eps(prediction, x, t)[0]
                x0 = x0.clamp(-1, 1) if clip_denoised else x0
                d = x0 if mix[step] == 0 else x0 + mix[step] * (x0 - x0_before)
                x = q_sample_op(d, x, torch.full(t.shape, coef_x0[step], device=device),
                                torch.full(t.shape, coef_x[step], device=device))  # one fused pass
                x0_before = x0
            else:
                x = self.stochastic_step(sampler, prediction, x, t, step, eta, variance, clip_denoised,
                                         torch.randn(shape, device=device, generator=generator))
            if callback is not None:
                callback(i, x)
        return x

    def stochastic_step(self, sampler, prediction, x, t, step, eta, variance, clip, noise):
        """One DDPM or DDIM step from x at step t; the fused kernels take eps, so other targets convert first."""
        if self.alpha_bar[step] == 0:
            # zero terminal SNR at t = T: x_t is pure noise (eps = x_t) and x0 comes from the prediction alone,
            # where the kernels' x0 = x_t / sqrt(alpha_bar) - ... would be 0 / 0
            x0, eps = self.predict_x0_eps(prediction, x, t)
            x0 = x0.clamp(-1, 1) if clip else x0
            ab_prev = self.alpha_bar_prev[step]
            if sampler == "ddpm":  # posterior mean: coef_xt = 0 since alpha_T = 0
                sigma = math.sqrt(self.posterior_variance[step] if variance == "small" else self.betas[step])
                return math.sqrt(ab_prev) * x0 + sigma * noise
            sigma = eta * math.sqrt(1 - ab_prev)
            return math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0)) * eps + sigma * noise
        eps = prediction if self.prediction == "eps" else self.predict_x0_eps(prediction, x, t)[1]
        coefs = [self.coef("sqrt_recip_alpha_bar", t), self.coef("sqrt_recipm1_alpha_bar", t)]
        if sampler == "ddpm":
            # no noise on the last step
            sigma = self.coef("posterior_variance" if variance == "small" else "betas", t).sqrt() * (t > 0)
            return ddpm_step(x, eps, noise, *coefs, self.coef("posterior_mean_coef_x0", t),
                             self.coef("posterior_mean_coef_xt", t), sigma, clip)
        ab, ab_prev = self.coef("alpha_bar", t), self.coef("alpha_bar_prev", t)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        coef_eps = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
        return ddim_step(x, eps, noise, *coefs, ab_prev.sqrt(), coef_eps, sigma, clip)
