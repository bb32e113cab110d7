"""Forward process, posterior, learned variance and training losses (DDPM; improved DDPM).

All helpers take `t` as schedule positions (int64 [B]); the network is called with the original
timesteps `schedule.timesteps[t]`. Images are [B, C, H, W] in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mgdm_core.diffusion.schedule import Schedule, gather
from mgdm_core.errors import ConfigError

Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4): [B, C, H, W]."""
    return (
        gather(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def q_posterior_mean_variance(
    schedule: Schedule, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """mu~_t(x_t, x_0), beta~_t and clipped log beta~_t of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    Returns the mean [B, C, H, W] and the variance and log variance broadcastable to it.
    """
    mean = (
        gather(schedule.posterior_mean_coef1, t, x_t) * x0
        + gather(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = gather(schedule.posterior_variance, t, x_t)
    log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def predict_x0_from_eps(schedule: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), DDPM eq. 4 solved for x_0."""
    return (
        gather(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - gather(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def learned_log_variance(schedule: Schedule, v: Tensor, t: Tensor) -> Tensor:
    """log Sigma_theta = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (improved DDPM eq. 15).

    v: the model's variance channels in [-1, 1], [B, C, H, W]; returns the same shape, in at least
    float32. Under bf16 autocast v arrives in bf16, but log beta_t and log beta~_t differ by less
    than bf16's spacing for t above about 60 (of 1000), so the interpolation (and its gradient)
    would be meaningless there: it is always computed in float32 (float64 stays float64).
    """
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    frac = (v + 1.0) / 2.0
    max_log = gather(np.log(schedule.betas), t, v)
    min_log = gather(schedule.posterior_log_variance_clipped, t, v)
    return frac * max_log + (1.0 - frac) * min_log


def split_output(out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """Split a model output into eps [B, C, ...] and variance channels v (None for C-channel models)."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise ConfigError(
        f"expected the model to output {channels} (eps) or {2 * channels} (eps, v) channels, "
        f"got {out.shape[1]}"
    )


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) elementwise, in nats."""
    return 0.5 * (
        log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2), binned (DDPM eq. 13).

    Each pixel owns the bin [x - 1/255, x + 1/255]; the outermost bins extend to +-infinity.
    Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255.0))
    cdf_minus = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255.0))
    # Clamp so empty bins give a large finite penalty instead of -inf.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_bin))


def _per_sample_mean(values: Tensor) -> Tensor:
    return values.flatten(1).mean(dim=1)


MseWeighting = Literal["sqrt_one_minus_alpha_bar", "uniform", "min_snr"]
MIN_SNR_GAMMA = 5.0


def mse_weight(schedule: Schedule, t: Tensor, weighting: MseWeighting, like: Tensor) -> Tensor | float:
    """Per-sample weight of the eps-MSE at positions t, broadcastable to `like`.

    - sqrt_one_minus_alpha_bar: 1 / sqrt(1 + SNR_t) = sqrt(1 - alpha_bar_t), SNR_t = alpha_bar_t /
      (1 - alpha_bar_t): the original MGDM release's weighting (its `training_losses`);
    - uniform: 1, L_simple of DDPM and improved DDPM;
    - min_snr: min(SNR_t, 5) / SNR_t, Min-SNR-5 for eps prediction (Hang et al. 2023).
    """
    if weighting == "uniform":
        return 1.0
    abar = schedule.alphas_cumprod
    if weighting == "sqrt_one_minus_alpha_bar":
        table = np.sqrt(1.0 - abar)
    elif weighting == "min_snr":
        snr = abar / (1.0 - abar)
        table = np.minimum(snr, MIN_SNR_GAMMA) / snr
    else:
        raise ConfigError(f"unknown mse weighting {weighting!r} (expected one of {MseWeighting.__args__})")
    return gather(table, t, like)


def vlb_terms(
    schedule: Schedule, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, v: Tensor
) -> Tensor:
    """L_t of the variational bound in bits per dimension: [B] (improved DDPM eqs. 4-6).

    KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 0, the decoder NLL
    -log p_theta(x_0 | x_1) for t = 0. eps [B, C, H, W] gives the mean, v the log variance.
    """
    # In float32 at least: under bf16 autocast the posterior terms differ by less than bf16 resolves.
    dtype = torch.promote_types(eps.dtype, torch.float32)
    x0, x_t, eps, v = (a.to(dtype) for a in (x0, x_t, eps, v))
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    model_mean, _, _ = q_posterior_mean_variance(
        schedule, predict_x0_from_eps(schedule, x_t, t, eps), x_t, t
    )
    model_log_var = learned_log_variance(schedule, v, t)
    kl = _per_sample_mean(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    nll = -_per_sample_mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def hybrid_loss(
    model: Model,
    schedule: Schedule,
    x0: Tensor,
    t: Tensor,
    y: Tensor | None,
    noise: Tensor,
    *,
    vlb_weight: float = 1.0,
    weighting: MseWeighting = "uniform",
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_hybrid = w_t L_simple + vlb_weight * (N / 1000) * L_vlb (improved DDPM eq. 16): per-sample [B].

    w_t is `mse_weight(weighting)` (1 for "uniform"; the original release trains with
    "sqrt_one_minus_alpha_bar"); the VLB term is not weighted. The losses are computed in float32
    even when the model ran under bf16 autocast.

    The model outputs 2C channels (eps, v). The VLB term sees eps with its gradient stopped, so it
    trains only the variance (improved DDPM section 3.1); scaling by N / 1000 is the paper's
    lambda = 0.001 over a 1000-step sum ("rescaled MSE"), so vlb_weight = 1 reproduces the paper.
    x0, noise: [B, C, H, W]; t: int64 [B] positions; y: int64 [B] labels or None.
    Returns (loss [B], {"mse": [B], "vb": [B]}).
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, _network_timesteps(schedule, t), y)
    eps, v = split_output(out, x0.shape[1])
    if v is None:
        raise ConfigError("hybrid_loss: expected a learned-variance model with 2C output channels")
    eps = eps.to(torch.promote_types(eps.dtype, torch.float32))
    mse = _per_sample_mean(mse_weight(schedule, t, weighting, eps) * (noise - eps) ** 2)
    vb = vlb_terms(schedule, x0, x_t, t, eps.detach(), v) * (schedule.num_timesteps / 1000.0)
    return mse + vlb_weight * vb, {"mse": mse, "vb": vb}


def mse_loss(
    model: Model, schedule: Schedule, x0: Tensor, t: Tensor, y: Tensor | None, noise: Tensor,
    *, weighting: MseWeighting = "uniform",
) -> tuple[Tensor, dict[str, Tensor]]:
    """w_t ||eps - eps_theta(x_t, t, y)||^2 (DDPM eq. 14; w_t from `mse_weight`) for C-channel models: per-sample [B]."""
    out = model(q_sample(schedule, x0, t, noise), _network_timesteps(schedule, t), y)
    eps, v = split_output(out, x0.shape[1])
    if v is not None:
        raise ConfigError("mse_loss: expected a fixed-variance model with C output channels; use hybrid_loss")
    eps = eps.to(torch.promote_types(eps.dtype, torch.float32))
    mse = _per_sample_mean(mse_weight(schedule, t, weighting, eps) * (noise - eps) ** 2)
    return mse, {"mse": mse}


def _network_timesteps(schedule: Schedule, t: Tensor) -> Tensor:
    """Original timesteps for positions t: int64 [B] on t's device."""
    return torch.from_numpy(schedule.timesteps.copy()).to(t.device)[t]
