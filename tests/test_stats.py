"""Intervals that mean what they say (simultaneous Bonferroni intervals, Holm decisions, detectable
differences from the noncentral t) and the two-level analysis over several generators."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import nct, norm
from scipy.stats import t as t_dist

from mgdm_core import cli
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation import generators as gen
from mgdm_core.evaluation.report import verdict_sentence
from mgdm_core.evaluation.stats import (
    bonferroni_confidence,
    bootstrap_difference,
    detectable_difference,
    holm,
    paired_difference,
)
from mgdm_core.stages.evaluate import _interval_records, _verdict

N_SEEDS = 5


def _exact_power(delta: float, se: float, alpha: float, dof: int) -> float:
    crit = t_dist.ppf(1 - alpha / 2, dof)
    return float(nct.sf(crit, dof, delta / se) + nct.sf(crit, dof, -delta / se))


def _simulated_power(delta: float, alpha: float, rng: np.random.Generator, runs: int = 200_000) -> float:
    """Share of two-sided paired t-tests on N_SEEDS unit-variance differences with mean delta
    that reject at level alpha."""
    d = rng.normal(delta, 1.0, size=(runs, N_SEEDS))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / np.sqrt(N_SEEDS))
    return float(np.mean(np.abs(t) > t_dist.ppf(1 - alpha / 2, N_SEEDS - 1)))


@pytest.mark.parametrize("comparisons", [1, 2, 4, 6])
def test_detectable_difference_has_80_percent_power_at_the_levels_the_report_uses(comparisons: int) -> None:
    alpha, se = 0.05 / comparisons, 1 / np.sqrt(N_SEEDS)
    mde = detectable_difference(se, alpha, 0.8, dof=N_SEEDS - 1)
    rng = np.random.default_rng(comparisons)
    assert _exact_power(mde, se, alpha, N_SEEDS - 1) == pytest.approx(0.8, abs=1e-6)
    # Monte-Carlo of the test itself: 200,000 runs give a standard error of 0.0009
    assert _simulated_power(mde, alpha, rng) == pytest.approx(0.8, abs=0.005)
    # the textbook (t(1 - alpha/2) + t(power)) se falls short, the more so the more comparisons
    textbook = (t_dist.ppf(1 - alpha / 2, N_SEEDS - 1) + t_dist.ppf(0.8, N_SEEDS - 1)) * se
    assert _exact_power(textbook, se, alpha, N_SEEDS - 1) < 0.8
    assert _simulated_power(textbook, alpha, rng) < 0.8 - 0.005


def test_detectable_difference_of_the_bootstrap_uses_normal_quantiles() -> None:
    mde = detectable_difference(0.01, alpha=0.05 / 3, power=0.8)
    z = norm.ppf(1 - 0.05 / 6)
    assert norm.sf(z - mde / 0.01) + norm.cdf(-z - mde / 0.01) == pytest.approx(0.8, abs=1e-9)
    assert detectable_difference(0.0) == 0.0
    with pytest.raises(ConfigError):
        detectable_difference(1.0, alpha=0.05, power=0.01)  # power below alpha: no such difference


def test_bonferroni_intervals_cover_all_true_differences_together() -> None:
    """Six conditions against one baseline, 5 paired seeds each, every true difference 0.03: the
    six intervals at `bonferroni_confidence(6)` cover all six in >= 95% of 20,000 simulated
    families (standard error 0.0015); six plain 95% intervals cover all six in about 0.95^6 = 74%."""
    rng = np.random.default_rng(0)
    each = bonferroni_confidence(6)
    assert each == pytest.approx(1 - 0.05 / 6)
    noise = rng.normal(0, 0.02, size=(20_000, 6, N_SEEDS))
    # paired_difference's interval is the textbook paired t-interval (checked on one family) ...
    baseline = {s: 0.8 for s in range(N_SEEDS)}
    first = paired_difference({s: 0.83 + e for s, e in enumerate(noise[0, 0])}, baseline, each)
    mean, se = 0.03 + noise.mean(axis=2), noise.std(axis=2, ddof=1) / np.sqrt(N_SEEDS)
    half = t_dist.ppf(1 - 0.05 / 12, N_SEEDS - 1) * se
    assert (first["ci_low"], first["ci_high"]) == pytest.approx((mean[0, 0] - half[0, 0], mean[0, 0] + half[0, 0]))
    # ... so the share of families it covers entirely is:
    def covered_together(half_width: np.ndarray) -> float:
        return float(np.mean(np.all(np.abs(mean - 0.03) <= half_width, axis=1)))

    assert covered_together(half) >= 0.95 - 0.003
    assert covered_together(t_dist.ppf(0.975, N_SEEDS - 1) * se) < 0.78


def test_bonferroni_confidence_needs_a_comparison() -> None:
    assert bonferroni_confidence(1) == 0.95
    with pytest.raises(ConfigError):
        bonferroni_confidence(0)


def test_comparisons_state_the_level_power_and_variance_they_cover() -> None:
    base = {s: 0.8 for s in range(5)}
    d = paired_difference({s: 0.81 + 0.01 * (-1) ** s for s in range(5)}, base, confidence=1 - 0.05 / 4)
    assert d["mde_alpha"] == pytest.approx(0.05 / 4) and d["mde_power"] == 0.8
    assert "seeds" in d["variance_covered"]
    y = np.array([0, 1] * 30)
    probs = np.stack([1 - y * 0.6 - 0.2, y * 0.6 + 0.2], axis=1)
    boot = bootstrap_difference(y, [probs], [probs[::-1] * 0 + 0.5], "auc", n_boot=50)
    assert "leaves the seeds' variance out" in boot["variance_covered"]
    assert boot["mde_alpha"] == pytest.approx(0.05)


def _family_diff(reject: bool, low: float, high: float) -> dict:
    return {"delta": (low + high) / 2, "ci_low": low, "ci_high": high, "method": "t_over_seeds", "n": 5,
            "confidence": 1 - 0.05 / 2, "family_confidence": 0.95, "interval": "bonferroni", "p_value": 0.02,
            "p_holm": 0.04 if reject else 0.3, "reject": reject, "comparisons": 2, "adjustment": "holm",
            "mde": 0.05, "mde_power": 0.8, "mde_alpha": 0.025}


def test_a_holm_rejection_inside_an_interval_that_spans_zero_is_marked_not_hidden() -> None:
    stats = {"mean": 0.9, "std": 0.01, "n": 5}
    def entry(diff: dict | None) -> dict:
        return {"seeds": list(range(5)), "metrics": {"auc": stats}, "vs_baseline": diff and {"auc": diff}}

    # a: Holm rejects (p_holm 0.04) although its 97.5% interval reaches -0.001; b: a plain null
    conditions = {"real": entry(None), "a": entry(_family_diff(True, -0.001, 0.041)),
                  "b": entry(_family_diff(False, -0.03, 0.02))}
    sentence = verdict_sentence("simple_cnn", conditions, "real")
    assert "better than real: a +0.020 [-0.001, +0.041]†" in sentence
    assert "simultaneous 95% intervals (Bonferroni, each 97.5%)" in sentence
    assert "verdicts: Holm's test over 2 comparisons at family-wise 5%" in sentence
    mlflow_verdict = _verdict(conditions["a"]["vs_baseline"], False)
    assert mlflow_verdict.startswith("better than baseline (Holm over 2") and "still spans 0" in mlflow_verdict
    params, metrics, tags = _interval_records(conditions["a"]["vs_baseline"]["auc"])
    assert params["interval"] == "bonferroni" and params["family_confidence"] == 0.95
    assert metrics["interval_confidence"] == pytest.approx(0.975)
    assert tags["interval"] == "simultaneous 95% over 2 (bonferroni), each 97.5%"


# ---------------------------------------------------------------- several generators


def _two_level(rng, generators: int, seeds: int, effect: float, sd_generator: float, sd_seed: float,
               shared_reference: bool = False) -> list[dict]:
    """Per generator: condition -> seed -> AUC, with the generator's effect drawn around `effect`."""
    shared = {s: 0.85 + rng.normal(0, sd_seed) for s in range(seeds)}
    runs = []
    for _ in range(generators):
        own = rng.normal(effect, sd_generator)
        reference = shared if shared_reference else {s: 0.85 + rng.normal(0, sd_seed) for s in range(seeds)}
        runs.append({"real": reference, "real+stage1": {s: 0.85 + own + rng.normal(0, sd_seed) for s in range(seeds)}})
    return runs


