"""Several generators: pooling evaluate runs that differ only in the generator seed.

One `evaluate` run compares conditions on the images of ONE trained generator (one diffusion
seed), so its intervals speak for that generator only. With G runs (G DVC experiments or G
project roots, each holding a `metrics/evaluate.json` with `per_seed` values) that differ only in
the generator seed, the question "does augmentation with this method help?" has two levels:

* level 1, classifier seeds within a generator g: the paired difference per seed
  D_gs = x(g, condition, s) - x(g, reference, s), averaged into d_g = mean_s D_gs;
* level 2, generators: d_1..d_G are independent, with mean mu (the effect of the method) and
  Var(d_g) = sigma2_generator + sigma2_seed / n (n seeds per generator).

The interval is a t over the G numbers d_g (G - 1 degrees of freedom): the classifier seeds enter
only through each generator's seed mean, and the spread of those means already contains their
variance divided by n, so the seeds are never counted again as independent observations. The
comparisons of one network and metric form a family, as in `report`: Bonferroni intervals at
1 - alpha/m each (simultaneous 1 - alpha), Holm's decisions, and the detectable difference of the
level-alpha/m test from the noncentral t (`stats.detectable_difference`).

`variance_components` splits the D_gs into sigma2_generator and sigma2_seed (one-way
random-effects ANOVA); `design_detectable` turns them into the detectable difference of another
design (G generators x n seeds), so a page can say how many of each a 0.01 AUC target needs.

Shared conditions: a condition that does not depend on the generator (`real`, `real+classic`) may
come from one shared run set (`shared`, filling in what a generator's file lacks), and it is
shared anyway when every generator's file holds the same per-seed values for it (it trains
bit-reproducibly on CPU, so each experiment's `real` repeats the others'). Every d_g then uses
the same seed values, whose seed mean is common to all of them and does not average out over
generators: its variance s2_shared / n_shared is added to the standard error (Welch-Satterthwaite
degrees of freedom). This ignores the positive correlation the shared initialisation seed gives
the two conditions, so it errs on the wide side. Two shared conditions involve no generator and
are not compared here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import t as t_dist

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS
from mgdm_core.evaluation.stats import CONFIDENCE, POWER, bonferroni_confidence, detectable_difference, holm

SeedValues = Mapping[int, float]  # classifier seed -> metric value
Runs = Mapping[str, SeedValues]  # condition -> its seeds' values (one generator, network and metric)

HOW_SEEDS_ENTER = (
    "Each generator contributes one number, its seed-averaged paired difference d_g (mean over its "
    "classifier seeds of condition - reference, paired on seed). The interval is a t over the d_g "
    "(G - 1 df): Var(d_g) = sigma2_generator + sigma2_seed / n_seeds, so the between-generator "
    "spread of the d_g already carries the seeds' variance; the seeds are not counted again."
)
SHARED_NOTE = (
    "The {which} comes from one shared run set: its seed mean is common to every d_g and does not "
    "average over generators, so its variance s2 / n is added to the standard error "
    "(Welch-Satterthwaite df; conservative, the seeds' pairing is ignored)."
)
DESIGN_GENERATORS = (2, 3, 5, 10, 20)
DESIGN_SEEDS = (1, 3, 5, 10)


def paired_seed_differences(condition: SeedValues, reference: SeedValues) -> np.ndarray:
    """condition - reference on the classifier seeds both hold, in seed order."""
    seeds = sorted(set(condition) & set(reference))
    if not seeds:
        raise DataError("pool: a condition and its reference share no classifier seed")
    return np.array([condition[s] - reference[s] for s in seeds], dtype=float)


def variance_components(differences: Sequence[np.ndarray]) -> dict[str, float | int | bool | None]:
    """One-way random-effects ANOVA of the paired differences D_gs (one array per generator):
    sigma2_seed = MS_within, sigma2_generator = max(0, (MS_between - MS_within) / n0), n0 the
    (unbalanced-design) effective seeds per generator, (N - sum n_g^2 / N) / (G - 1).

    `within_generator_seed` is None when no generator has two seeds (nothing to estimate it from);
    `truncated` says the moment estimate of sigma2_generator was negative (set to 0).
    """
    groups = [np.asarray(d, dtype=float) for d in differences]
    if len(groups) < 2 or any(g.size == 0 for g in groups):
        raise DataError("pool: variance components need at least 2 generators, each with a seed")
    sizes = np.array([g.size for g in groups], dtype=float)
    total, means = sizes.sum(), np.array([g.mean() for g in groups])
    grand = float(np.concatenate(groups).mean())
    n0 = float((total - (sizes**2).sum() / total) / (len(groups) - 1))
    ms_between = float((sizes * (means - grand) ** 2).sum() / (len(groups) - 1))
    within_df = total - len(groups)
    ms_within = float(sum(((g - g.mean()) ** 2).sum() for g in groups) / within_df) if within_df > 0 else None
    between = (ms_between - (ms_within or 0.0)) / n0
    return {
        "between_generator": max(0.0, between),
        "within_generator_seed": ms_within,
        "generators": len(groups),
        "seeds_per_generator": n0,
        "ms_between": ms_between,
        "ms_within": ms_within,
        "truncated": bool(between < 0),
    }


def interval_over_generators(
    per_generator: Sequence[float],
    confidence: float = CONFIDENCE,
    power: float = POWER,
    shared_values: Sequence[float] | None = None,
) -> dict[str, float]:
    """Mean of the generators' seed-averaged differences d_g with a t-interval at `confidence`
    over them, the two-sided p-value for mu = 0 and the detectable difference of that test.

    se^2 = s2_d / G with G - 1 df; with `shared_values` (the per-seed values of a condition
    shared by every generator) s2_shared / n_shared is added and the df are Welch-Satterthwaite's.
    """
    d = np.asarray(per_generator, dtype=float)
    if d.size < 2:
        raise DataError(f"pool: an interval over generators needs at least 2 generators, got {d.size}")
    terms = [(float(d.var(ddof=1)) / d.size, d.size - 1)]
    if shared_values is not None and len(shared_values) > 1:
        s = np.asarray(shared_values, dtype=float)
        terms.append((float(s.var(ddof=1)) / s.size, s.size - 1))
    se2 = sum(v for v, _ in terms)
    if se2 == 0:  # every generator moved by exactly the same amount: t is 0/0 or infinite
        raise DataError("pool: every generator gives the same difference (the same results passed twice?); "
                        "no spread between generators to build an interval from")
    dof = se2**2 / sum(v**2 / df for v, df in terms if v > 0)
    se, mean = float(np.sqrt(se2)), float(d.mean())
    half = float(t_dist.ppf(1 - (1 - confidence) / 2, dof) * se)
    return {
        "delta": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "se": se,
        "df": float(dof),
        "p_value": float(2 * t_dist.sf(abs(mean) / se, dof)),
        "mde": detectable_difference(se, 1 - confidence, power, dof=float(dof)),
    }


def design_detectable(
    components: Mapping[str, Any], generators: int, seeds: int, alpha: float = 1 - CONFIDENCE, power: float = POWER
) -> float | None:
    """Detectable difference of a design with `generators` x `seeds` (each generator with its own
    reference runs): se^2 = sigma2_generator / G + sigma2_seed / (G n), G - 1 df, test at `alpha`.
    None when sigma2_seed could not be estimated or G < 2."""
    if generators < 2 or seeds < 1 or components.get("within_generator_seed") is None:
        return None
    se2 = components["between_generator"] / generators + components["within_generator_seed"] / (generators * seeds)
    return detectable_difference(float(np.sqrt(se2)), alpha, power, dof=generators - 1)


def generators_needed(
    components: Mapping[str, Any],
    target: float,
    seeds: int,
    alpha: float = 1 - CONFIDENCE,
    power: float = POWER,
    most: int = 200,
) -> int | None:
    """The fewest generators (with `seeds` classifier seeds each) whose detectable difference is
    at most `target`; None when not even `most` suffice or the components are incomplete."""
    if target <= 0:
        raise ConfigError(f"pool: the target difference must be > 0, got {target}")
    for g in range(2, most + 1):
        mde = design_detectable(components, g, seeds, alpha, power)
        if mde is None:
            return None
        if mde <= target:
            return g
    return None


def _values(runs: Runs, shared: Runs | None, condition: str, where: str) -> SeedValues:
    """A condition's seed values from this generator, else from the shared runs."""
    if condition in runs:
        return runs[condition]
    if shared is not None and condition in shared:
        return shared[condition]
    raise DataError(f"pool: {where} has no results for condition '{condition}' (and no shared runs hold it)")


