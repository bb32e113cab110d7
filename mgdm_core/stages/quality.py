"""Stage `quality`: what the synthetic images are, measured against the real data.

For the real validation and test splits (noise floor), stage 1 and every stage-2 measure, per
class and overall:

* fidelity / diversity in the penultimate features of a reference classifier trained on the
  real training set only: Fréchet distance and KID to the real test set, k-NN precision/recall
  against the real training set;
* boundary: the reference classifier's entropy, margin and max probability, the rate of images
  predicted as another class than intended, and for stage 2 the change from each stage-1 source;
* memorisation: each image's distance to its nearest real training image (pixels and features),
  flagged when nearer than the `nn_percentile`-th percentile of real test images' distances.

Synthetic manifests are DVC outputs of earlier stages, so per-image values are not added to
them: they go to `reports/quality_images.csv` (one row per synthetic image).
"""

from __future__ import annotations

import csv
import io as _io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mgdm_core.config import Params  # noqa: E402
from mgdm_core.device import resolve_device  # noqa: E402
from mgdm_core.errors import DataError  # noqa: E402
from mgdm_core.io import atomic_write, ensure_writable_dir, read_image, read_manifest  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.plots import histograms  # noqa: E402
from mgdm_core.quality.features import features_and_probs, train_reference  # noqa: E402
from mgdm_core.quality.metrics import (  # noqa: E402
    frechet_distance, kernel_inception_distance, memorisation_threshold, nearest_neighbours, pixel_vectors,
    precision_recall, predictive_scores,
)
from mgdm_core.stages.common import load_prepared, log, write_metrics  # noqa: E402
from mgdm_core.tracking import Tracker  # noqa: E402

READS = ("seed", "device", "quality")

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


def load_sets(layout: Layout, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], num_classes: int) -> list[ImageSet]:
    """real_val, real_test, stage1 and stage2_<measure> for every stage-2 manifest present."""
    stage1 = layout.stage1_dir / "manifest.csv"
    if not stage1.is_file():
        raise DataError(f"{stage1}: stage-1 manifest not found; run `mgdm generate` first")
    sets = [ImageSet(f"real_{s}", images[s], labels[s], [f"{s}[{i}]" for i in range(len(labels[s]))]) for s in ("val", "test")]
    sets.append(_manifest_set("stage1", stage1, num_classes))
    for manifest in sorted(layout.stage2_dir.glob("*/manifest.csv")) if layout.stage2_dir.is_dir() else []:
        sets.append(_manifest_set(f"stage2_{manifest.parent.name}", manifest, num_classes))
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
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Compute every quality measure, write metrics/quality.json, reports/quality.md,
    reports/quality_images.csv and plots/quality_*.png; log them to `tracker` when given.

    Returns the summary written to metrics/quality.json.
    """
    dev = resolve_device(device)
    data = load_prepared(layout)
    names = data.class_names
    sets = load_sets(layout, data.images, data.labels, data.num_classes)
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
        feats[s.name], probs = features_and_probs(ref.model, s.images, dev)
        s.values.update(predictive_scores(probs))
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

    summary: dict[str, Any] = {
        "reference": {"network": ref.network, "epochs": ref.epochs, "seed": ref.seed, "best_epoch": ref.best_epoch,
                      "val_auc": _finite(ref.val_auc), "test_auc": _finite(ref.test_auc),
                      "feature_dim": int(train_feats.shape[1])},
        "memorisation_thresholds": thresholds,
        "pr_k": pr_k,
        "class_names": list(names),
        "sets": {},
    }
    for s in sets:
        entry: dict[str, Any] = {}
        for scope, mask in [("overall", np.ones(len(s.labels), bool))] + [(n, s.labels == c) for c, n in enumerate(names)]:
            test_mask = np.ones(len(test.labels), bool) if scope == "overall" else test.labels == names.index(scope)
            train_mask = np.ones(len(data.labels["train"]), bool) if scope == "overall" else data.labels["train"] == names.index(scope)
            entry[scope] = {
                **per_image_summary({k: v[mask] for k, v in s.values.items()}, s.labels[mask]),
                **distribution_metrics(feats[s.name][mask], feats["real_test"][test_mask], train_feats[train_mask],
                                       k=pr_k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
                                       against_test=s.name != "real_test"),
            }
        summary["sets"][s.name] = entry

    write_metrics(layout, "quality", summary)
    artifacts = write_outputs(layout, summary, sets, data.images["train"], max_pairs)
    if tracker is not None:
        tracker.log_metrics(flat_metrics(summary))
        for path in [layout.metrics_file("quality"), *artifacts]:
            tracker.log_artifact(path, "quality")
    return summary


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """`<set>.<scope>.<metric>` -> value for MLflow (defined values only; class names sanitised)."""
    flat = {f"reference.{k}": v for k, v in summary["reference"].items() if isinstance(v, (int, float))}
    for name, entry in summary["sets"].items():
        for scope, values in entry.items():
            for metric, value in values.items():
                if isinstance(value, (int, float)):
                    flat[f"{name}.{scope}.{metric}".replace(" ", "_")] = float(value)
    return flat


# ---- outputs -------------------------------------------------------------------------------------

IMAGE_COLUMNS = ("set", "file", "class", "label", "predicted", "ref_entropy", "ref_margin", "ref_max_prob",
                 "nn_pixel_distance", "nn_feature_distance", "nn_train_index", "memorised", "feature_near",
                 "source", "entropy_change", "margin_change", "pixel_change", "roundtrip_error")


def image_rows(sets: list[ImageSet], class_names: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per synthetic image (file relative to its manifest, as in the manifest)."""
    rows = []
    for s in (s for s in sets if s.synthetic):
        v = s.values
        for i, file in enumerate(s.files):
            row = {"set": s.name, "file": file, "class": class_names[s.labels[i]], "label": int(s.labels[i]),
                   "predicted": int(v["predicted"][i]), "ref_entropy": f"{v['entropy'][i]:.6f}",
                   "ref_margin": f"{v['margin'][i]:.6f}", "ref_max_prob": f"{v['max_prob'][i]:.6f}",
                   "nn_pixel_distance": f"{v['nn_pixel_distance'][i]:.6f}",
                   "nn_feature_distance": f"{v['nn_feature_distance'][i]:.6f}",
                   "nn_train_index": int(v["nn_train_index"][i]), "memorised": int(v["memorised"][i]),
                   "feature_near": int(v["feature_near"][i]), "source": s.rows[i].get("source", "")}
            for key in ("entropy_change", "margin_change", "pixel_change", "roundtrip_error"):
                row[key] = f"{v[key][i]:.6f}" if key in v else ""
            rows.append(row)
    return rows


