"""Parameters that depend on the data, checked against it before any work starts.

`prepare` checks them against the source it loaded (before writing anything); every other stage
checks them against the prepared data's `classes.json` when it starts (`launch.run_stage`), so a
mismatch is one ConfigError naming the key within seconds, not an error after an hour of training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from mgdm_core.config import Params
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.layout import Layout

MIN_CLASSES = 2


def check_class_counts(class_names: Sequence[str], labels: np.ndarray, where: str) -> None:
    """At least two classes, and every class present in `labels` (a split's labels)."""
    if len(class_names) < MIN_CLASSES:
        raise DataError(
            f"{where}: the data has {len(class_names)} class ({', '.join(class_names) or 'none'}); "
            f"mgdm needs at least {MIN_CLASSES} (guidance and augmentation are per class)"
        )
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, n in zip(class_names, counts) if n == 0]
    if empty:
        raise DataError(f"{where}: no images of class(es) {empty}; every class needs images in every split")


def check_params_against_data(
    params: Params, *, class_names: Sequence[str], image_size: int, channels: int, where: str = "the data"
) -> None:
    """Every data-dependent parameter against the data: lengths per class, class indices, network layouts.

    Raises ConfigError naming the key (`generate.counts`, `data.class_names`, `disturb.class_map`,
    `diffusion.<key>`, `classifier.<key>`).
    """
    from mgdm_core.stages.common import classifier_config, unet_config

    k = len(class_names)
    if params.data.class_names is not None and len(params.data.class_names) != k:
        raise ConfigError(
            f"data.class_names: {len(params.data.class_names)} names given, {where} has {k} classes {list(class_names)}"
        )
    if params.generate.mode == "counts" and len(params.generate.counts) != k:
        raise ConfigError(
            f"generate.counts: {len(params.generate.counts)} numbers given, {where} has {k} classes "
            f"{list(class_names)} (one number per class, or generate.mode: balance)"
        )
    for source, target in params.disturb.class_map.items():
        if not (0 <= source < k and 0 <= target < k):
            raise ConfigError(f"disturb.class_map: {source} -> {target} is outside the classes 0..{k - 1} of {where}")
    unet_config(params, image_size, channels, k)
    classifier_config(params, image_size, channels, k)


def check_stage_inputs(stage: str, params: Params, layout: Layout) -> None:
    """A stage's start: the parameters against the prepared data (prepare checks its source itself).

    Without prepared data there is nothing to check here; the stage itself then says what is missing.
    """
    if stage == "prepare" or not layout.classes_file.is_file():
        return
    try:
        meta = json.loads(layout.classes_file.read_text())
        class_names, size, channels = tuple(meta["class_names"]), int(meta["image_size"]), int(meta["channels"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{layout.classes_file}: unreadable ({exc}); rerun `mgdm prepare`") from None
    where = f"the prepared data ({layout.relative(layout.classes_file)})"
    for key, wanted, found in (("data.image_size", params.data.image_size, size), ("data.channels", params.data.channels, channels)):
        if wanted != found:
            raise ConfigError(f"{key}: {wanted}, but {where} has {found}; rerun `mgdm prepare`")
    check_params_against_data(params, class_names=class_names, image_size=size, channels=channels, where=where)
