"""Schedules, losses, guidance and samplers, proven on a Gaussian mixture with exact eps and p(y | x_t)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from gaussian_mixture import SHAPE_CHW, GaussianMixture
from mgdm_core.diffusion.guidance import (
    cfg_model,
    classifier_guidance,
    entropy,
    least_confidence,
    margin,
    uncertainty_guidance,
)
from mgdm_core.diffusion.losses import hybrid_loss, learned_log_variance, mse_loss, mse_weight, q_sample
from mgdm_core.diffusion.sampling import (
    PerImageNoise,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    dynamic_threshold,
    initial_noise,
)
from mgdm_core.diffusion.schedule import Schedule, cosine_betas, linear_betas, make_schedule, respace
from mgdm_core.errors import ConfigError

DTYPE = torch.float64
BASE = make_schedule("linear", 1000)
GM = GaussianMixture(BASE)
DDIM50 = respace(BASE, "ddim50")


def _noise(seeds: range) -> Tensor:
    return initial_noise(seeds, SHAPE_CHW, "cpu", DTYPE)


def _data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n exact draws (x_0 [n, 1, 1, 2], balanced labels y [n])."""
    y = torch.arange(n) % 2
    return GM.sample_x0(y, torch.Generator().manual_seed(seed)), y


def _p_true_class(x0: Tensor, y: Tensor) -> Tensor:
    return torch.softmax(GM.clean_logits(x0), dim=-1)[torch.arange(len(y)), y]


