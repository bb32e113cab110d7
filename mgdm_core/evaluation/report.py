"""Summaries of the evaluation units: the `metrics/evaluate.json` structure, a markdown table,
a bar plot and flat rows for `dvc plots`.

A unit record is a mapping with `network`, `condition`, `seed`, `metrics` (from
`classification_metrics`), `test_probs` [N, K] and `test_labels` [N]; every record must score
the same test images in the same order, which the paired comparisons rely on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS
from mgdm_core.evaluation.stats import difference_to_baseline, summarise

_METHOD_ABBREV = {"t_over_seeds": "t", "bootstrap_test_images": "boot"}


def _group(unit_results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[int, Mapping[str, Any]]]]:
    """network -> condition -> seed -> record, in first-appearance order; rejects duplicates."""
    grouped: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in unit_results:
        seeds = grouped.setdefault(r["network"], {}).setdefault(r["condition"], {})
        if r["seed"] in seeds:
            raise DataError(f"evaluate: duplicate unit ({r['network']}, {r['condition']}, seed {r['seed']})")
        seeds[r["seed"]] = r
    return grouped


def _common_test_labels(unit_results: Sequence[Mapping[str, Any]]) -> np.ndarray:
    labels = np.asarray(unit_results[0]["test_labels"])
    for r in unit_results[1:]:
        if not np.array_equal(labels, r["test_labels"]):
            raise DataError("evaluate: units were tested on different test sets; paired comparison impossible")
    return labels


def _condition_summary(
    runs: dict[int, Mapping[str, Any]],
    base_runs: dict[int, Mapping[str, Any]] | None,
    y_true: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Each scalar metric's mean/std/n, and (unless this is the baseline) the paired differences."""
    first = next(iter(runs.values()))["metrics"]
    scalar = [k for k, v in first.items() if isinstance(v, (int, float))]
    summary: dict[str, Any] = {
        "seeds": sorted(runs),
        "metrics": {k: summarise([r["metrics"][k] for r in runs.values()]) for k in scalar},
        "vs_baseline": None,
    }
    if base_runs is not None:
        cond_probs = {s: np.asarray(r["test_probs"]) for s, r in runs.items()}
        base_probs = {s: np.asarray(r["test_probs"]) for s, r in base_runs.items()}
        summary["vs_baseline"] = {
            m: difference_to_baseline(y_true, cond_probs, base_probs, m, n_boot=n_boot, seed=seed)
            for m in COMPARED_METRICS
        }
    return summary


def build_summary(
    unit_results: Sequence[Mapping[str, Any]],
    baseline: str = "real",
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """{baseline, n_test, test_class_counts, minority_class, networks: {network: {condition:
    {seeds, metrics: {metric: {mean, std, n}}, vs_baseline: {metric: {delta, ci_low, ci_high, n,
    method}} or None for the baseline}}}}; the baseline condition is listed first."""
    if not unit_results:
        raise DataError("evaluate: no unit results to summarise")
    y_true = _common_test_labels(unit_results)
    counts = np.bincount(y_true)
    networks: dict[str, Any] = {}
    for network, conditions in _group(unit_results).items():
        if baseline not in conditions:
            raise ConfigError(f"evaluate: baseline condition '{baseline}' has no results for {network}")
        order = [baseline, *(c for c in conditions if c != baseline)]
        networks[network] = {
            c: _condition_summary(
                conditions[c], None if c == baseline else conditions[baseline], y_true, n_boot, seed
            )
            for c in order
        }
    return {
        "baseline": baseline,
        "n_test": int(len(y_true)),
        "test_class_counts": counts.tolist(),
        "minority_class": int(counts.argmin()),
        "networks": networks,
    }


def _mean_std(stats: Mapping[str, Any]) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _delta(diff: Mapping[str, Any] | None) -> str:
    """'+0.012 [-0.004, +0.028] boot', starred when the interval excludes 0."""
    if diff is None:
        return "—"
    star = "*" if diff["ci_low"] > 0 or diff["ci_high"] < 0 else ""
    method = _METHOD_ABBREV[diff["method"]]
    return f"{diff['delta']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]{star} {method}"


def markdown_table(summary: Mapping[str, Any], dataset_name: str) -> str:
    """A markdown section: one row per (network, condition), baseline first, and a legend."""
    baseline, minority = summary["baseline"], summary["minority_class"]
    lines = [
        f"## {dataset_name}: downstream classifiers ({summary['n_test']} test images, "
        f"class counts {summary['test_class_counts']})",
        "",
        f"| network | condition | AUC | ACC | bal-acc | recall class {minority} (minority) "
        f"| Δ AUC vs {baseline} [95% CI] | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for network, conditions in summary["networks"].items():
        for condition, s in conditions.items():
            m = s["metrics"]
            diff = s["vs_baseline"]["auc"] if s["vs_baseline"] else None
            cells = [
                network,
                condition,
                _mean_std(m["auc"]),
                _mean_std(m["accuracy"]),
                _mean_std(m["balanced_accuracy"]),
                _mean_std(m[f"recall_{minority}"]),
                _delta(diff),
                str(m["auc"]["n"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "mean ± std over seeds (n seeds). Δ: paired difference to the baseline with a 95% interval; "
        "`t`: t-interval over paired seeds, `boot`: paired bootstrap over test images. "
        "* marks an interval excluding 0; an interval containing 0 means no difference was "
        "detected at this sample size, not that there is none.",
        "",
    ]
    return "\n".join(lines)


def plot_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows {network, condition, metric, mean, std} for a `dvc plots` CSV."""
    return [
        {"network": network, "condition": condition, "metric": metric, "mean": st["mean"], "std": st["std"]}
        for network, conditions in summary["networks"].items()
        for condition, s in conditions.items()
        for metric, st in s["metrics"].items()
    ]


def plot_summary(summary: Mapping[str, Any], png_path: str | os.PathLike[str]) -> None:
    """Grouped bars of test AUC: one group per network, one bar per condition, error bars = std.

    Written atomically (a temporary file in the same folder, then `os.replace`), so a crash never
    leaves a truncated PNG for DVC to cache.
    """
    networks = list(summary["networks"])
    conditions = list(dict.fromkeys(c for n in networks for c in summary["networks"][n]))
    width = 0.8 / len(conditions)
    fig = Figure(figsize=(max(6.0, 1.2 * len(networks) * max(1, len(conditions) / 2)), 4.0))
    ax = fig.add_subplot()
    lowest = 0.5
    for i, condition in enumerate(conditions):
        stats = [summary["networks"][n].get(condition, {}).get("metrics", {}).get("auc") for n in networks]
        lowest = min([lowest, *(s["mean"] - (s["std"] or 0.0) for s in stats if s)])
        ax.bar(
            np.arange(len(networks)) + (i - (len(conditions) - 1) / 2) * width,
            [s["mean"] if s else np.nan for s in stats],
            width,
            yerr=[(s["std"] or 0.0) if s else 0.0 for s in stats],
            capsize=3,
            label=condition,
        )
    ax.set_xticks(np.arange(len(networks)), networks, rotation=30, ha="right")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_ylim(lowest - 0.02, 1.0)  # from chance (or below) up: small differences stay visible
    ax.legend(title="condition", fontsize="small")
    fig.tight_layout()
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
