"""Stage `evaluate`: downstream networks on real vs real+synthetic data, with paired statistics.

The grid is (network, condition, seed) units, each independent: `plan` lists them, `run_unit`
trains and tests one (and logs its own nested MLflow run), `summarise` turns the results into
`metrics/evaluate.json`, the report and the plots. `run` does all three in this process; the
Prefect flow fans `run_unit` out through its task runner instead.

Conditions (`mgdm_core/conditions.py` parses them): `real` (baseline), `real+stage1`,
`real+stage2:<measure>` (`real+stage2` expands to every measure in `disturb.measure`), and
`synthetic` (stage-1 images only: train on synthetic, test on real), each optionally with a
training-only augmentation `+classic` (flips and small affine), `+trivialaugment`, `+randaugment`,
`+mixup` or `+cutmix` (`real+cutmix`, `real+stage2:entropy+cutmix`).

Units are cached: every finished unit leaves its result under `.mgdm/evaluate-units/`, keyed by
what the result depends on (the unit, the evaluate parameters that shape training, the seed, the
device type, the prepared data, the unit's synthetic set and the code), so a killed `run` resumes
with only the missing units, and a later run that changed only generator parameters retrains only
the units whose synthetic set changed. A completed run keeps its units and removes those unused
for more than `evaluate.unit_cache_days` days.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mgdm_core import headline
from mgdm_core.conditions import parse_condition
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
    """`real+stage2` -> `real+stage2:<m>` (`real+stage2+mixup` -> `real+stage2:<m>+mixup`) for
    exactly the measures `disturb.measure` names (never whatever stage-2 folders an older run left
    on disk); a named measure must be one of them."""
    expanded: list[str] = []
    for cond in conditions:
        parsed = parse_condition(cond)
        if parsed.data == "real+stage2" and parsed.measure is None:
            expanded += [str(parsed._replace(measure=m)) for m in measures]
        elif parsed.data == "real+stage2" and parsed.measure not in measures:
            raise ConfigError(f"evaluate.conditions: '{cond}' needs '{parsed.measure}' in disturb.measure "
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
    """The training data of one condition; validation and test are always the real splits (its
    augmentation, if any, is applied to training batches only, in `train_and_test`)."""
    manifest = synthetic_manifest(condition, layout)
    synthetic = None if manifest is None else _manifest_images(manifest, data.class_names)
    train_images, train_labels = data.images["train"], data.labels["train"]
    if parse_condition(condition).data == "synthetic":
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
    """The manifest of the synthetic set a condition trains on (None: real images only, whatever
    its augmentation, so nothing generated reaches its result or its cache key)."""
    parsed = parse_condition(condition)
    if parsed.synthetic_set == "stage1":
        return layout.stage1_dir / "manifest.csv"
    if parsed.synthetic_set == "stage2":
        if parsed.measure is None:
            raise ConfigError(f"evaluate: '{condition}' names no measure; expand_conditions first")
        return layout.stage2_measure_dir(parsed.measure) / "manifest.csv"
    return None


def _first_row(manifest: Path) -> dict[str, str]:
    rows = read_manifest(manifest) if manifest.is_file() else []
    return rows[0] if rows else {}


def unit_params(unit: Unit, params: Params, layout: Layout) -> dict[str, Any]:
    """What a unit's MLflow run records as parameters, so the compare view lines units up.

    The guidance scales are read from the manifests of the synthetic set the unit trains on (what
    its images were made with); "-" where the condition uses no such set."""
    e = params.evaluate
    parsed = parse_condition(unit.condition)
    manifest = synthetic_manifest(unit.condition, layout)
    stage1 = _first_row(layout.stage1_dir / "manifest.csv") if manifest is not None else {}
    stage2 = _first_row(manifest) if parsed.synthetic_set == "stage2" else {}
    return {
        "network": unit.network, "condition": unit.condition, "measure": parsed.measure or "-",
        "augment": parsed.augment or "-",
        "synthetic_ratio": e.synthetic_ratio if parsed.data.startswith("real+stage") else "-",
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
        images, labels = ((train.train_images, train.train_labels) if parse_condition(unit.condition).data == "synthetic"
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
            augment=parse_condition(unit.condition).augment, epochs=e.epochs, batch_size=e.batch_size, lr=e.lr,
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
    """AUC's paired difference in words, by the report's rule: Holm's decision over the family
    (summaries without one: the interval), and whether the simultaneous interval agrees."""
    if is_baseline:
        return "baseline"
    diff = (vs_baseline or {}).get("auc")
    if not diff or diff.get("delta") is None:
        return "no comparison"
    spans_zero = diff["ci_low"] <= 0 <= diff["ci_high"]
    if "reject" not in diff:
        declared, rule = not spans_zero, "AUC interval"
    else:
        declared, rule = bool(diff["reject"]), f"Holm over {diff.get('comparisons', 1)}, family-wise 5%"
    if not declared:
        return f"no difference detected ({rule}; AUC interval spans 0)"
    word = "better" if diff["delta"] > 0 else "worse"
    agrees = "; its simultaneous interval still spans 0" if spans_zero else ""
    return f"{word} than baseline ({rule}{agrees})"


def _interval_records(diff: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """The level of a condition's AUC interval as MLflow params, metrics and a tag: per interval
    (`interval_confidence`, 1 - 0.05/m for Bonferroni over m) and for the family together."""
    if not diff or "confidence" not in diff:
        return {}, {}, {}
    each, family = diff["confidence"], diff.get("family_confidence", diff["confidence"])
    m = diff.get("comparisons", 1)
    kind = diff.get("interval", "per-comparison")
    params = {"interval": kind, "interval_confidence": round(each, 6), "family_confidence": family,
              "comparisons": m, "decision": diff.get("adjustment", "interval")}
    metrics = {"interval_confidence": each, "family_confidence": family}
    tag = f"simultaneous {family:.0%} over {m} ({kind}), each {each:.1%}" if kind == "bonferroni" else f"{each:.1%}"
    return params, metrics, {"interval": tag}


def _log_summary_runs(summary: dict[str, Any], tracker: Tracker) -> None:
    """One run per (network, condition) under the evaluate run, with the verdict as metrics:
    mean and std of each metric over seeds and the paired difference to the baseline with its
    simultaneous interval (`delta_auc`, `delta_auc_low`, `delta_auc_high`, ...; Bonferroni, its
    levels in `interval_confidence` / `family_confidence` and the `interval` tag), Holm's
    adjusted p-value `delta_<metric>_p_holm` and the detectable difference
    `delta_<metric>_detectable`. Sorting the runs table by `delta_auc` then answers "did
    augmentation help?"; the `verdict` tag is Holm's decision. Where a standard augmentation was
    chosen on validation (`report.best_augmentation`), the synthetic conditions also carry
    `delta_auc_vs_best_augmentation` (with `_low` / `_high`) and a `best_augmentation` tag, and
    every condition its mean validation AUC `val_auc_mean`."""
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
                    metrics.update({f"delta_{metric}_{name}": diff[key] for name, key in
                                    (("p_holm", "p_holm"), ("detectable", "mde")) if diff.get(key) is not None})
            if entry.get("validation"):
                metrics["val_auc_mean"] = entry["validation"]["auc"]["mean"]
            versus_best = (entry.get("vs_best_augmentation") or {}).get("auc")
            if versus_best:  # the synthetic set against the standard augmentation chosen on validation
                metrics.update({"delta_auc_vs_best_augmentation": versus_best["delta"],
                                "delta_auc_vs_best_augmentation_low": versus_best["ci_low"],
                                "delta_auc_vs_best_augmentation_high": versus_best["ci_high"]})
                run.set_tags({"best_augmentation": versus_best["reference"]})
            level_params, level_metrics, level_tags = _interval_records((entry.get("vs_baseline") or {}).get("auc"))
            run.log_params(level_params)
            metrics.update(level_metrics)
            if condition == baseline:  # the difference of the baseline to itself is exactly zero
                metrics.update({f"delta_{m}{end}": 0.0 for m in COMPARED_METRICS if m in entry["metrics"]
                                for end in ("", "_low", "_high")})
            run.log_metrics(metrics)
            run.set_tags({"verdict": _verdict(entry.get("vs_baseline"), condition == baseline), **level_tags})
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
    tracker.set_tags({f"best_augmentation.{network}": chosen["condition"]
                      for network, chosen in summary["best_augmentation"].items()})

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


# Evaluate keys no unit's result depends on: the grid (the unit names its own network, condition
# and seed), how many units run at once, which models MLflow keeps, how long the cache keeps them.
_NOT_IN_UNIT_KEY = {"networks", "conditions", "seeds", "seeds_per_network", "workers", "log_models", "unit_cache_days"}


def unit_keys(units: list[Unit], params: Params, layout: Layout) -> dict[Unit, str]:
    """Each unit's cache key: a hash of everything its result depends on and nothing else, so a
    change of generator parameters (generate.*, disturb.*, the models) reaches only the units whose
    synthetic set changed: the evaluate keys that shape training (`synthetic_ratio` only for units
    with a synthetic set), the seed, the device type, the prepared data, the unit's synthetic set
    (its files' bytes) and the mgdm_core sources."""
    synthetic = {m: tree_digest(m.parent) for m in {synthetic_manifest(u.condition, layout) for u in units} if m}
    training = params.evaluate.model_dump(mode="json", exclude=_NOT_IN_UNIT_KEY)
    common = {"seed": params.seed, "device": resolve_device(params.device).type, "code": source_digest(),
              "prepared": tree_digest(layout.prepared)}
    keys = {}
    for u in units:
        manifest = synthetic_manifest(u.condition, layout)
        evaluate = training if manifest is not None else {k: v for k, v in training.items() if k != "synthetic_ratio"}
        payload = {**common, "evaluate": evaluate, "unit": [u.network, u.condition, u.seed],
                   "synthetic": synthetic.get(manifest)}
        keys[u] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    return keys


def prune_unit_cache(directory: Path, used: set[Path], max_age_days: float, now: float | None = None) -> list[Path]:
    """Remove the cached unit results in `directory` that `used` (the files of the run that just
    completed) does not name and that were last used more than `max_age_days` days before `now`
    (0: every unused one); returns the removed files. A file's age is its mtime, which a run that
    reuses the unit refreshes."""
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for file in directory.iterdir():
        if file in used or not file.is_file():
            continue
        if now - file.stat().st_mtime > max_age_days * 86400:
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed


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
        log.info("evaluate: %d of %d units reused from an earlier or interrupted run on the same inputs (%s)",
                 len(finished), len(units), layout.relative(_resume_dir(layout)))
        tracker.set_tags({"resumed_units": f"{len(finished)}/{len(units)}"})
        for u in finished:
            os.utime(files[u])  # used now: the age `prune_unit_cache` reads
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
    # This run's units stay for the next run (another experiment that changes only the synthetic
    # sets retrains only the units that read them); those no run has used for a while go.
    pruned = prune_unit_cache(_resume_dir(layout), set(files.values()), e.unit_cache_days)
    if pruned:
        log.info("evaluate: removed %d cached unit(s) unused for over %d days", len(pruned), e.unit_cache_days)
    return summary


def _run_unit_in_worker(unit: Unit, params: Params, root: Path, run_id: str, threads: int, file: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    layout = Layout(root)
    return _run_and_keep(unit, params, layout, attach(root, run_id), file, progress=False)
