"""Stage `quality`: what the synthetic images are, measured against the real data.

For the real validation and test splits (noise floor), stage 1 and every stage-2 measure, per
class and overall:

* fidelity / diversity in the penultimate features of a reference classifier trained on the
  real training set only: Fréchet distance and KID to the real test set, k-NN precision/recall
  against the real training set;
* boundary: the reference classifier's entropy, margin and max probability, the rate of images
  predicted as another class than intended, and for stage 2 the change from each stage-1 source;
* memorisation: each image's distance to its nearest real training image (pixels and features),
  flagged when nearer than the `nn_percentile`-th percentile of real test images' distances;
* judged independently (`quality.judge`): class fidelity (the reference classifier's AUC and
  balanced accuracy against the intended labels, recall per class), CAS (a `feature_network`
  trained on the synthetic set alone, tested on the real test set, beside the same network
  trained on the real training set), FD and KID as ratios to the real-validation floor, and the
  fraction of saturated pixels;
* quality by training step: FD and class fidelity of a small unguided sample from each chosen
  EMA snapshot in `models/diffusion/snapshots` (`quality.by_step`), as a table and a curve.

`metrics/quality.json` keeps the full table under `sets` and the headline figures under stable
keys: `real.*`, `stage1.*`, `stage2.<measure>.*` and `by_step.*` (see `headline`).

Synthetic manifests are DVC outputs of earlier stages, so per-image values are not added to
them: they go to `reports/quality_images.csv` (one row per synthetic image).

This module computes; `mgdm_core.quality.report` writes reports/quality.md,
reports/quality_images.csv and the plots from what it computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgdm_core.config import Params
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.schedule import make_schedule, respace
from mgdm_core.errors import CheckpointError, DataError
from mgdm_core.headline import quality_rows, write_rows
from mgdm_core.io import read_image, read_manifest
from mgdm_core.layout import Layout
from mgdm_core.quality.by_step import balanced_labels, choose_snapshots, judge_sample, list_snapshots, unguided_sample
from mgdm_core.quality.features import ReferenceClassifier, features_and_probs, train_reference
from mgdm_core.quality.judge import (
    SATURATED_HIGH, SATURATED_LOW, class_fidelity, classification_accuracy_score, floor_ratio, saturated_fraction,
)
from mgdm_core.quality.metrics import (
    frechet_distance, kernel_inception_distance, memorisation_threshold, nearest_neighbours, pixel_vectors,
    precision_recall, predictive_scores,
)
from mgdm_core.quality.report import BY_STEP_COLUMNS, fmt, write_outputs
from mgdm_core.stages.common import Prepared, load_prepared, load_unet, log, seed_for, write_metrics
from mgdm_core.training.checkpoint import load_checkpoint
from mgdm_core.tracking import Tracker

# diffusion.schedule / diffusion.steps: the noise schedule the snapshots were trained with.
READS = ("seed", "device", "diffusion.schedule", "diffusion.steps", "quality", "disturb.measure")

REFERENCE_SETS = ("real_val", "real_test")  # real held-out splits: the noise floor


@dataclass
class ImageSet:
    """One set of images: uint8 [N,H,W,C], intended labels int64 [N], and per-image values filled in later."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    files: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)  # manifest rows (synthetic sets only)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    probs: np.ndarray | None = None  # the reference classifier's probabilities [N,K]

    @property
    def synthetic(self) -> bool:
        return self.name not in REFERENCE_SETS


def _manifest_set(name: str, manifest: Path, num_classes: int) -> ImageSet:
    rows = read_manifest(manifest)
    if not rows:
        raise DataError(f"{manifest}: no images listed")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{manifest}: labels outside 0..{num_classes - 1}")
    images = np.stack([read_image(manifest.parent / r["file"]) for r in rows])
    return ImageSet(name, images, labels, [r["file"] for r in rows], rows)


