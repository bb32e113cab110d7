"""Stage `evaluate`: downstream networks on real vs real+synthetic data, with paired statistics.

The grid is (network, condition, seed) units, each independent: `plan` lists them, `run_unit`
trains and tests one (and logs its own nested MLflow run), `summarise` turns the results into
`metrics/evaluate.json`, the report and the plots. `run` does all three in this process; the
Prefect flow fans `run_unit` out through its task runner instead.

Conditions: `real` (baseline), `real+classic` (flips and small affine), `real+stage1`,
`real+stage2:<measure>` (`real+stage2` expands to every measure in `disturb.measure`), and
`synthetic` (stage-1 images only: train on synthetic, test on real).

A killed `run` resumes: every finished unit leaves its result under `.mgdm/evaluate-units/`, keyed
by what the result depends on (the unit, the evaluate parameters, the seed, the device type, the
prepared data, the unit's synthetic set and the code), and the next `run` on the same inputs trains
only the units still missing. A run that completes removes them.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mgdm_core import headline
from mgdm_core.config import Params
from mgdm_core.device import resolve_device
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS
from mgdm_core.evaluation.report import build_summary, markdown_table, plot_rows, plot_summary
from mgdm_core.evaluation.train import EvalData, train_and_test
from mgdm_core.io import atomic_write, ensure_writable_dir, read_image, read_manifest, source_digest, tree_digest
from mgdm_core.layout import Layout
from mgdm_core.stages.common import Prepared, load_prepared, log, write_metrics
from mgdm_core.tracking import DataInput, Tracker, attach

READS = ("seed", "device", "evaluate", "disturb.measure")


@dataclass(frozen=True)
class Unit:
    network: str
    condition: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.network} | {self.condition} | seed {self.seed}"


def expand_conditions(conditions: tuple[str, ...], measures: tuple[str, ...]) -> list[str]:
    """`real+stage2` -> `real+stage2:<m>` for exactly the measures `disturb.measure` names (never
    whatever stage-2 folders an older run left on disk); a named measure must be one of them."""
    expanded: list[str] = []
    for cond in conditions:
        base, _, measure = cond.partition(":")
        if cond == "real+stage2":
            expanded += [f"real+stage2:{m}" for m in measures]
        elif base == "real+stage2" and measure not in measures:
            raise ConfigError(f"evaluate.conditions: '{cond}' needs '{measure}' in disturb.measure "
                              f"(it names {', '.join(measures)})")
        else:
            expanded.append(cond)
    return list(dict.fromkeys(expanded))


def plan(params: Params, layout: Layout) -> list[Unit]:
    e = params.evaluate
    conditions = expand_conditions(e.conditions, params.disturb.measures)
    return [Unit(n, c, s) for n in e.networks for c in conditions for s in e.seeds_for(n)]


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


def synthetic_manifest(condition: str, layout: Layout) -> Path | None:
    """The manifest of the synthetic set a condition trains on (None: real images only)."""
    base, _, measure = condition.partition(":")
    if base in ("real+stage1", "synthetic"):
        return layout.stage1_dir / "manifest.csv"
    if base == "real+stage2":
        return layout.stage2_measure_dir(measure) / "manifest.csv"
    return None


def _first_row(manifest: Path) -> dict[str, str]:
    rows = read_manifest(manifest) if manifest.is_file() else []
    return rows[0] if rows else {}


def unit_params(unit: Unit, params: Params, layout: Layout) -> dict[str, Any]:
    """What a unit's MLflow run records as parameters, so the compare view lines units up.

    The guidance scales are read from the manifests of the synthetic set the unit trains on (what
    its images were made with); "-" where the condition uses no such set."""
    e = params.evaluate
    base, _, measure = unit.condition.partition(":")
    manifest = synthetic_manifest(unit.condition, layout)
    stage1 = _first_row(layout.stage1_dir / "manifest.csv") if manifest is not None else {}
    stage2 = _first_row(manifest) if base == "real+stage2" and manifest is not None else {}
    return {
        "network": unit.network, "condition": unit.condition, "measure": measure or "-",
        "synthetic_ratio": e.synthetic_ratio if base.startswith("real+stage") else "-",
        "generate_guidance": stage1.get("guidance", "-"), "generate_scale": stage1.get("scale", "-"),
        "disturb_scale": stage2.get("scale", "-"), "epochs": e.epochs, "batch_size": e.batch_size, "lr": e.lr,
        "seed": unit.seed, "training_seed": params.seed * 1000 + unit.seed,
    }


def unit_inputs(unit: Unit, data: Prepared, train: EvalData, layout: Layout) -> list[DataInput]:
    """The real splits and the synthetic set a unit read, as MLflow dataset inputs."""
    name = data.dataset
    inputs = [DataInput(f"{name}/{split}", data.images[split], data.labels[split],
                        str(layout.split_file(split)), context)
              for split, context in (("train", "train"), ("val", "validation"), ("test", "test"))]
    manifest = synthetic_manifest(unit.condition, layout)
    if manifest is not None:
        images, labels = ((train.train_images, train.train_labels) if unit.condition == "synthetic"
                          else (train.synthetic_images, train.synthetic_labels))
        inputs.append(DataInput(f"{name}/{layout.relative(manifest.parent)}", images, labels, str(manifest.parent),
                                "synthetic"))
    return inputs


def _model_scratch(layout: Layout, stage_run_id: str) -> Path:
    """Where units leave their trained classifier until `summarise` keeps the best (log_models: best)."""
    return layout.root / ".mgdm" / "evaluate-models" / (stage_run_id or "local")


def _model_config(unit: Unit, data: Prepared, params: Params) -> dict[str, Any]:
    return {"network": unit.network, "condition": unit.condition, "seed": unit.seed,
            "in_channels": data.channels, "num_classes": data.num_classes, "image_size": data.image_size,
            "class_names": list(data.class_names), "input": "float [B,C,H,W] in [-1, 1]", "output": "logits [B,K]",
            "evaluate": params.evaluate.model_dump(mode="json")}


def run_unit(unit: Unit, params: Params, layout: Layout, tracker: Tracker, progress: bool = True) -> dict[str, Any]:
    """Train and test one unit in its own MLflow run nested under the evaluate stage's run."""
    e = params.evaluate
    data = load_prepared(layout)
    train_data = condition_data(unit.condition, data, layout)
    child = tracker.child(unit.name, {"stage": "evaluate", "kind": "unit", "network": unit.network,
                                      "condition": unit.condition, "seed": unit.seed, "dataset": data.dataset})
    try:
        child.log_params(unit_params(unit, params, layout))
        child.log_inputs(unit_inputs(unit, data, train_data, layout))
        result = train_and_test(
            network=unit.network, data=train_data,
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
    best_val_auc = max(result.val_auc_history, default=float("nan"))
    shape = ((-1, data.channels, data.image_size, data.image_size), (-1, data.num_classes))
    if e.log_models == "all":
        child.log_model(result.model.cpu(), "classifier", _model_config(unit, data, params), tensor_shapes=shape)
    model_file = None
    if e.log_models == "best" and child.run_id:  # no run id: a NullTracker (nothing logged)
        model_file = _model_scratch(layout, tracker.run_id) / f"{child.run_id}.pt"
        ensure_writable_dir(model_file.parent)
        with atomic_write(model_file) as tmp:
            torch.save(result.model.cpu(), tmp)
    child.finish()
    log.info("evaluate %s: AUC %.3f, ACC %.3f", unit.name, scalars.get("auc", float("nan")), scalars.get("accuracy", float("nan")))
    return {"network": unit.network, "condition": unit.condition, "seed": unit.seed, "metrics": result.metrics,
            "test_probs": result.test_probs, "test_labels": result.test_labels, "run_id": child.run_id,
            "val_auc": best_val_auc, "model_file": None if model_file is None else str(model_file)}


def _log_best_models(results: list[dict[str, Any]], params: Params, layout: Layout, tracker: Tracker) -> None:
    """log_models: best: the unit with the highest validation AUC of each (network, condition)
    (the lowest seed on ties) logs its classifier as an MLflow model; the scratch files go."""
    if params.evaluate.log_models != "best":
        return
    data = load_prepared(layout)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["network"], r["condition"]), []).append(r)
    for (network, condition), runs in groups.items():
        have = [r for r in runs if r.get("model_file") and Path(r["model_file"]).is_file()]
        if len(have) < len(runs):  # units served from Prefect's cache of an earlier run
            log.info("evaluate: %s | %s: %d of %d units have a model to choose from", network, condition, len(have), len(runs))
        if not have:
            continue
        best = max(have, key=lambda r: (np.nan_to_num(r.get("val_auc", np.nan), nan=-1.0), -r["seed"]))
        model = torch.load(best["model_file"], map_location="cpu", weights_only=False)  # our own file
        unit = Unit(network, condition, best["seed"])
        shape = ((-1, data.channels, data.image_size, data.image_size), (-1, data.num_classes))
        run = attach(layout.root, best["run_id"])
        run.log_model(model, "classifier", {**_model_config(unit, data, params), "chosen_by": "best validation AUC",
                                            "val_auc": best.get("val_auc")}, tensor_shapes=shape)
        run.set_tags({"model": f"best of {len(runs)} seeds (validation AUC)"})
    # This run's scratch, and those of the interrupted runs it resumed.
    for folder in {_model_scratch(layout, tracker.run_id)} | {Path(r["model_file"]).parent for r in results if r.get("model_file")}:
        shutil.rmtree(folder, ignore_errors=True)


