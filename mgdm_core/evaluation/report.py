"""Summaries of the evaluation units: the `metrics/evaluate.json` structure, a markdown table,
a bar plot and flat rows for `dvc plots`.

A unit record is a mapping with `network`, `condition`, `seed`, `metrics` (from
`classification_metrics`), `test_probs` [N, K] and `test_labels` [N]; every record must score
the same test images in the same order, which the paired comparisons rely on.

Per network and metric, the conditions compared with the baseline form one family: their
p-values are Holm-adjusted (`stats.holm`) and each interval is recomputed at its Holm level, so
the family-wise error stays at 5% however many conditions a profile lists.
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
from mgdm_core.evaluation.stats import CONFIDENCE, POWER, difference_to_baseline, holm, summarise

_METHOD_ABBREV = {"t_over_seeds": "t", "bootstrap_test_images": "boot"}
STAGE1 = "real+stage1"


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


def _condition_summary(runs: dict[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Each scalar metric's mean/std/n over seeds; `vs_baseline` is filled in by `_compare`."""
    first = next(iter(runs.values()))["metrics"]
    scalar = [k for k, v in first.items() if isinstance(v, (int, float))]
    return {
        "seeds": sorted(runs),
        "metrics": {k: summarise([r["metrics"][k] for r in runs.values()]) for k in scalar},
        "vs_baseline": None,
    }