def load_sets(layout: Layout, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int,
              measures: tuple[str, ...] | None = None) -> list[ImageSet]:
    """real_val, real_test, stage1 and stage2_<measure> for each of `measures` (the stage reads
    `disturb.measure`; None: every stage-2 manifest present, for a folder judged on its own)."""
    stage1 = layout.stage1_dir / "manifest.csv"
    if not stage1.is_file():
        raise DataError(f"{stage1}: stage-1 manifest not found; run `mgdm generate` first")
    sets = [ImageSet(f"real_{s}", images[s], labels[s], [f"{s}[{i}]" for i in range(len(labels[s]))]) for s in ("val", "test")]
    sets.append(_manifest_set("stage1", stage1, num_classes))
    if measures is None:
        found = sorted(layout.stage2_dir.glob("*/manifest.csv")) if layout.stage2_dir.is_dir() else []
        measures = tuple(m.parent.name for m in found)
    for measure in measures:
        manifest = layout.stage2_measure_dir(measure) / "manifest.csv"
        if not manifest.is_file():
            raise DataError(f"{manifest}: stage-2 manifest of disturb.measure '{measure}' not found; run `mgdm disturb`")
        sets.append(_manifest_set(f"stage2_{measure}", manifest, num_classes))
    return sets


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined values (too few images) become null."""
    return float(value) if value is not None and math.isfinite(value) else None


def distribution_metrics(
    feats: np.ndarray, test_feats: np.ndarray, train_feats: np.ndarray, *, k: int, kid_subsets: int,
    kid_subset_size: int, seed: int, against_test: bool,
) -> dict[str, float | None]:
    """FD and KID to the real test features, precision/recall against the real training features.

    feats [N,D]; None where a set is too small (FD/KID need 2 rows, precision/recall k + 1).
    """
    out: dict[str, float | None] = {"fd": None, "kid": None, "kid_se": None, "precision": None, "recall": None}
    if against_test and len(feats) >= 2 and len(test_feats) >= 2:
        out["fd"] = _finite(frechet_distance(feats, test_feats))
        kid, se = kernel_inception_distance(feats, test_feats, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        out["kid"], out["kid_se"] = _finite(kid), _finite(se)
    if len(feats) > k and len(train_feats) > k:
        out["precision"], out["recall"] = precision_recall(train_feats, feats, k=k)
    return out


def per_image_summary(values: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float | None]:
    """Means of the boundary scores, medians of the distances, rates of the flags, over one subset."""
    out: dict[str, float | None] = {
        "n": int(len(labels)),
        "entropy_mean": _finite(values["entropy"].mean()) if len(labels) else None,
        "margin_mean": _finite(values["margin"].mean()) if len(labels) else None,
        "max_prob_mean": _finite(values["max_prob"].mean()) if len(labels) else None,
        "mismatch_rate": _finite((values["predicted"] != labels).mean()) if len(labels) else None,
        "nn_pixel_median": _finite(np.median(values["nn_pixel_distance"])) if len(labels) else None,
        "nn_feature_median": _finite(np.median(values["nn_feature_distance"])) if len(labels) else None,
        "memorised_rate": _finite(values["memorised"].mean()) if len(labels) else None,
        "feature_near_rate": _finite(values["feature_near"].mean()) if len(labels) else None,
    }
    for key in ("entropy_change", "margin_change", "pixel_change", "prediction_flipped", "roundtrip_error"):
        if key in values and len(labels):
            out[f"{key}_mean"] = _finite(np.nanmean(values[key]))
    return out


def stage2_changes(s2: ImageSet, s1: ImageSet) -> dict[str, np.ndarray]:
    """Per stage-2 image: change of the reference scores and pixels from its stage-1 source [N]."""
    index = {f"stage1/{f}": i for i, f in enumerate(s1.files)}
    missing = [r["source"] for r in s2.rows if r["source"] not in index]
    if missing:
        raise DataError(f"{s2.name}: {len(missing)} source(s) not in the stage-1 manifest, e.g. {missing[0]}")
    src = np.array([index[r["source"]] for r in s2.rows], dtype=np.int64)
    roundtrip = np.array([float(r.get("roundtrip_error") or "nan") for r in s2.rows])
    pixel = np.linalg.norm(pixel_vectors(s2.images) - pixel_vectors(s1.images[src]), axis=1)
    return {
        "source_index": src,
        "entropy_change": s2.values["entropy"] - s1.values["entropy"][src],
        "margin_change": s2.values["margin"] - s1.values["margin"][src],
        "prediction_flipped": (s2.values["predicted"] != s1.values["predicted"][src]).astype(float),
        "pixel_change": pixel,
        "roundtrip_error": roundtrip,
    }


def judge_sets(
    sets: list[ImageSet], data: Prepared, *, network: str, epochs: int, batch_size: int, lr: float, seed: int,
    device: Any,
) -> dict[str, dict[str, Any]]:
    """Class fidelity, CAS and saturation per set: {set name: {"fidelity", "cas", "saturated"}}.

    The real sets' CAS entry is the network trained on the real training set (the same for
    both), so every synthetic CAS row has its real counterpart beside it.
    """
    val, test = (data.images["val"], data.labels["val"]), (data.images["test"], data.labels["test"])

    def cas(images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        return classification_accuracy_score(images, labels, val=val, test=test, num_classes=data.num_classes,
                                             network=network, epochs=epochs, batch_size=batch_size, lr=lr,
                                             seed=seed, device=device)

    real_cas = cas(data.images["train"], data.labels["train"])
    log.info("quality: CAS of real training images (%s): AUC %s", network, fmt(real_cas["auc"]))
    judged = {}
    for s in sets:
        judged[s.name] = {"fidelity": class_fidelity(s.labels, s.probs),
                          "cas": cas(s.images, s.labels) if s.synthetic else real_cas}
        if s.synthetic:
            log.info("quality: %s: fidelity AUC %s, CAS AUC %s", s.name, fmt(judged[s.name]["fidelity"]["auc"]),
                     fmt(judged[s.name]["cas"]["auc"]))
    return judged


def judged_columns(s: ImageSet, judged: dict[str, Any], scope: str, class_index: int | None) -> dict[str, float | None]:
    """The independent judges' columns of one (set, scope) row of the `sets` table."""
    fidelity, cas = judged["fidelity"], judged["cas"]
    images = s.images if class_index is None else s.images[s.labels == class_index]
    out: dict[str, float | None] = {"saturated_fraction": saturated_fraction(images)}
    if class_index is None:
        out.update(fidelity_auc=_finite_or_none(fidelity["auc"]),
                   fidelity_balanced_accuracy=_finite_or_none(fidelity["balanced_accuracy"]),
                   cas_auc=_finite_or_none(cas["auc"]), cas_balanced_accuracy=_finite_or_none(cas["balanced_accuracy"]))
    else:
        recall = fidelity["recall"][class_index]
        out.update(fidelity_recall=_finite_or_none(recall),
                   fidelity_mismatch=None if recall is None else _finite(1.0 - recall),
                   cas_recall=_finite_or_none(cas["recall"][class_index]))
    return out


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None else _finite(value)


