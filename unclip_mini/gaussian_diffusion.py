"""Gaussian diffusion: noise schedules, q and p, DDPM and DDIM sampling, DDIM inversion, guidance.

The machinery shared by every diffusion model of unCLIP (Ramesh et al. 2022): the diffusion prior
(vectors `[B, D]`), the decoder and both upsamplers (images `[B, C, H, W]`). It follows
DDPM (Ho et al. 2020, arXiv:2006.11239), Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672:
cosine schedule, learned variance, hybrid loss), DDIM (Song et al. 2020, arXiv:2010.02502) and
classifier-free guidance (Ho & Salimans 2022) as GLIDE (Nichol et al. 2021) runs it: one doubled batch.
Method names match openai/guided-diffusion (ADM, Dhariwal & Nichol 2021) so the two can be diffed.

unCLIP Table 3 (what the paper's stages use):

    stage              diffusion steps  schedule  sampling steps  sampling variance
    diffusion prior    1000             cosine    64              analytic (Bao et al. 2022)
    decoder 64 px      1000             cosine    250             learned (Nichol & Dhariwal 2021)
    upsampler 64->256  1000             cosine    27              DDIM
    upsampler 256->1k  1000             linear    15              DDIM

Not implemented here: Analytic-DPM's variance (the prior samples with `fixed_small` or DDIM instead),
likelihood evaluation over the whole chain (ADM's `calc_bpd_loop`), fp16 and distributed code.

Conventions: `t` is a LongTensor `[B]` of indices into this chain (0 = least noisy); every schedule
is computed in float64 and stored as a float32 buffer read through `extract`. The model is called
as `model(x_t, t, **model_kwargs)` and returns `[B, C, ...]`, or `[B, 2C, ...]` with
`var_type='learned_range'` (mean prediction first, variance interpolation second, split on dim 1,
which is the feature dim for vectors `[B, D]`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn
from .progress import tqdm

from . import distributed
from .config import PresetConfig, check, check_choice, check_positive
from .errors import ConfigError, DataError

SCHEDULES = ("cosine", "linear")
MEAN_TYPES = ("eps", "x0", "v")  # what the network predicts: the noise, the clean x_0, or v
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "hybrid")  # hybrid = MSE + VLB (Improved DDPM's L_hybrid)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # how training draws t (see GaussianDiffusion.sample_timesteps)


@dataclasses.dataclass(frozen=True)
class DiffusionConfig(PresetConfig):
    """The diffusion process of one stage; the presets' defaults suit the decoder."""

    timesteps: int = 1000  # paper: 1000 for the prior, the decoder and both upsamplers (Table 3)
    schedule: str = "cosine"  # paper: cosine (prior, decoder, upsampler 1), linear (upsampler 2)
    mean_type: str = "v"  # paper: eps (decoder, GLIDE-style), x0 (the prior predicts z_i directly)
    var_type: str = "fixed_small"  # paper: learned_range (decoder); the prior samples with analytic variance
    loss_type: str = "mse"  # paper: hybrid for the learned-variance decoder, mse for the prior
    rescale_timesteps: bool = False  # ADM option: feed the model t * 1000 / timesteps
    # training's t: 'uniform' (paper, ADM) | 'logit_normal' (t/T = sigmoid(u), u ~ N(0, 1): Esser et al. 2024,
    # fewer draws near t = 0 and t = T). Left out of the config's dict while 'uniform', so stages recorded before
    # the field existed keep their ids.
    timestep_sampling: str = dataclasses.field(default="uniform", metadata={"omit_at_default": True})

    def __post_init__(self):
        check_positive(self, "timesteps")
        check(self.timesteps >= 2, self, "timesteps", "a diffusion needs at least 2 steps")
        check_choice(self, "schedule", SCHEDULES)
        check_choice(self, "mean_type", MEAN_TYPES)
        check_choice(self, "var_type", VAR_TYPES)
        check_choice(self, "loss_type", LOSS_TYPES)
        check_choice(self, "timestep_sampling", TIMESTEP_SAMPLINGS)
        check(self.schedule != "linear" or self.timesteps > 20, self, "timesteps",
              "the linear schedule scales beta_T = 0.02 * 1000 / timesteps, which reaches 1 at 20 "
              "steps: use more than 20 steps or schedule='cosine'")
        check(self.loss_type != "hybrid" or self.var_type == "learned_range", self, "loss_type",
              "'hybrid' trains the variance through the VLB, so it needs var_type='learned_range'")
        check(self.var_type != "learned_range" or self.loss_type == "hybrid", self, "var_type",
              "a learned variance gets no gradient from the MSE alone: use loss_type='hybrid'")

    @classmethod
    def smoke(cls):
        return cls(timesteps=100)

    @classmethod
    def toy(cls):
        return cls()  # v-prediction: far fewer CPU steps than eps for colour and position (README, measurements)

    @classmethod
    def small(cls):
        return cls()

    @classmethod
    def paper(cls):
        # the decoder's recipe (ADM/GLIDE): eps, learned variance, hybrid loss
        return cls(mean_type="eps", var_type="learned_range", loss_type="hybrid")


