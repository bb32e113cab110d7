"""Noise schedules: beta constructors, the frozen float64 `Schedule`, and respacing.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021, "improved DDPM"): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, and the posterior q(x_{t-1} | x_t, x_0) with variance
beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mgdm_core.errors import ConfigError

ScheduleKind = Literal["linear", "cosine"]


def linear_betas(steps: int) -> np.ndarray:
    """Linear betas of DDPM, rescaled to `steps` as in improved DDPM: float64 [steps].

    With scale = 1000 / steps, beta runs linearly from scale * 1e-4 to scale * 0.02, so any number
    of steps covers the same noise range as Ho et al.'s 1000.
    """
    _check_steps(steps)
    scale = 1000.0 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine betas, improved DDPM eq. 17: float64 [steps].

    alpha_bar(t) = f(t) / f(0) with f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2, and
    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), clipped at `max_beta` to avoid the
    singularity at t = T.
    """
    _check_steps(steps)
    if not 0.0 < max_beta < 1.0:
        raise ConfigError(f"cosine_betas: expected 0 < max_beta < 1, got {max_beta}")
    fractions = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((fractions + s) / (1.0 + s) * math.pi / 2.0) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"expected the number of diffusion steps to be a positive int, got {steps!r}")


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class Schedule:
    """A diffusion schedule over N positions; every array is read-only float64 [N].

    `timesteps[i]` (int64) is the original timestep fed to the networks at position i; it equals
    `i` for an unrespaced schedule. Position i - 1 is the step after position i when sampling, so
    `alphas_cumprod_prev[i] == alphas_cumprod[i - 1]` (1 at i = 0).
    """

    timesteps: np.ndarray                       # int64 [N], original timestep per position
    betas: np.ndarray                           # beta_i
    alphas_cumprod: np.ndarray                  # alpha_bar_i
    alphas_cumprod_prev: np.ndarray             # alpha_bar_{i-1}, 1 at i = 0
    alphas_cumprod_next: np.ndarray             # alpha_bar_{i+1}, 0 at i = N - 1
    sqrt_alphas_cumprod: np.ndarray             # sqrt(alpha_bar_i)
    sqrt_one_minus_alphas_cumprod: np.ndarray   # sqrt(1 - alpha_bar_i)
    sqrt_recip_alphas_cumprod: np.ndarray       # 1 / sqrt(alpha_bar_i)
    sqrt_recipm1_alphas_cumprod: np.ndarray     # sqrt(1 / alpha_bar_i - 1)
    posterior_variance: np.ndarray              # beta~_i, 0 at i = 0
    posterior_log_variance_clipped: np.ndarray  # log beta~_i with beta~_0 replaced by beta~_1
    posterior_mean_coef1: np.ndarray            # coefficient of x_0 in mu~_i (DDPM eq. 7)
    posterior_mean_coef2: np.ndarray            # coefficient of x_i in mu~_i (DDPM eq. 7)

    @property
    def num_timesteps(self) -> int:
        """N, the number of positions (sampling steps)."""
        return len(self.betas)

    @classmethod
    def from_betas(cls, betas: np.ndarray, timesteps: np.ndarray | None = None) -> Schedule:
        """Build from betas [N] in (0, 1]; `timesteps` defaults to 0..N-1."""
        betas = np.asarray(betas, dtype=np.float64)
        return _build(betas, np.cumprod(1.0 - betas), timesteps)


