"""A two-class Gaussian mixture with exact diffusion quantities, for closed-form tests.

Data: x_0 | y ~ N(mu_y, sigma^2 I), p(y) = 1/2, as "images" [B, 1, 1, 2]. Under
x_t = sqrt(a) x_0 + sqrt(1 - a) eps (a = alpha_bar_t), x_t | y ~ N(sqrt(a) mu_y, s^2 I) with
s^2 = a sigma^2 + 1 - a, so

    eps*(x_t, t, y) = E[eps | x_t, y] = sqrt(1 - a) (x_t - sqrt(a) mu_y) / s^2,
    log p(y | x_t) = log softmax_y(-||x_t - sqrt(a) mu_y||^2 / (2 s^2)),
    eps*(x_t, t)    = sum_y p(y | x_t) eps*(x_t, t, y).

Every callable takes original timesteps t (int64 [B]) and reads alpha_bar from the unrespaced
`base` schedule, so a respaced sampler that feeds the wrong timestep gets the wrong eps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mgdm_core.diffusion.schedule import Schedule, gather

SHAPE_CHW = (1, 1, 2)


@dataclass(frozen=True)
class GaussianMixture:
    """Two classes at means `means` [2, 2] with isotropic std `sigma`; `null_class` 2 means unconditional."""

    base: Schedule
    means: tuple[tuple[float, float], tuple[float, float]] = ((-0.4, 0.2), (0.4, -0.2))
    sigma: float = 0.4
    null_class: int = 2

    def _mu(self, like: Tensor) -> Tensor:
        return torch.tensor(self.means, dtype=like.dtype, device=like.device).reshape(2, *SHAPE_CHW)

    def _abar(self, t: Tensor, like: Tensor) -> Tensor:
        return gather(self.base.alphas_cumprod, t, like)

    def sample_x0(self, y: Tensor, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Tensor:
        """Exact data draws x_0 | y: [B, 1, 1, 2]."""
        noise = torch.randn((len(y), *SHAPE_CHW), generator=generator, dtype=dtype)
        return self._mu(noise)[y] + self.sigma * noise

    def class_eps(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """eps*(x_t, t, y): [B, 1, 1, 2]."""
        a = self._abar(t, x_t)
        s2 = a * self.sigma**2 + 1.0 - a
        return (1.0 - a).sqrt() * (x_t - a.sqrt() * self._mu(x_t)[y]) / s2

    def logits(self, x_t: Tensor, t: Tensor) -> Tensor:
        """log p(y | x_t) up to a constant, the Bayes-optimal noisy classifier: [B, 2]."""
        a = self._abar(t, x_t)
        s2 = a * self.sigma**2 + 1.0 - a
        diff = x_t.unsqueeze(1) - a.sqrt().unsqueeze(1) * self._mu(x_t).unsqueeze(0)
        return -(diff**2).flatten(2).sum(-1) / (2.0 * s2.flatten())[:, None]

    def clean_logits(self, x0: Tensor) -> Tensor:
        """log p(y | x_0) up to a constant: [B, 2] (alpha_bar = 1)."""
        diff = x0.unsqueeze(1) - self._mu(x0).unsqueeze(0)
        return -(diff**2).flatten(2).sum(-1) / (2.0 * self.sigma**2)

    def mixture_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """eps*(x_t, t) of the unconditional mixture: [B, 1, 1, 2]."""
        p = torch.softmax(self.logits(x_t, t), dim=-1)
        eps = [self.class_eps(x_t, t, torch.full_like(t, k)) for k in range(2)]
        return sum(p[:, k].reshape(-1, 1, 1, 1) * eps[k] for k in range(2))

    def mixture_model(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The exact unconditional eps model (y ignored), for classifier guidance."""
        return self.mixture_eps(x_t, t)

    def model(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The exact eps model: conditional for y in {0, 1}, unconditional for None or null_class."""
        if y is None:
            return self.mixture_eps(x_t, t)
        is_null = y == self.null_class
        cond = self.class_eps(x_t, t, torch.where(is_null, 0, y))
        if not bool(is_null.any()):  # a host sync is fine in a test fixture; it halves the cost
            return cond
        return torch.where(is_null.reshape(-1, 1, 1, 1), self.mixture_eps(x_t, t), cond)
