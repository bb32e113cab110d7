"""The grammar of `evaluate.conditions`, parsed in this one place.

A condition names what a downstream network trains on, then optionally how its training batches
are augmented:

    <data>[+<augment>]
    data:    real | real+stage1 | real+stage2 | real+stage2:<measure> | synthetic
    augment: classic | trivialaugment | randaugment | mixup | cutmix

`real` is the baseline; `real+stage2` (no measure) stands for every measure `disturb.measure`
runs and is expanded by the evaluate stage; `synthetic` trains on stage-1 images alone. The
policies themselves are built in `mgdm_core.evaluation.train.augmentation`. Pure Python (no torch),
so `config.py` can validate names with it.
"""

from __future__ import annotations

from typing import NamedTuple

from mgdm_core.errors import ConfigError

# Training-only augmentation policies (validation and test images are never augmented).
AUGMENTS: tuple[str, ...] = ("classic", "trivialaugment", "randaugment", "mixup", "cutmix")
DATA: tuple[str, ...] = ("real", "real+stage1", "real+stage2", "synthetic")
BASELINE = "real"


class Condition(NamedTuple):
    """One parsed condition: `data` (one of DATA), the stage-2 `measure` (None unless data is
    real+stage2 with a `:<measure>`), the `augment` policy (one of AUGMENTS, or None)."""

    data: str
    measure: str | None = None
    augment: str | None = None

    @property
    def synthetic_set(self) -> str | None:
        """The synthetic set the condition reads: "stage1" (real+stage1, synthetic), "stage2"
        (real+stage2), None for real images only (then nothing generated can change its result)."""
        return {"real+stage1": "stage1", "synthetic": "stage1", "real+stage2": "stage2"}.get(self.data)

    def __str__(self) -> str:
        measure = f":{self.measure}" if self.measure else ""
        augment = f"+{self.augment}" if self.augment else ""
        return f"{self.data}{measure}{augment}"


def parse_condition(condition: str) -> Condition:
    """`real+stage2:entropy+cutmix` -> Condition("real+stage2", "entropy", "cutmix").

    Raises ConfigError naming the valid data parts or augment policies. The measure is checked
    against `disturb.measure` where conditions are expanded, not here.
    """
    head, *rest = condition.split("+")
    if head not in ("real", "synthetic"):
        raise ConfigError(f"unknown condition '{condition}': it must start with real or synthetic "
                          f"(data parts: {', '.join(DATA)})")
    data, measure = head, None
    if head == "real" and rest and rest[0].partition(":")[0] in ("stage1", "stage2"):
        stage, colon, measure = rest.pop(0).partition(":")
        if colon and (stage != "stage2" or not measure):
            raise ConfigError(f"condition '{condition}': a ':<measure>' suffix needs real+stage2 and a measure name")
        data, measure = f"real+{stage}", measure or None
    augment = rest.pop(0) if rest else None
    if augment is not None and augment not in AUGMENTS:
        raise ConfigError(f"condition '{condition}': unknown augmentation '{augment}' "
                          f"(valid: {', '.join(AUGMENTS)})")
    if rest:
        raise ConfigError(f"condition '{condition}': expected <data>[+<augment>] with data one of "
                          f"{', '.join(DATA)} (optionally real+stage2:<measure>) and one augmentation")
    return Condition(data, measure, augment)
