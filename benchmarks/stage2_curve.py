"""Stage-2 round trip and effect against model calls: each (respacing, inversion_refine) of a grid.

For a project root with a trained generator (`models/diffusion.pt`, `models/classifier.pt`,
`data/prepared/`) and stage-1 images (the root's `synthetic/stage1/manifest.csv`, or a
`solver_curve.py` point's `points/<key>.npz` with --stage1-npz), every grid point disturbs the
same images through the disturb stage's own code (`stages.disturb.invert_with_round_trip`:
`ddim_invert` with `disturb.inversion_refine` fixed-point iterations per step and the unguided
round trip that checks it; `stages.disturb.decode_guided`: DDIM under one uncertainty measure at
`disturb.scale`), on the point's `disturb.respacing`. Per point it records the cost (UNet and
classifier calls per image, counted with forward hooks on the networks; wall seconds per image
of inversion, round trip and guided decode), the round-trip error, and what stage 2 did: by the
guiding classifier at t=0 (share of images whose entropy rose, share still in the intended
class) and by a reference classifier trained on real images only (`generator_study.real_judge`:
mean entropy change, share still in the intended class, FD of its features to the real test set
and FD / floor).

    python benchmarks/stage2_curve.py --root RUN_ROOT [--params params.yaml] [--profile P] --out DIR \\
        [--images 64] [--grid ddim25:2 ddim25:1 ...] [--measure entropy] [--scale S] \\
        [--stage1-npz SOLVER_OUT/points/dpmpp_2m_20.npz] [--reference-epochs 20]

Writes DIR/stage2_curve.csv (a row per grid point, appended as each finishes), DIR/stage2_curve.png
(round trip and effect against UNet calls per image), DIR/stage2_curve.md, and per point the
stage-2 images (DIR/points/<respacing>_r<refine>_<measure>_s<scale>_n<images>_<stage 1>.npz) and a
stage-1 / stage-2 pair plot.
Resumable: a rerun with the same DIR skips the points that have a CSV row for the same measure,
scale, image count and stage-1 source, and judges without recomputing a point whose images were
saved. The judge is retrained on every run (seeded, repeatable on CPU).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generator_study import real_judge  # noqa: E402
from solver_curve import CallCounter, append_row, read_rows  # noqa: E402

from mgdm_core import runtime  # noqa: E402
from mgdm_core.config import Params, load_params  # noqa: E402
from mgdm_core.data.loaders import from_model_tensor, to_model_tensor  # noqa: E402
from mgdm_core.device import resolve_device  # noqa: E402
from mgdm_core.diffusion.schedule import respace  # noqa: E402
from mgdm_core.errors import ConfigError, DataError  # noqa: E402
from mgdm_core.io import read_image, read_manifest  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.plots import paired_grid  # noqa: E402
from mgdm_core.quality.features import features_and_probs  # noqa: E402
from mgdm_core.quality.metrics import frechet_distance  # noqa: E402
from mgdm_core.stages.common import (  # noqa: E402
    classifier_scores, diffusion_schedule, load_classifier, load_prepared, load_unet,
)
from mgdm_core.stages.disturb import decode_guided, invert_with_round_trip, target_labels  # noqa: E402

DEFAULT_GRID = ("ddim25:2", "ddim25:1", "ddim20:2", "ddim15:2", "ddim10:2", "ddim10:3", "ddim50:1")
MEASURES = ("entropy", "margin", "least_confidence")
COLUMNS = ("respacing", "inversion_refine", "steps", "unet_calls_per_image", "classifier_calls_per_image",
           "seconds_per_image", "roundtrip_error_mean", "roundtrip_error_max",
           "guide_entropy_rose_share", "guide_entropy_change_mean", "guide_target_share",
           "reference_entropy_change_mean", "reference_target_share", "fd", "fd_floor", "fd_ratio",
           "images", "measure", "scale", "stage1", "device")
# The columns that say which experiment a row belongs to (besides the grid point itself).
RUN_COLUMNS = ("measure", "scale", "images", "stage1")


@dataclass(frozen=True)
class GridPoint:
    respacing: str
    refine: int

    def key(self, run: dict[str, str]) -> str:
        """File-name-safe name of this point in one experiment (`RUN_COLUMNS`), e.g.
        ddim25_r2_entropy_s4_n64_stage1-manifest-csv: saved images are reused only for the same one."""
        parts = (self.respacing, f"r{self.refine}", run["measure"], f"s{run['scale']}", f"n{run['images']}", run["stage1"])
        return "_".join(re.sub(r"[^A-Za-z0-9]+", "-", part) for part in parts)


def parse_grid(items: list[str], params: Params) -> list[GridPoint]:
    """`respacing:refine` items -> grid points; a bad respacing (for the model's schedule) or refine
    (outside disturb.inversion_refine's range, or > 0 with disturb.clip_denoised) is a ConfigError
    naming it, raised before anything runs."""
    points = []
    for item in items:
        spacing, sep, refine = item.rpartition(":")
        if not sep or not refine.isdigit():
            raise ConfigError(f"--grid: expected respacing:inversion_refine (e.g. ddim25:2), got {item!r}")
        try:
            respace(diffusion_schedule(params), spacing)
            point_params(params, GridPoint(spacing, int(refine)), "entropy", params.disturb.scale)  # validates refine
        except ConfigError as exc:
            raise ConfigError(f"--grid {item}: {exc}") from None
        if int(refine) > 0 and params.disturb.clip_denoised:
            raise ConfigError(f"--grid {item}: inversion_refine > 0 inverts the unclipped step; disturb.clip_denoised is true")
        points.append(GridPoint(spacing, int(refine)))
    return points


def point_params(params: Params, point: GridPoint, measure: str, scale: float) -> Params:
    """The disturb section of one grid point: its respacing and refine, one measure at `scale`."""
    return params.with_overrides({"disturb.respacing": point.respacing, "disturb.inversion_refine": point.refine,
                                  "disturb.measure": measure, "disturb.scale": scale})


def first_in_class_turns(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first `n` images taken class by class in turns (the first of each class, then
    the second, ...), in file order: stage-1 manifests and solver_curve points list one class after
    another, and the first n of those would be one class only."""
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        rank_in_class[i] = seen.get(label, 0)
        seen[label] = rank_in_class[i] + 1
    return np.sort(np.lexsort((labels, rank_in_class))[:n])


def load_stage1(layout: Layout, npz: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Stage-1 images uint8 [N,H,W,C], their labels int64 [N] and a name of where they came from."""
    if npz is not None:
        with np.load(npz) as arrays:
            return arrays["images"], np.asarray(arrays["labels"], dtype=np.int64), npz.name
    manifest = layout.stage1_dir / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"{manifest}: stage-1 manifest not found; run `mgdm generate` or pass --stage1-npz")
    rows = read_manifest(manifest)
    if not rows:
        raise DataError(f"{manifest}: no stage-1 images")
    images = np.stack([read_image(layout.stage1_dir / r["file"]) for r in rows])
    return images, np.array([int(r["label"]) for r in rows], dtype=np.int64), "stage1/manifest.csv"


def disturb_point(unet, classifier, images: np.ndarray, source_labels: np.ndarray, targets: np.ndarray,
                  params: Params, device) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Stage 2 of `images` as the disturb stage runs it for `params.disturb`'s one measure: the
    stage-2 images uint8 [N,H,W,C] (what the stage writes as PNG), the per-image round-trip error
    and the network calls and wall seconds per image (inversion, round trip and guided decode)."""
    d = params.disturb
    x0 = to_model_tensor(images).to(device)
    y_src, y_tgt = torch.as_tensor(source_labels, device=device), torch.as_tensor(targets, device=device)
    schedule = respace(diffusion_schedule(params), d.respacing)
    unet_calls, classifier_calls = CallCounter(unet), CallCounter(classifier)
    try:
        start = time.perf_counter()
        latents, recon = invert_with_round_trip(unet, x0, y_src, schedule, d)
        decoded = decode_guided(unet, classifier, latents, y_tgt, schedule, d.measures[0], d)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        unet_calls.close()
        classifier_calls.close()
    roundtrip = (recon - x0).abs().flatten(1).mean(1).cpu().numpy()  # as the stage: mean |error| on [-1, 1]
    n = len(images)
    return from_model_tensor(decoded.cpu()), roundtrip, {"unet_calls_per_image": unet_calls.rows / n,
                                                         "classifier_calls_per_image": classifier_calls.rows / n,
                                                         "seconds_per_image": seconds / n}


def entropy_of(probs: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats of probabilities [N,K], as `classifier_scores` computes it."""
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)


@dataclass(frozen=True)
class Before:
    """The stage-1 images as both classifiers see them, for the per-image changes."""
    guide_entropy: np.ndarray
    reference_entropy: np.ndarray
    guide_target_share: float
    reference_target_share: float
    fd: float


def judge_stage1(images, targets, classifier, judge, real_test_features, device) -> Before:
    guide_probs, _, guide_entropy = classifier_scores(classifier, images, device)
    features, probs = features_and_probs(judge, images, device)
    return Before(guide_entropy, entropy_of(probs), float((guide_probs.argmax(1) == targets).mean()),
                  float((probs.argmax(1) == targets).mean()), frechet_distance(features, real_test_features))


def judge_stage2(images, targets, before: Before, classifier, judge, real_test_features, floor,
                 device) -> dict[str, float]:
    """What stage 2 did, image by image against its stage-1 source: by the guiding classifier at
    t=0 (as the disturb stage's metrics) and by the reference classifier trained on real images."""
    guide_probs, _, guide_entropy = classifier_scores(classifier, images, device)
    features, probs = features_and_probs(judge, images, device)
    fd = frechet_distance(features, real_test_features)
    return {"guide_entropy_rose_share": float((guide_entropy > before.guide_entropy).mean()),
            "guide_entropy_change_mean": float((guide_entropy - before.guide_entropy).mean()),
            "guide_target_share": float((guide_probs.argmax(1) == targets).mean()),
            "reference_entropy_change_mean": float((entropy_of(probs) - before.reference_entropy).mean()),
            "reference_target_share": float((probs.argmax(1) == targets).mean()),
            "fd": fd, "fd_floor": floor, "fd_ratio": fd / floor}


def row_key(row: dict) -> tuple[str, ...]:
    """A row's grid point and experiment, as the CSV spells them."""
    return tuple(str(row[c]) for c in ("respacing", "inversion_refine", *RUN_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="project root of a run (holds data/prepared and models/)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds a stage2_curve.csv)")
    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID),
                        help="respacing:inversion_refine points (respacing as disturb.respacing, e.g. ddim25:2)")
    parser.add_argument("--images", type=int, default=64, help="stage-1 images disturbed at every point")
    parser.add_argument("--measure", default="entropy", choices=MEASURES)
    parser.add_argument("--scale", type=float, default=None, help="uncertainty-guidance scale (default disturb.scale)")
    parser.add_argument("--stage1-npz", type=Path, default=None,
                        help="stage-1 images from a solver_curve point (points/<key>.npz) instead of the root's stage 1")
    parser.add_argument("--reference-epochs", type=int, default=20, help="epochs of the judge (trained on real images)")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images must be at least 2 (FD needs two images)")

    t0 = time.perf_counter()
    runtime.configure_process()
    try:
        params = load_params(args.params, args.profile)
        points = parse_grid(args.grid, params)
    except ConfigError as exc:
        parser.error(str(exc))
    scale = params.disturb.scale if args.scale is None else args.scale
    layout = Layout(Path(args.root))
    device = resolve_device(params.device)
    data = load_prepared(layout)
    all_images, all_labels, stage1_name = load_stage1(layout, args.stage1_npz)
    chosen = first_in_class_turns(all_labels, args.images)
    images, source_labels = all_images[chosen], all_labels[chosen]
    targets = target_labels(source_labels, params.disturb.class_map, data.num_classes)
    unet = load_unet(layout.diffusion_model, device, data)
    classifier = load_classifier(layout.classifier_model, device, data)

    out = Path(args.out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    csv_path = out / "stage2_curve.csv"
    run = {"measure": args.measure, "scale": f"{scale:.6g}", "images": str(len(images)), "stage1": stage1_name}
    done = {row_key(r) for r in read_rows(csv_path)}
    todo = [p for p in points if row_key({"respacing": p.respacing, "inversion_refine": p.refine, **run}) not in done]
    print(f"{len(points) - len(todo)} of {len(points)} grid points already in {csv_path}", flush=True)

    _, reference, feats, floor = real_judge(params, data, device, args.reference_epochs)
    before = judge_stage1(images, targets, classifier, reference.model, feats["test"][0], device)
    print(f"judge: test AUC {reference.test_auc:.3f}; FD floor {floor:.3f}; stage 1 FD / floor "
          f"{before.fd / floor:.3f} on these {len(images)} images", flush=True)

    shown = first_in_class_turns(source_labels, 8)
    for point in todo:
        saved = out / "points" / f"{point.key(run)}.npz"
        if saved.is_file():  # disturbed by an interrupted run: judge it, do not pay for it twice
            with np.load(saved) as arrays:
                stage2, roundtrip = arrays["images"], arrays["roundtrip"]
                cost = {k: float(arrays[k]) for k in ("unet_calls_per_image", "classifier_calls_per_image",
                                                      "seconds_per_image")}
        else:
            chosen_params = point_params(params, point, args.measure, scale)
            stage2, roundtrip, cost = disturb_point(unet, classifier, images, source_labels, targets,
                                                    chosen_params, device)
            np.savez_compressed(saved, images=stage2, labels=targets, roundtrip=roundtrip, **cost)
        paired_grid(images[shown], stage2[shown], out / "points" / f"{point.key(run)}.png",
                    [data.class_names[t] for t in targets[shown]],
                    title=f"{point.respacing}, refine {point.refine}: {args.measure} at {scale:g}")
        steps = respace(diffusion_schedule(params), point.respacing).num_timesteps
        row = {"respacing": point.respacing, "inversion_refine": point.refine, "steps": steps, **cost,
               "roundtrip_error_mean": float(roundtrip.mean()), "roundtrip_error_max": float(roundtrip.max()),
               **judge_stage2(stage2, targets, before, classifier, reference.model, feats["test"][0], floor, device),
               **run, "device": str(device)}
        append_row(csv_path, row, COLUMNS)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    rows = [r for r in read_rows(csv_path) if all(r[c] == v for c, v in run.items())]
    plot(rows, before, floor, out / "stage2_curve.png")
    write_page(out, rows, args, scale, stage1_name, reference, floor, before, time.perf_counter() - t0)


def plot(rows: list[dict[str, str]], before: Before, floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    panels = ((("roundtrip_error_mean", "-"), ("roundtrip_error_max", ":")),
              (("guide_entropy_rose_share", "-"), ("guide_target_share", "--")),
              (("reference_entropy_change_mean", "-"),),
              (("fd_ratio", "-"),))
    titles = ("round trip |error| on [-1, 1] (mean -, max :)",
              "guiding classifier: entropy rose (-), intended class (--)",
              "reference classifier: mean entropy change (nats)", "FD / real floor (reference features)")
    for refine in sorted({int(r["inversion_refine"]) for r in rows}):
        mine = sorted((r for r in rows if int(r["inversion_refine"]) == refine),
                      key=lambda r: float(r["unet_calls_per_image"]))
        calls = [float(r["unet_calls_per_image"]) for r in mine]
        for ax, columns in zip(axes, panels):
            for column, style in columns:
                values = [float(r[column]) for r in mine]
                ax.plot(calls, values, marker="o", ls=style, color=f"C{refine}",
                        label=f"refine {refine}" if style == "-" else None)
                for x, v, r in zip(calls, values, mine):
                    ax.annotate(r["respacing"], (x, v), fontsize=6, xytext=(2, 2), textcoords="offset points")
    axes[1].axhline(before.guide_target_share, color="grey", ls="--", label="stage 1 intended class")
    axes[2].axhline(0.0, color="grey", ls=":")
    axes[3].axhline(before.fd / floor, color="grey", ls="--", label="stage 1 (same images)")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="UNet calls per image")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_page(out: Path, rows, args, scale, stage1_name, reference, floor, before: Before, seconds) -> None:
    cols = ("respacing", "inversion_refine", "unet_calls_per_image", "classifier_calls_per_image", "seconds_per_image",
            "roundtrip_error_mean", "roundtrip_error_max", "guide_entropy_rose_share", "guide_target_share",
            "reference_entropy_change_mean", "reference_target_share", "fd_ratio")
    lines = [
        "# Stage 2: round trip and effect against model calls",
        "",
        f"Generated by `benchmarks/stage2_curve.py` (this run {seconds / 60:.1f} min) on `{args.root}` "
        f"(params `{args.params}`, profile `{args.profile}`). Measure `{args.measure}` at scale {scale:g}; "
        f"{rows[0]['images'] if rows else args.images} stage-1 images from `{stage1_name}` (the first of each "
        "class in turns), the same images at every point, disturbed by the disturb stage's own functions.",
        "",
        f"Judge: `{reference.network}` trained on real training images only ({reference.epochs} epochs), real test "
        f"AUC {reference.test_auc:.3f}; FD floor FD(real val, real test) = {floor:.3f}. The stage-1 images "
        f"themselves: FD / floor {before.fd / floor:.3f}, in the intended class for the guiding classifier "
        f"{before.guide_target_share:.3f}, for the reference classifier {before.reference_target_share:.3f}.",
        "",
        "| " + " | ".join(cols) + " |",
        "| --- |" + " ---: |" * (len(cols) - 1),
    ]
    for r in sorted(rows, key=lambda r: float(r["unet_calls_per_image"])):
        lines.append("| " + " | ".join(r[c] for c in cols) + " |")
    lines += [
        "",
        "Columns:",
        "",
        "- `inversion_refine`: fixed-point iterations per inversion step (1 + refine UNet calls per step).",
        "- `unet_calls_per_image`, `classifier_calls_per_image`: rows through each network per image, counted "
        "with forward hooks: inversion (steps x (1 + refine)), the unguided round-trip decode the stage runs "
        "as its check (steps), and the guided decode (steps UNet calls, steps classifier calls). The stage "
        "pays the inversion and round trip once for all its measures, the guided decode once per measure.",
        "- `seconds_per_image`: wall seconds per image of those three, on this machine under whatever else ran "
        "(scoring excluded).",
        "- `roundtrip_error_mean`, `_max`: per image mean |x0 - decode(invert(x0))| on the [-1, 1] scale, "
        "unguided; mean and max over the images (the stage's `roundtrip_error_*`).",
        "- `guide_entropy_rose_share`: share of images whose guiding-classifier entropy at t=0 is higher after "
        "stage 2 than before (the stage's `<measure>_entropy_increased_rate`); `guide_target_share`: share the "
        "guiding classifier still puts in the intended class (`<measure>_target_class_rate`).",
        "- `reference_entropy_change_mean`: mean per-image change of the reference classifier's entropy "
        "(nats, stage 2 minus stage 1); `reference_target_share`: share it puts in the intended class.",
        "- `fd_ratio`: FD of the stage-2 images' reference features to the real test set over the floor. "
        "With this few images FD is biased upward: compare it with the stage-1 images' value above, not with 1.",
        "",
        "![round trip and effect against UNet calls](stage2_curve.png)",
        "",
    ]
    (out / "stage2_curve.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
