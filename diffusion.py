"""
DDPM on top of any noise-predicting model: beta schedules, the forward process q(x_t | x_0), the training
loss, and the DDPM and DDIM samplers with classifier-free guidance. One file, read top to bottom.

Notation follows Ho et al. (2020): alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s, and the model
predicts the noise eps that was mixed into x_0. Timesteps are 0-based: t = 0 is the least noisy step.
"""
import math

import numpy as np
import torch

from csrc import extension as _C

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
    if _C is None:
        return q_sample_reference(x0, noise, coef_x0, coef_noise)
    return _C.q_sample(x0, noise, coef_x0, coef_noise)


def ddpm_step(*args):
    return ddpm_step_reference(*args) if _C is None else _C.ddpm_step(*args)


def ddim_step(*args):
    return ddim_step_reference(*args) if _C is None else _C.ddim_step(*args)


# -----------------------------------------------------------------------------
# the diffusion process


class Diffusion:
    """Coefficient tables for one beta schedule, plus the loss and samplers that use them.

    timestep_map translates this process's step index into the timestep the model was trained on; it is
    the identity unless the process was made by respace().
    """

    def __init__(self, betas, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_steps = len(betas)
        self.timestep_map = np.arange(self.num_steps) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        self.betas, self.alpha_bar, self.alpha_bar_prev = betas, alpha_bar, alpha_bar_prev
        self.sqrt_alpha_bar = np.sqrt(alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(1.0 - alpha_bar)
        self.sqrt_recip_alpha_bar = np.sqrt(1.0 / alpha_bar)
        self.sqrt_recipm1_alpha_bar = np.sqrt(1.0 / alpha_bar - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 * x_0 + coef_xt * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef_x0 = betas * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef_xt = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar)
        self._device_tables = {}

    @classmethod
    def from_config(cls, diffusion_cfg):
        c = diffusion_cfg
        return cls(get_beta_schedule(c["noise_schedule"], c["num_steps"], c["beta_start"], c["beta_end"],
                                     c["power"]))

    def respace(self, steps):
        """A process over `steps` evenly spaced timesteps of this one, with betas that keep alpha_bar."""
        if steps >= self.num_steps:
            return self
        use = np.unique(np.linspace(0, self.num_steps - 1, steps).round().astype(np.int64))
        alpha_bar = self.alpha_bar[use]
        betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
        return Diffusion(betas, self.timestep_map[use])

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

    # ---- training

    def q_sample(self, x0, t, noise):
        return q_sample_op(x0, noise, self.coef("sqrt_alpha_bar", t), self.coef("sqrt_one_minus_alpha_bar", t))

    def training_losses(self, model, x0, y, t=None, noise=None):
        """Per-sample MSE between the true and predicted noise, shape (B,), and the timesteps used."""
        if t is None:
            t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, self.model_timesteps(t), y)
        return (eps.float() - noise.float()).pow(2).mean(dim=(1, 2, 3)), t

    # ---- sampling

    def predict_eps(self, model, x, t, y, guidance_scale, null_class):
        """Classifier-free guidance: eps_uncond + s * (eps_cond - eps_uncond); s = 1 is the plain model."""
        model_t = self.model_timesteps(t)
        if guidance_scale == 1.0:
            return model(x, model_t, y).float()
        eps = model(torch.cat([x, x]), torch.cat([model_t, model_t]),
                    torch.cat([y, torch.full_like(y, null_class)])).float()
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def sample(self, model, shape, y, sampler="ddpm", eta=0.0, guidance_scale=1.0, clip_denoised=True,
               null_class=None, generator=None, callback=None, progress=False):
        """Draw x_0 from pure noise. callback(i, x) sees the current x after each of the steps (i counts up
        from 0), which is how the timestep grids record the reverse process."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler={sampler!r} is not one of ddpm, ddim")
        device = y.device
        x = torch.randn(shape, device=device, generator=generator)
        steps = range(self.num_steps - 1, -1, -1)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc=f"{sampler} {self.num_steps} steps", leave=False)
        for i, step in enumerate(steps):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = self.predict_eps(model, x, t, y, guidance_scale, null_class)
            noise = torch.randn(shape, device=device, generator=generator)
            coefs = [self.coef("sqrt_recip_alpha_bar", t), self.coef("sqrt_recipm1_alpha_bar", t)]
            if sampler == "ddpm":
                # sigma^2 = posterior variance ("fixed small"); no noise on the last step
                sigma = self.coef("posterior_variance", t).sqrt() * (t > 0)
                x = ddpm_step(x, eps, noise, *coefs, self.coef("posterior_mean_coef_x0", t),
                              self.coef("posterior_mean_coef_xt", t), sigma, clip_denoised)
            else:
                ab, ab_prev = self.coef("alpha_bar", t), self.coef("alpha_bar_prev", t)
                sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
                coef_eps = (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt()
                x = ddim_step(x, eps, noise, *coefs, ab_prev.sqrt(), coef_eps, sigma, clip_denoised)
            if callback is not None:
                callback(i, x)
        return x
