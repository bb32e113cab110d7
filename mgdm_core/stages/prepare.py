"""Stage `prepare`: load a data set, validate it, resize/convert it, split it, write it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mgdm_core.config import Params
from mgdm_core.data.loaders import resize_and_convert
from mgdm_core.data.sources import check_class_name, load_source
from mgdm_core.errors import ConfigError
from mgdm_core.io import ensure_writable_dir, save_npz_atomic, tree_digest, write_json_atomic
from mgdm_core.layout import Layout
from mgdm_core.plots import class_grid
from mgdm_core.stages.checks import check_class_counts, check_params_against_data
from mgdm_core.stages.common import SPLITS, dataset_name, log, write_metrics
from mgdm_core.tracking import Tracker

READS = ("seed", "data")


def _resolve(layout: Layout, path: str | None) -> Path | None:
    """Relative data paths are relative to the project root (where dvc.yaml lives)."""
    return None if path is None else (layout.root / path).resolve()


def _class_names(wanted: tuple[str, ...] | None, found: tuple[str, ...]) -> tuple[str, ...]:
    """`data.class_names` renames the source's classes (e.g. MedMNIST's "0", "1"); folder-safe names only."""
    if wanted is None:
        return found
    if len(wanted) != len(found):
        raise ConfigError(f"data.class_names: {len(wanted)} names given, the data has {len(found)} classes {list(found)}")
    for name in wanted:
        check_class_name(name, "data.class_names")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"data.class_names: names must be distinct, got {list(wanted)}")
    return wanted


def input_digests(params: Params, layout: Layout) -> dict[str, dict[str, str | None]]:
    """`data.path`, `data.val_path`, `data.test_path` (those set) -> their path and content hash.

    Recorded in classes.json and as MLflow tags, so prepared data names the input it came from.
    dvc.yaml makes `data/raw` a dependency of prepare: input kept elsewhere is not seen by
    `dvc status` (Prefect's cache key hashes it wherever it is), so say so.
    """
    out: dict[str, dict[str, str | None]] = {}
    for key in ("path", "val_path", "test_path"):
        value = getattr(params.data, key)
        if value is None:
            continue
        resolved = _resolve(layout, value)
        out[f"data.{key}"] = {"path": str(value), "digest": tree_digest(resolved)}
        if not resolved.is_relative_to(layout.raw_data_dir.resolve()):
            log.warning("data.%s %s is outside %s: `dvc status` will not notice when it changes; "
                        "`dvc add` or `dvc import` it into %s (README, \"Your data\")",
                        key, value, layout.relative(layout.raw_data_dir), layout.relative(layout.raw_data_dir))
    return out


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    """Load, check and write the prepared data; a refused source leaves the previous prepared data untouched.

    Everything is checked before anything is written: at least two classes, every class in every
    split, and every data-dependent parameter (`stages.checks`). The splits are written into a
    temporary sibling directory that replaces `data/prepared` only once complete.
    """
    data = params.data
    inputs = input_digests(params, layout)
    splits = load_source(
        data.source,
        path=_resolve(layout, data.path),
        val_path=_resolve(layout, data.val_path),
        test_path=_resolve(layout, data.test_path),
        flag=data.flag,
        phantom_counts=data.phantom_counts,
        image_size=data.image_size,
        channels=data.channels,
        seed=params.seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
    )
    class_names = _class_names(data.class_names, splits.class_names)
    for split in SPLITS:
        check_class_counts(class_names, getattr(splits, split).labels, f"data ({split} split)")
    check_params_against_data(params, class_names=class_names, image_size=data.image_size,
                              channels=data.channels, where=f"the data ({dataset_name(params)})")
    ensure_writable_dir(layout.prepared.parent)
    num_classes = len(class_names)
    metrics: dict[str, float] = {"num_classes": num_classes}
    prepared = {}
    staging = Path(tempfile.mkdtemp(prefix=".prepared-", dir=layout.prepared.parent))
    try:
        for split in SPLITS:
            part = getattr(splits, split)
            images = resize_and_convert(part.images, data.image_size, data.channels)
            labels = part.labels.astype(np.int64)
            save_npz_atomic(staging / layout.split_file(split).name, images=images, labels=labels)
            prepared[split] = (images, labels)
            metrics[f"{split}_images"] = len(labels)
            for k in range(num_classes):
                metrics[f"{split}_class{k}"] = int((labels == k).sum())
        write_json_atomic(
            staging / layout.classes_file.name,
            {
                "class_names": list(class_names),
                "dataset": dataset_name(params),
                "source": splits.source,
                "image_size": data.image_size,
                "channels": data.channels,
                "notes": list(splits.notes),
                "inputs": inputs,
            },
        )
        _swap_in(staging, layout.prepared)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    grid = layout.plot_file("prepare_real_samples.png")
    class_grid(*prepared["train"], class_names, grid, title=f"real training images ({dataset_name(params)})")
    tracker.log_artifact(grid, "samples")
    tracker.set_tags({f"input.{key}": entry["digest"] for key, entry in inputs.items()})
    tracker.log_metrics(metrics)
    write_metrics(layout, "prepare", metrics)
    log.info("prepared %s: %s", dataset_name(params), {k: int(v) for k, v in metrics.items() if k.endswith("images")})
    return metrics


def _swap_in(staging: Path, target: Path) -> None:
    """Replace directory `target` by the complete `staging` (two renames; the old one is removed last)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".prepared-old-", dir=target.parent))
        os.replace(target, old / "prepared")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
