"""Stage `evaluate`: downstream networks on real vs real+synthetic data, with paired statistics.

The grid is (network, condition, seed) units, each independent: `plan` lists them, `run_unit`
trains and tests one (and logs its own nested MLflow run), `summarise` turns the results into
`metrics/evaluate.json`, the report and the plots. `run` does all three in this process; the
Prefect flow fans `run_unit` out through its task runner instead.

Conditions: `real` (baseline), `real+classic` (flips and small affine), `real+stage1`,
`real+stage2:<measure>` (`real+stage2` expands to every measure `disturb` wrote), and
`synthetic` (stage-1 images only: train on synthetic, test on real).
"""

from __future__ import annotations

import csv
import io as _io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mgdm_core.config import Params
from mgdm_core.device import resolve_device
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.report import build_summary, markdown_table, plot_rows, plot_summary
from mgdm_core.evaluation.train import EvalData, train_and_test
from mgdm_core.io import atomic_write, ensure_writable_dir, read_image, read_manifest
from mgdm_core.layout import Layout
from mgdm_core.stages.common import Prepared, load_prepared, log, write_metrics
from mgdm_core.tracking import Tracker, attach

READS = ("seed", "device", "evaluate")


@dataclass(frozen=True)
class Unit:
    network: str
    condition: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.network} | {self.condition} | seed {self.seed}"


def stage2_measures(layout: Layout) -> list[str]:
    if not layout.stage2_dir.is_dir():
        return []
    return sorted(p.parent.name for p in layout.stage2_dir.glob("*/manifest.csv"))


def expand_conditions(conditions: tuple[str, ...], layout: Layout) -> list[str]:
    expanded: list[str] = []
    for cond in conditions:
        if cond == "real+stage2":
            measures = stage2_measures(layout)
            if not measures:
                raise DataError(f"{layout.stage2_dir}: no stage-2 manifests for condition real+stage2; run `mgdm disturb`")
            expanded += [f"real+stage2:{m}" for m in measures]
        else:
            expanded.append(cond)
    return list(dict.fromkeys(expanded))


def plan(params: Params, layout: Layout) -> list[Unit]:
    e = params.evaluate
    conditions = expand_conditions(e.conditions, layout)
    return [Unit(n, c, s) for n in e.networks for c in conditions for s in e.seeds]


def _manifest_images(manifest: Path, class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found; run the stage that writes it first")
    rows = read_manifest(manifest)
    if not rows:
        raise DataError(f"{manifest}: no synthetic images listed")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise DataError(f"{manifest}: labels outside 0..{len(class_names) - 1}")
    return np.stack([read_image(manifest.parent / r["file"]) for r in rows]), labels


def condition_data(condition: str, data: Prepared, layout: Layout) -> EvalData:
    """The training data of one condition; validation and test are always the real splits."""
    base, _, measure = condition.partition(":")
    synthetic = None
    if base in ("real+stage1", "synthetic"):
        synthetic = _manifest_images(layout.stage1_dir / "manifest.csv", data.class_names)
    elif base == "real+stage2":
        synthetic = _manifest_images(layout.stage2_measure_dir(measure) / "manifest.csv", data.class_names)
    train_images, train_labels = data.images["train"], data.labels["train"]
    if base == "synthetic":
        (train_images, train_labels), synthetic = synthetic, None
    return EvalData(
        train_images=train_images, train_labels=train_labels,
        val_images=data.images["val"], val_labels=data.labels["val"],
        test_images=data.images["test"], test_labels=data.labels["test"],
        num_classes=data.num_classes,
        synthetic_images=None if synthetic is None else synthetic[0],
        synthetic_labels=None if synthetic is None else synthetic[1],
    )


def run_unit(unit: Unit, params: Params, layout: Layout, tracker: Tracker, progress: bool = True) -> dict[str, Any]:
    """Train and test one unit in its own MLflow run nested under the evaluate stage's run."""
    e = params.evaluate
    data = load_prepared(layout)
    child = tracker.child(unit.name, {"stage": "evaluate", "network": unit.network, "condition": unit.condition,
                                      "seed": unit.seed, "dataset": data.dataset})
    try:
        result = train_and_test(
            network=unit.network, data=condition_data(unit.condition, data, layout),
            augment=unit.condition == "real+classic", epochs=e.epochs, batch_size=e.batch_size, lr=e.lr,
            seed=params.seed * 1000 + unit.seed, device=resolve_device(params.device),
            synthetic_ratio=e.synthetic_ratio, progress=progress,
            on_epoch=lambda row: child.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])),
        )
    except BaseException:
        child.finish("FAILED")
        raise
    scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    child.log_metrics({**scalars, "best_epoch": result.best_epoch, "synthetic_images": result.n_synthetic})
    child.log_text(str(result.metrics.get("confusion_matrix")), "confusion_matrix.txt")
    child.finish()
    log.info("evaluate %s: AUC %.3f, ACC %.3f", unit.name, scalars.get("auc", float("nan")), scalars.get("accuracy", float("nan")))
    return {"network": unit.network, "condition": unit.condition, "seed": unit.seed, "metrics": result.metrics,
            "test_probs": result.test_probs, "test_labels": result.test_labels, "run_id": child.run_id}


