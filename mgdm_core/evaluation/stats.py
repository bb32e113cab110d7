"""Paired comparisons of a condition against the baseline: simultaneous intervals, Holm decisions
and the smallest difference a comparison could have detected.

Two estimates of the difference, chosen by `difference_to_baseline`:

* `t_over_seeds` (>= `MIN_SEEDS_FOR_T` paired seeds): a t-interval on the per-seed differences.
  A seed pairs the two runs by their initialisation (the same `seed` gives the same initial
  weights); the batch order and the synthetic subset differ whenever the training sets differ,
  so the pairing removes the initialisation's share of the seed variance, not all of it. It
  captures training-seed variance on this one test set (the test set's own sampling variance is
  left out);
* `bootstrap_test_images` (fewer seeds): a paired, class-stratified bootstrap over test images:
  each replicate resamples the test indices once, scores every run of both conditions on them and
  takes the difference of the seed-averaged metric. It captures test-sample variance (the larger
  one on small test sets such as BreastMNIST's 156 images) and works with a single seed, but
  leaves the seeds' variance out: the runs are held fixed.

A family is the m conditions compared with one baseline (per network and metric). Its
**decisions** are Holm's step-down test (`holm`), family-wise error <= 1 - CONFIDENCE. Its
**intervals** are Bonferroni's: each at 1 - alpha/m (`bonferroni_confidence`), so that all m
cover their true differences together with probability >= 1 - alpha. (Intervals at Holm's step
levels alpha/(m-i+1) do not: by simulation 92.6% joint coverage for m = 2, 83.8% for m = 6.)
Holm is the more powerful test, so it can reject where the Bonferroni interval still touches 0;
the report marks such rows rather than letting the interval and the verdict disagree silently.

The smallest detectable difference (`detectable_difference`) is the true difference the family's
test (two-sided, level alpha/m) finds with probability POWER, from the noncentral t (the normal
for the bootstrap). It says what the design could see; what a null result rules out is the
interval's bound, not this number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.stats import nct, norm
from scipy.stats import t as t_dist

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import check_inputs, metric_batch

MIN_SEEDS_FOR_T = 5
CONFIDENCE = 0.95  # family-wise: of Holm's decisions and of the Bonferroni intervals together
POWER = 0.8
_CHUNK = 250  # bootstrap replicates scored at once: bounds memory at [250, N, K] probabilities
VARIANCE_COVERED = {
    "t_over_seeds": "classifier seeds on this test set (the test set's sampling variance is left out)",
    "bootstrap_test_images": "test images only: a bootstrap over test images leaves the seeds' variance out",
}


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample std (ddof=1; None when n < 2, since it is undefined) and n."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise DataError("stats: cannot summarise an empty list of values")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def bonferroni_confidence(comparisons: int, confidence: float = CONFIDENCE) -> float:
    """Each interval's level so that `comparisons` intervals hold together at `confidence`:
    1 - (1 - confidence) / m (Bonferroni's inequality; conservative when they are dependent)."""
    if comparisons < 1 or not 0 < confidence < 1:
        raise ConfigError(f"stats: need >= 1 comparison and 0 < confidence < 1, got {comparisons}, {confidence}")
    return 1 - (1 - confidence) / comparisons


def _critical_value(alpha: float, dof: float | None) -> float:
    """q(1 - alpha/2) of Student's t with `dof` degrees of freedom (the normal when None)."""
    return float(norm.ppf(1 - alpha / 2) if dof is None else t_dist.ppf(1 - alpha / 2, dof))


def _two_sided_power(noncentrality: float, crit: float, dof: float | None) -> float:
    """P(|T| > crit) for T ~ noncentral t(dof, noncentrality) (normal when dof is None)."""
    if dof is None:
        return float(norm.sf(crit - noncentrality) + norm.cdf(-crit - noncentrality))
    # The lower tail by symmetry, P(T < -c; nc) = P(T > c; -nc): scipy's nct.cdf far in the
    # tail returns NaN (df 4, nc 8); the tail is then negligible.
    lower = np.nan_to_num(nct.sf(crit, dof, -noncentrality))
    return float(nct.sf(crit, dof, noncentrality) + lower)


@lru_cache(maxsize=4096)
def detectable_noncentrality(alpha: float, power: float, dof: float | None) -> float:
    """The noncentrality delta / se at which the two-sided test at level `alpha` rejects with
    probability `power` (root of `_two_sided_power`; it rises monotonically from alpha at 0)."""
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise ConfigError(f"stats: need 0 < alpha < power < 1, got alpha {alpha}, power {power}")
    if dof is not None and not dof >= 1:
        raise ConfigError(f"stats: the t-test needs >= 1 degree of freedom, got {dof}")
    crit = _critical_value(alpha, dof)
    # The textbook sum q(1 - alpha/2) + q(power) falls a little short: it brackets the root from below.
    low = crit + (norm.ppf(power) if dof is None else t_dist.ppf(power, dof))
    low = min(low, crit) if _two_sided_power(low, crit, dof) > power else low
    high = 2 * low + 1
    while _two_sided_power(high, crit, dof) < power:
        high *= 2
    return float(brentq(lambda nc: _two_sided_power(nc, crit, dof) - power, low, high, xtol=1e-9))


def detectable_difference(
    se: float, alpha: float = 1 - CONFIDENCE, power: float = POWER, dof: int | None = None
) -> float:
    """Smallest true difference that a two-sided test at level `alpha` on an estimate with
    standard error `se` detects with probability `power`: the delta with
    P(|T| > t(1 - alpha/2, dof)) = power, T ~ noncentral t(dof, delta / se) (scipy.stats.nct);
    with dof None the normal replaces the t (the bootstrap).

    For n paired seeds whose differences have sample std s: se = s / sqrt(n), dof = n - 1
    (n = 5, alpha 0.05, power 0.8: 3.76 se = 1.68 s; the textbook (t(0.975) + t(0.8)) se = 3.72 se
    = 1.66 s has only about 79% power, and less at the smaller alpha of a family). Pass the level the family's test uses (alpha / m), not the nominal 0.05.
    """
    if not se >= 0:
        raise ConfigError(f"stats: the standard error must be >= 0, got {se}")
    return float(detectable_noncentrality(float(alpha), float(power), dof) * se)


def minimum_detectable_effect(
    se: float, alpha: float = 1 - CONFIDENCE, power: float = POWER, dof: int | None = None
) -> float:
    """Former name of `detectable_difference` (now solved from the noncentral t)."""
    return detectable_difference(se, alpha, power, dof)


def holm(p_values: Sequence[float], alpha: float = 1 - CONFIDENCE) -> dict[str, list]:
    """Holm's step-down test (Holm 1979) of m two-sided tests at family-wise level `alpha`: the
    decisions a report states.

    Sorted ascending, the i-th smallest p (i = 1..m) is compared with alpha / (m - i + 1), stopping
    at the first that fails. Returns, in input order, `p_adjusted` (max over j <= i of
    (m - j + 1) p_(j), capped at 1) and `reject` (p_adjusted <= alpha). Only these decisions are
    family-wise controlled: intervals at the step levels are not simultaneous (see the module
    docstring), so intervals come from `bonferroni_confidence`. Since p_adjusted <= m p, every
    comparison whose Bonferroni interval excludes 0 is also rejected by Holm.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or not 0 < alpha < 1:
        raise ConfigError(f"stats: Holm needs p-values in [0, 1] and 0 < alpha < 1, got {p_values}, {alpha}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return {"p_adjusted": adjusted.tolist(), "reject": (adjusted <= alpha).tolist()}


def paired_difference(
    cond_values_by_seed: Mapping[int, float],
    baseline_values_by_seed: Mapping[int, float],
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> dict[str, float | int | str]:
    """Mean of (condition - baseline) over the seeds both hold, with a t-interval at `confidence`
    (n - 1 dof), the paired t-test's two-sided p-value and the difference a test at level
    1 - confidence detects with probability `power` (`mde`, with `mde_power` and `mde_alpha`)."""
    seeds = sorted(set(cond_values_by_seed) & set(baseline_values_by_seed))
    if len(seeds) < 2:
        raise DataError(f"stats: a t-interval needs at least 2 paired seeds, got {len(seeds)}")
    diff = np.array([cond_values_by_seed[s] - baseline_values_by_seed[s] for s in seeds], dtype=float)
    n, mean = len(seeds), float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(n))
    if se == 0:  # every seed moved by the same amount: the t statistic is 0/0 or infinite
        p_value, half = (1.0 if mean == 0 else 0.0), 0.0
    else:
        p_value = float(2 * t_dist.sf(abs(mean) / se, n - 1))
        half = float(t_dist.ppf(1 - (1 - confidence) / 2, n - 1) * se)
    return {
        "delta": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "n": n,
        "method": "t_over_seeds",
        "confidence": confidence,
        "p_value": p_value,
        "mde": detectable_difference(se, 1 - confidence, power, dof=n - 1),
        "mde_power": power,
        "mde_alpha": 1 - confidence,
        "variance_covered": VARIANCE_COVERED["t_over_seeds"],
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
    power: float = POWER,
) -> dict[str, float | int | str]:
    """Seed-averaged `metric` of the condition minus the baseline, with a percentile interval from
    a paired bootstrap over test images (stratified by class so every class, hence AUC, exists),
    the percentile bootstrap's two-sided p-value (twice the share of replicates on the far side
    of 0) and the detectable difference from the replicates' std (normal quantiles). The runs are
    held fixed: the seeds' variance is not in the interval (`variance_covered` says so).

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
        "mde": detectable_difference(float(deltas.std(ddof=1)) if n_boot > 1 else 0.0, 1 - confidence, power),
        "mde_power": power,
        "mde_alpha": 1 - confidence,
        "variance_covered": VARIANCE_COVERED["bootstrap_test_images"],
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
    power: float = POWER,
) -> dict[str, float | int | str]:
    """The t-interval over seeds when >= MIN_SEEDS_FOR_T seeds pair up, else the test-image
    bootstrap over all runs; `n` counts paired seeds or test images, `method` says which."""
    paired = sorted(set(cond_probs_by_seed) & set(base_probs_by_seed))
    if len(paired) >= MIN_SEEDS_FOR_T:
        probs = {s: np.stack([cond_probs_by_seed[s], base_probs_by_seed[s]]) for s in paired}
        values = {s: metric_batch(metric, y_true, p) for s, p in probs.items()}
        return paired_difference(
            {s: v[0] for s, v in values.items()}, {s: v[1] for s, v in values.items()}, confidence, power
        )
    return bootstrap_difference(
        y_true, list(cond_probs_by_seed.values()), list(base_probs_by_seed.values()), metric, n_boot, seed,
        confidence, power,
    )