def _verdict(vs_baseline: dict[str, Any] | None, is_baseline: bool) -> str:
    """AUC's paired difference in words: its 95% interval above zero, below zero, or across it."""
    if is_baseline:
        return "baseline"
    diff = (vs_baseline or {}).get("auc")
    if not diff or diff.get("delta") is None:
        return "no comparison"
    if diff["ci_low"] > 0:
        return "better than baseline (AUC interval above 0)"
    if diff["ci_high"] < 0:
        return "worse than baseline (AUC interval below 0)"
    return "no clear difference (AUC interval spans 0)"


def _log_summary_runs(summary: dict[str, Any], tracker: Tracker) -> None:
    """One run per (network, condition) under the evaluate run, with the verdict as metrics:
    mean and std of each metric over seeds and the paired difference to the baseline with its
    95% interval (`delta_auc`, `delta_auc_low`, `delta_auc_high`, ...). Sorting the runs table
    by `delta_auc` then answers "did augmentation help?"."""
    baseline = summary["baseline"]
    for network, conditions in summary["networks"].items():
        for condition, entry in conditions.items():
            run = tracker.child(f"summary: {network} | {condition}", {
                "stage": "evaluate", "kind": "summary", "network": network, "condition": condition,
                "baseline": baseline})
            run.log_params({"network": network, "condition": condition, "baseline": baseline,
                            "seeds": ",".join(str(s) for s in entry["seeds"]), "n_test": summary["n_test"]})
            metrics: dict[str, float] = {}
            for metric, stats in entry["metrics"].items():
                for stat in ("mean", "std"):
                    if stats.get(stat) is not None:
                        metrics[f"{metric}_{stat}"] = stats[stat]
            for metric, diff in (entry.get("vs_baseline") or {}).items():
                if diff and diff.get("delta") is not None:
                    metrics[f"delta_{metric}"] = diff["delta"]
                    metrics[f"delta_{metric}_low"] = diff["ci_low"]
                    metrics[f"delta_{metric}_high"] = diff["ci_high"]
            if condition == baseline:  # the difference of the baseline to itself is exactly zero
                metrics.update({f"delta_{m}{end}": 0.0 for m in COMPARED_METRICS if m in entry["metrics"]
                                for end in ("", "_low", "_high")})
            run.log_metrics(metrics)
            run.set_tags({"verdict": _verdict(entry.get("vs_baseline"), condition == baseline)})
            run.finish()