@pytest.mark.parametrize("sd_generator, shared_reference, studies", [(0.01, False, 1000), (0.0, False, 1000),
                                                                   (0.01, True, 500)])
def test_interval_over_generators_covers_the_true_effect_at_its_stated_level(sd_generator, shared_reference,
                                                                             studies) -> None:
    """Simulated studies of 4 generators x 5 seeds: the 95% interval covers the true effect in 95%
    of them (standard error 0.007 for 1,000 studies, 0.01 for 500), also without generator
    variance and with one `real` shared by all generators (the shared seed mean's variance added
    to the standard error; fewer studies, each solves its own Welch-Satterthwaite df)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(studies):
        row = gen.pool_family(_two_level(rng, 4, 5, 0.02, sd_generator, 0.015, shared_reference),
                              [("real+stage1", "real")])[0]
        hits += row["ci_low"] <= 0.02 <= row["ci_high"]
        # G - 1 df; with a shared reference Welch-Satterthwaite's, more than G - 1
        assert row["df"] > 3 if shared_reference else row["df"] == pytest.approx(3)
    assert hits / studies == pytest.approx(0.95, abs=0.025)
    assert row["shared"] == ("reference" if shared_reference else None)


def test_variance_components_closed_form() -> None:
    # group means 2 and 6 (grand 4): MS_between = 2 * (4 + 4) / 1 = 16; MS_within = 4 / 2 = 2;
    # sigma2_generator = (16 - 2) / 2 = 7, sigma2_seed = 2
    vc = gen.variance_components([np.array([1.0, 3.0]), np.array([5.0, 7.0])])
    assert vc["between_generator"] == pytest.approx(7.0) and vc["within_generator_seed"] == pytest.approx(2.0)
    assert vc["seeds_per_generator"] == pytest.approx(2.0) and not vc["truncated"]
    # equal generator means: no generator variance at all (the moment estimate -1 is cut to 0)
    flat = gen.variance_components([np.array([1.0, 3.0]), np.array([3.0, 1.0])])
    assert flat["between_generator"] == 0.0 and flat["truncated"]


def test_pool_family_closed_form_and_holm_over_the_family() -> None:
    runs = [
        {"real": {0: 0.80, 1: 0.82}, "a": {0: 0.83, 1: 0.85}, "b": {0: 0.80, 1: 0.83}},
        {"real": {0: 0.81, 1: 0.79}, "a": {0: 0.86, 1: 0.84}, "b": {0: 0.80, 1: 0.79}},
    ]
    a, b = gen.pool_family(runs, [("a", "real"), ("b", "real")])
    assert a["per_generator"] == pytest.approx([0.03, 0.05]) and a["delta"] == pytest.approx(0.04)
    half = t_dist.ppf(1 - 0.05 / 4, 1) * np.std([0.03, 0.05], ddof=1) / np.sqrt(2)
    assert a["ci_high"] - a["delta"] == pytest.approx(half)
    assert a["confidence"] == pytest.approx(0.975) and a["family_confidence"] == 0.95 and a["comparisons"] == 2
    decided = holm([a["p_value"], b["p_value"]])
    assert [a["p_holm"], b["p_holm"]] == pytest.approx(decided["p_adjusted"])
    assert [a["reject"], b["reject"]] == decided["reject"]
    assert a["mde"] == pytest.approx(detectable_difference(a["se"], 0.05 / 2, 0.8, dof=1))
    assert "seed-averaged" in a["how_seeds_enter"] and a["seeds"] == [2, 2]


def test_design_table_shrinks_with_generators_and_seeds() -> None:
    vc = {"between_generator": 0.0, "within_generator_seed": 0.02**2}
    # no generator variance: 4 generators x 5 seeds behave as 20 seeds, with 3 df
    assert gen.design_detectable(vc, 4, 5) == pytest.approx(detectable_difference(0.02 / np.sqrt(20), 0.05, 0.8, dof=3))
    vc = {"between_generator": 0.01**2, "within_generator_seed": 0.02**2}
    needed = {n: gen.generators_needed(vc, 0.01, n) for n in (1, 5, 10)}
    assert needed[1] >= needed[5] >= needed[10] >= 2
    g = needed[5]
    assert gen.design_detectable(vc, g, 5) <= 0.01 < gen.design_detectable(vc, g - 1, 5)
    assert gen.design_detectable({"between_generator": 0.0, "within_generator_seed": None}, 4, 5) is None


def test_the_same_results_twice_or_two_shared_conditions_are_refused() -> None:
    same = {"real": {0: 0.8, 1: 0.81}, "a": {0: 0.82, 1: 0.84}}
    with pytest.raises(ConfigError, match="the same results passed twice"):
        gen.pool_family([same, same], [("a", "real")])
    shifted = {c: {s: v - 0.1 for s, v in seeds.items()} for c, seeds in same.items()}
    with pytest.raises(DataError, match="same difference"):  # no spread between generators at all
        gen.pool_family([same, shifted], [("a", "real")])
    with pytest.raises(ConfigError, match="no generator is involved"):  # both sides from the shared runs
        gen.pool_family([{"x": {0: 1.0}}, {"x": {0: 0.9}}], [("a", "real")], shared=same)


def test_compare_splits_condition_names_that_hold_colons() -> None:
    known = ["real", "real+stage1", "real+stage2:entropy"]
    assert gen.parse_comparison("real+stage2:entropy:real+stage1", known) == ("real+stage2:entropy", "real+stage1")
    with pytest.raises(ConfigError, match="--compare"):
        gen.parse_comparison("real+stage2:margin:real", known)


def _evaluate_json(path, runs: dict[str, dict[int, float]]) -> None:
    """The parts of metrics/evaluate.json that pooling reads."""
    conditions = {c: {"seeds": sorted(v), "per_seed": {"auc": [v[s] for s in sorted(v)]}} for c, v in runs.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"baseline": "real", "networks": {"simple_cnn": conditions}}))


def test_mgdm_pool_writes_a_report_and_json_from_evaluate_files(tmp_path, capsys) -> None:
    rng = np.random.default_rng(2)
    runs = _two_level(rng, 3, 5, 0.02, 0.005, 0.01, shared_reference=True)  # real: bit-identical in every file
    for i, r in enumerate(runs):
        _evaluate_json(tmp_path / f"gen{i}" / "metrics" / "evaluate.json", r)
    _evaluate_json(tmp_path / "shared.json", {"real": runs[0]["real"], "real+classic": {s: 0.86 for s in range(5)}})
    out = tmp_path / "reports" / "pooled.md"
    sources = [str(tmp_path / f"gen{i}") for i in range(3)]
    assert cli.main(["pool", *sources, "--shared", str(tmp_path / "shared.json"), "--metric", "auc",
                     "--out", str(out)]) == 0
    pooled = json.loads(out.with_suffix(".json").read_text())
    rows = pooled["networks"]["simple_cnn"]["auc"]
    # real+classic vs real involves no generator: only stage 1 is compared
    assert [(r["condition"], r["reference"]) for r in rows] == [("real+stage1", "real")]
    assert rows[0]["shared"] == "reference" and len(rows[0]["per_generator"]) == 3
    assert set(rows[0]["generators_needed"]) == {"1", "3", "5", "10"}
    report = out.read_text()
    assert report.startswith("# Pooled over 3 generators: auc") and "| real+stage1 vs real |" in report
    assert "Generators needed to detect 0.01" in report
    # an evaluate.json written before per-seed values were stored cannot be pooled
    (tmp_path / "old.json").write_text(json.dumps({"networks": {"simple_cnn": {"real": {"seeds": [0]}}}}))
    assert cli.main(["pool", str(tmp_path / "old.json"), sources[0], "--out", str(out)]) == 2
    assert "per-seed values" in capsys.readouterr().err
