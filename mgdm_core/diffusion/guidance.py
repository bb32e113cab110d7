"""Guidance: gradients that steer sampling, and classifier-free guidance.

A `Guidance` is `(x_t, t, y) -> grad` with the shape of x_t, where t is the original timestep
(int64 [B]) given to the networks. Samplers apply it as the score correction of Dhariwal & Nichol
(2021, eq. 14): eps_hat = eps - sqrt(1 - alpha_bar_t) * scale * grad, so a positive scale moves x
toward larger values of whatever `grad` is the gradient of. Autograd is on only in here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mgdm_core.errors import ConfigError

Classifier = Callable[[Tensor, Tensor], Tensor]
Guidance = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Measure = Literal["entropy", "margin", "least_confidence"]


def entropy(logits: Tensor) -> Tensor:
    """Predictive entropy H = -sum_k p_k log p_k in nats: logits [B, K] -> [B]."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def margin(logits: Tensor) -> Tensor:
    """p_(1) - p_(2), the gap between the two most probable classes: logits [B, K] -> [B]."""
    top2 = F.softmax(logits, dim=-1).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]


def least_confidence(logits: Tensor) -> Tensor:
    """1 - max_k p_k: logits [B, K] -> [B]."""
    return 1.0 - F.softmax(logits, dim=-1).amax(dim=-1)


# Sign that turns each measure into a quantity that grows with uncertainty (a small margin is uncertain).
_UNCERTAINTY_SIGN: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "entropy": (entropy, 1.0),
    "margin": (margin, -1.0),
    "least_confidence": (least_confidence, 1.0),
}


def _input_gradient(objective: Callable[[Tensor], Tensor], x_t: Tensor) -> Tensor:
    """d/dx sum_b objective(x)[b] at x_t, with x_t detached from any outer graph."""
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        return torch.autograd.grad(objective(x).sum(), x)[0]


def classifier_guidance(classifier: Classifier) -> Guidance:
    """grad_{x_t} log p_phi(y | x_t, t), classifier guidance (Dhariwal & Nichol 2021, alg. 2).

    classifier(x_t [B, C, H, W], t [B]) -> logits [B, K]; y: int64 [B] target labels (required).
    """

    def guidance(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ConfigError("classifier guidance needs class labels y")
        rows = torch.arange(x_t.shape[0], device=x_t.device)
        return _input_gradient(lambda x: F.log_softmax(classifier(x, t), dim=-1)[rows, y], x_t)

    return guidance


def uncertainty_guidance(classifier: Classifier, measure: Measure) -> Guidance:
    """grad_{x_t} of the classifier's uncertainty, signed so guidance raises it (MGDM stage 2).

    +entropy, -margin or +least_confidence of classifier(x_t, t); y is ignored.
    """
    if measure not in _UNCERTAINTY_SIGN:
        raise ConfigError(
            f"expected uncertainty measure one of {sorted(_UNCERTAINTY_SIGN)}, got {measure!r}"
        )
    fn, sign = _UNCERTAINTY_SIGN[measure]

    def guidance(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _input_gradient(lambda x: sign * fn(classifier(x, t)), x_t)

    return guidance


def cfg_model(model: Model, scale: float, null_class: int) -> Model:
    """Classifier-free guidance as a model: eps = eps_c + scale * (eps_c - eps_u) (Ho & Salimans 2022).

    The original release's convention: scale 0 is conditional sampling (returns `model` itself, so
    it is exact), scale -1 unconditional; w = 1 + scale in the w convention. Both passes run as
    one batched forward with y replaced by `null_class` in the second half. For 2C-channel models
    the variance channels come from the conditional half.
    """
    if scale == 0:
        return model

    def guided(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if y is None:
            raise ConfigError("classifier-free guidance needs class labels y")
        out = model(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)])
        )
        out_c, out_u = out.chunk(2)
        channels = x_t.shape[1]
        # lerp from eps_u with weight w = 1 + scale: exact eps_u at scale -1.
        eps = torch.lerp(out_u[:, :channels], out_c[:, :channels], 1.0 + scale)
        return torch.cat([eps, out_c[:, channels:]], dim=1)

    return guided