# ---------------------------------------------------------------------------------------------
# schedules (float64 numpy) and small helpers
# ---------------------------------------------------------------------------------------------

def betas_for_alpha_bar(num_timesteps, alpha_bar, max_beta=0.999):
    """Betas `[T]` (float64) whose cumulative product follows `alpha_bar(t)` on t in [0, 1]."""
    t1 = np.arange(num_timesteps, dtype=np.float64) / num_timesteps
    t2 = (np.arange(num_timesteps, dtype=np.float64) + 1) / num_timesteps
    return np.minimum(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta)  # clip: the last beta is 1


def get_named_beta_schedule(name, num_timesteps):
    """Betas `[T]` in float64: 'linear' (DDPM, scaled to T steps) or 'cosine' (Improved DDPM eq. 17)."""
    if name == "linear":
        scale = 1000 / num_timesteps  # DDPM's 1e-4 .. 0.02 was tuned for T = 1000
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008  # offset that keeps beta_0 from being vanishingly small
        return betas_for_alpha_bar(num_timesteps, lambda t: np.cos((t + s) / (1 + s) * math.pi / 2) ** 2)
    raise ConfigError(f"unknown noise schedule {name!r}; valid choices: {', '.join(map(repr, SCHEDULES))}")


def extract(a, t, shape):
    """`a[t]` for a schedule `a` `[T]` and steps `t` `[B]`, as `[B, 1, ...]` broadcastable to `shape`."""
    out = a.to(t.device)[t].float()
    return out.reshape(t.shape[0], *((1,) * (len(shape) - 1)))


