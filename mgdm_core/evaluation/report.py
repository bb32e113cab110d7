"""Summaries of the evaluation units: the `metrics/evaluate.json` structure, a markdown table,
a bar plot and flat rows for `dvc plots`.

A unit record is a mapping with `network`, `condition`, `seed`, `metrics` (from
`classification_metrics`), `test_probs` [N, K] and `test_labels` [N]; every record must score
the same test images in the same order, which the paired comparisons rely on.

Per network and metric, the m conditions compared with the baseline form one family. Its
decisions (`reject`, the `*` and the verdict words) are Holm's step-down test (`stats.holm`) at
family-wise 5%; its intervals are Bonferroni's, each at 1 - 0.05/m (`confidence`), so that all m
hold together at 95% (`family_confidence`) however many conditions a profile lists. Holm can
reject where a Bonferroni interval still touches 0: such rows are marked (`†`), not hidden.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mgdm_core.conditions import parse_condition
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS
from mgdm_core.evaluation.stats import (
    CONFIDENCE,
    POWER,
    bonferroni_confidence,
    difference_to_baseline,
    holm,
    summarise,
)

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
    """Each scalar metric's mean/std/n over seeds and its `per_seed` values (in the order of
    `seeds`, so runs of several generators can be pooled from the JSON files alone:
    `evaluation.generators`); `vs_baseline` is filled in by `_compare`."""
    seeds = sorted(runs)
    first = runs[seeds[0]]["metrics"]
    scalar = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    summary = {
        "seeds": seeds,
        "metrics": {k: summarise([runs[s]["metrics"][k] for s in seeds]) for k in scalar},
        "per_seed": {k: [float(runs[s]["metrics"][k]) for s in seeds] for k in scalar},
        "vs_baseline": None,
    }
    val = [runs[s].get("val_auc") for s in seeds]
    if all(v is not None and np.isfinite(v) for v in val):  # each seed's best-epoch validation AUC
        summary["validation"] = {"auc": summarise([float(v) for v in val])}
    return summary


def _parsed(condition: str):
    """The parsed condition, or None for a name outside the grammar (summaries built by hand)."""
    try:
        return parse_condition(condition)
    except ConfigError:
        return None


def best_augmentation(conditions: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The standard augmentation (`real+<augment>`, no synthetic images) with the highest mean
    validation AUC over its seeds: {condition, chosen_by, validation_auc: {candidate: mean}}.
    The test images play no part in the choice, so comparisons with it on the test images stay
    honest. None when no such condition was run or a candidate lacks validation AUCs (results
    written before they were recorded); ties go to the first listed."""
    candidates = [c for c in conditions if (p := _parsed(c)) and p.data == "real" and p.augment]
    if not candidates or any("validation" not in conditions[c] for c in candidates):
        return None
    means = {c: float(conditions[c]["validation"]["auc"]["mean"]) for c in candidates}
    best = max(candidates, key=lambda c: means[c])  # max keeps the first of equals
    return {"condition": best, "chosen_by": "highest mean validation AUC over seeds (test images not used)",
            "validation_auc": means}


def _stage2_families(conditions: Sequence[str]) -> dict[str, list[str]]:
    """Stage 2 against stage 1 under the same augmentation: {`real+stage1[+aug]`: the
    `real+stage2:<measure>[+aug]` conditions}, for the references that were run (stage 2 with
    TrivialAugment is compared with stage 1 with TrivialAugment, not with plain stage 1)."""
    families: dict[str, list[str]] = {}
    for c in conditions:
        p = _parsed(c)
        if p is None and c.startswith("real+stage2"):  # names outside the grammar: plain stage 1
            families.setdefault(STAGE1, []).append(c)
        elif p is not None and p.data == "real+stage2":
            families.setdefault(STAGE1 + (f"+{p.augment}" if p.augment else ""), []).append(c)
    return {ref: members for ref, members in families.items() if ref in conditions}


