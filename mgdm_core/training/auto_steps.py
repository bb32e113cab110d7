"""`train_diffusion.steps: auto`: when to stop training, from the judged curve of EMA snapshots.

Pure: a curve is a list of judged snapshots `{"step", "fd_ratio", "fd", "fidelity_auc", ...}` in
training order (`quality.by_step.judge_sample` makes them); `decide` reads it and never trains or
samples, so the rule is testable with a scripted curve.

The rule. A snapshot is *faithful* when its class fidelity AUC (the reference classifier, trained
on real images only, on the snapshot's unguided sample against the intended labels) is at least
the real test images' AUC minus `fidelity_tolerance`. The *distance* is FD / floor (FD itself when
the floor is undefined). Training stops as soon as some snapshot is faithful and the distance has
not improved, i.e. dropped below `(1 - min_improvement)` times the best so far, for `patience`
snapshots in a row, or, with `rise_stop`, as soon as some snapshot is faithful and the latest
distance is at least `rise_stop` times the best so far (a clear rise, not a flat stretch that a noisy
estimate may hide: the patience is for that). The model kept is the faithful snapshot of the lowest
distance (the lowest of all when none is faithful: training then ran to `max_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StopRule:
    patience: int  # snapshots in a row without an improvement of the distance
    min_improvement: float  # relative drop of the best distance that counts as an improvement
    fidelity_tolerance: float  # fidelity AUC this far below the real test images' still counts
    rise_stop: float | None = None  # stop at once when the latest distance is this many times the best

    def describe(self, real_auc: float | None) -> str:
        target = "undefined" if real_auc is None else f"{real_auc - self.fidelity_tolerance:.4f}"
        rise = "" if self.rise_stop is None else f", or the latest FD / floor is at least {self.rise_stop:g}x its best"
        return (f"stop when a snapshot's fidelity AUC >= real test AUC - {self.fidelity_tolerance:g} ({target}) and "
                f"FD / floor has not dropped by {self.min_improvement:.0%} of its best for {self.patience} snapshot(s) in "
                f"a row{rise}; keep the faithful snapshot of the lowest FD / floor")


@dataclass(frozen=True)
class Decision:
    stop: bool
    chosen_step: int | None  # the snapshot to keep (None: nothing judged yet)
    stale: int  # snapshots since the distance last improved
    reason: str


def distance(row: dict[str, Any]) -> float | None:
    """FD / floor, or FD when the floor is undefined (the same floor for every snapshot of a run)."""
    return row.get("fd_ratio") if row.get("fd_ratio") is not None else row.get("fd")


def is_faithful(row: dict[str, Any], real_auc: float | None, tolerance: float) -> bool:
    auc = row.get("fidelity_auc")
    return auc is not None and real_auc is not None and auc >= real_auc - tolerance


def decide(curve: Sequence[dict[str, Any]], real_auc: float | None, rule: StopRule) -> Decision:
    """Whether to stop after the last snapshot of `curve`, and which snapshot to keep."""
    if not curve:
        return Decision(False, None, 0, "nothing judged yet")
    best, stale = None, 0
    for row in curve:
        d = distance(row)
        if d is not None and (best is None or d < best * (1.0 - rule.min_improvement)):
            best, stale = d, 0
        else:
            stale += 1
    faithful = [r for r in curve if is_faithful(r, real_auc, rule.fidelity_tolerance)]
    pool = [r for r in (faithful or curve) if distance(r) is not None] or list(curve)
    chosen = min(pool, key=lambda r: (distance(r) if distance(r) is not None else float("inf"), r["step"]))["step"]
    if faithful and stale >= rule.patience:
        return Decision(True, chosen, stale, f"fidelity reached and FD / floor flat for {stale} snapshot(s)")
    latest = distance(curve[-1])
    if faithful and rule.rise_stop is not None and latest is not None and best is not None and latest >= rule.rise_stop * best:
        return Decision(True, chosen, stale, f"fidelity reached and FD / floor rose to {latest / best:.2f}x its best")
    waiting = "no snapshot faithful yet" if not faithful else f"FD / floor improved {stale} snapshot(s) ago"
    return Decision(False, chosen, stale, waiting)