def mean_flat(x):
    """Mean over every dim but the batch: `[B, ...]` -> `[B]`."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability (nats) of 8-bit data `x` in [-1, 1] under a Gaussian discretized to 256 bins.

    The edge bins reach to -inf and +inf (DDPM's decoder L_0). ADM uses a tanh approximation of the
    normal CDF; we use the exact one.
    """
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (x - means + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (x - means - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def randn(shape, generator=None, device=None):
    """Standard normal noise; drawn on the generator's device so a CPU seed reproduces on any device (and, from
    the training loop's generator, split-invariant across processes: `distributed.randn`)."""
    return distributed.randn(shape, generator, device)


# ---------------------------------------------------------------------------------------------
# the diffusion process
# ---------------------------------------------------------------------------------------------

class GaussianDiffusion(nn.Module):
    """A discrete Gaussian diffusion over `[B, ...]` tensors (DDPM / Improved DDPM / DDIM).

    An `nn.Module` only so that `.to(device)` moves the schedule buffers (non-persistent: nothing
    enters a state_dict). Build it with `create_diffusion(cfg)`.
    """

    def __init__(self, betas, mean_type="eps", var_type="fixed_small", loss_type="mse",
                 rescale_timesteps=False, timestep_sampling="uniform"):
        super().__init__()
        for name, value, choices in (("mean_type", mean_type, MEAN_TYPES), ("var_type", var_type, VAR_TYPES),
                                     ("loss_type", loss_type, LOSS_TYPES),
                                     ("timestep_sampling", timestep_sampling, TIMESTEP_SAMPLINGS)):
            if value not in choices:
                raise ConfigError(f"GaussianDiffusion {name}={value!r} is not a valid choice; "
                                  f"valid choices: {', '.join(map(repr, choices))}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ConfigError("betas must be a 1-D array with values in (0, 1]: build them with "
                              "get_named_beta_schedule('cosine', T)")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.rescale_timesteps, self.timestep_sampling = rescale_timesteps, timestep_sampling
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)  # alpha-bar_t
        ac_prev = np.append(1.0, ac[:-1])
        ac_next = np.append(ac[1:], 0.0)
        self.alphas_cumprod_f64 = ac  # float64 copy, used to respace the chain without rounding
        # posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)  (DDPM eq. 6-7)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        buffers = dict(
            betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, alphas_cumprod_next=ac_next,
            one_minus_alphas_cumprod=1.0 - ac,  # in float64: 1 - float32(abar) loses digits near t = 0
            sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            # post_var[0] = 0: the log is clipped by repeating post_var[1] (as ADM does)
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    # ---- the forward process q ----

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0), each broadcastable to `x_start` `[B, ...]`."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        return (mean, extract(self.one_minus_alphas_cumprod, t, x_start.shape),
                extract(self.log_one_minus_alphas_cumprod, t, x_start.shape))

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (DDPM eq. 4); `[B, ...]`."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0)  (DDPM eq. 6-7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))

    # ---- parameterisations: eps, x0 and v are affine in each other for fixed x_t ----

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def predict_v(self, x_start, t, noise):
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0  (Salimans & Ho 2022, arXiv:2202.00512)."""
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def predict_xstart_from_v(self, x_t, t, v):
        """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        return (extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
                + extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v)

    # ---- the reverse process p ----

    def _scale_timesteps(self, t):
        return t.float() * (1000.0 / self.num_timesteps) if self.rescale_timesteps else t

    def _call_model(self, model, x, t, model_kwargs):
        """The one place the network is called (SpacedDiffusion maps `t` to the original steps here)."""
        return model(x, self._scale_timesteps(t), **(model_kwargs or {}))

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t) and the predicted x_0: dict(mean, variance, log_variance, pred_xstart, model_output).

        `x` `[B, C, ...]`; `clip_denoised` clamps x_0 to [-1, 1] (images; the prior passes False);
        `denoised_fn` (optional) is applied to x_0 before the clamp.
        """
        out = self._call_model(model, x, t, model_kwargs)
        c = x.shape[1]
        if self.var_type == "learned_range":
            if out.shape[1] != 2 * c or out.shape[2:] != x.shape[2:]:
                raise DataError(f"the model returned {list(out.shape)} but var_type='learned_range' needs "
                                f"{[x.shape[0], 2 * c, *x.shape[2:]]} (mean and variance parts): set the "
                                f"model's output size to 2*{c} or use var_type='fixed_small'")
            out, var_values = out[:, :c], out[:, c:]
            # Improved DDPM eq. 15: interpolate the log variance between beta~_t and beta_t
            min_log = extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = extract(torch.log(self.betas), t, x.shape)
            frac = (var_values + 1) / 2  # the network's v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if out.shape != x.shape:
                raise DataError(f"the model returned {list(out.shape)} but x_t is {list(x.shape)}: the model "
                                f"must predict one value per input value (or 2x with var_type='learned_range')")
            if self.var_type == "fixed_large":  # beta_t, with beta~_1 at t=0 for a better L_0
                var = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
                variance, log_variance = extract(var, t, x.shape), extract(torch.log(var), t, x.shape)
            else:  # fixed_small: the true posterior variance beta~_t
                variance = extract(self.posterior_variance, t, x.shape)
                log_variance = extract(self.posterior_log_variance_clipped, t, x.shape)

        if self.mean_type == "eps":
            pred_xstart = self.predict_xstart_from_eps(x, t, out)
        elif self.mean_type == "v":
            pred_xstart = self.predict_xstart_from_v(x, t, out)
        else:
            pred_xstart = out
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart,
                    model_output=out)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None):
        """One ancestral DDPM step x_t -> x_{t-1}: dict(sample, pred_xstart), `[B, ...]`."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn(x.shape, generator, x.device)
        nonzero = (t != 0).float().reshape(-1, *((1,) * (x.ndim - 1)))  # no noise at the last step
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    generator=None):
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12; eta=1 is DDPM-like): dict(sample, pred_xstart)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = extract(self.alphas_cumprod, t, x.shape)
        abar_prev = extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # clamp: 1 - abar_prev - sigma^2 >= 0 exactly, but rounding can dip below at eta = 1
        eps_coef = torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0))
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + eps_coef * eps
        if eta > 0:  # eta = 0 draws nothing: deterministic without a generator
            nonzero = (t != 0).float().reshape(-1, *((1,) * (x.ndim - 1)))
            sample = sample + nonzero * sigma * randn(x.shape, generator, x.device)
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """One DDIM inversion step x_t -> x_{t+1} (the ODE run forwards, eta = 0): dict(sample, pred_xstart).

        An x0-predicting model's noise is implied, eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t). At the
        chain's first level, the image itself, sqrt(1 - abar_0) is ~0.006 (cosine schedule), so eps is the
        model's error on x0 blown up ~160x (a 0.02 error gives eps ~3, and x_T inherits it), while an exact x0
        predictor gives eps = x_0 (1 - sqrt(abar_0)) / sqrt(1 - abar_0) ~ 0.003 x_0. There the step takes eps = 0:
        the image is carried up as noise-free, x_1 = sqrt(abar_1) x0_hat. eps- and v-models predict the noise
        (or v) themselves, so their step keeps it.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        if self.mean_type == "x0":
            eps = torch.where((t == 0).view(-1, *([1] * (x.dim() - 1))), torch.zeros_like(eps), eps)
        abar_next = extract(self.alphas_cumprod_next, t, x.shape)
        sample = out["pred_xstart"] * torch.sqrt(abar_next) + torch.sqrt(1 - abar_next) * eps
        return dict(sample=sample, pred_xstart=out["pred_xstart"])

    # ---- loops ----

    def _device(self, model, noise, model_kwargs, device):
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        for v in (model_kwargs or {}).values():
            if torch.is_tensor(v):
                return v.device
        if isinstance(model, nn.Module):
            for p in model.parameters():
                return p.device
        return self.betas.device

    def _loop(self, step, model, shape, noise, model_kwargs, progress, generator, device, indices):
        device = self._device(model, noise, model_kwargs, device)
        x = noise.to(device) if noise is not None else randn(tuple(shape), generator, device)
        for i in tqdm(indices, disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():  # samplers never need gradients; training uses training_losses
                out = step(x, t)
            yield out
            x = out["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, progress=False, generator=None, device=None):
        """Yield dict(sample, pred_xstart) after each DDPM step from x_T (`noise` or drawn) down to x_0."""
        step = lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, generator)
        yield from self._loop(step, model, shape, noise, model_kwargs, progress, generator, device,
                              range(self.num_timesteps - 1, -1, -1))

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      progress=False, generator=None, device=None):
        """Ancestral DDPM sampling: x_0 `shape` = `[B, ...]` (same generator seed -> same samples)."""
        for out in self.p_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn, model_kwargs,
                                                  progress, generator, device):
            pass
        return out["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, progress=False, generator=None, device=None, eta=0.0):
        """Yield dict(sample, pred_xstart) after each DDIM step from x_T down to x_0."""
        step = lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta, generator)
        yield from self._loop(step, model, shape, noise, model_kwargs, progress, generator, device,
                              range(self.num_timesteps - 1, -1, -1))

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         progress=False, generator=None, device=None, eta=0.0):
        """DDIM sampling: x_0 `[B, ...]`; eta=0 is a deterministic map x_T -> x_0."""
        for out in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised, denoised_fn,
                                                     model_kwargs, progress, generator, device, eta):
            pass
        return out["sample"]

    def ddim_reverse_sample_loop(self, model, x_start, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                                 progress=False):
        """DDIM inversion x_0 -> x_T `[B, ...]`: the x_T of unCLIP §3's bipartite latent (z_i, x_T).

        The image is taken as the chain's least noisy level (index 0) and carried up one level per step to the
        noisiest, index T - 1, where `ddim_sample_loop` starts: T - 1 steps, so that sampling from the result
        retraces them (a T-th step would overshoot to a level past the chain, alpha-bar = 0).
        """
        if self.num_timesteps < 2:
            raise ConfigError("DDIM inversion needs a chain of at least 2 steps")
        step = lambda x, t: self.ddim_reverse_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        for out in self._loop(step, model, x_start.shape, x_start, model_kwargs, progress, None, x_start.device,
                              range(self.num_timesteps - 1)):
            pass
        return out["sample"]

    # ---- training ----

    def sample_timesteps(self, batch, generator=None, device=None):
        """Random training steps `[batch]` (long) in [0, num_timesteps): uniform, or with `logit_normal`
        t = floor(T * sigmoid(u)), u ~ N(0, 1), which draws the middle of the chain more often than its ends
        (1.4% of draws below T/10 instead of 10%)."""
        if self.timestep_sampling == "logit_normal":
            u = distributed.randn((batch,), generator, device)
            return (torch.sigmoid(u) * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)
        return distributed.randint(0, self.num_timesteps, (batch,), generator, device)

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the VLB in bits per dim: dict(output [B], pred_xstart).

        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the discretized decoder NLL -log p(x_0|x_1) at t = 0
        (which assumes 8-bit images in [-1, 1]: the VLB is for the image models, not the prior's vectors).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, None, model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return dict(output=torch.where(t == 0, nll, kl), pred_xstart=out["pred_xstart"])

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses for x_0 `[B, ...]` at steps `t` `[B]`: dict(loss, mse[, vb]), each `[B]`."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = self._call_model(model, x_t, t, model_kwargs)
        terms = {}
        if self.var_type == "learned_range":
            c = x_start.shape[1]
            if out.shape[1] != 2 * c:
                raise DataError(f"the model returned {list(out.shape)} but var_type='learned_range' needs "
                                f"{2 * c} values on dim 1: set the model's output size to 2*{c}")
            out, var_values = out[:, :c], out[:, c:]
            # the VLB trains only the variance: the mean part enters it with its gradient stopped
            frozen = torch.cat([out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            # L_hybrid = L_simple + 0.001 * L_vlb, and L_vlb = T * E_t[L_t]: one sampled term weighs T / 1000
            terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = {"eps": noise, "x0": x_start, "v": self.predict_v(x_start, t, noise)}[self.mean_type]
        if out.shape != target.shape:
            raise DataError(f"the model returned {list(out.shape)} but the target is {list(target.shape)}: "
                            f"the model must predict one value per input value")
        terms["mse"] = mean_flat((target - out) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# ---------------------------------------------------------------------------------------------
# timestep respacing: sample with fewer steps than the model was trained with (ADM respace.py)
# ---------------------------------------------------------------------------------------------

def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep: `section_counts` spread over equal sections of the chain.

    `[10, 15, 20]` (or "10,15,20") on 300 steps keeps 10 steps of the first 100, 15 of the next 100 and
    20 of the last 100; "ddimN" keeps the evenly strided `range(0, T, stride)` of exactly N steps (the DDIM
    paper's choice); an int N is the same as [N].
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ConfigError(f"cannot take exactly {desired} evenly strided steps of {num_timesteps}: "
                              f"pick another count or give section counts such as '{desired}'")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ConfigError(f"cannot take {count} steps from a section of {size} of a {num_timesteps}-step "
                              f"chain: use between 1 and {size} steps per section")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over a subset of another's steps; the model still sees the ORIGINAL step indices.

    Keeping alpha-bar at the kept steps fixes the new betas: beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}.
    """

    def __init__(self, base: GaussianDiffusion, use_timesteps):
        kept = sorted(use_timesteps)
        if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ConfigError(f"use_timesteps must be a non-empty subset of range({base.num_timesteps})")
        ac = base.alphas_cumprod_f64[kept]
        betas = 1.0 - ac / np.append(1.0, ac[:-1])
        super().__init__(betas, base.mean_type, base.var_type, base.loss_type, base.rescale_timesteps,
                         base.timestep_sampling)
        base_map = getattr(base, "timestep_map", torch.arange(base.num_timesteps))
        self.register_buffer("timestep_map", base_map.cpu()[kept].clone(), persistent=False)
        self.original_num_steps = getattr(base, "original_num_steps", base.num_timesteps)

    def _call_model(self, model, x, t, model_kwargs):
        t = self.timestep_map.to(t.device)[t]
        if self.rescale_timesteps:
            t = t.float() * (1000.0 / self.original_num_steps)
        return model(x, t, **(model_kwargs or {}))


