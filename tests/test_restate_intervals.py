"""scripts/restate_intervals.py: a stored Holm step-down t interval restated as a Bonferroni one."""

import importlib.util
import math
from pathlib import Path

import numpy as np
from scipy.stats import ttest_rel

from mgdm_core.evaluation.stats import detectable_difference

_spec = importlib.util.spec_from_file_location(
    "restate_intervals", Path(__file__).resolve().parents[1] / "scripts" / "restate_intervals.py")
restate_intervals = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(restate_intervals)


def _stored_row(cond: np.ndarray, base: np.ndarray, confidence: float, m: int) -> dict:
    ci = ttest_rel(cond, base).confidence_interval(confidence)
    return {"delta": float((cond - base).mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "n": len(cond), "method": "t_over_seeds", "confidence": confidence, "comparisons": m,
            "reject": False, "p_holm": 0.5, "mde": 0.0}


def test_the_restated_interval_is_the_bonferroni_t_interval_of_the_same_seeds() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0.90, 0.01, 5)
    cond = base + rng.normal(0.005, 0.01, 5)
    evaluate = {"networks": {"net": {"real": {}, "real+stage1": {"vs_baseline": {"auc": _stored_row(cond, base, 0.9875, 6)}}}}}
    (row,) = restate_intervals.restate(evaluate)
    direct = ttest_rel(cond, base).confidence_interval(1 - 0.05 / 6)
    assert math.isclose(row["low"], direct.low, abs_tol=1e-12) and math.isclose(row["high"], direct.high, abs_tol=1e-12)
    assert math.isclose(row["level"], 1 - 0.05 / 6)
    se = (cond - base).std(ddof=1) / math.sqrt(5)
    assert math.isclose(row["detectable"], detectable_difference(se, 0.05 / 6, 0.8, 4), rel_tol=1e-9)


def test_seeds_needed_is_the_first_design_that_reaches_the_target() -> None:
    n = restate_intervals.seeds_needed(0.02, 0.05 / 3, 0.01)
    assert n is not None and n > 2
    assert detectable_difference(0.02 / math.sqrt(n), 0.05 / 3, 0.8, n - 1) <= 0.01
    assert detectable_difference(0.02 / math.sqrt(n - 1), 0.05 / 3, 0.8, n - 2) > 0.01
    assert restate_intervals.seeds_needed(0.02, 0.05, 0.01) < n  # a looser level needs fewer seeds


def test_the_section_replaces_itself_on_the_page(tmp_path: Path) -> None:
    rows = [{"network": "net", "condition": "real+stage1", "family": "against real", "method": "bootstrap_test_images",
             "delta": 0.01, "m": 1, "n": 156, "reject": None, "p_holm": None}]
    text = restate_intervals.markdown(rows, "auc", 0.01, "x.json")
    assert "bootstrap_test_images: not restated" in text
    page = "# Results\n\n| table |\n\n## Notes on this run\n\n- a note\n"
    once = restate_intervals.with_section(page, text)
    assert once.index(restate_intervals.BEGIN) < once.index("## Notes on this run")
    assert restate_intervals.with_section(once, text) == once
    newer = text.replace("x.json", "y.json")
    assert restate_intervals.with_section(once, newer).count(restate_intervals.BEGIN) == 1
    assert "y.json" in restate_intervals.with_section(once, newer)
