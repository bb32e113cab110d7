"""Paired comparisons of a condition against the baseline, with 95% intervals.

Two intervals, chosen by `difference_to_baseline`:

* `t_over_seeds` (>= `MIN_SEEDS_FOR_T` paired seeds): a t-interval on the per-seed differences
  (same seed = same initialisation and batch order), capturing training-seed variance on this
  test set;
* `bootstrap_test_images` (fewer seeds): a paired, class-stratified bootstrap over test images:
  each replicate resamples the test indices once, scores every run of both conditions on them and
  takes the difference of the seed-averaged metric. It captures test-sample variance (the larger
  one on small test sets such as BreastMNIST's 156 images) and works with a single seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import ttest_rel

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import check_inputs, metric_batch

MIN_SEEDS_FOR_T = 5
CONFIDENCE = 0.95
_CHUNK = 250  # bootstrap replicates scored at once: bounds memory at [250, N, K] probabilities


def summarise(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean, sample std (ddof=1; None when n < 2, since it is undefined) and n."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise DataError("stats: cannot summarise an empty list of values")
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def paired_difference(
    cond_values_by_seed: Mapping[int, float],
    baseline_values_by_seed: Mapping[int, float],
    confidence: float = CONFIDENCE,
) -> dict[str, float | int | str]:
    """Mean of (condition - baseline) over the seeds both hold, with a t-interval (n - 1 dof)."""
    seeds = sorted(set(cond_values_by_seed) & set(baseline_values_by_seed))
    if len(seeds) < 2:
        raise DataError(f"stats: a t-interval needs at least 2 paired seeds, got {len(seeds)}")
    cond = np.array([cond_values_by_seed[s] for s in seeds], dtype=float)
    base = np.array([baseline_values_by_seed[s] for s in seeds], dtype=float)
    ci = ttest_rel(cond, base).confidence_interval(confidence)
    return {
        "delta": float((cond - base).mean()),
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "n": len(seeds),
        "method": "t_over_seeds",
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
    a paired bootstrap over test images (stratified by class so every class, hence AUC, exists).

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
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.concatenate(deltas), [tail, 100 - tail])
    return {
        "delta": float(delta[0]),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": len(y_true),
        "method": "bootstrap_test_images",
    }


def difference_to_baseline(
    y_true: np.ndarray,
    cond_probs_by_seed: Mapping[int, np.ndarray],
    base_probs_by_seed: Mapping[int, np.ndarray],
    metric: str,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """The t-interval over seeds when >= MIN_SEEDS_FOR_T seeds pair up, else the test-image
    bootstrap over all runs; `n` counts paired seeds or test images, `method` says which."""
    paired = sorted(set(cond_probs_by_seed) & set(base_probs_by_seed))
    if len(paired) >= MIN_SEEDS_FOR_T:
        probs = {s: np.stack([cond_probs_by_seed[s], base_probs_by_seed[s]]) for s in paired}
        values = {s: metric_batch(metric, y_true, p) for s, p in probs.items()}
        return paired_difference({s: v[0] for s, v in values.items()}, {s: v[1] for s, v in values.items()})
    return bootstrap_difference(
        y_true, list(cond_probs_by_seed.values()), list(base_probs_by_seed.values()), metric, n_boot, seed
    )