def respace(diffusion, section_counts):
    """`diffusion` sampled on the steps `space_timesteps(T, section_counts)` picks ("ddim50", 50, ...)."""
    use = space_timesteps(diffusion.num_timesteps, section_counts)
    if len(use) < 2:
        raise ConfigError(f"respacing {section_counts!r} keeps {len(use)} step; sampling needs at least 2 "
                          f"(e.g. 'ddim2')")
    return SpacedDiffusion(diffusion, use)


def create_diffusion(cfg: DiffusionConfig, respacing=None):
    """The diffusion `cfg` describes; with `respacing` ("ddim50", "250", [10, 15, 20]) a SpacedDiffusion."""
    if not isinstance(cfg, DiffusionConfig):
        raise ConfigError(f"create_diffusion needs a DiffusionConfig, got {type(cfg).__name__}: "
                          f"use DiffusionConfig.preset('toy')")
    diffusion = GaussianDiffusion(get_named_beta_schedule(cfg.schedule, cfg.timesteps), cfg.mean_type,
                                  cfg.var_type, cfg.loss_type, cfg.rescale_timesteps, cfg.timestep_sampling)
    return diffusion if respacing in (None, "") else respace(diffusion, respacing)


# ---------------------------------------------------------------------------------------------
# classifier-free guidance (Ho & Salimans 2022) as GLIDE runs it: one doubled batch
# ---------------------------------------------------------------------------------------------