def _same_everywhere(values: Sequence[SeedValues]) -> bool:
    """The same seed values for every generator: taken from the shared runs, or a condition that
    does not depend on the generator and trained bit-reproducibly (`real` on CPU)."""
    return all(dict(v) == dict(values[0]) for v in values[1:])


def pool_family(
    generators: Sequence[Runs],
    comparisons: Sequence[tuple[str, str]],
    shared: Runs | None = None,
    *,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    target: float | None = None,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One family (one network and metric): for each (condition, reference) in `comparisons`,
    the generators' seed-averaged differences `per_generator`, their mean `delta` with a
    Bonferroni t-interval over generators (`confidence` each, `family_confidence` together),
    `p_value`, Holm's `p_holm` / `reject`, the detectable difference `mde` (`mde_power`,
    `mde_alpha`), the `variance_components` and `designs` (detectable difference per
    (generators, seeds); with `target`, the generators each seed count needs).

    generators: per generator, condition -> seed -> value; `shared`: conditions common to all.
    """
    if not comparisons:
        raise ConfigError("pool: nothing to compare")
    names = list(names) if names is not None else [f"generator {i}" for i in range(len(generators))]
    each = bonferroni_confidence(len(comparisons), confidence)
    alpha = (1 - confidence) / len(comparisons)  # the same level as 1 - each, without its rounding
    rows = []
    for condition, reference in comparisons:
        if condition == reference:
            raise ConfigError(f"pool: '{condition}' compared with itself")
        conds = [_values(runs, shared, condition, name) for runs, name in zip(generators, names)]
        refs = [_values(runs, shared, reference, name) for runs, name in zip(generators, names)]
        if _same_everywhere(conds) and _same_everywhere(refs):
            raise ConfigError(f"pool: '{condition}' and '{reference}' have the same results for every generator "
                              "(both generator-independent, or the same results passed twice): no generator is "
                              "involved (compare them with `mgdm evaluate`)")
        diffs = [paired_seed_differences(c, r) for c, r in zip(conds, refs)]
        side = "condition" if _same_everywhere(conds) else "reference" if _same_everywhere(refs) else None
        shared_side = {} if side is None else {side: (conds if side == "condition" else refs)[0]}
        shared_values = next(iter(shared_side.values()), None)
        per_generator = [float(d.mean()) for d in diffs]
        interval = interval_over_generators(
            per_generator, each, power, None if shared_values is None else list(shared_values.values())
        )
        components = variance_components(diffs)
        row = {
            "condition": condition,
            "reference": reference,
            "per_generator": per_generator,
            "seeds": [int(d.size) for d in diffs],
            **interval,
            "confidence": each,
            "family_confidence": confidence,
            "interval": "bonferroni",
            "mde_power": power,
            "mde_alpha": alpha,
            "shared": next(iter(shared_side), None),
            "how_seeds_enter": HOW_SEEDS_ENTER
            + (" " + SHARED_NOTE.format(which=next(iter(shared_side))) if shared_side else ""),
            "variance_components": components,
            "designs": [
                {"generators": g, "seeds": n, "detectable": design_detectable(components, g, n, alpha, power)}
                for g in DESIGN_GENERATORS
                for n in DESIGN_SEEDS
            ],
        }
        if target is not None:
            row["target"] = target
            row["generators_needed"] = {
                str(n): generators_needed(components, target, n, alpha, power) for n in DESIGN_SEEDS
            }
        rows.append(row)
    decided = holm([r["p_value"] for r in rows], alpha=1 - confidence)
    for row, p_adj, rej in zip(rows, decided["p_adjusted"], decided["reject"]):
        row.update({"p_holm": p_adj, "reject": bool(rej), "comparisons": len(rows), "adjustment": "holm"})
    return rows


# ---------------------------------------------------------------- evaluate.json files


def evaluate_file(path: str | Path) -> Path:
    """An evaluate.json, or a project root holding metrics/evaluate.json."""
    p = Path(path)
    return p / "metrics" / "evaluate.json" if p.is_dir() else p


def runs_from_summary(summary: Mapping[str, Any], source: str) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """network -> metric -> condition -> seed -> value from an evaluate.json's `per_seed` values."""
    out: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    for network, conditions in (summary.get("networks") or {}).items():
        for condition, entry in conditions.items():
            per_seed = entry.get("per_seed")
            if per_seed is None:
                raise DataError(f"pool: {source} has no per-seed values ({network} | {condition}); "
                                "it was written before they were stored: rerun evaluate")
            for metric, values in per_seed.items():
                if len(values) != len(entry["seeds"]):
                    raise DataError(f"pool: {source}: {network} | {condition} | {metric}: "
                                    f"{len(values)} values for {len(entry['seeds'])} seeds")
                by_metric = out.setdefault(network, {}).setdefault(metric, {})
                by_metric[condition] = dict(zip((int(s) for s in entry["seeds"]), map(float, values)))
    return out