def summarise(results: list[dict[str, Any]], params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    """metrics/evaluate.json, reports/evaluate.md, plots/evaluate.{csv,png}; all logged to MLflow."""
    data = load_prepared(layout)
    summary = build_summary(results, baseline="real")
    summary["dataset"] = data.dataset
    summary["class_names"] = list(data.class_names)
    write_metrics(layout, "evaluate", summary)

    report = layout.reports_dir / "evaluate.md"
    ensure_writable_dir(report.parent)
    with atomic_write(report) as tmp:
        Path(tmp).write_text(markdown_table(summary, data.dataset))
    png = layout.plot_file("evaluate.png")
    plot_summary(summary, png)
    rows = plot_rows(summary)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["network", "condition", "metric", "mean", "std"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(layout.plot_file("evaluate.csv")) as tmp:
        Path(tmp).write_text(buffer.getvalue())
    for artifact in (report, png, layout.metrics_file("evaluate")):
        tracker.log_artifact(artifact, "evaluate")

    flat: dict[str, float] = {}
    for network, conditions in summary["networks"].items():
        for condition, entry in conditions.items():
            for metric in ("auc", "accuracy"):
                stats = entry["metrics"].get(metric)
                if stats and stats.get("mean") is not None:
                    flat[f"{network}.{condition}.{metric}_mean".replace(":", "_").replace("+", "_")] = stats["mean"]
    tracker.log_metrics(flat)
    return summary


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    units = plan(params, layout)
    if not units:
        raise ConfigError("evaluate: the grid is empty (check evaluate.networks, conditions and seeds)")
    log.info("evaluate: %d units (%d networks x %d conditions x %d seeds), %d at a time", len(units),
             len(params.evaluate.networks), len(units) // (len(params.evaluate.networks) * len(params.evaluate.seeds)),
             len(params.evaluate.seeds), params.evaluate.workers)
    workers = min(params.evaluate.workers, len(units))
    if workers == 1:
        results = [run_unit(u, params, layout, tracker) for u in units]
    else:
        # Processes, not threads: torch's global RNG (init, dropout, augmentation) is per process,
        # so every unit stays bit-reproducible whatever the number of workers.
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_run_unit_in_worker, u, params, layout.root, tracker.run_id, threads) for u in units]
            results = [f.result() for f in tqdm(futures, desc="evaluate", unit="unit")]
    return summarise(results, params, layout, tracker)


def _run_unit_in_worker(unit: Unit, params: Params, root: Path, run_id: str, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return run_unit(unit, params, Layout(root), attach(root, run_id), progress=False)