def _against_augmentation(conditions: Sequence[str], best: str) -> list[str]:
    """The conditions compared with the best standard augmentation: the synthetic sets added to
    real images, alone and combined with that same augmentation (does synthesis beat it, and
    does it add to it)."""
    augment = parse_condition(best).augment
    return [c for c in conditions
            if (p := _parsed(c)) and p.data in ("real+stage1", "real+stage2") and p.augment in (None, augment)]


def _compare(
    conditions: dict[str, dict[int, Mapping[str, Any]]],
    baseline: str,
    others: Sequence[str],
    y_true: np.ndarray,
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """condition -> metric -> paired difference of each of `others` to `baseline`: {delta,
    ci_low, ci_high, n, method, confidence, family_confidence, interval, p_value, p_holm, reject,
    comparisons, adjustment, mde, mde_power, mde_alpha, variance_covered}.

    The interval is Bonferroni's (`interval`), at `confidence` = 1 - 0.05/m each and
    `family_confidence` = 0.95 for the m together; `reject` is Holm's decision (`adjustment`) on
    the unadjusted p-values; `mde` is the difference the level-(0.05/m) test detects with
    `mde_power`."""
    probs = {c: {s: np.asarray(r["test_probs"]) for s, r in runs.items()} for c, runs in conditions.items()}
    out: dict[str, dict[str, Any]] = {c: {} for c in others}
    each = bonferroni_confidence(len(others), CONFIDENCE) if others else CONFIDENCE
    for metric in COMPARED_METRICS:
        raw = {
            c: difference_to_baseline(
                y_true, probs[c], probs[baseline], metric, n_boot=n_boot, seed=seed, confidence=each, power=POWER
            )
            for c in others
        }
        decided = holm([raw[c]["p_value"] for c in others], alpha=1 - CONFIDENCE)
        for i, c in enumerate(others):
            out[c][metric] = {
                **raw[c],
                "family_confidence": CONFIDENCE,
                "interval": "bonferroni",
                "p_holm": decided["p_adjusted"][i],
                "reject": bool(decided["reject"][i]),
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
    """{baseline, n_test, test_class_counts, minority_class, adjustment, interval,
    family_confidence, power, networks: {network: {condition: {seeds, metrics: {metric: {mean,
    std, n}}, per_seed: {metric: [value per seed]}, vs_baseline: {metric: see `_compare`} or None
    for the baseline}}}}; the baseline condition is listed first.
    When `real+stage1` was run, each `real+stage2:<measure>` also gets `vs_stage1` (the same
    structure against `real+stage1`, Holm-adjusted across the measures, `reference` naming it):
    does stage 2 add anything over stage 1; `real+stage2:<measure>+<aug>` is compared with
    `real+stage1+<aug>` when that was run (a family per augmentation).
    When standard augmentations (`real+<augment>`) were run and the records carry `val_auc`, each
    condition also gets `validation` (its seeds' best-epoch validation AUC), `best_augmentation`
    names per network the one with the highest mean validation AUC (`best_augmentation`), and the
    synthetic conditions with no augmentation or that one get `vs_best_augmentation` (the same
    structure, its own Holm family): does synthesis beat the strongest standard recipe, and
    does it add to it."""
    if not unit_results:
        raise DataError("evaluate: no unit results to summarise")
    y_true = _common_test_labels(unit_results)
    counts = np.bincount(y_true)
    networks: dict[str, Any] = {}
    best_augmentations: dict[str, Any] = {}
    for network, conditions in _group(unit_results).items():
        if baseline not in conditions:
            raise ConfigError(f"evaluate: baseline condition '{baseline}' has no results for {network}")
        order = [baseline, *(c for c in conditions if c != baseline)]
        networks[network] = {c: _condition_summary(conditions[c]) for c in order}
        others = [c for c in conditions if c != baseline]
        for c, diffs in _compare(conditions, baseline, others, y_true, n_boot, seed).items():
            networks[network][c]["vs_baseline"] = diffs
        for reference, stage2 in _stage2_families(list(conditions)).items():
            for c, diffs in _compare(conditions, reference, stage2, y_true, n_boot, seed).items():
                networks[network][c]["vs_stage1"] = {
                    metric: {**diff, "reference": reference} for metric, diff in diffs.items()}
        chosen = best_augmentation(networks[network])
        against = _against_augmentation(list(conditions), chosen["condition"]) if chosen else []
        if against:
            best_augmentations[network] = chosen
            for c, diffs in _compare(conditions, chosen["condition"], against, y_true, n_boot, seed).items():
                networks[network][c]["vs_best_augmentation"] = {
                    metric: {**diff, "reference": chosen["condition"]} for metric, diff in diffs.items()}
    return {
        "baseline": baseline,
        "n_test": int(len(y_true)),
        "test_class_counts": counts.tolist(),
        "minority_class": int(counts.argmin()),
        "adjustment": "holm",
        "interval": "bonferroni",
        "family_confidence": CONFIDENCE,
        "power": POWER,
        "networks": networks,
        "best_augmentation": best_augmentations,
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


def _declared_inside_interval(diff: Mapping[str, Any]) -> bool:
    """Holm declares a difference that the Bonferroni interval still spans 0 for (Holm's later
    steps test at levels above alpha/m, so it can reject what the simultaneous interval cannot)."""
    return _significant(diff) and diff["ci_low"] <= 0 <= diff["ci_high"]


def _marks(diff: Mapping[str, Any]) -> str:
    return ("*" if _significant(diff) else "") + ("†" if _declared_inside_interval(diff) else "")


def _percent(level: float) -> str:
    """0.95 -> '95%', 0.98333 -> '98.3%'."""
    return f"{level:.1%}".replace(".0%", "%")


def _delta(diff: Mapping[str, Any] | None) -> str:
    """'+0.012 [-0.004, +0.028] boot'; * when Holm rejects, *† when it rejects although the
    interval spans 0."""
    if diff is None:
        return "—"
    method = _METHOD_ABBREV[diff["method"]]
    return f"{diff['delta']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]{_marks(diff)} {method}"


def _mde(diff: Mapping[str, Any] | None) -> str:
    """The detectable difference of a null comparison; '—' for the baseline and for effects found."""
    if diff is None or _significant(diff) or diff.get("mde") is None:
        return "—"
    return f"{diff['mde']:.3f}"


def _listing(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _interval_words(diff: Mapping[str, Any], comparisons: int) -> str:
    """What the family's intervals are: 'simultaneous 95% intervals (Bonferroni, each 98.3%)', or
    for summaries written before Bonferroni intervals, their stated per-interval level."""
    each = _percent(diff.get("confidence", CONFIDENCE))
    if diff.get("interval") == "bonferroni" and comparisons > 1:
        return f"simultaneous {_percent(diff['family_confidence'])} intervals (Bonferroni, each {each})"
    return f"{each} intervals"


def _decision_words(diff: Mapping[str, Any], comparisons: int) -> str:
    if diff.get("adjustment") != "holm":
        return "verdicts: interval excludes 0"
    family = 1 - diff.get("family_confidence", CONFIDENCE)
    if comparisons == 1:
        return f"verdicts: two-sided test at {_percent(family)}"
    return f"verdicts: Holm's test over {comparisons} comparisons at family-wise {_percent(family)}"


def _verdicts(compared: Mapping[str, Mapping[str, Any]], against: str) -> list[str]:
    """'better than X: a +0.03 [+0.01, +0.05]', 'worse than X: ...', 'no difference detected
    for b and c (smallest detectable with 80% power at level 0.025: 0.041, 0.023)' for the
    comparisons that have each; better/worse is Holm's decision (†: the interval spans 0)."""

    def fmt(c: str, d: Mapping[str, Any]) -> str:
        dagger = "†" if _declared_inside_interval(d) else ""
        return f"{c} {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{dagger}"

    better = [fmt(c, d) for c, d in compared.items() if _significant(d) and d["delta"] > 0]
    worse = [fmt(c, d) for c, d in compared.items() if _significant(d) and d["delta"] < 0]
    null = {c: d for c, d in compared.items() if not _significant(d)}
    parts = [f"better than {against}: {_listing(better)}"] if better else []
    if worse:
        parts.append(f"worse than {against}: {_listing(worse)}")
    if null:
        first = next(iter(null.values()))
        detectable = ", ".join(f"{d['mde']:.3f}" for d in null.values())
        level = f" at level {first['mde_alpha']:.3g}" if first.get("mde_alpha") is not None else ""
        parts.append(
            f"no difference from {against} detected for {_listing(list(null))} "
            f"(smallest detectable with {first.get('mde_power', POWER):.0%} power{level}: {detectable})"
        )
    return parts


def verdict_sentence(network: str, conditions: Mapping[str, Any], baseline: str, metric: str = "auc") -> str:
    """One sentence: which conditions beat the baseline, which lost to it (Holm's decisions),
    which showed no difference (with the smallest difference the run could have detected), and,
    when both were run, stage 2 against stage 1. It names the intervals' levels and the rule
    behind the verdict words."""
    name = {"auc": "AUC", "accuracy": "ACC", "balanced_accuracy": "balanced ACC"}.get(metric, metric)
    base = conditions[baseline]["metrics"][metric]
    compared = {c: e["vs_baseline"][metric] for c, e in conditions.items() if e.get("vs_baseline")}
    head = f"**{network}** ({len(conditions[baseline]['seeds'])} seeds, {baseline} {name} {_mean_std(base)}"
    if not compared:
        return f"{head}): only the baseline was run."
    first = next(iter(compared.values()))
    rules = f"{_interval_words(first, len(compared))}; {_decision_words(first, len(compared))}"
    if first.get("method") == "bootstrap_test_images":
        rules += "; bootstrap over test images, the seeds' variance left out"
    parts = _verdicts(compared, baseline)
    by_reference: dict[str, dict[str, Any]] = {}
    for c, e in conditions.items():
        if e.get("vs_stage1"):
            d = e["vs_stage1"][metric]
            by_reference.setdefault(d.get("reference", STAGE1), {})[c] = d
    for reference, stage2 in by_reference.items():
        family2 = f"Holm over {len(stage2)} measures" if len(stage2) > 1 else "one measure"
        intervals2 = _interval_words(next(iter(stage2.values())), len(stage2))
        parts.append(f"stage 2 against {reference} ({family2}, {intervals2}): " + ", ".join(_verdicts(stage2, reference)))
    vs_aug = {c: e["vs_best_augmentation"][metric] for c, e in conditions.items() if e.get("vs_best_augmentation")}
    if vs_aug:
        first_aug = next(iter(vs_aug.values()))
        best = first_aug["reference"]
        parts.append(
            f"against the best standard augmentation on validation AUC, {best} ({name} "
            f"{_mean_std(conditions[best]['metrics'][metric])}; {_interval_words(first_aug, len(vs_aug))}, "
            f"{_decision_words(first_aug, len(vs_aug))}): " + ", ".join(_verdicts(vs_aug, best)))
    return f"{head}; Δ {name} with {rules}): {'; '.join(parts)}."


def verdict_sentences(summary: Mapping[str, Any], metric: str = "auc") -> list[str]:
    """`verdict_sentence` for every network of a `build_summary` result."""
    return [verdict_sentence(n, c, summary["baseline"], metric) for n, c in summary["networks"].items()]


def _levels_legend(summary: Mapping[str, Any]) -> str:
    """'each interval at 98.3% (3 comparisons per network)' for the family sizes the table has."""
    levels = sorted({
        (d["comparisons"], d["confidence"])
        for conditions in summary["networks"].values()
        for s in conditions.values()
        if s.get("vs_baseline") and "comparisons" in (d := s["vs_baseline"]["auc"])
    })
    return "; ".join(f"{_percent(c)} each for {m} comparison{'s' if m > 1 else ''}" for m, c in levels) or "none here"


def markdown_table(summary: Mapping[str, Any], dataset_name: str) -> str:
    """The evaluation report: one verdict sentence per network (`verdict_sentences`), then a table
    with one row per (network, condition), baseline first, and a legend."""
    baseline, minority = summary["baseline"], summary["minority_class"]
    family = _percent(summary.get("family_confidence", CONFIDENCE))
    lines = [
        f"# {dataset_name}: downstream classifiers",
        "",
        *(f"- {sentence}" for sentence in verdict_sentences(summary)),
        "",
        f"## All conditions ({summary['n_test']} test images, class counts {summary['test_class_counts']})",
        "",
        f"| network | condition | AUC | ACC | bal-acc | recall class {minority} (minority) "
        f"| Δ AUC vs {baseline} [simultaneous {family} CI] | detectable Δ AUC ({POWER:.0%} power) | n |",
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
        "`t`: t-interval over paired seeds (same initialisation seed; batch order differs when the "
        "training sets differ), `boot`: paired bootstrap over test images (it leaves the seeds' "
        "variance out). Intervals are Bonferroni's: with m conditions compared with the baseline "
        f"per network, each is at 1 - {1 - CONFIDENCE:.2g}/m ({_levels_legend(summary)}), so that a "
        f"network's intervals hold together at {family}. * marks a difference Holm's step-down test "
        f"declares at family-wise {_percent(1 - summary.get('family_confidence', CONFIDENCE))}: the rule "
        "behind better / worse. Holm is the more powerful, so it may declare a difference whose "
        "interval still spans 0 (*†). An interval containing 0 means no difference was detected at "
        "this sample size, not that there is none; what it rules out is its bound. `detectable Δ` "
        f"is the smallest true difference the family's test (level {1 - CONFIDENCE:.2g}/m) would have "
        f"found with {POWER:.0%} power (noncentral t; normal for `boot`).",
        "",
        *_augmentation_section(summary),
    ]
    return "\n".join(lines)


def _augmentation_section(summary: Mapping[str, Any]) -> list[str]:
    """Per network: the standard augmentations ranked by validation AUC, the one chosen, and the
    synthetic conditions against it (`vs_best_augmentation`); nothing when none was chosen."""
    chosen = summary.get("best_augmentation") or {}
    if not chosen:
        return []
    lines = ["## Against the best standard augmentation (chosen on validation AUC)", ""]
    for network, best in chosen.items():
        conditions = summary["networks"][network]
        ranked = sorted(best["validation_auc"].items(), key=lambda kv: -kv[1])
        base_val = conditions[summary["baseline"]].get("validation", {}).get("auc", {}).get("mean")
        listing = ", ".join(f"{c} {v:.3f}" for c, v in ranked)
        baseline_words = f" ({summary['baseline']}: {base_val:.3f})" if base_val is not None else ""
        lines += [
            (f"**{network}**: mean validation AUC {listing}{baseline_words}; chosen: **{best['condition']}**, "
             f"test AUC {_mean_std(conditions[best['condition']]['metrics']['auc'])}."),
            "",
            f"| condition | AUC | Δ AUC vs {best['condition']} [CI] | detectable Δ AUC ({POWER:.0%} power) |",
            "| --- | --- | --- | --- |",
        ]
        for condition, entry in conditions.items():
            diff = (entry.get("vs_best_augmentation") or {}).get("auc")
            if diff is not None:
                lines.append(f"| {condition} | {_mean_std(entry['metrics']['auc'])} | {_delta(diff)} | {_mde(diff)} |")
        first = next((e["vs_best_augmentation"]["auc"] for e in conditions.values() if e.get("vs_best_augmentation")), None)
        if first is not None:
            words = _interval_words(first, first["comparisons"])
            lines += ["", f"{words[0].upper()}{words[1:]}; {_decision_words(first, first['comparisons'])}.", ""]
    return lines


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
