"""The quality stage's written outputs, apart from the computation (as `evaluation.report` is for
`evaluate`): reports/quality.md, reports/quality_images.csv, plots/quality_*.png and
plots/quality_by_step.csv, each a function of the computed summary and sets and the paths to write.

`summary` is the structure `stages.quality.compute_quality` writes to metrics/quality.json; a
set is anything shaped like `ScoredSet` (the stage's `ImageSet`, one per judged image set).
"""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mgdm_core.io import atomic_write, ensure_writable_dir  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.plots import histograms  # noqa: E402


class ScoredSet(Protocol):
    """What the report reads of one judged image set (the stage's `ImageSet`)."""

    name: str
    images: np.ndarray  # uint8 [N,H,W,C]
    labels: np.ndarray  # intended labels, int64 [N]
    files: list[str]  # relative to the set's manifest
    rows: list[dict[str, str]]  # manifest rows (synthetic sets only)
    values: dict[str, np.ndarray]  # per-image values [N] by name

    @property
    def synthetic(self) -> bool: ...


# The by-step table's columns, in plots/quality_by_step.csv and report order.
BY_STEP_COLUMNS = ("step", "snapshot", "n", "fd", "fd_ratio", "fidelity_auc", "fidelity_balanced_accuracy",
                   "saturated_fraction")

# reports/quality_images.csv's columns: one row per synthetic image.
IMAGE_COLUMNS = ("set", "file", "class", "label", "predicted", "ref_entropy", "ref_margin", "ref_max_prob",
                 "nn_pixel_distance", "nn_feature_distance", "nn_train_index", "memorised", "feature_near",
                 "source", "entropy_change", "margin_change", "pixel_change", "roundtrip_error")