def _compare(
    conditions: dict[str, dict[int, Mapping[str, Any]]],
    baseline: str,
    others: Sequence[str],
    y_true: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """condition -> metric -> paired difference of each of `others` to `baseline`, Holm-adjusted
    across `others`: {delta, ci_low, ci_high, n, method, confidence, p_value, mde, p_holm, reject,
    comparisons, adjustment}. `confidence` is the interval's own level after the adjustment."""
    probs = {c: {s: np.asarray(r["test_probs"]) for s, r in runs.items()} for c, runs in conditions.items()}
    out: dict[str, dict[str, Any]] = {c: {} for c in others}
    for metric in COMPARED_METRICS:

        def diff(c: str, confidence: float) -> dict[str, Any]:
            return difference_to_baseline(
                y_true, probs[c], probs[baseline], metric, n_boot=n_boot, seed=seed, confidence=confidence
            )

        raw = {c: diff(c, CONFIDENCE) for c in others}
        adjusted = holm([raw[c]["p_value"] for c in others], alpha=1 - CONFIDENCE)
        for i, c in enumerate(others):
            confidence = 1 - adjusted["alpha_level"][i]
            entry = raw[c] if np.isclose(confidence, CONFIDENCE) else diff(c, confidence)
            out[c][metric] = {
                **entry,
                "p_holm": adjusted["p_adjusted"][i],
                "reject": bool(adjusted["reject"][i]),
                "comparisons": len(others),
                "adjustment": "holm",
            }
    return out


def build_summary(
    unit_results: Sequence[Mapping[str, Any]],
    baseline: str = "real",
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """{baseline, n_test, test_class_counts, minority_class, adjustment, family_confidence, power,
    networks: {network: {condition: {seeds, metrics: {metric: {mean, std, n}}, vs_baseline:
    {metric: see `_compare`} or None for the baseline}}}}; the baseline condition is listed first.
    When `real+stage1` was run, each `real+stage2:<measure>` also gets `vs_stage1` (the same
    structure against `real+stage1`, Holm-adjusted across the measures): does stage 2 add
    anything over stage 1."""
    if not unit_results:
        raise DataError("evaluate: no unit results to summarise")
    y_true = _common_test_labels(unit_results)
    counts = np.bincount(y_true)
    networks: dict[str, Any] = {}
    for network, conditions in _group(unit_results).items():
        if baseline not in conditions:
            raise ConfigError(f"evaluate: baseline condition '{baseline}' has no results for {network}")
        order = [baseline, *(c for c in conditions if c != baseline)]
        networks[network] = {c: _condition_summary(conditions[c]) for c in order}
        others = [c for c in conditions if c != baseline]
        for c, diffs in _compare(conditions, baseline, others, y_true, n_boot, seed).items():
            networks[network][c]["vs_baseline"] = diffs
        stage2 = [c for c in conditions if c.startswith("real+stage2")]
        if STAGE1 in conditions and stage2:
            for c, diffs in _compare(conditions, STAGE1, stage2, y_true, n_boot, seed).items():
                networks[network][c]["vs_stage1"] = diffs
    return {
        "baseline": baseline,
        "n_test": int(len(y_true)),
        "test_class_counts": counts.tolist(),
        "minority_class": int(counts.argmin()),
        "adjustment": "holm",
        "family_confidence": CONFIDENCE,
        "power": POWER,
        "networks": networks,
    }


def _mean_std(stats: Mapping[str, Any]) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _significant(diff: Mapping[str, Any]) -> bool:
    """Holm's verdict; summaries written before the adjustment existed: the interval's."""
    if "reject" in diff:
        return bool(diff["reject"])
    return diff["ci_low"] > 0 or diff["ci_high"] < 0


def _delta(diff: Mapping[str, Any] | None) -> str:
    """'+0.012 [-0.004, +0.028] boot', starred when Holm rejects (the interval then excludes 0)."""
    if diff is None:
        return "—"
    star = "*" if _significant(diff) else ""
    method = _METHOD_ABBREV[diff["method"]]
    return f"{diff['delta']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]{star} {method}"


def _mde(diff: Mapping[str, Any] | None) -> str:
    """The minimum detectable effect of a null comparison; '—' for the baseline and for effects found."""
    if diff is None or _significant(diff) or diff.get("mde") is None:
        return "—"
    return f"{diff['mde']:.3f}"


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _verdicts(compared: Mapping[str, Mapping[str, Any]], against: str) -> list[str]:
    """'better than X: a +0.03 [+0.01, +0.05]', 'worse than X: ...', 'no difference detected
    for b and c (smallest detectable: 0.041, 0.023)' for the comparisons that have each."""

    def fmt(c: str, d: Mapping[str, Any]) -> str:
        return f"{c} {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    better = [fmt(c, d) for c, d in compared.items() if _significant(d) and d["delta"] > 0]
    worse = [fmt(c, d) for c, d in compared.items() if _significant(d) and d["delta"] < 0]
    null = {c: d for c, d in compared.items() if not _significant(d)}
    parts = [f"better than {against}: {_listing(better)}"] if better else []
    if worse:
        parts.append(f"worse than {against}: {_listing(worse)}")
    if null:
        detectable = ", ".join(f"{d['mde']:.3f}" for d in null.values())
        parts.append(
            f"no difference from {against} detected for {_listing(list(null))} "
            f"(smallest detectable with {POWER:.0%} power: {detectable})"
        )
    return parts


def verdict_sentence(network: str, conditions: Mapping[str, Any], baseline: str, metric: str = "auc") -> str:
    """One sentence: which conditions beat the baseline, which lost to it, which showed no
    difference (with the smallest difference the run could have detected), and, when both were
    run, stage 2 against stage 1."""
    name = {"auc": "AUC", "accuracy": "ACC", "balanced_accuracy": "balanced ACC"}.get(metric, metric)
    base = conditions[baseline]["metrics"][metric]
    compared = {c: e["vs_baseline"][metric] for c, e in conditions.items() if e.get("vs_baseline")}
    head = f"**{network}** ({len(conditions[baseline]['seeds'])} seeds, {baseline} {name} {_mean_std(base)}"
    if not compared:
        return f"{head}): only the baseline was run."
    adjustment = next(iter(compared.values())).get("adjustment")
    family = f"Holm-adjusted over {len(compared)} comparisons" if adjustment == "holm" else "unadjusted"
    parts = _verdicts(compared, baseline)
    stage2 = {c: e["vs_stage1"][metric] for c, e in conditions.items() if e.get("vs_stage1")}
    if stage2:
        family2 = f"Holm over {len(stage2)} measures" if len(stage2) > 1 else "one measure"
        parts.append(f"stage 2 against {STAGE1} ({family2}): " + ", ".join(_verdicts(stage2, STAGE1)))
    return f"{head}; Δ {name} with 95% intervals, {family}): {'; '.join(parts)}."


def verdict_sentences(summary: Mapping[str, Any], metric: str = "auc") -> list[str]:
    """`verdict_sentence` for every network of a `build_summary` result."""
    return [verdict_sentence(n, c, summary["baseline"], metric) for n, c in summary["networks"].items()]


def markdown_table(summary: Mapping[str, Any], dataset_name: str) -> str:
    """The evaluation report: one verdict sentence per network (`verdict_sentences`), then a table
    with one row per (network, condition), baseline first, and a legend."""
    baseline, minority = summary["baseline"], summary["minority_class"]
    lines = [
        f"# {dataset_name}: downstream classifiers",
        "",
        *(f"- {sentence}" for sentence in verdict_sentences(summary)),
        "",
        f"## All conditions ({summary['n_test']} test images, class counts {summary['test_class_counts']})",
        "",
        f"| network | condition | AUC | ACC | bal-acc | recall class {minority} (minority) "
        f"| Δ AUC vs {baseline} [95% CI, Holm] | detectable Δ AUC | n |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
                _mde(diff),
                str(m["auc"]["n"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "mean ± std over seeds (n seeds). Δ: paired difference to the baseline; "
        "`t`: t-interval over paired seeds, `boot`: paired bootstrap over test images. "
        "Intervals and * are Holm-adjusted across the conditions compared with the baseline "
        "(per network; family-wise 95%): * marks a difference Holm declares, and only those "
        "intervals exclude 0. An interval containing 0 means no difference was detected at this "
        f"sample size, not that there is none; `detectable Δ` is the smallest difference it would "
        f"have found with {POWER:.0%} power.",
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
    # Beside the axes, not over the bars: with seven conditions an inside legend hides some of them.
    ax.legend(title="condition", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