def _build(betas: np.ndarray, alphas_cumprod: np.ndarray, timesteps: np.ndarray | None) -> Schedule:
    """Derive every array from betas and alpha_bar (passed separately so respacing keeps them exact)."""
    if betas.ndim != 1 or len(betas) < 1:
        raise ConfigError(f"expected a 1-D array of betas, got shape {betas.shape}")
    if not (np.all(betas > 0.0) and np.all(betas <= 1.0)):
        raise ConfigError("expected every beta in (0, 1]")
    n = len(betas)
    timesteps = np.arange(n, dtype=np.int64) if timesteps is None else np.asarray(timesteps, np.int64)
    if timesteps.shape != (n,) or np.any(np.diff(timesteps) <= 0) or timesteps[0] < 0:
        raise ConfigError(f"expected {n} strictly increasing non-negative timesteps")
    abar = alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 = 0; the clipped log uses beta~_1 there so the log stays finite (improved DDPM).
    clipped = np.append(posterior_variance[1], posterior_variance[1:]) if n > 1 else betas.copy()
    arrays = dict(
        timesteps=timesteps,
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        alphas_cumprod_next=np.append(abar[1:], 0.0),
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(clipped),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
    )
    return Schedule(**{name: _readonly(np.array(value)) for name, value in arrays.items()})


def make_schedule(kind: ScheduleKind, steps: int) -> Schedule:
    """The unrespaced schedule of `kind` ("linear" or "cosine") with `steps` positions."""
    if kind == "linear":
        return Schedule.from_betas(linear_betas(steps))
    if kind == "cosine":
        return Schedule.from_betas(cosine_betas(steps))
    raise ConfigError(f"expected schedule kind 'linear' or 'cosine', got {kind!r}")


def respace(schedule: Schedule, spacing: str) -> Schedule:
    """Keep a subset of positions, preserving alpha_bar exactly there (guided-diffusion respace idea).

    `spacing`: "" or "none" (unchanged), "ddimN" (every k-th position from 0, N of them, as DDIM),
    or comma-separated section counts "10,15,25" (positions split into equal sections, each
    evenly strided, both ends kept). Betas are rebuilt as beta_k = 1 - alpha_bar_k / alpha_bar_prev,
    so the respaced chain has the same marginals q(x_t | x_0) at the kept timesteps.
    """
    if spacing.strip().lower() in ("", "none"):
        return schedule
    kept = _kept_positions(schedule.num_timesteps, spacing)
    abar = schedule.alphas_cumprod[kept]
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return _build(betas, abar.copy(), schedule.timesteps[kept])


def _kept_positions(n: int, spacing: str) -> np.ndarray:
    """Sorted positions of an N-position schedule that `spacing` keeps: int64 [M]."""
    text = spacing.strip().lower()
    ddim = re.fullmatch(r"ddim(\d+)", text)
    if ddim:
        return _ddim_positions(n, int(ddim.group(1)))
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"expected spacing '', 'none', 'ddimN' or comma-separated step counts like '10,15,25', "
            f"got {spacing!r}"
        ) from None
    return _section_positions(n, counts)


def _ddim_positions(n: int, count: int) -> np.ndarray:
    """Positions 0, k, 2k, ... with the integer stride k giving exactly `count` of them."""
    for stride in range(1, n + 1):
        positions = np.arange(0, n, stride, dtype=np.int64)
        if len(positions) == count:
            return positions
    raise ConfigError(f"spacing 'ddim{count}': no integer stride gives {count} of {n} steps")


def _section_positions(n: int, counts: list[int]) -> np.ndarray:
    """Split 0..N-1 into len(counts) near-equal sections and stride each to its count."""
    sizes = [n // len(counts) + (1 if k < n % len(counts) else 0) for k in range(len(counts))]
    positions: list[int] = []
    start = 0
    for size, count in zip(sizes, counts):
        if not 1 <= count <= size:
            raise ConfigError(f"spacing: expected each section count in 1..{size}, got {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        positions.extend(start + round(j * stride) for j in range(count))
        start += size
    return np.array(positions, dtype=np.int64)


def gather(values: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcastable to `like`: [B, 1, ..., 1] in like's dtype and device.

    values: float64 [N] schedule array; t: int64 [B] schedule positions on like's device.
    The cast happens before indexing so devices without float64 (MPS) work.
    """
    table = torch.tensor(values, dtype=like.dtype, device=like.device)
    return table[t].reshape(-1, *([1] * (like.ndim - 1)))
