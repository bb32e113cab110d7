"""The headline figures: what `dvc metrics show`, `dvc metrics diff` and `dvc exp show` display.

The detailed `metrics/<stage>.json` files (every class, set, interval and test) stay outputs; DVC
declares as metrics only these small files, one JSON file per row, so `dvc metrics show` prints
one line per row with a handful of columns (it prints one line per file, one column per key):

* `metrics/evaluate/<network>/<condition>.json` (written by `evaluate`): `auc`, `acc` (mean over
  seeds), and for every condition but the baseline `d_auc` with `d_lo`, `d_hi`, the paired
  difference in AUC to `real` and its interval: Bonferroni's, each at 1 - 0.05/m for the m
  conditions compared with `real`, so that a network's intervals hold together at 95% (the level
  is in metrics/evaluate.json's `confidence` / `family_confidence`);
* `metrics/quality/<set>.json` (written by `quality`) for `real`, `stage1` and `stage2-<measure>`:
  `fd_ratio` (Fréchet distance over the real-validation floor) and `fidelity` (class fidelity:
  the reference classifier's AUC against the intended labels; for `real`, on the real test set);
  keys the quality summary lacks are left out.

A condition's `:` becomes `-` in its file name (`real+stage2-entropy.json`). Each writer replaces
its whole folder, so a condition or set no longer run leaves no row behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgdm_core.io import write_json_atomic

DECIMALS = 3  # BreastMNIST's 156 test images: one image is 0.0064 of accuracy


def _number(value: Any) -> float | None:
    return round(float(value), DECIMALS) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _row(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ((k, _number(v)) for k, v in values.items()) if v is not None}


def file_name(name: str) -> str:
    return name.replace(":", "-") + ".json"


def evaluate_rows(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"<network>/<condition>.json": {auc, acc[, d_auc, d_lo, d_hi]}} from metrics/evaluate.json's summary."""
    rows = {}
    for network, conditions in summary["networks"].items():
        for condition, entry in conditions.items():
            metrics = entry.get("metrics", {})
            diff = (entry.get("vs_baseline") or {}).get("auc") or {}
            rows[f"{network}/{file_name(condition)}"] = _row({
                "auc": (metrics.get("auc") or {}).get("mean"), "acc": (metrics.get("accuracy") or {}).get("mean"),
                "d_auc": diff.get("delta"), "d_lo": diff.get("ci_low"), "d_hi": diff.get("ci_high"),
            })
    return rows


# Two columns, so a row of every kind fits 120 columns; CAS, KID and the rest stay in quality.json.
_QUALITY_KEYS = {"fd_ratio": "fd_ratio", "fidelity": "fidelity_auc"}


def quality_rows(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"<set>.json": {fd_ratio, fidelity}} from metrics/quality.json's headline keys
    (`real`, `stage1`, `stage2.<measure>`); sets without any of them get no row."""
    sets = {"real": summary.get("real"), "stage1": summary.get("stage1"),
            **{f"stage2-{m}": entry for m, entry in (summary.get("stage2") or {}).items()}}
    rows = {}
    for name, entry in sets.items():
        row = _row({ours: (entry or {}).get(theirs) for ours, theirs in _QUALITY_KEYS.items()})
        if row:
            rows[file_name(name)] = row
    return rows


def write_rows(directory: Path, rows: Mapping[str, Mapping[str, float]]) -> list[Path]:
    """Replace `directory` by one JSON file per row; returns the files written."""
    if directory.exists():
        shutil.rmtree(directory)
    written = []
    for relative, row in rows.items():
        path = directory / relative
        write_json_atomic(path, dict(row))
        written.append(path)
    return written