class _BatchedNoise:
    """One generator for the whole batch: faster than PerImageNoise for moment tests."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, like: Tensor, step_index: int) -> Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype)


def _assert_class_moments(sample: Callable[[Tensor, Tensor], Tensor], n: int, var_rtol: float) -> None:
    """Per class, n samples: mean within 0.05 std of mu_y, per-dim variance within var_rtol of sigma^2."""
    for label in (0, 1):
        x0 = sample(_noise(range(n)), torch.full((n,), label))
        mean, var = x0.mean(dim=0).flatten(), x0.var(dim=0).flatten()
        mu = torch.tensor(GM.means[label], dtype=DTYPE)
        # Monte-Carlo std of the mean is sigma / sqrt(n) (0.016 sigma at 4096, 0.022 at 2048), so
        # 0.05 sigma is over 2 standard errors; seeds are fixed, so the check is deterministic.
        assert torch.all((mean - mu).abs() < 0.05 * GM.sigma), (label, mean)
        torch.testing.assert_close(var, torch.full_like(var, GM.sigma**2), rtol=var_rtol, atol=0.0)


# Schedules -------------------------------------------------------------------------------------


def test_linear_betas_endpoints_closed_form() -> None:
    betas = linear_betas(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # improved DDPM rescales by 1000 / steps so 4000 steps cover the same noise range.
    assert linear_betas(4000)[[0, -1]] == pytest.approx([2.5e-5, 0.005])


def test_cosine_alpha_bar_matches_eq17_closed_form() -> None:
    steps, s = 1000, 0.008
    schedule = make_schedule("cosine", steps)
    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / steps + s) / (1 + s) * np.pi / 2) ** 2

    expected = f(np.arange(1, steps + 1)) / f(np.zeros(1))
    unclipped = cosine_betas(steps) < 0.999  # only the last betas hit max_beta
    assert unclipped[:-1].all()
    np.testing.assert_allclose(schedule.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-10)


def test_posterior_variance_matches_ddpm_eq7_closed_form() -> None:
    s = BASE
    np.testing.assert_allclose(
        s.posterior_variance[1:], s.betas[1:] * (1 - s.alphas_cumprod[:-1]) / (1 - s.alphas_cumprod[1:])
    )
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


@pytest.mark.parametrize("spacing", ["ddim50", "25", "10,15,25", "ddim250"])
def test_respace_keeps_alpha_bar_at_kept_steps(spacing: str) -> None:
    respaced = respace(BASE, spacing)
    assert np.array_equal(respaced.alphas_cumprod, BASE.alphas_cumprod[respaced.timesteps])
    # Consecutive positions are consecutive (t, t_prev) pairs of the respaced chain.
    assert np.array_equal(respaced.alphas_cumprod_prev[1:], respaced.alphas_cumprod[:-1])
    assert respaced.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(np.cumprod(1 - respaced.betas), respaced.alphas_cumprod, rtol=1e-12)


def test_respace_counts_and_endpoints() -> None:
    assert DDIM50.num_timesteps == 50
    assert np.array_equal(DDIM50.timesteps, np.arange(0, 1000, 20))
    sections = respace(BASE, "10,15,25")
    assert sections.num_timesteps == 50 and sections.timesteps[0] == 0 and sections.timesteps[-1] == 999
    assert respace(BASE, "25").timesteps[[0, -1]].tolist() == [0, 999]
    for unchanged in ("", "none"):
        assert np.array_equal(respace(BASE, unchanged).betas, BASE.betas)
    twice = respace(respace(BASE, "ddim100"), "ddim50")
    assert np.array_equal(twice.timesteps, DDIM50.timesteps)


@pytest.mark.parametrize("spacing", ["ddim999", "abc", "2000", "10,,5"])
def test_respace_rejects_bad_spacing(spacing: str) -> None:
    with pytest.raises(ConfigError, match="spacing"):
        respace(BASE, spacing)


def test_schedule_is_frozen_and_validated() -> None:
    with pytest.raises(ValueError):
        BASE.betas[0] = 0.5  # read-only arrays
    with pytest.raises(ConfigError, match="schedule kind"):
        make_schedule("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="positive int"):
        linear_betas(0)
    with pytest.raises(ConfigError, match="beta"):
        Schedule.from_betas(np.array([0.1, 1.5]))


def test_sampler_walks_consecutive_positions() -> None:
    seen: list[tuple[int, int]] = []
    ddim_sample(GM.model, _noise(range(2)), DDIM50, callback=lambda d: seen.append((d["i"], d["t"])))
    assert seen == [(i, 20 * i) for i in reversed(range(50))]


# Losses ----------------------------------------------------------------------------------------


def test_q_sample_matches_marginal_closed_form() -> None:
    x0 = torch.ones(4096, *SHAPE_CHW, dtype=DTYPE)
    t = torch.full((4096,), 300)
    x_t = q_sample(BASE, x0, t, _noise(range(4096)))
    abar = BASE.alphas_cumprod[300]
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar), abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.05)


def _learned_variance_model(eps_shift: float) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """Exact eps (+ eps_shift) with v = 0, i.e. log-variance halfway between beta~ and beta: 2C channels."""

    def model(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return torch.cat([GM.model(x_t, t, y) + eps_shift, torch.zeros_like(x_t)], dim=1)

    return model


def test_learned_variance_interpolates_between_posterior_and_beta_closed_form() -> None:
    t = torch.tensor([5, 500])
    v = torch.stack([torch.full(SHAPE_CHW, -1.0), torch.full(SHAPE_CHW, 1.0)]).to(DTYPE)
    log_var = learned_log_variance(BASE, v, t)
    assert log_var.shape == v.shape
    assert torch.allclose(log_var[0], torch.tensor(BASE.posterior_log_variance_clipped[5], dtype=DTYPE))
    assert torch.allclose(log_var[1], torch.tensor(math.log(BASE.betas[500]), dtype=DTYPE))


@pytest.mark.parametrize("position", [0, 10, 300])
def test_vlb_term_is_lower_at_true_eps_closed_form(position: int) -> None:
    x0, y = _data(2048)
    t = torch.full((2048,), position)
    noise = _noise(range(2048))
    true_loss, true_terms = hybrid_loss(_learned_variance_model(0.0), BASE, x0, t, y, noise)
    _, wrong_terms = hybrid_loss(_learned_variance_model(0.5), BASE, x0, t, y, noise)
    assert true_loss.shape == (2048,) and torch.isfinite(true_loss).all()
    # The exact eps gives the exact posterior mean E[x_{t-1} | x_t], which minimises the expected KL.
    assert true_terms["vb"].mean() < wrong_terms["vb"].mean()


def test_hybrid_loss_vlb_does_not_train_eps() -> None:
    eps_weight = torch.ones((), dtype=DTYPE, requires_grad=True)
    v_weight = torch.zeros((), dtype=DTYPE, requires_grad=True)

    def model(x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return torch.cat([eps_weight * GM.model(x_t, t, y), torch.tanh(v_weight + 0 * x_t)], dim=1)

    x0, y = _data(64)
    _, terms = hybrid_loss(model, BASE, x0, torch.full((64,), 200), y, _noise(range(64)))
    grad_eps, grad_v = torch.autograd.grad(terms["vb"].sum(), [eps_weight, v_weight], allow_unused=True)
    # eps_weight is reached only through the concatenation, whose eps half gets zero gradient.
    assert (grad_eps is None or grad_eps == 0) and grad_v is not None and grad_v != 0


def test_loss_channel_contracts() -> None:
    x0, y = _data(4)
    t, noise = torch.full((4,), 10), _noise(range(4))
    mse, terms = mse_loss(GM.model, BASE, x0, t, y, noise)
    assert mse.shape == (4,) and set(terms) == {"mse"}
    with pytest.raises(ConfigError, match="2C"):
        hybrid_loss(GM.model, BASE, x0, t, y, noise)
    with pytest.raises(ConfigError, match="hybrid_loss"):
        mse_loss(_learned_variance_model(0.0), BASE, x0, t, y, noise)


# Samplers --------------------------------------------------------------------------------------


def test_ddim50_sampling_matches_class_moments_closed_form() -> None:
    # DDIM is a first-order (Euler) discretisation of the probability-flow ODE; on this fixture it
    # under-disperses by about 12% at 50 steps (and 6% at 100), so variance is checked to 20%.
    _assert_class_moments(
        lambda x_T, y: ddim_sample(GM.model, x_T, DDIM50, y=y, clip_denoised=False), n=4096, var_rtol=0.2
    )


def test_ddpm_sampling_matches_class_moments_closed_form() -> None:
    # Ancestral sampling with the small posterior variance under-disperses when respaced (about
    # 16% at 100 steps on this fixture, matching improved DDPM's remark on beta~ with few steps).
    schedule = respace(BASE, "ddim100")
    _assert_class_moments(
        lambda x_T, y: ddpm_sample(
            GM.model, x_T, schedule, y=y, noise=_BatchedNoise(1), clip_denoised=False
        ),
        n=2048,
        var_rtol=0.25,
    )


def test_ddim_invert_then_decode_reconstructs_x0_closed_form() -> None:
    x0, y = _data(512)

    def round_trip_error(spacing: str) -> float:
        schedule = respace(BASE, spacing)
        x_T = ddim_invert(GM.model, x0, schedule, y=y)
        x_rec = ddim_sample(GM.model, x_T, schedule, y=y, clip_denoised=False)
        return ((x_rec - x0).norm() / x0.norm()).item()

    errors = {steps: round_trip_error(f"ddim{steps}") for steps in (25, 50, 100, 500)}
    # Inversion and decoding are both Euler steps of one ODE, so the round trip is first order:
    # doubling the steps about halves the error (measured 0.127, 0.065, 0.033, 0.007).
    assert 1.7 < errors[25] / errors[50] < 2.3 and 1.7 < errors[50] / errors[100] < 2.3
    assert errors[50] < 0.1
    assert errors[500] < 1e-2


def test_ddim_invert_refine_solves_the_exact_inverse_closed_form() -> None:
    x0, y = _data(512)

    def round_trip_error(steps: int, refine: int) -> float:
        schedule = respace(BASE, f"ddim{steps}")
        x_T = ddim_invert(GM.model, x0, schedule, y=y, refine=refine)
        x_rec = ddim_sample(GM.model, x_T, schedule, y=y, clip_denoised=False)
        return ((x_rec - x0).norm() / x0.norm()).item()

    # Each refinement is one fixed-point iteration of the exact inverse of ddim_sample's step, so
    # the error contracts about 10x per iteration at 50 steps (measured 0.068, 6.3e-3, 5.8e-4,
    # 5.5e-5 for refine 0..3; 0.13, 2.4e-2, 4.2e-3, 7.6e-4 at 25 steps).
    errors = {(steps, r): round_trip_error(steps, r) for steps in (25, 50) for r in (0, 1, 2, 3)}
    for steps in (25, 50):
        assert all(errors[steps, r + 1] < 0.3 * errors[steps, r] for r in range(3)), errors
    assert all(errors[50, r] < errors[25, r] for r in range(4)), errors
    assert errors[50, 2] < 1e-2
    # The fixed point decodes exactly: many iterations reach float64 round-off (measured 2.5e-11).
    assert round_trip_error(50, 10) < 1e-9


def test_ddim_invert_refine_costs_one_model_call_per_iteration() -> None:
    x0, y = _data(4)
    calls: list[int] = []

    def counting_model(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        calls.append(int(t[0]))
        return GM.model(x, t, y)

    seen: list[int] = []
    ddim_invert(counting_model, x0, DDIM50, y=y, refine=3, callback=lambda d: seen.append(d["i"]))
    assert len(calls) == 4 * DDIM50.num_timesteps
    assert calls == [int(t) for t in DDIM50.timesteps for _ in range(4)]
    assert seen == list(range(DDIM50.num_timesteps))
    with pytest.raises(ValueError, match="refine"):
        ddim_invert(GM.model, x0, DDIM50, y=y, refine=-1)
    with pytest.raises(ValueError, match="clip_denoised"):
        ddim_invert(GM.model, x0, DDIM50, y=y, refine=1, clip_denoised=True)


def test_ddim_invert_latents_are_standard_normal_closed_form() -> None:
    x0, y = _data(2048)
    x_T = ddim_invert(GM.model, x0, DDIM50, y=y)
    assert abs(x_T.mean().item()) < 0.05 and x_T.std().item() == pytest.approx(1.0, abs=0.05)


def test_classifier_guidance_raises_class_probability_monotonically_closed_form() -> None:
    n = 256
    y = torch.arange(n) % 2
    x_T = _noise(range(n))
    guidance = classifier_guidance(GM.logits)
    p = [
        _p_true_class(
            ddim_sample(GM.mixture_model, x_T, DDIM50, y=y, guidance=guidance, scale=scale, clip_denoised=False),
            y,
        ).mean().item()
        for scale in (0.0, 1.0, 2.0, 4.0)
    ]
    assert p == sorted(p) and p[-1] - p[0] > 0.1, p


@pytest.mark.parametrize("measure", ["entropy", "margin", "least_confidence"])
def test_uncertainty_guidance_raises_entropy_monotonically_closed_form(measure: str) -> None:
    # Stage 2: invert class samples with the conditional model, decode with uncertainty guidance.
    x0, y = _data(256)
    x_T = ddim_invert(GM.model, x0, DDIM50, y=y)
    guidance = uncertainty_guidance(GM.logits, measure)  # type: ignore[arg-type]

    def decode(scale: float) -> Tensor:
        return ddim_sample(GM.model, x_T, DDIM50, y=y, guidance=guidance, scale=scale, clip_denoised=False)

    unguided = ddim_sample(GM.model, x_T, DDIM50, y=y, clip_denoised=False)
    decoded = [decode(scale) for scale in (0.0, 1.0, 2.0, 4.0)]
    assert torch.equal(decoded[0], unguided)
    h = [entropy(GM.clean_logits(x0_hat)).mean().item() for x0_hat in decoded]
    assert h == sorted(h) and h[-1] - h[0] > 0.1, h


def test_uncertainty_measures_closed_form() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    expected_entropy = torch.tensor([-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), math.log(3)])
    torch.testing.assert_close(entropy(logits), expected_entropy)
    torch.testing.assert_close(margin(logits), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(least_confidence(logits), torch.tensor([0.3, 2 / 3]))
    with pytest.raises(ConfigError, match="measure"):
        uncertainty_guidance(GM.logits, "variance")  # type: ignore[arg-type]


class _CountingModel:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        self.batch_sizes.append(x_t.shape[0])
        return GM.model(x_t, t, y)


def test_cfg_endpoints_and_one_batched_forward_per_step() -> None:
    n = 64
    y = torch.arange(n) % 2
    x_T = _noise(range(n))

    def run(model: Callable[[Tensor, Tensor, Tensor | None], Tensor], labels: Tensor | None) -> Tensor:
        return ddim_sample(model, x_T, DDIM50, y=labels, clip_denoised=False)

    conditional, unconditional = run(GM.model, y), run(GM.model, None)
    assert torch.equal(run(cfg_model(GM.model, 0.0, GM.null_class), y), conditional)
    torch.testing.assert_close(run(cfg_model(GM.model, -1.0, GM.null_class), y), unconditional)
    counting = _CountingModel()
    guided = run(cfg_model(counting, 3.0, GM.null_class), y)
    assert counting.batch_sizes == [2 * n] * 50
    # Guidance pushes samples further from the other class than conditional sampling does.
    assert _p_true_class(guided, y).mean() > _p_true_class(conditional, y).mean()


def test_cfg_keeps_conditional_variance_channels() -> None:
    def model(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return torch.cat([GM.model(x_t, t, y), y.to(x_t.dtype).reshape(-1, 1, 1, 1).expand_as(x_t)], dim=1)

    x_t, y, t = _noise(range(4)), torch.tensor([0, 1, 0, 1]), torch.full((4,), 100)
    out = cfg_model(model, 2.0, GM.null_class)(x_t, t, y)
    assert out.shape == (4, 2, 1, 2)
    assert torch.equal(out[:, 1:], y.to(DTYPE).reshape(-1, 1, 1, 1).expand_as(x_t))


def test_ddpm_uses_learned_variance_channels() -> None:
    schedule = respace(BASE, "ddim25")
    x_T, y = _noise(range(8)), torch.arange(8) % 2
    fixed = ddpm_sample(GM.model, x_T, schedule, y=y, noise=PerImageNoise(range(8), "cpu"), clip_denoised=False)
    learned = ddpm_sample(
        _learned_variance_model(0.0), x_T, schedule, y=y, noise=PerImageNoise(range(8), "cpu"), clip_denoised=False
    )
    assert learned.shape == fixed.shape and not torch.equal(learned, fixed)


def test_per_image_noise_is_independent_of_batch_composition() -> None:
    schedule = respace(BASE, "ddim25")

    def generate(seeds: list[int]) -> Tensor:
        y = torch.tensor(seeds) % 2
        return ddpm_sample(
            GM.model, _noise(seeds), schedule, y=y, noise=PerImageNoise(seeds, "cpu"), clip_denoised=False
        )

    alone, batched = generate([7]), generate([3, 7, 11])
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[2])
    assert torch.equal(_noise([7])[0], _noise([1, 7])[1])


def test_stochastic_samplers_require_explicit_noise() -> None:
    with pytest.raises(ValueError, match="PerImageNoise"):
        ddpm_sample(GM.model, _noise(range(2)), DDIM50)
    with pytest.raises(ValueError, match="PerImageNoise"):
        ddim_sample(GM.model, _noise(range(2)), DDIM50, eta=1.0)


def test_ddim_eta_one_matches_class_mean_closed_form() -> None:
    n, schedule = 2048, respace(BASE, "ddim100")
    x0 = ddim_sample(
        GM.model, _noise(range(n)), schedule, y=torch.ones(n, dtype=torch.long), eta=1.0,
        noise=_BatchedNoise(2), clip_denoised=False,
    )
    mean = x0.mean(dim=0).flatten()
    assert torch.all((mean - torch.tensor(GM.means[1], dtype=DTYPE)).abs() < 0.05 * GM.sigma), mean


# DPM-Solver++(2M): fewer model calls for the same distribution ------------------------------------

GM_MIXTURE_VARIANCE = torch.tensor(
    [np.var([m[d] for m in GM.means]) + GM.sigma**2 for d in range(2)], dtype=DTYPE
)  # per-dim variance of the equal-weight mixture: spread of the means plus sigma^2


def _dpmpp(model, x_T: Tensor, spacing: str, **kwargs) -> Tensor:
    """Unthresholded DPM-Solver++(2M): the mixture reaches beyond [-1, 1], so bounding x0_hat would bias it."""
    return dpmpp_2m_sample(model, x_T, respace(BASE, spacing), thresholding="none", **kwargs)


def test_dpmpp_2m_20_steps_matches_class_moments_closed_form() -> None:
    # A second-order solver: at 20 model calls the variance is within 17 % (measured 0.83-0.86
    # sigma^2), where DDIM needs 50 calls for 13 % (test above) and is 30 % under at 20.
    _assert_class_moments(lambda x_T, y: _dpmpp(GM.model, x_T, "20", y=y), n=2048, var_rtol=0.2)


def test_dpmpp_2m_is_closer_to_the_target_than_ddim_at_equal_steps_closed_form() -> None:
    n, y = 1024, torch.ones(1024, dtype=torch.long)
    x_T = _noise(range(n))

    def variance_error(x0: Tensor) -> float:
        return (x0.var(dim=0).flatten() / GM.sigma**2 - 1.0).abs().max().item()

    for steps in (10, 15, 20, 25):
        ddim = ddim_sample(GM.model, x_T, respace(BASE, str(steps)), y=y, clip_denoised=False)
        dpmpp = _dpmpp(GM.model, x_T, str(steps), y=y)
        # Both under-disperse; measured relative variance errors (DPM-Solver++ vs DDIM) at 10, 15,
        # 20, 25 steps: 0.51 vs 0.56, 0.30 vs 0.42, 0.19 vs 0.33, 0.13 vs 0.28. Deterministic seeds.
        assert variance_error(dpmpp) < variance_error(ddim) - 0.03, steps


def test_dpmpp_2m_unconditional_keeps_the_mixture_weights_closed_form() -> None:
    n = 4096
    x0 = _dpmpp(GM.model, _noise(range(n)), "20")  # y None: the mixture's own eps
    share_class1 = (GM.clean_logits(x0).argmax(dim=-1) == 1).double().mean().item()
    # p(y=1) = 1/2; the binomial standard error at 4096 is 0.008, so 0.03 is almost 4 of them.
    assert abs(share_class1 - 0.5) < 0.03, share_class1
    # Measured 0.95 and 0.89 of the mixture variance per dimension.
    torch.testing.assert_close(x0.var(dim=0).flatten(), GM_MIXTURE_VARIANCE, rtol=0.2, atol=0.0)


def test_dpmpp_2m_classifier_guidance_at_scale_one_reaches_the_class_posterior_closed_form() -> None:
    # eps_mix - sqrt(1 - abar) * grad log p(y | x_t) is exactly eps(x_t, y) for the Bayes classifier
    # (Bayes' rule on the scores), so guided unconditional sampling is conditional sampling.
    n = 512
    y, x_T = torch.arange(n) % 2, _noise(range(n))
    guided = _dpmpp(GM.mixture_model, x_T, "20", y=y, guidance=classifier_guidance(GM.logits), scale=1.0)
    torch.testing.assert_close(guided, _dpmpp(GM.model, x_T, "20", y=y), rtol=0.0, atol=1e-10)
    _assert_class_moments(
        lambda x, labels: _dpmpp(GM.mixture_model, x, "20", y=labels, guidance=classifier_guidance(GM.logits),
                                 scale=1.0),
        n=2048, var_rtol=0.2,
    )
    # Scale 0 is the unguided solver exactly, and larger scales make the class more certain.
    unguided = _dpmpp(GM.mixture_model, x_T, "20", y=y)
    assert torch.equal(_dpmpp(GM.mixture_model, x_T, "20", y=y, guidance=classifier_guidance(GM.logits)), unguided)
    p = [_p_true_class(_dpmpp(GM.mixture_model, x_T, "20", y=y, guidance=classifier_guidance(GM.logits),
                              scale=scale), y).mean().item() for scale in (0.0, 1.0, 2.0, 4.0)]
    assert p == sorted(p) and p[-1] - p[0] > 0.1, p


def test_dpmpp_2m_makes_one_model_call_per_step() -> None:
    schedule = respace(BASE, "20")
    x_T, y = _noise(range(4)), torch.tensor([0, 1, 0, 1])
    calls: list[int] = []

    def counting_model(x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        calls.append(int(t[0]))
        return GM.model(x, t, labels)

    dpmpp_2m_sample(counting_model, x_T, schedule, y=y)
    assert calls == [int(t) for t in reversed(schedule.timesteps)]  # 20 calls, t = 999 .. 0
    # Classifier-free guidance: still one (batched) forward per step.
    counting = _CountingModel()
    dpmpp_2m_sample(cfg_model(counting, 2.0, GM.null_class), x_T, schedule, y=y)
    assert counting.batch_sizes == [2 * len(y)] * 20
    # Learned-variance models: the eps channels drive the solver, the variance channels are ignored.
    torch.testing.assert_close(
        dpmpp_2m_sample(_learned_variance_model(0.0), x_T, schedule, y=y), dpmpp_2m_sample(GM.model, x_T, schedule, y=y)
    )


def test_dpmpp_2m_steps_follow_the_paper_closed_form() -> None:
    # Lu et al. 2022 alg. 2 by hand on 4 positions: first step DPM-Solver++ 1 (= DDIM), then the
    # multistep update, then first order into position 0, then x_0 = x0_hat at position 0.
    schedule = respace(BASE, "4")
    x_T, y = _noise(range(8)), torch.arange(8) % 2
    seen: list[Tensor] = []
    out = _dpmpp(GM.model, x_T, "4", y=y, callback=lambda info: seen.append(info["x"]))
    abar = [float(a) for a in schedule.alphas_cumprod]
    lam = [0.5 * math.log(a / (1 - a)) for a in abar]

    def x0_hat(x: Tensor, i: int) -> Tensor:
        t = torch.full((len(x),), int(schedule.timesteps[i]))
        return (x - math.sqrt(1 - abar[i]) * GM.model(x, t, y)) / math.sqrt(abar[i])

    def step(x: Tensor, i: int, d: Tensor) -> Tensor:  # x_{i-1} = sigma_{i-1}/sigma_i x_i + alpha_{i-1} (1 - e^-h) D
        h = lam[i - 1] - lam[i]
        return math.sqrt((1 - abar[i - 1]) / (1 - abar[i])) * x + math.sqrt(abar[i - 1]) * (1 - math.exp(-h)) * d

    x2 = step(x_T, 3, x0_hat(x_T, 3))
    ddim_first: list[Tensor] = []
    ddim_sample(GM.model, x_T, schedule, y=y, clip_denoised=False, callback=lambda info: ddim_first.append(info["x"]))
    torch.testing.assert_close(x2, ddim_first[1])
    r = (lam[2] - lam[3]) / (lam[1] - lam[2])
    x1 = step(x2, 2, (1 + 1 / (2 * r)) * x0_hat(x2, 2) - 1 / (2 * r) * x0_hat(x_T, 3))
    x0 = step(x1, 1, x0_hat(x1, 1))
    for got, expected in zip(seen, (x_T, x2, x1, x0)):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(out, x0_hat(x0, 0))


def test_dynamic_threshold_rescales_only_images_beyond_the_range_closed_form() -> None:
    inside = torch.linspace(-0.9, 0.9, 200, dtype=DTYPE).reshape(1, 1, 10, 20)
    outside = 3.0 * inside  # |x| up to 2.7: s = the 0.995 quantile of |x|, then clamp to [-s, s] and / s
    s = torch.quantile(outside.abs().flatten(), 0.995)
    out = dynamic_threshold(torch.cat([inside, outside]), 0.995)
    assert torch.equal(out[0], inside[0])  # s = max(1, quantile) = 1: nothing to do
    torch.testing.assert_close(out[1], outside[0].clamp(-s, s) / s)
    assert out.abs().max() <= 1.0 and s > 2.0


@pytest.mark.parametrize("thresholding", ["dynamic", "static"])
def test_dpmpp_2m_thresholds_the_guided_prediction_closed_form(thresholding: str) -> None:
    # A strong constant guidance pushes x0_hat far beyond [-1, 1]; the solver bounds the guided
    # data prediction (Lu et al. sec. 4), so its output, x0_hat at position 0, stays in range.
    x_T, y = _noise(range(4)), torch.arange(4) % 2
    out = dpmpp_2m_sample(GM.model, x_T, respace(BASE, "10"), y=y, guidance=_constant_guidance(5.0), scale=4.0,
                          thresholding=thresholding)  # type: ignore[arg-type]
    unbounded = _dpmpp(GM.model, x_T, "10", y=y, guidance=_constant_guidance(5.0), scale=4.0)
    assert out.abs().max() <= 1.0 < unbounded.abs().max()
    with pytest.raises(ValueError, match="thresholding"):
        dpmpp_2m_sample(GM.model, x_T, DDIM50, thresholding="soft")  # type: ignore[arg-type]


# Order of clipping and guidance (the original release's p_mean_variance + condition_score/mean) --


def _constant_model(eps_value: float) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    return lambda x_t, t, y: torch.full_like(x_t, eps_value)


def _constant_guidance(value: float):
    return lambda x_t, t, y: torch.full_like(x_t, value)


def test_ddim_guidance_corrects_the_clipped_prediction_and_is_not_clipped_again_closed_form() -> None:
    schedule = respace(BASE, "2")
    x, eps, g, scale = torch.full((1, 1, 1, 2), 3.0, dtype=DTYPE), -0.5, 0.7, 4.0
    seen: list[Tensor] = []
    out = ddim_sample(_constant_model(eps), x, schedule, guidance=_constant_guidance(g), scale=scale,
                      clip_denoised=True, callback=lambda info: seen.append(info["x"]))
    expected = x
    for i in (1, 0):
        abar, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
        x0 = ((expected - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)  # clip first
        e = (expected - math.sqrt(abar) * x0) / math.sqrt(1 - abar)  # eps from the clipped x0
        e = e - math.sqrt(1 - abar) * scale * g  # then guidance
        x0 = (expected - math.sqrt(1 - abar) * e) / math.sqrt(abar)  # never clipped again
        expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * e
        if i == 1:
            torch.testing.assert_close(seen[1], expected)
    torch.testing.assert_close(out, expected)
    assert out.max() > 1.0  # guidance beyond the clip range survives


def test_ddpm_guidance_shifts_the_clipped_posterior_mean_by_the_variance_closed_form() -> None:
    schedule = respace(BASE, "2")
    x, eps, g, scale = torch.full((1, 1, 1, 2), 3.0, dtype=DTYPE), -0.5, 0.7, 4.0
    seen: list[Tensor] = []
    zero_noise = lambda like, i: torch.zeros_like(like)  # noqa: E731
    ddpm_sample(_constant_model(eps), x, schedule, guidance=_constant_guidance(g), scale=scale,
                noise=zero_noise, clip_denoised=True, callback=lambda info: seen.append(info["x"]))
    abar = schedule.alphas_cumprod[1]
    x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
    mean = schedule.posterior_mean_coef1[1] * x0 + schedule.posterior_mean_coef2[1] * x
    expected = mean + math.exp(schedule.posterior_log_variance_clipped[1]) * scale * g
    torch.testing.assert_close(seen[1], expected)


# Loss weighting and float32 variance under bf16 autocast ----------------------------------------


def test_mse_weightings_closed_form() -> None:
    t = torch.tensor([0, 10, 500, 999])
    like = torch.zeros(4, 1, 1, 2, dtype=DTYPE)
    abar = torch.tensor(BASE.alphas_cumprod[t.numpy()], dtype=DTYPE).reshape(-1, 1, 1, 1)
    snr = abar / (1 - abar)
    torch.testing.assert_close(mse_weight(BASE, t, "sqrt_one_minus_alpha_bar", like), 1 / torch.sqrt(1 + snr))
    torch.testing.assert_close(mse_weight(BASE, t, "min_snr", like), torch.clamp(snr, max=5.0) / snr)
    assert mse_weight(BASE, t, "uniform", like) == 1.0


def test_weighted_mse_scales_each_sample_by_its_weight() -> None:
    x0, y = _data(4)
    t, noise = torch.tensor([3, 40, 400, 900]), _noise(range(4))
    model = _learned_variance_model(0.3)
    _, uniform = hybrid_loss(model, BASE, x0, t, y, noise, weighting="uniform")
    _, weighted = hybrid_loss(model, BASE, x0, t, y, noise, weighting="sqrt_one_minus_alpha_bar")
    w = torch.tensor(np.sqrt(1 - BASE.alphas_cumprod[t.numpy()]), dtype=DTYPE)
    torch.testing.assert_close(weighted["mse"], uniform["mse"] * w)
    torch.testing.assert_close(weighted["vb"], uniform["vb"])  # the VLB term is not weighted


def test_learned_variance_is_interpolated_in_float32_from_bf16_channels() -> None:
    t = torch.tensor([100, 300, 600])
    v = torch.tensor([-0.5, 0.25, 0.9]).reshape(-1, 1, 1, 1).bfloat16()
    log_var = learned_log_variance(BASE, v, t)
    assert log_var.dtype == torch.float32
    # Same as the float32 interpolation of the same (bf16-rounded) values: log beta and log beta~
    # differ by less than bf16's spacing here, so a bf16 interpolation would return one of them.
    torch.testing.assert_close(log_var, learned_log_variance(BASE, v.float(), t), rtol=0, atol=0)
    lo = torch.tensor(BASE.posterior_log_variance_clipped[t.numpy()], dtype=torch.float32).reshape(-1, 1, 1, 1)
    hi = torch.tensor(np.log(BASE.betas[t.numpy()]), dtype=torch.float32).reshape(-1, 1, 1, 1)
    assert torch.all(log_var > lo) and torch.all(log_var < hi)


def _tiny_unet(seed: int = 0):
    from mgdm_core.networks.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    config = UNetConfig(image_size=8, in_channels=1, num_classes=2, width=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), num_heads=2, num_head_channels=-1, dropout=0.0,
                        scale_shift_norm=True, resblock_updown=True, learn_sigma=True)
    model = UNet(config).eval()
    # Non-zero output conv, so eps and the variance channels are not trivially zero.
    for parameter in model.parameters():
        if parameter.abs().sum() == 0:
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_hybrid_loss_under_cpu_bf16_autocast_matches_float32() -> None:
    """The dtype path of a CUDA bf16 run, on the CPU: the loss stays within 2 % of float32."""
    model, schedule = _tiny_unet(), make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (16,), generator=gen)
    noise, y = torch.randn(x0.shape, generator=gen), torch.arange(16) % 2
    with torch.no_grad():
        fp32, parts32 = hybrid_loss(model, schedule, x0, t, y, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, parts16 = hybrid_loss(model, schedule, x0, t, y, noise)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.mean(), fp32.mean(), rtol=0.02, atol=0.0)
    torch.testing.assert_close(parts16["vb"].mean(), parts32["vb"].mean(), rtol=0.05, atol=0.0)


def test_learned_variance_ddpm_under_cpu_bf16_autocast_matches_float32() -> None:
    model, schedule = _tiny_unet(), respace(make_schedule("linear", 1000), "20")
    seeds = list(range(8))
    x_T, y = initial_noise(seeds, (1, 8, 8), "cpu", torch.float32), torch.arange(8) % 2
    fp32 = ddpm_sample(model, x_T, schedule, y=y, noise=PerImageNoise(seeds, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ddpm_sample(model, x_T, schedule, y=y, noise=PerImageNoise(seeds, "cpu"))
    assert torch.isfinite(bf16).all()
    # bf16 has 8 significant bits: per-pixel drift over 20 steps stays small against the [-1, 1] range.
    assert (bf16.float() - fp32).abs().mean() < 0.03