def image_rows(sets: list[ScoredSet], class_names: tuple[str, ...]) -> list[dict[str, Any]]:
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


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell or log figure: floats to `digits` significant digits, undefined (None) as a dash."""
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def judged_section(summary: dict[str, Any]) -> list[str]:
    """The independent judges' tables: one row per set, then one per (set, class)."""
    ref, sat = summary["reference"], summary["saturation"]
    lines = [
        "## Judged independently", "",
        f"Never the guiding classifier. **Fidelity**: the reference classifier on each set against its intended "
        f"labels (AUC: binary from the probability of label 1, macro one-vs-rest for more classes; balanced "
        f"accuracy and recall at the MedMNIST threshold); the real rows are the same classifier on real images. "
        f"**CAS** (classification accuracy score, Ravuri & Vinyals 2019): a `{ref['network']}` trained on the set "
        f"alone ({ref['epochs']} epochs, epoch chosen on real validation AUC), tested on the real test set; the "
        f"real rows show it trained on the real training set. **FD / floor**, **KID / floor**: FD and KID to the "
        f"real test set divided by those of the real validation set (the floor: {fmt(summary['real']['fd_floor'])} "
        f"FD; KID / floor is – when the floor's KID is not positive). **Saturated**: fraction of pixel values "
        f"<= {sat['low']} or >= {sat['high']} (uint8; <= {sat['low']}/255 or >= {sat['high']}/255 on [0, 1]).", "",
        "| set | fidelity AUC | fidelity bal. acc. | CAS AUC | CAS bal. acc. | FD | FD / floor | KID / floor | saturated |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = ("fidelity_auc", "fidelity_balanced_accuracy", "cas_auc", "cas_balanced_accuracy", "fd", "fd_ratio",
            "kid_ratio", "saturated_fraction")
    for name, entry in summary["sets"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(entry["overall"].get(k)) for k in keys) + " |")
    lines += ["", "Per class: fidelity recall is the share of the class's images the reference classifier assigns "
              "to it (mismatch = 1 - recall); CAS recall is the CAS network's recall on that class of the real test set.",
              "", "| set | class | n | fidelity recall | mismatch | CAS recall | FD / floor | saturated |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, entry in summary["sets"].items():
        for cls in summary["class_names"]:
            row = entry[cls]
            lines.append(f"| {name} | {cls} | " + " | ".join(fmt(row.get(k)) for k in (
                "n", "fidelity_recall", "fidelity_mismatch", "cas_recall", "fd_ratio", "saturated_fraction")) + " |")
    return lines + [""]


def by_step_section(by_step: dict[str, Any], picture: Any) -> list[str]:
    """The quality-by-training-step table and curve, or the one line saying why there is none."""
    lines = ["## Quality by training step", ""]
    if not by_step["rows"]:
        return lines + [f"Skipped: {by_step['note']}.", ""]
    lines += [
        f"{by_step['samples']} unguided, class-conditional DDPM images (respacing \"{by_step['respacing']}\", classes "
        f"balanced, the same seeds at every step) from {len(by_step['rows'])} of {by_step['found']} EMA snapshots. "
        "FD grows as the sample shrinks, so compare steps with each other, not with the stage-1 row above.", "",
        "| step | FD | FD / floor | fidelity AUC | fidelity bal. acc. | saturated |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['step']} | " + " | ".join(fmt(r[k]) for k in BY_STEP_COLUMNS[3:]) + " |" for r in by_step["rows"]]
    if by_step["skipped"]:
        lines += ["", f"Skipped (another UNet config than models/diffusion.pt): {', '.join(by_step['skipped'])}."]
    if picture is not None:
        lines += ["", f"![quality by training step]({picture})"]
    return lines + [""]


def by_step_plot(rows: list[dict[str, Any]], real_auc: float | None, path: Path, note: str | None) -> None:
    """Two panels over the training step: FD / floor (1 = as close as two real splits) and fidelity AUC."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [r["step"] for r in rows]
    for ax, key, label, reference, ref_label in (
        (axes[0], "fd_ratio", "FD / real-validation floor", 1.0, "floor (real val vs real test)"),
        (axes[1], "fidelity_auc", "reference-classifier AUC (intended labels)", real_auc, "real test"),
    ):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        if rows:
            ax.plot(steps, values, marker="o")
        if key == "fd_ratio" and any(v > 0 for v in values if np.isfinite(v)):
            ax.set_yscale("log")  # ratios span decades on the way down to the floor (1)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=ref_label)
            ax.legend(fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    if note:
        fig.text(0.5, 0.5, f"no curve: {note}", ha="center", va="center", fontsize=9)
    fig.suptitle("quality by training step (unguided EMA samples)", fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def by_step_csv(rows: list[dict[str, Any]]) -> str:
    """plots/quality_by_step.csv: one row per judged snapshot, undefined values empty."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(BY_STEP_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r[k] is None else r[k]) for k in BY_STEP_COLUMNS} for r in rows)
    return buffer.getvalue()


def markdown_report(summary: dict[str, Any], pictures: dict[str, str]) -> str:
    """reports/quality.md: tables per topic, pictures referenced relative to reports/."""
    pictures = dict(pictures)  # the by-step curve goes to its own section, the rest to "Pictures"
    ref, thr = summary["reference"], summary["memorisation_thresholds"]
    lines = [
        "# Synthetic image quality", "",
        f"Reference classifier: `{ref['network']}`, {ref['epochs']} epochs, seed {ref['seed']}, best epoch "
        f"{ref['best_epoch']}, validation AUC {fmt(ref['val_auc'])}, **test AUC {fmt(ref['test_auc'])}** "
        f"(trained on real training images only; its {ref['feature_dim']}-d penultimate activations are the feature space).",
        "`real_val` and `real_test` are real held-out images: their rows are the noise floor.", "",
        *judged_section(summary),
        *by_step_section(summary["by_step"], pictures.pop("quality by training step", None)),
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
            lines += [f"| {name} | {scope} | " + " | ".join(fmt(entry[scope].get(k)) for _, k in columns) + " |" for scope in scopes]
        lines.append("")
    changes = [("entropy change", "entropy_change_mean"), ("margin change", "margin_change_mean"),
               ("prediction flipped", "prediction_flipped_mean"), ("pixel change (RMS)", "pixel_change_mean"),
               ("DDIM round trip", "roundtrip_error_mean")]
    stage2 = [n for n in summary["sets"] if n.startswith("stage2_")]
    if stage2:
        lines += ["## Stage 2 against its stage-1 sources", "", "| set | " + " | ".join(c for c, _ in changes) + " |",
                  "| --- | " + " | ".join("---:" for _ in changes) + " |"]
        lines += [f"| {n} | " + " | ".join(fmt(summary["sets"][n]["overall"].get(k)) for _, k in changes) + " |" for n in stage2]
        lines.append("")
    lines += ["## Pictures", ""] + [f"![{caption}]({rel})" for caption, rel in pictures.items()] + [""]
    lines += ["Per-image values: [quality_images.csv](quality_images.csv).", ""]
    return "\n".join(lines)


def images_csv(sets: list[ScoredSet], class_names: tuple[str, ...]) -> str:
    """reports/quality_images.csv: `IMAGE_COLUMNS`, one row per synthetic image."""
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(IMAGE_COLUMNS))
    writer.writeheader()
    writer.writerows(image_rows(sets, class_names))
    return buffer.getvalue()


def write_outputs(
    layout: Layout, summary: dict[str, Any], sets: list[ScoredSet], train_images: np.ndarray, max_pairs: int,
) -> list[Path]:
    """Plots, reports/quality.md and reports/quality_images.csv; returns the files written.

    train_images: the real training images uint8 [N,H,W,C] that `nn_train_index` points into;
    max_pairs: how many synthetic images the nearest-neighbour picture shows.
    """
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
    by_step = summary["by_step"]
    curve_png, curve_csv = layout.plot_file("quality_by_step.png"), layout.plot_file("quality_by_step.csv")
    by_step_plot(by_step["rows"], summary["real"]["fidelity_auc"], curve_png, by_step["note"])
    _write_text(curve_csv, by_step_csv(by_step["rows"]))
    pictures["quality by training step"] = curve_png

    report = layout.reports_dir / "quality.md"
    _write_text(report, markdown_report(summary, {k: Path("..") / layout.relative(p) for k, p in pictures.items()}))
    table = layout.reports_dir / "quality_images.csv"
    _write_text(table, images_csv(sets, tuple(summary["class_names"])))
    return [report, table, curve_csv, *pictures.values()]