def with_null_rows(*tensors):
    """The doubled batch of classifier-free guidance: each tensor `[B, ...]` -> `[2B, ...]` (the rows,
    then the same rows again), plus `drop` `[2B]` bool, True on the second half. Each model turns the
    dropped rows into its own null condition (the empty caption, z_i = 0, a learned null embedding), the
    same way it dropped conditions in training. Returns (*doubled, drop)."""
    b = tensors[0].shape[0]
    drop = torch.arange(2 * b, device=tensors[0].device) >= b
    return (*(torch.cat([x, x]) for x in tensors), drop)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond): s = 1 is the conditional model, s = 0 the unconditional one, s > 1
    pushes further along the direction the condition adds (Ho & Salimans 2022, eq. 6)."""
    if scale == 1.0:  # exactly the conditional output (the formula would round)
        return cond
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(model, guidance_scale, guided_channels=None):
    """A model function `fn(x [B, ...], t [B], **model_kwargs)` returning the guided output.

    `guidance_scale` s (a number): the model runs once on `cat([x, x])`; its first B rows must see the
    condition and its last B the null condition, and the output is `guide(cond, uncond, s)`. So every
    tensor in `model_kwargs` is `[2B, ...]` (build them with `with_null_rows`; None and non-tensor entries
    pass through; a model that holds its conditioning already, e.g. in a cache, takes none).

    A sequence of K scales (s_1, ..., s_K) guides K nested conditions separately (the compositional form
    of InstructPix2Pix, Brooks et al. 2023, eq. 3): the model runs on K + 1 copies of x whose row blocks
    h_0, ..., h_K see one condition fewer each (h_0 every condition, h_K the null one), and the output is
    h_K + sum_k s_k (h_{k-1} - h_k): s_k scales what the condition dropped between h_{k-1} and h_k adds.
    Equal scales telescope to one, h_K + s (h_0 - h_K).

    Only the first `guided_channels` channels of dim 1 are guided (default: as many as x has, the mean
    prediction); the rest (a learned variance) is taken from h_0. Guiding eps, x_0 or v gives the same
    sampler: for fixed x_t each is an affine function of the others whose x_t-term cancels in every
    difference, so the mixture maps across unchanged.
    """
    scales = [float(s) for s in guidance_scale] if isinstance(guidance_scale, (list, tuple)) \
        else [float(guidance_scale)]
    if not scales:
        raise ConfigError("guidance_scale is an empty sequence: give one scale, or one per condition")
    copies = len(scales) + 1

    def guided(x, t, **model_kwargs):
        b = x.shape[0]
        for k, v in model_kwargs.items():
            if torch.is_tensor(v) and v.shape[0] != copies * b:
                raise DataError(f"model_kwargs[{k!r}] has batch {v.shape[0]} but guidance of {b} samples with "
                                f"{len(scales)} scale(s) needs {copies * b}: concatenate the conditional rows "
                                f"and the null (unconditional) rows, one block per condition dropped")
        out = model(torch.cat([x] * copies), torch.cat([t] * copies), **model_kwargs)
        h = out.split(b)
        c = x.shape[1] if guided_channels is None else guided_channels
        if copies == 2:
            mixed = guide(h[0][:, :c], h[1][:, :c], scales[0])
        else:
            mixed = h[-1][:, :c]
            for k, s in enumerate(scales, start=1):
                mixed = mixed + s * (h[k - 1][:, :c] - h[k][:, :c])
        return torch.cat([mixed, h[0][:, c:]], dim=1)

    return guided