def summarise(results: list[dict[str, Any]], params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    """metrics/evaluate.json, reports/evaluate.md, plots/evaluate.{csv,png}; all logged to MLflow."""
    data = load_prepared(layout)
    summary = build_summary(results, baseline="real")
    summary["dataset"] = data.dataset
    summary["class_names"] = list(data.class_names)
    write_metrics(layout, "evaluate", summary)
    headline.write_rows(layout.headline_dir("evaluate"), headline.evaluate_rows(summary))

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
    _log_summary_runs(summary, tracker)
    _log_best_models(results, params, layout, tracker)

    flat: dict[str, float] = {}
    for network, conditions in summary["networks"].items():
        for condition, entry in conditions.items():
            for metric in ("auc", "accuracy"):
                stats = entry["metrics"].get(metric)
                if stats and stats.get("mean") is not None:
                    flat[f"{network}.{condition}.{metric}_mean".replace(":", "_").replace("+", "_")] = stats["mean"]
    tracker.log_metrics(flat)
    return summary


def _resume_dir(layout: Layout) -> Path:
    return layout.root / ".mgdm" / "evaluate-units"


def unit_keys(units: list[Unit], params: Params, layout: Layout) -> dict[Unit, str]:
    """Each unit's resume key: a hash of everything its result depends on (not `workers` or the
    MLflow run it logs to)."""
    synthetic = {m: tree_digest(m.parent) for m in {synthetic_manifest(u.condition, layout) for u in units} if m}
    common = {"seed": params.seed, "device": resolve_device(params.device).type, "code": source_digest(),
              "evaluate": params.evaluate.model_dump(mode="json", exclude={"workers"}),
              "prepared": tree_digest(layout.prepared)}
    keys = {}
    for u in units:
        manifest = synthetic_manifest(u.condition, layout)
        payload = {**common, "unit": [u.network, u.condition, u.seed], "synthetic": synthetic.get(manifest)}
        keys[u] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    return keys


def _load_finished(file: Path) -> dict[str, Any] | None:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)  # our own file
    except Exception:  # missing, or cut short by the kill it is meant to survive
        return None