HEADLINE_KEYS = ("fidelity_auc", "fidelity_balanced_accuracy", "cas_auc", "cas_balanced_accuracy", "fd", "fd_ratio",
                 "kid", "kid_ratio", "saturated_fraction")


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The stable headline keys of metrics/quality.json (dotted as `dvc metrics show` prints them):

    real.{fidelity_auc, fidelity_balanced_accuracy, cas_auc, cas_balanced_accuracy, fd_floor, kid_floor,
    saturated_fraction}: the reference classifier on the real test set, the CAS network trained on
    the real training set, FD/KID of real validation to real test, saturation of real test images;
    stage1.{HEADLINE_KEYS, fidelity_recall.<class>} and stage2.<measure>.{the same}.
    """
    sets, names = summary["sets"], summary["class_names"]
    test, floor = sets["real_test"], sets["real_val"]

    def row(entry: dict[str, Any]) -> dict[str, Any]:
        out = {k: entry["overall"].get(k) for k in HEADLINE_KEYS}
        out["fidelity_recall"] = {n: entry[n].get("fidelity_recall") for n in names}
        return out

    real = {k: test["overall"].get(k) for k in ("fidelity_auc", "fidelity_balanced_accuracy", "cas_auc",
                                                  "cas_balanced_accuracy", "saturated_fraction")}
    real.update(fd_floor=floor["overall"]["fd"], kid_floor=floor["overall"]["kid"],
                fidelity_recall={n: test[n].get("fidelity_recall") for n in names})
    return {"real": real, "stage1": row(sets["stage1"]),
            "stage2": {n.removeprefix("stage2_"): row(e) for n, e in sets.items() if n.startswith("stage2_")}}


# ---- quality by training step ----------------------------------------------------------------------

def quality_by_step(
    layout: Layout, data: Prepared, ref: ReferenceClassifier, test_feats: np.ndarray, fd_floor: float | None, *,
    schedule_kind: str, schedule_steps: int, respacing: str, samples: int, max_snapshots: int, seed: int,
    batch_size: int, device: Any,
) -> dict[str, Any]:
    """FD to the real test set (and its ratio to the floor) and class fidelity of `samples`
    unguided images (balanced over the classes) from each chosen EMA snapshot.

    Returns {"respacing", "samples", "found", "rows": [...], "skipped": [...], "note", "first",
    "last"} (first/last: the earliest and latest rows); rows are empty, first/last null and `note`
    says why when there is nothing to judge. Snapshots whose UNet config differs
    from `models/diffusion.pt`'s (left in the persisted directory by an earlier run of another
    architecture) are skipped and listed.
    """
    found = list_snapshots(layout.diffusion_snapshots_dir)
    out: dict[str, Any] = {"respacing": respacing, "samples": samples, "found": len(found), "rows": [], "skipped": [],
                           "note": None, "first": None, "last": None}
    chosen = choose_snapshots(found, max_snapshots)
    if not chosen:
        out["note"] = ("quality.by_step_max_snapshots is 0" if max_snapshots == 0 else
                       f"no EMA snapshots in {layout.relative(layout.diffusion_snapshots_dir)}")
        return out
    expected = load_checkpoint(layout.diffusion_model, kind="unet")[0] if layout.diffusion_model.is_file() else None
    schedule = respace(make_schedule(schedule_kind, schedule_steps), respacing)
    labels = balanced_labels(samples, data.num_classes)
    seeds = [seed_for(seed, int(y), i) for i, y in enumerate(labels)]
    shape = (data.channels, data.image_size, data.image_size)
    for step, path in chosen:
        try:
            if expected is not None:
                load_checkpoint(path, kind="unet", expected_config=expected)
            unet = load_unet(path, device, data)
        except CheckpointError as err:
            log.warning("quality by step: skipping %s (%s)", path.name, str(err)[:200])
            out["skipped"].append(path.name)
            continue
        images = unguided_sample(unet, schedule, labels, seeds, shape, device, batch_size)
        # The same judge as train_diffusion's `steps: auto` rule, so both read one curve.
        judged = judge_sample(images, labels, ref.model, test_feats, fd_floor, device)
        out["rows"].append({"step": step, "snapshot": path.name, "n": len(labels), **judged})
        log.info("quality by step: step %d FD %s (x%s floor), fidelity AUC %s", step, fmt(judged["fd"]),
                 fmt(out["rows"][-1]["fd_ratio"]), fmt(out["rows"][-1]["fidelity_auc"]))
    if not out["rows"]:
        out["note"] = f"all {len(chosen)} chosen snapshots were made with another UNet config than models/diffusion.pt"
    # Stable headline keys (by_step.first.*, by_step.last.*); null when no snapshot was judged.
    out["first"], out["last"] = (out["rows"][0], out["rows"][-1]) if out["rows"] else (None, None)
    return out


def compute_quality(
    layout: Layout,
    *,
    feature_network: str = "simple_cnn",
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    nn_percentile: float = 1.0,
    pr_k: int = 3,
    kid_subsets: int = 50,
    kid_subset_size: int = 100,
    max_pairs: int = 8,
    schedule_kind: str = "linear",
    schedule_steps: int = 1000,
    by_step_max_snapshots: int = 8,
    by_step_samples: int = 64,
    by_step_respacing: str = "50",
    measures: tuple[str, ...] | None = None,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Compute every quality measure, write metrics/quality.json, reports/quality.md,
    reports/quality_images.csv, plots/quality_*.png and plots/quality_by_step.csv; log them to
    `tracker` when given (by-step figures with MLflow's step = training step).

    `schedule_kind` / `schedule_steps` are the diffusion schedule the EMA snapshots were trained
    with. `measures`: the stage-2 sets judged (the stage passes `disturb.measure`; None: every
    stage-2 manifest present). Returns the summary written to metrics/quality.json.
    """
    dev = resolve_device(device)
    data = load_prepared(layout)
    names = data.class_names
    sets = load_sets(layout, data.images, data.labels, data.num_classes, measures)
    ref = train_reference(
        network=feature_network, train=(data.images["train"], data.labels["train"]),
        val=(data.images["val"], data.labels["val"]), test=(data.images["test"], data.labels["test"]),
        num_classes=data.num_classes, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=dev,
    )
    log.info("quality: reference %s, val AUC %.3f, test AUC %.3f", feature_network, ref.val_auc, ref.test_auc)
    train_feats, _ = features_and_probs(ref.model, data.images["train"], dev)
    train_pixels = pixel_vectors(data.images["train"])
    feats: dict[str, np.ndarray] = {}
    for s in sets:
        feats[s.name], s.probs = features_and_probs(ref.model, s.images, dev)
        s.values.update(predictive_scores(s.probs))
        s.values["nn_pixel_distance"], s.values["nn_train_index"] = nearest_neighbours(pixel_vectors(s.images), train_pixels)
        s.values["nn_feature_distance"], _ = nearest_neighbours(feats[s.name], train_feats)
    by_name = {s.name: s for s in sets}
    test = by_name["real_test"]
    thresholds = {
        "percentile": nn_percentile,
        "pixel": memorisation_threshold(test.values["nn_pixel_distance"], nn_percentile),
        "feature": memorisation_threshold(test.values["nn_feature_distance"], nn_percentile),
    }
    for s in sets:
        # Strictly below: real test images at the percentile itself are not flagged.
        s.values["memorised"] = s.values["nn_pixel_distance"] < thresholds["pixel"]
        s.values["feature_near"] = s.values["nn_feature_distance"] < thresholds["feature"]
        if s.name.startswith("stage2_"):
            s.values.update(stage2_changes(s, by_name["stage1"]))
    judged = judge_sets(sets, data, network=feature_network, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                        device=dev)

    summary: dict[str, Any] = {
        "reference": {"network": ref.network, "epochs": ref.epochs, "seed": ref.seed, "best_epoch": ref.best_epoch,
                      "val_auc": _finite(ref.val_auc), "test_auc": _finite(ref.test_auc),
                      "feature_dim": int(train_feats.shape[1])},
        "memorisation_thresholds": thresholds,
        "saturation": {"low": SATURATED_LOW, "high": SATURATED_HIGH},
        "pr_k": pr_k,
        "class_names": list(names),
        "sets": {},
    }
    # real_val first: its FD/KID to real test are the floor the other rows are divided by.
    for s in sets:
        entry: dict[str, Any] = {}
        for scope, mask in [("overall", np.ones(len(s.labels), bool))] + [(n, s.labels == c) for c, n in enumerate(names)]:
            test_mask = np.ones(len(test.labels), bool) if scope == "overall" else test.labels == names.index(scope)
            train_mask = np.ones(len(data.labels["train"]), bool) if scope == "overall" else data.labels["train"] == names.index(scope)
            distances = distribution_metrics(feats[s.name][mask], feats["real_test"][test_mask], train_feats[train_mask],
                                             k=pr_k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
                                             against_test=s.name != "real_test")
            floor = summary["sets"]["real_val"][scope] if s.name != "real_val" else distances
            entry[scope] = {
                **per_image_summary({k: v[mask] for k, v in s.values.items()}, s.labels[mask]),
                **distances,
                "fd_ratio": floor_ratio(distances["fd"], floor["fd"]),
                "kid_ratio": floor_ratio(distances["kid"], floor["kid"]),
                **judged_columns(s, judged[s.name], scope, None if scope == "overall" else names.index(scope)),
            }
        summary["sets"][s.name] = entry
    summary.update(headline(summary))
    summary["by_step"] = quality_by_step(
        layout, data, ref, feats["real_test"], summary["real"]["fd_floor"], schedule_kind=schedule_kind,
        schedule_steps=schedule_steps, respacing=by_step_respacing, samples=by_step_samples,
        max_snapshots=by_step_max_snapshots, seed=seed, batch_size=batch_size, device=dev,
    )

    write_metrics(layout, "quality", summary)
    write_rows(layout.headline_dir("quality"), quality_rows(summary))  # what DVC shows as metrics
    artifacts = write_outputs(layout, summary, sets, data.images["train"], max_pairs)
    if tracker is not None:
        tracker.log_metrics(flat_metrics(summary))
        for row in summary["by_step"]["rows"]:
            tracker.log_metrics({f"by_step.{k}": row[k] for k in BY_STEP_COLUMNS[3:] if row[k] is not None}, step=row["step"])
        for path in [layout.metrics_file("quality"), *artifacts]:
            tracker.log_artifact(path, "quality")
    return summary


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """For MLflow (defined values only; class names sanitised): `<set>.<scope>.<metric>` for the
    full table, `reference.*`, and the headline keys `real.*`, `stage1.*`, `stage2.<measure>.*`."""
    flat = {f"reference.{k}": v for k, v in summary["reference"].items() if isinstance(v, (int, float))}
    for name, entry in summary["sets"].items():
        for scope, values in entry.items():
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    flat[f"{name}.{scope}.{metric}".replace(" ", "_")] = float(value)

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[prefix.replace(" ", "_")] = float(node)

    for section in ("real", "stage1", "stage2"):
        walk(section, summary[section])
    return flat


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    q = params.quality  # the `quality` section (QualityParams)
    return compute_quality(
        layout, feature_network=q.feature_network, epochs=q.epochs, batch_size=q.batch_size, lr=q.lr,
        seed=params.seed * 1000 + q.seed, device=params.device, nn_percentile=q.nn_percentile, pr_k=q.pr_k,
        kid_subsets=q.kid_subsets, kid_subset_size=q.kid_subset_size, max_pairs=q.max_pairs,
        schedule_kind=params.diffusion.schedule, schedule_steps=params.diffusion.steps,
        by_step_max_snapshots=q.by_step_max_snapshots, by_step_samples=q.by_step_samples,
        by_step_respacing=q.by_step_respacing, measures=params.disturb.measures, tracker=tracker,
    )
