"""Restate a stored evaluate.json's t intervals as Bonferroni intervals, with noncentral-t
detectable differences, and write the section into a results page.

    python scripts/restate_intervals.py docs/results/breastmnist/metrics/evaluate.json \
        --page docs/results/breastmnist.md

Metrics written before evaluate's Bonferroni intervals hold Holm step-down intervals (each at
alpha / (m - i + 1)), which do not hold together at 95%, and a detectable difference with about
75% power. Such files keep no per-seed values, but a `t_over_seeds` row's interval fixes its
standard error exactly: se = half-width / t(1 - (1 - confidence) / 2, n - 1). From it this script
computes, for every family (per network, the conditions compared with one reference):

* the Bonferroni interval at 1 - 0.05/m (all m together at 95%), beside Holm's decision;
* the difference the comparison detects with 80% power at that level (noncentral t);
* for a null comparison, how many classifier seeds (one generator) the same per-seed spread would
  need to detect a `--target` difference at that level.

Bootstrap rows (fewer than 5 seeds) are listed without a restatement: their replicates were not
kept. The section replaces the one between the markers on the page, or is appended.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy.stats import t as t_dist

from mgdm_core.evaluation.stats import CONFIDENCE, POWER, bonferroni_confidence, detectable_difference

BEGIN = "<!-- restate_intervals: begin -->"
END = "<!-- restate_intervals: end -->"
FAMILIES = {"vs_baseline": "against real", "vs_stage1": "against real+stage1"}


def seeds_needed(spread: float, alpha: float, target: float, power: float = POWER, most: int = 500) -> int | None:
    """Smallest number of paired seeds n whose t test at `alpha` detects `target` with `power`,
    for per-seed differences of standard deviation `spread` (None beyond `most`)."""
    for n in range(2, most + 1):
        if detectable_difference(spread / math.sqrt(n), alpha, power, n - 1) <= target:
            return n
    return None


def restate(evaluate: dict, metric: str = "auc", target: float = 0.01) -> list[dict]:
    rows = []
    for network, conditions in evaluate["networks"].items():
        for condition, entry in conditions.items():
            for family, label in FAMILIES.items():
                diff = (entry.get(family) or {}).get(metric)
                if not diff or diff.get("delta") is None:
                    continue
                row = {"network": network, "condition": condition, "family": label, "method": diff["method"],
                       "delta": diff["delta"], "m": diff.get("comparisons", 1), "n": diff["n"],
                       "reject": diff.get("reject"), "p_holm": diff.get("p_holm")}
                if diff["method"] == "t_over_seeds":
                    n, m = diff["n"], row["m"]
                    half = (diff["ci_high"] - diff["ci_low"]) / 2
                    se = half / t_dist.ppf(1 - (1 - diff["confidence"]) / 2, n - 1)
                    level = bonferroni_confidence(m, CONFIDENCE)
                    bonf = t_dist.ppf(1 - (1 - level) / 2, n - 1) * se
                    alpha = 1 - level
                    row |= {"stored_low": diff["ci_low"], "stored_high": diff["ci_high"],
                            "stored_confidence": diff["confidence"], "level": level,
                            "low": diff["delta"] - bonf, "high": diff["delta"] + bonf,
                            "detectable": detectable_difference(se, alpha, POWER, n - 1),
                            "stored_detectable": diff.get("mde"),
                            "seeds_for_target": None if diff.get("reject") else
                            seeds_needed(se * math.sqrt(n), alpha, target)}
                rows.append(row)
    return rows


def markdown(rows: list[dict], metric: str, target: float, source: str) -> str:
    lines = [BEGIN, "", "## Intervals restated: simultaneous 95 % (Bonferroni) and 80 % power", "",
             "**Read this before the table above:** its \"95%\" labels and its detectable differences were "
             "written by the code of the time and are not what they say; the verdicts (Holm's decisions) stand.", "",
             f"Computed by `scripts/restate_intervals.py` from `{source}`. The table above shows the intervals "
             "this run stored: Holm's step-down intervals, each at alpha/(m-i+1) (98.3-99.2 % each), which do not "
             "hold together at 95 %, and a detectable difference from (t(1-alpha/2) + t(0.8)) se, which has about "
             "75 % power. Each t interval's standard error follows exactly from its stored bounds, so here are the "
             f"Bonferroni intervals (each at 1 - 0.05/m, all m of a family together at 95 %), Holm's decision "
             f"(family-wise 5 %), the difference each comparison detects with 80 % power at the Bonferroni level "
             f"(noncentral t, {metric.upper()}), and for null comparisons the classifier seeds the same per-seed "
             f"spread would need to detect {target} (one generator).", "",
             "Conditional on: one trained generator (one diffusion model, one guidance classifier, one stage-1 set, "
             "one stage-2 set per measure) and these test images. The t interval over classifier seeds (same "
             "initialisation seed per pair; batch order differs because the training sets differ) sees none of "
             "the generator's variance: more seeds of one generator make a verdict about that generator, more "
             "generators (`mgdm pool`) one about the recipe.", "",
             f"| network | condition | compared | Δ {metric.upper()} | stored interval (level) | "
             "Bonferroni interval (level) | Holm | detectable, 80 % power (stored) | seeds for "
             f"{target} |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "level" not in r:
            lines.append(f"| {r['network']} | {r['condition']} | {r['family']} | {r['delta']:+.3f} | "
                         f"{r['method']}: not restated | | | | |")
            continue
        holm = "rejects" if r["reject"] else "keeps" if r["reject"] is not None else "—"
        seeds = "—" if r["reject"] else (str(r["seeds_for_target"]) if r["seeds_for_target"] else "> 500")
        stored_mde = f" ({r['stored_detectable']:.3f})" if r.get("stored_detectable") is not None else ""
        lines.append(
            f"| {r['network']} | {r['condition']} | {r['family']} | {r['delta']:+.3f} | "
            f"[{r['stored_low']:+.3f}, {r['stored_high']:+.3f}] ({100 * r['stored_confidence']:.2f} %) | "
            f"[{r['low']:+.3f}, {r['high']:+.3f}] ({100 * r['level']:.2f} %, m = {r['m']}) | {holm} | "
            f"{r['detectable']:.3f}{stored_mde} | {seeds} |")
    lines += ["", "Seeds for the target assume the per-seed spread this run measured (from only its few seeds) "
              "and one generator; the spread between generators is unknown until several are trained.", "", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evaluate_json", type=Path)
    parser.add_argument("--page", type=Path, help="results page to write the section into (else print it)")
    parser.add_argument("--metric", default="auc")
    parser.add_argument("--target", type=float, default=0.01)
    args = parser.parse_args()
    evaluate = json.loads(args.evaluate_json.read_text())
    text = markdown(restate(evaluate, args.metric, args.target), args.metric, args.target, str(args.evaluate_json))
    if args.page is None:
        print(text)
        return
    args.page.write_text(with_section(args.page.read_text(), text))


def with_section(page: str, section: str) -> str:
    """The page with `section` in place of the one between the markers, else inserted right under
    the table it restates (before "## Notes on this run"), else appended."""
    if BEGIN in page and END in page:
        return page[: page.index(BEGIN)] + section + page[page.index(END) + len(END) + 1:]
    marker = "\n## Notes on this run"
    return page.replace(marker, "\n" + section + marker, 1) if marker in page else page + "\n" + section


if __name__ == "__main__":
    main()