def load_runs(path: str | Path) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    file = evaluate_file(path)
    try:
        summary = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"pool: {file} does not exist (run evaluate there first)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"pool: {file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return runs_from_summary(summary, str(file))


def parse_comparison(text: str, known: Sequence[str]) -> tuple[str, str]:
    """'cond_a:cond_b' -> (cond_a, cond_b), cond_a compared with cond_b. Condition names hold ':'
    themselves (`real+stage2:entropy`), so the split is the one whose halves are both known."""
    splits = [(text[:i], text[i + 1 :]) for i, ch in enumerate(text) if ch == ":"]
    matches = [(a, b) for a, b in splits if a in known and b in known]
    if len(matches) != 1:
        raise ConfigError(f"pool: --compare '{text}' must be <condition>:<reference> with both among "
                          f"{', '.join(known)}")
    return matches[0]


def _no_generator(generators: Sequence[Runs], shared: Runs, condition: str, reference: str) -> bool:
    """Both sides hold the same results for every generator (two generator-independent conditions)."""
    def same(c: str) -> bool:
        values = [g.get(c, shared.get(c)) for g in generators]
        return None not in values and _same_everywhere(values)

    return same(condition) and same(reference)


def pool(
    generators: Sequence[Mapping[str, Any]],
    *,
    shared: Mapping[str, Any] | None = None,
    reference: str = "real",
    comparisons: Sequence[tuple[str, str]] | None = None,
    metrics: Sequence[str] | None = COMPARED_METRICS,
    confidence: float = CONFIDENCE,
    power: float = POWER,
    target: float | None = 0.01,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`pool_family` for every network the generators all hold and every metric in `metrics`.

    generators / shared: `runs_from_summary` results. Without `comparisons`, every condition the
    generators (or the shared runs) all hold is compared with `reference`, except those that,
    like it, hold the same results for every generator. `metrics` None: those all generators hold.
    """
    if len(generators) < 2:
        raise ConfigError(f"pool: needs the results of at least 2 generators, got {len(generators)}")
    networks = [n for n in generators[0] if all(n in g for g in generators[1:])]
    if not networks:
        raise DataError("pool: the generators' results share no network")
    out: dict[str, Any] = {}
    for network in networks:
        out[network] = {}
        wanted_metrics = metrics if metrics is not None else [
            m for m in generators[0][network] if all(m in g[network] for g in generators[1:])
        ]
        for metric in wanted_metrics:
            if any(metric not in g[network] for g in generators):
                raise DataError(f"pool: {network}: not every generator's results hold per-seed '{metric}'")
            per_generator = [g[network][metric] for g in generators]
            common = (shared or {}).get(network, {}).get(metric, {})
            conditions = [c for c in per_generator[0] if all(c in g for g in per_generator[1:])]
            conditions += [c for c in common if c not in conditions]
            wanted = list(comparisons) if comparisons else [
                (c, reference)
                for c in conditions
                if c != reference and not _no_generator(per_generator, common, c, reference)
            ]
            if not wanted:
                raise DataError(f"pool: {network} | {metric}: no condition to compare with '{reference}'")
            out[network][metric] = pool_family(
                per_generator, wanted, common or None, confidence=confidence, power=power, target=target, names=names
            )
    return {
        "generators": len(generators),
        "sources": list(names) if names is not None else None,
        "reference": reference,
        "family_confidence": confidence,
        "interval": "bonferroni",
        "adjustment": "holm",
        "power": power,
        "target": target,
        "how_seeds_enter": HOW_SEEDS_ENTER,
        "networks": out,
    }


def _cell(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def pooled_markdown(pooled: Mapping[str, Any], metric: str = "auc") -> str:
    """The pooled report: per network a table of comparisons (interval over generators, Holm's
    decision, detectable difference, variance components), then the designs a target needs."""
    g = pooled["generators"]
    family = pooled["family_confidence"]
    if not any(metric in by_metric for by_metric in pooled["networks"].values()):
        raise DataError(f"pool: no network has per-seed values of '{metric}' in every generator's results")
    lines = [f"# Pooled over {g} generators: {metric}", "", pooled["how_seeds_enter"], ""]
    for network, by_metric in pooled["networks"].items():
        rows = by_metric.get(metric)
        if not rows:
            continue
        m, each = rows[0]["comparisons"], rows[0]["confidence"]
        lines += [
            f"## {network}",
            "",
            f"Intervals: t over generators, Bonferroni over {m} comparison{'s' if m > 1 else ''} "
            f"({each:.1%} each, simultaneous {family:.0%}); * = Holm's test at family-wise {1 - family:.0%} "
            "(the decision; †: Holm rejects although the interval spans 0).",
            "",
            f"| comparison | Δ {metric} per generator | Δ {metric} [CI] | p (Holm) | detectable Δ "
            f"({pooled['power']:.0%} power) | σ² generator | σ² seed | shared |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            spans = r["ci_low"] <= 0 <= r["ci_high"]
            mark = ("*" if r["reject"] else "") + ("†" if r["reject"] and spans else "")
            vc = r["variance_components"]
            between = "0 (estimate < 0)" if vc["truncated"] else _cell(vc["between_generator"], "{:.2e}")
            lines.append(
                f"| {r['condition']} vs {r['reference']} | {', '.join(f'{d:+.3f}' for d in r['per_generator'])} "
                f"| {r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]{mark} | {r['p_holm']:.3g} "
                f"| {r['mde']:.3f} | {between} "
                f"| {_cell(vc['within_generator_seed'], '{:.2e}')} | {r['shared'] or '—'} |"
            )
        target = rows[0].get("target")
        if target is not None:
            seeds = list(rows[0]["generators_needed"])
            lines += [
                "",
                f"Generators needed to detect {target:g} with {pooled['power']:.0%} power at level "
                f"{rows[0]['mde_alpha']:.3g}, by classifier seeds per generator (from the variance "
                "components above, each generator with its own reference runs; estimates from "
                f"{g} generators are rough):",
                "",
                "| comparison | " + " | ".join(f"{n} seeds" for n in seeds) + " |",
                "| --- |" + " --- |" * len(seeds),
            ]
            for r in rows:
                needed = [str(v) if v is not None else "> 200 or unknown" for v in r["generators_needed"].values()]
                lines.append(f"| {r['condition']} vs {r['reference']} | " + " | ".join(needed) + " |")
        lines.append("")
    return "\n".join(lines)
