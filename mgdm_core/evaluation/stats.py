"""Paired comparisons of a condition against the baseline, with 95% intervals.

Two intervals, chosen by `difference_to_baseline`:

* `t_over_seeds` (>= `MIN_SEEDS_FOR_T` paired seeds): a t-interval on the per-seed differences
  (same seed = same initialisation and batch order), capturing training-seed variance on this
  test set;
* `bootstrap_test_images` (fewer seeds): a paired, class-stratified bootstrap over test images:
  each replicate resamples the test indices once, scores every run of both conditions on them and
  takes the difference of the seed-averaged metric. It captures test-sample variance (the larger
  one on small test sets such as BreastMNIST's 156 images) and works with a single seed.

Both give a two-sided p-value for "no difference", which `holm` adjusts across the conditions
compared with one baseline, and a minimum detectable effect (`minimum_detectable_effect`): the
difference the comparison would find with 80% power, what a null result rules out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import norm, ttest_rel
from scipy.stats import t as t_dist

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import check_inputs, metric_batch

MIN_SEEDS_FOR_T = 5
CONFIDENCE = 0.95
POWER = 0.8
_CHUNK = 250  # bootstrap replicates scored at once: bounds memory at [250, N, K] probabilities


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample std (ddof=1; None when n < 2, since it is undefined) and n."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise DataError("stats: cannot summarise an empty list of values")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def minimum_detectable_effect(
    se: float, alpha: float = 1 - CONFIDENCE, power: float = POWER, dof: int | None = None
) -> float:
    """Smallest true difference a two-sided test at level `alpha` detects with probability
    `power`: (q(1 - alpha/2) + q(power)) * se, q the quantile of Student's t with `dof` degrees
    of freedom (the usual approximation to the noncentral t), or of the normal when dof is None.

    For n paired seeds whose differences have sample std s: se = s / sqrt(n), dof = n - 1
    (n = 5, alpha 0.05, power 0.8: (2.776 + 0.941) s / sqrt(5) = 1.66 s).
    """
    if se < 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ConfigError(f"stats: need se >= 0, 0 < alpha < 1, 0 < power < 1; got {se}, {alpha}, {power}")
    q = norm.ppf if dof is None else (lambda p: t_dist.ppf(p, dof))
    return float((q(1 - alpha / 2) + q(power)) * se)


def holm(p_values: Sequence[float], alpha: float = 1 - CONFIDENCE) -> dict[str, list]:
    """Holm's step-down adjustment (Holm 1979) of m two-sided tests at family-wise level `alpha`.

    Sorted ascending, the i-th smallest p (i = 1..m) is compared with alpha / (m - i + 1), stopping
    at the first that fails. Returns, in input order, `p_adjusted` (max over j <= i of
    (m - j + 1) p_(j), capped at 1), `reject` (p_adjusted <= alpha) and `alpha_level`: the level
    of each comparison's interval, alpha / (m - i + 1) for a rejected one and alpha / (m - r)
    (r rejections) for the others, so an interval excludes 0 exactly when Holm rejects.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or not 0 < alpha < 1:
        raise ConfigError(f"stats: Holm needs p-values in [0, 1] and 0 < alpha < 1, got {p_values}, {alpha}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    reject = adjusted <= alpha
    r = int(reject.sum())
    levels = np.empty(m)
    levels[order] = alpha / (m - np.arange(m))
    if r < m:
        levels[~reject] = alpha / (m - r)
    return {"p_adjusted": adjusted.tolist(), "reject": reject.tolist(), "alpha_level": levels.tolist()}


def paired_difference(
    cond_values_by_seed: Mapping[int, float],
    baseline_values_by_seed: Mapping[int, float],
    confidence: float = CONFIDENCE,
) -> dict[str, float | int | str]:
    """Mean of (condition - baseline) over the seeds both hold, with a t-interval (n - 1 dof), the
    paired t-test's two-sided p-value and the minimum detectable effect at 80% power."""
    seeds = sorted(set(cond_values_by_seed) & set(baseline_values_by_seed))
    if len(seeds) < 2:
        raise DataError(f"stats: a t-interval needs at least 2 paired seeds, got {len(seeds)}")
    cond = np.array([cond_values_by_seed[s] for s in seeds], dtype=float)
    base = np.array([baseline_values_by_seed[s] for s in seeds], dtype=float)
    diff = cond - base
    se = float(diff.std(ddof=1) / np.sqrt(len(seeds)))
    if se == 0:  # every seed moved by the same amount: the t statistic is 0/0 or infinite
        p_value, low, high = (1.0 if diff[0] == 0 else 0.0), float(diff[0]), float(diff[0])
    else:
        test = ttest_rel(cond, base)
        ci = test.confidence_interval(confidence)
        p_value, low, high = float(test.pvalue), float(ci.low), float(ci.high)
    return {
        "delta": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "n": len(seeds),
        "method": "t_over_seeds",
        "confidence": confidence,
        "p_value": p_value,
        "mde": minimum_detectable_effect(se, 1 - confidence, dof=len(seeds) - 1),
    }


def _seed_mean(metric: str, y_true: np.ndarray, probs_list: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """Seed-averaged metric on each row of resampled test indices idx [B, N] -> [B]."""
    return np.mean([metric_batch(metric, y_true, probs[idx]) for probs in probs_list], axis=0)


def bootstrap_difference(
    y_true: np.ndarray,
    probs_cond_list: Sequence[np.ndarray],
    probs_base_list: Sequence[np.ndarray],
    metric: str,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, float | int | str]:
    """Seed-averaged `metric` of the condition minus the baseline, with a percentile interval from
    a paired bootstrap over test images (stratified by class so every class, hence AUC, exists),
    the percentile bootstrap's two-sided p-value (twice the share of replicates on the far side
    of 0) and the minimum detectable effect from the replicates' std (normal quantiles).

    y_true: int [N]; each probs: [N, K] on the same test images in the same order.
    """
    if not probs_cond_list or not probs_base_list:
        raise DataError("stats: bootstrap needs at least one run of each condition")
    if n_boot < 1:
        raise ConfigError(f"stats: n_boot must be >= 1, got {n_boot}")
    for probs in (*probs_cond_list, *probs_base_list):
        check_inputs(y_true, probs)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    y_strat = y_true[np.concatenate(groups)]  # labels of the resampled columns, fixed by stratification
    everything = np.arange(len(y_true))[None, :]
    delta = _seed_mean(metric, y_true, probs_cond_list, everything) - _seed_mean(
        metric, y_true, probs_base_list, everything
    )
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        idx = np.concatenate([rng.choice(g, size=(b, len(g))) for g in groups], axis=1)
        deltas.append(
            _seed_mean(metric, y_strat, probs_cond_list, idx) - _seed_mean(metric, y_strat, probs_base_list, idx)
        )
    deltas = np.concatenate(deltas)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return {
        "delta": float(delta[0]),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": len(y_true),
        "method": "bootstrap_test_images",
        "confidence": confidence,
        "p_value": float(min(1.0, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0)))),
        "mde": minimum_detectable_effect(float(deltas.std(ddof=1)) if n_boot > 1 else 0.0, 1 - confidence),
    }


def difference_to_baseline(
    y_true: np.ndarray,
    cond_probs_by_seed: Mapping[int, np.ndarray],
    base_probs_by_seed: Mapping[int, np.ndarray],
    metric: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, float | int | str]:
    """The t-interval over seeds when >= MIN_SEEDS_FOR_T seeds pair up, else the test-image
    bootstrap over all runs; `n` counts paired seeds or test images, `method` says which."""
    paired = sorted(set(cond_probs_by_seed) & set(base_probs_by_seed))
    if len(paired) >= MIN_SEEDS_FOR_T:
        probs = {s: np.stack([cond_probs_by_seed[s], base_probs_by_seed[s]]) for s in paired}
        values = {s: metric_batch(metric, y_true, p) for s, p in probs.items()}
        return paired_difference(
            {s: v[0] for s, v in values.items()}, {s: v[1] for s, v in values.items()}, confidence
        )
    return bootstrap_difference(
        y_true, list(cond_probs_by_seed.values()), list(base_probs_by_seed.values()), metric, n_boot, seed, confidence
    )