def _write_text(path: Path, text: str) -> None:
    ensure_writable_dir(path.parent)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def nearest_pairs_grid(queries: np.ndarray, nearest: np.ndarray, captions: list[str], path: Path, title: str) -> None:
    """Synthetic images (top row) over their nearest real training images (bottom row); uint8 [N,H,W,C]."""
    n = max(len(queries), 1)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.2, 2.9), squeeze=False)
    for c in range(len(queries)):
        for r, img in enumerate((queries[c], nearest[c])):
            axes[r, c].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        axes[0, c].set_title(captions[c], fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("synthetic", fontsize=8)
    axes[1, 0].set_ylabel("nearest train", fontsize=8)
    fig.suptitle(title, fontsize=9)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown_report(summary: dict[str, Any], pictures: dict[str, str]) -> str:
    """reports/quality.md: tables per topic, pictures referenced relative to reports/."""
    ref, thr = summary["reference"], summary["memorisation_thresholds"]
    lines = [
        "# Synthetic image quality", "",
        f"Reference classifier: `{ref['network']}`, {ref['epochs']} epochs, seed {ref['seed']}, best epoch "
        f"{ref['best_epoch']}, validation AUC {_fmt(ref['val_auc'])}, **test AUC {_fmt(ref['test_auc'])}** "
        f"(trained on real training images only; its {ref['feature_dim']}-d penultimate activations are the feature space).",
        "`real_val` and `real_test` are real held-out images: their rows are the noise floor.", "",
    ]
    scopes = ["overall", *summary["class_names"]]
    tables = [
        ("Fidelity and diversity", "FD and KID to the real test set, precision/recall (k = "
         f"{summary['pr_k']}) against the real training set.",
         [("n", "n"), ("FD", "fd"), ("KID", "kid"), ("KID s.e.", "kid_se"), ("precision", "precision"), ("recall", "recall")]),
        ("Boundary", "Reference classifier on each image; mismatch = predicted class differs from the intended one.",
         [("entropy", "entropy_mean"), ("margin", "margin_mean"), ("max prob", "max_prob_mean"), ("mismatch", "mismatch_rate")]),
        ("Memorisation", f"Distance to the nearest real training image; flagged below the {thr['percentile']}th percentile "
         f"of real test images (pixels: {thr['pixel']:.4g} RMS on [0, 1]; features: {thr['feature']:.4g}).",
         [("NN pixel (median)", "nn_pixel_median"), ("NN feature (median)", "nn_feature_median"),
          ("memorised (pixels)", "memorised_rate"), ("near (features)", "feature_near_rate")]),
    ]
    for title, note, columns in tables:
        lines += [f"## {title}", "", note, "", "| set | scope | " + " | ".join(c for c, _ in columns) + " |",
                  "| --- | --- | " + " | ".join("---:" for _ in columns) + " |"]
        for name, entry in summary["sets"].items():
            lines += [f"| {name} | {scope} | " + " | ".join(_fmt(entry[scope].get(k)) for _, k in columns) + " |" for scope in scopes]
        lines.append("")
    changes = [("entropy change", "entropy_change_mean"), ("margin change", "margin_change_mean"),
               ("prediction flipped", "prediction_flipped_mean"), ("pixel change (RMS)", "pixel_change_mean"),
               ("DDIM round trip", "roundtrip_error_mean")]
    stage2 = [n for n in summary["sets"] if n.startswith("stage2_")]
    if stage2:
        lines += ["## Stage 2 against its stage-1 sources", "", "| set | " + " | ".join(c for c, _ in changes) + " |",
                  "| --- | " + " | ".join("---:" for _ in changes) + " |"]
        lines += [f"| {n} | " + " | ".join(_fmt(summary["sets"][n]["overall"].get(k)) for _, k in changes) + " |" for n in stage2]
        lines.append("")
    lines += ["## Pictures", ""] + [f"![{caption}]({rel})" for caption, rel in pictures.items()] + [""]
    lines += ["Per-image values: [quality_images.csv](quality_images.csv).", ""]
    return "\n".join(lines)


def write_outputs(layout: Layout, summary: dict[str, Any], sets: list[ImageSet], train_images: np.ndarray, max_pairs: int) -> list[Path]:
    """Plots, reports/quality.md and reports/quality_images.csv; returns the files written."""
    ensure_writable_dir(layout.plots_dir)
    pictures: dict[str, Path] = {}
    for key, label in [("entropy", "predictive entropy (nats)"), ("margin", "top-1 minus top-2 probability"),
                       ("max_prob", "max probability"), ("nn_pixel_distance", "RMS pixel distance to nearest training image"),
                       ("nn_feature_distance", "feature distance to nearest training image")]:
        path = layout.plot_file(f"quality_{key}.png")
        histograms({s.name: s.values[key] for s in sets}, path, f"reference classifier: {key}", label)
        pictures[key] = path
    synthetic = [s for s in sets if s.synthetic]
    # Flagged images first, nearest first; if none are flagged the closest ones still show the scale.
    candidates = sorted(((s.values["nn_pixel_distance"][i], not s.values["memorised"][i], s, i)
                         for s in synthetic for i in range(len(s.labels))), key=lambda c: (c[1], c[0]))[:max_pairs]
    flagged = sum(1 for c in candidates if not c[1])
    pairs = layout.plot_file("quality_nearest.png")
    nearest_pairs_grid(
        np.stack([c[2].images[c[3]] for c in candidates]), np.stack([train_images[c[2].values["nn_train_index"][c[3]]] for c in candidates]),
        [f"{c[2].name}\n{'FLAG ' if not c[1] else ''}{c[0]:.3f}" for c in candidates], pairs,
        f"{flagged} flagged (memorised) shown; nearest synthetic images vs their nearest training image")
    pictures["nearest training images"] = pairs

    report = layout.reports_dir / "quality.md"
    _write_text(report, markdown_report(summary, {k: Path("..") / layout.relative(p) for k, p in pictures.items()}))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(IMAGE_COLUMNS))
    writer.writeheader()
    writer.writerows(image_rows(sets, tuple(summary["class_names"])))
    table = layout.reports_dir / "quality_images.csv"
    _write_text(table, buffer.getvalue())
    return [report, table, *pictures.values()]


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, Any]:
    q = params.quality  # the `quality` section (QualityParams)
    return compute_quality(
        layout, feature_network=q.feature_network, epochs=q.epochs, batch_size=q.batch_size, lr=q.lr,
        seed=params.seed * 1000 + q.seed, device=params.device, nn_percentile=q.nn_percentile, pr_k=q.pr_k,
        kid_subsets=q.kid_subsets, kid_subset_size=q.kid_subset_size, max_pairs=q.max_pairs, tracker=tracker,
    )