def _run_and_keep(unit: Unit, params: Params, layout: Layout, tracker: Tracker, file: Path,
                  progress: bool) -> dict[str, Any]:
    result = run_unit(unit, params, layout, tracker, progress=progress)
    ensure_writable_dir(file.parent)
    with atomic_write(file) as tmp:
        torch.save(result, tmp)
    return result


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    units = plan(params, layout)
    if not units:
        raise ConfigError("evaluate: the grid is empty (check evaluate.networks, conditions and seeds)")
    e = params.evaluate
    log.info("evaluate: %d units (%d networks x %d conditions x seeds %s), %d at a time", len(units),
             len(e.networks), len({u.condition for u in units}),
             "/".join(str(len(e.seeds_for(n))) for n in e.networks), e.workers)
    files = {u: _resume_dir(layout) / f"{key}.pt" for u, key in unit_keys(units, params, layout).items()}
    finished = {u: r for u in units if (r := _load_finished(files[u])) is not None}
    if finished:
        log.info("evaluate: %d of %d units resumed from an interrupted run on the same inputs (%s)",
                 len(finished), len(units), layout.relative(_resume_dir(layout)))
        tracker.set_tags({"resumed_units": f"{len(finished)}/{len(units)}"})
    todo = [u for u in units if u not in finished]
    workers = min(params.evaluate.workers, max(1, len(todo)))
    if workers == 1:
        fresh = [_run_and_keep(u, params, layout, tracker, files[u], True) for u in todo]
    else:
        # Processes, not threads: torch's global RNG (init, dropout, augmentation) is per process,
        # so every unit stays bit-reproducible whatever the number of workers.
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_run_unit_in_worker, u, params, layout.root, tracker.run_id, threads, files[u])
                       for u in todo]
            fresh = [f.result() for f in tqdm(futures, desc="evaluate", unit="unit")]
    done = {**finished, **dict(zip(todo, fresh))}
    summary = summarise([done[u] for u in units], params, layout, tracker)
    shutil.rmtree(_resume_dir(layout), ignore_errors=True)
    return summary


def _run_unit_in_worker(unit: Unit, params: Params, root: Path, run_id: str, threads: int, file: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    layout = Layout(root)
    return _run_and_keep(unit, params, layout, attach(root, run_id), file, progress=False)
