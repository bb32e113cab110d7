"""The headline rows DVC shows: one small file per condition and per synthetic set."""

import json
from pathlib import Path

from mgdm_core.headline import evaluate_rows, quality_rows, write_rows


def _condition(auc: float, acc: float, diff: dict | None) -> dict:
    return {"seeds": [0, 1], "metrics": {"auc": {"mean": auc, "std": 0.01, "n": 2},
                                          "accuracy": {"mean": acc, "std": 0.02, "n": 2},
                                          "f1_macro": {"mean": 0.5, "std": 0.1, "n": 2}},
            "vs_baseline": diff}


SUMMARY = {"baseline": "real", "networks": {"resnet18": {
    "real": _condition(0.82843, 0.8375, None),
    "real+stage2:entropy": _condition(0.86, 0.85, {"auc": {"delta": 0.03157, "ci_low": -0.0204, "ci_high": 0.0811,
                                                          "method": "bootstrap_test_images", "n": 156},
                                                  "accuracy": {"delta": 0.01, "ci_low": -0.02, "ci_high": 0.04}}),
}}}


def test_evaluate_rows_hold_auc_acc_and_the_paired_difference_with_its_interval() -> None:
    rows = evaluate_rows(SUMMARY)
    assert rows == {
        "resnet18/real.json": {"auc": 0.828, "acc": 0.838},
        "resnet18/real+stage2-entropy.json": {"auc": 0.86, "acc": 0.85, "d_auc": 0.032, "d_lo": -0.02, "d_hi": 0.081},
    }


def test_quality_rows_take_the_keys_that_exist_and_skip_the_rest() -> None:
    summary = {"real": {"fidelity_auc": 0.93, "cas_auc": 0.9, "fd_floor": 1.5},
               "stage1": {"fd_ratio": 3.21, "fidelity_auc": 0.91, "kid": 0.1},
               "stage2": {"entropy": {"fd_ratio": 4.0, "fidelity_auc": None}, "margin": {"kid": 0.2}}}
    assert quality_rows(summary) == {"real.json": {"fidelity": 0.93},
                                     "stage1.json": {"fd_ratio": 3.21, "fidelity": 0.91},
                                     "stage2-entropy.json": {"fd_ratio": 4.0}}
    assert quality_rows({}) == {}


def test_write_rows_replaces_the_folder_so_dropped_rows_disappear(tmp_path: Path) -> None:
    folder = tmp_path / "metrics" / "evaluate"
    write_rows(folder, {"resnet18/real.json": {"auc": 0.8}, "resnet18/real+classic.json": {"auc": 0.9}})
    write_rows(folder, {"resnet18/real.json": {"auc": 0.7}})
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.json")) == ["resnet18/real.json"]
    assert json.loads((folder / "resnet18" / "real.json").read_text()) == {"auc": 0.7}
