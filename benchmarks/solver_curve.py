"""Stage-1 quality against model calls: each (sampler, respacing) of a grid, judged independently.

For a project root with a trained generator (`models/diffusion.pt`, `models/classifier.pt`,
`data/prepared/`), every grid point samples the same images (N per class, the same labels and
per-image seeds, `seed_for` as `generate` uses) through the generate stage's own code
(`stages.generate.sample_batches`: `load_unet`/`load_classifier`, `classifier_guidance` at
`generate.scale`), and judges them as the quality stage does, never with the guiding classifier:
the reference classifier trained on real training images only (`generator_study.real_judge`),
FD of its features to the real test set and that FD over the floor FD(real val, real test),
class fidelity (its AUC and balanced accuracy on the images against their intended labels), and
saturated pixels. Model calls per image are counted on the networks themselves (forward hooks),
not inferred from the step count; wall seconds per image cover sampling only.

    python benchmarks/solver_curve.py --root RUN_ROOT [--params params.yaml] [--profile P] --out DIR \\
        [--per-class 64] [--grid ddpm:100 ddpm:50 ... dpmpp_2m:10] [--scale S] [--reference-epochs 20]

Writes DIR/solver_curve.csv (a row per grid point, appended as each finishes), DIR/solver_curve.png
(quality against UNet calls per image), DIR/solver_curve.md, and per point a sample grid and the
images (DIR/points/<sampler>_<respacing>.{png,npz}). Resumable: a rerun with the same DIR skips
the points that have a CSV row, and judges without resampling a point whose images were saved.
The judge is retrained on every run (seeded, repeatable on CPU); its FD floor is in every row.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generator_study import real_judge  # noqa: E402

from mgdm_core import runtime  # noqa: E402
from mgdm_core.config import Params, load_params  # noqa: E402
from mgdm_core.device import resolve_device  # noqa: E402
from mgdm_core.diffusion.schedule import Schedule, respace  # noqa: E402
from mgdm_core.errors import ConfigError  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.plots import class_grid  # noqa: E402
from mgdm_core.quality.by_step import judge_sample  # noqa: E402
from mgdm_core.quality.judge import class_fidelity  # noqa: E402
from mgdm_core.stages.common import diffusion_schedule, load_classifier, load_prepared, load_unet, seed_for  # noqa: E402
from mgdm_core.stages.generate import Job, sample_batches  # noqa: E402

DEFAULT_GRID = ("ddpm:100", "ddpm:50", "ddpm:25", "ddim:50", "ddim:25", "ddim:10",
                "dpmpp_2m:25", "dpmpp_2m:20", "dpmpp_2m:15", "dpmpp_2m:10")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
COLUMNS = ("sampler", "respacing", "steps", "unet_calls_per_image", "classifier_calls_per_image",
           "seconds_per_image", "fd", "fd_floor", "fd_ratio", "fidelity_auc", "fidelity_balanced_accuracy",
           "saturated_fraction", "images", "guidance", "scale", "device")


@dataclass(frozen=True)
class GridPoint:
    sampler: str
    respacing: str

    @property
    def key(self) -> str:
        """File-name-safe name, e.g. dpmpp_2m_20 or ddpm_10-15-25."""
        return f"{self.sampler}_{re.sub(r'[^A-Za-z0-9]+', '-', self.respacing)}"


def parse_grid(items: list[str], schedule: Schedule) -> list[GridPoint]:
    """`sampler:respacing` items -> grid points; a bad sampler or respacing (for the model's
    `schedule`) is a ConfigError naming it, raised before anything is sampled."""
    points = []
    for item in items:
        sampler, sep, spacing = item.partition(":")
        if not sep or sampler not in SAMPLERS:
            raise ConfigError(f"--grid: expected sampler:respacing with sampler one of {SAMPLERS}, got {item!r}")
        respace(schedule, spacing)
        points.append(GridPoint(sampler, spacing))
    return points


class CallCounter:
    """Rows through a network's forward: a forward pre-hook adds each call's batch size."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, _module: torch.nn.Module, inputs: tuple) -> None:
        self.rows += int(inputs[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


def point_params(params: Params, point: GridPoint, scale: float) -> Params:
    """The generate section of one grid point: classifier guidance at `scale`, its sampler and respacing."""
    return params.with_overrides({"generate.guidance": "classifier", "generate.scale": scale,
                                  "generate.sampler": point.sampler, "generate.respacing": point.respacing})


def sample_point(unet, classifier, jobs: list[Job], params: Params, device, num_classes: int,
                 shape: tuple[int, int, int]) -> tuple[np.ndarray, dict[str, float]]:
    """Images uint8 [N,H,W,C] of `jobs` (in order) through the generate stage's sampling, with
    network calls per image and wall seconds per image."""
    unet_calls, classifier_calls = CallCounter(unet), CallCounter(classifier)
    try:
        start = time.perf_counter()
        images = [batch_images for _, batch_images in
                  sample_batches(unet, classifier, jobs, params, device, num_classes, shape)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        unet_calls.close()
        classifier_calls.close()
    n = len(jobs)
    return np.concatenate(images), {"unet_calls_per_image": unet_calls.rows / n,
                                    "classifier_calls_per_image": classifier_calls.rows / n,
                                    "seconds_per_image": seconds / n}


def judge_images(images: np.ndarray, labels: np.ndarray, judge, real_test_features: np.ndarray,
                 floor: float, device) -> dict[str, float | None]:
    """The quality stage's independent figures for one synthetic set (`quality.by_step.judge_sample`,
    the judge the quality stage and `steps: auto` use), with the floor beside them."""
    judged = judge_sample(images, labels, judge, real_test_features, floor, device)
    return {"fd": judged["fd"], "fd_floor": floor, **{k: v for k, v in judged.items() if k != "fd"}}


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def append_row(path: Path, row: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    """One finished grid point; the header (`columns`) is written with the first row."""
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="project root of a run (holds data/prepared and models/)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--out", required=True, help="output folder (resumed when it holds a solver_curve.csv)")
    parser.add_argument("--per-class", type=int, default=64, help="images per class at every grid point")
    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID),
                        help="sampler:respacing points (respacing as generate.respacing: 20, ddim50, 10,5,5)")
    parser.add_argument("--scale", type=float, default=None, help="classifier-guidance scale (default generate.scale)")
    parser.add_argument("--reference-epochs", type=int, default=20, help="epochs of the judge (trained on real images)")
    parser.add_argument("--dpmpp-thresholding", choices=("dynamic", "static", "none"), default="dynamic",
                        help="x0 thresholding of the dpmpp_2m points (generate uses dynamic; static clamps to "
                             "[-1, 1] as ddim/ddpm's clip does, but after guidance); use its own --out")
    parser.add_argument("--cas", nargs="*", default=[], metavar="SAMPLER:RESPACING",
                        help="grid points whose images also get a CAS (the quality stage's network trained on them "
                             "alone, tested on real test images), beside the same network trained on real images")
    args = parser.parse_args()
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")

    t0 = time.perf_counter()
    runtime.configure_process()
    if args.dpmpp_thresholding != "dynamic":
        # Measurement only: the generate stage always thresholds dynamically; this swaps the
        # solver it calls for the same solver with another thresholding, so the stage's code
        # path (batches, seeds, guidance) stays the one measured.
        import functools

        from mgdm_core.diffusion import sampling
        from mgdm_core.stages import generate as generate_stage

        generate_stage.dpmpp_2m_sample = functools.partial(sampling.dpmpp_2m_sample,
                                                           thresholding=args.dpmpp_thresholding)
    try:
        params = load_params(args.params, args.profile)
        points = parse_grid(args.grid, diffusion_schedule(params))
    except ConfigError as exc:
        parser.error(str(exc))
    scale = params.generate.scale if args.scale is None else args.scale
    layout = Layout(Path(args.root))
    device = resolve_device(params.device)
    data = load_prepared(layout)
    unet = load_unet(layout.diffusion_model, device, data)
    classifier = load_classifier(layout.classifier_model, device, data)
    shape = (data.channels, data.image_size, data.image_size)

    out = Path(args.out)
    (out / "points").mkdir(parents=True, exist_ok=True)
    csv_path = out / "solver_curve.csv"
    done = {(r["sampler"], r["respacing"]) for r in read_rows(csv_path)}
    todo = [p for p in points if (p.sampler, p.respacing) not in done]
    print(f"{len(points) - len(todo)} of {len(points)} grid points already in {csv_path}", flush=True)

    split, reference, feats, floor = real_judge(params, data, device, args.reference_epochs)
    real_fidelity = class_fidelity(split["test"][1], feats["test"][1])
    print(f"judge: test AUC {reference.test_auc:.3f}; FD floor {floor:.3f}", flush=True)

    # The same images at every point: class k's image i has generate's seed for (seed, k, i).
    jobs = [Job(out / "points" / "unused.png", label, seed_for(params.seed, label, i))
            for label in range(data.num_classes) for i in range(args.per_class)]
    labels = np.array([j.label for j in jobs], dtype=np.int64)
    for point in todo:
        saved = out / "points" / f"{point.key}.npz"
        chosen = point_params(params, point, scale)
        if saved.is_file():  # sampled by an interrupted run: judge it, do not pay for it twice
            with np.load(saved) as arrays:
                images, cost = arrays["images"], {k: float(arrays[k]) for k in
                                                  ("unet_calls_per_image", "classifier_calls_per_image",
                                                   "seconds_per_image")}
        else:
            images, cost = sample_point(unet, classifier, jobs, chosen, device, data.num_classes, shape)
            np.savez_compressed(saved, images=images, labels=labels, **cost)
        class_grid(images, labels, data.class_names, out / "points" / f"{point.key}.png", 8,
                   title=f"{point.sampler} {point.respacing}, classifier guidance {scale}")
        steps = respace(diffusion_schedule(params), point.respacing).num_timesteps
        row = {"sampler": point.sampler, "respacing": point.respacing, "steps": steps, **cost,
               **judge_images(images, labels, reference.model, feats["test"][0], floor, device),
               "images": len(images), "guidance": "classifier", "scale": scale, "device": str(device)}
        append_row(csv_path, row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    rows = read_rows(csv_path)
    cas_rows = classification_accuracy_rows(args.cas, points, params, data, split, out, device)
    plot(rows, real_fidelity["auc"], out / "solver_curve.png")
    write_page(out, rows, args, scale, reference, floor, real_fidelity, time.perf_counter() - t0, cas_rows)


def classification_accuracy_rows(names, points, params, data, split, out, device) -> list[dict]:
    """CAS (Ravuri & Vinyals 2019) of the named points' saved images and of the real training set,
    with the quality stage's network, epochs and optimiser (`quality.*`), cached in solver_cas.csv."""
    if not names:
        return []
    from mgdm_core.quality.judge import classification_accuracy_score

    path = out / "solver_cas.csv"
    known = {r["set"]: r for r in read_rows(path)}
    keys = {f"{p.sampler}:{p.respacing}": p.key for p in points}
    q = params.quality
    wanted = ["real", *names]
    for name in wanted:
        if name in known:
            continue
        if name == "real":
            images, labels = split["train"]
        elif name in keys and (out / "points" / f"{keys[name]}.npz").is_file():
            with np.load(out / "points" / f"{keys[name]}.npz") as arrays:
                images, labels = arrays["images"], arrays["labels"]
        else:
            print(f"--cas {name}: not a sampled grid point; skipped", flush=True)
            continue
        cas = classification_accuracy_score(images, labels, val=split["val"], test=split["test"],
                                            num_classes=data.num_classes, network=q.feature_network,
                                            epochs=q.epochs, batch_size=q.batch_size, lr=q.lr, seed=q.seed,
                                            device=device)
        row = {"set": name, "images": len(labels), "cas_auc": cas["auc"], "cas_balanced_accuracy": cas["balanced_accuracy"]}
        known[name] = row
        print({"cas": row}, flush=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(known.values())
    return [known[n] for n in wanted if n in known]


def plot(rows: list[dict[str, str]], real_auc: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = (("fd_ratio", "FD / real floor (1 = real)"), ("fidelity_auc", "class fidelity AUC (reference classifier)"),
              ("seconds_per_image", "wall seconds per image"))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: float(r["unet_calls_per_image"]))
        calls = [float(r["unet_calls_per_image"]) for r in mine]
        for ax, (column, _) in zip(axes, panels):
            ax.plot(calls, [float(r[column]) for r in mine], marker="o", label=sampler)
            for x, r in zip(calls, mine):
                ax.annotate(r["respacing"], (x, float(r[column])), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if real_auc is not None:
        axes[1].axhline(real_auc, color="grey", ls="--", label="real test")
    axes[0].axhline(1.0, color="grey", ls="--", label="real floor")
    for ax, (_, title) in zip(axes, panels):
        ax.set(title=title, xlabel="UNet calls per image")
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_page(out: Path, rows, args, scale, reference, floor, real_fidelity, seconds, cas_rows=()) -> None:
    cols = ("sampler", "respacing", "unet_calls_per_image", "classifier_calls_per_image", "seconds_per_image",
            "fd_ratio", "fidelity_auc", "fidelity_balanced_accuracy", "saturated_fraction")
    lines = [
        "# Stage 1: quality against model calls",
        "",
        f"Generated by `benchmarks/solver_curve.py` (this run {seconds / 60:.1f} min) on `{args.root}` "
        f"(params `{args.params}`, profile `{args.profile}`). Classifier guidance at scale {scale}; "
        f"{args.per_class} images per class, the same labels and per-image seeds at every point; "
        f"dpmpp_2m thresholding: {args.dpmpp_thresholding}.",
        "",
        f"Judge: `{reference.network}` trained on real training images only ({reference.epochs} epochs), real test "
        f"AUC {reference.test_auc:.3f}, balanced accuracy {real_fidelity['balanced_accuracy']:.3f}; FD floor "
        f"FD(real val, real test) = {floor:.3f}. UNet and classifier calls are counted rows through each "
        "network per image; seconds cover sampling only, on this machine, under whatever else ran.",
        "",
        ("Not only the solver differs: ddpm and ddim clip the model's x0_hat to [-1, 1] before guidance, "
         "dpmpp_2m thresholds the guided x0_hat dynamically (Imagen's quantile rescale), so part of a "
         "difference in saturation (and FD) can come from that rather than from the solver's order."
         if args.dpmpp_thresholding == "dynamic" else
         f"dpmpp_2m thresholds the guided x0_hat with `{args.dpmpp_thresholding}` here (the generate stage: "
         "dynamic); ddpm and ddim clip the model's x0_hat to [-1, 1] before guidance."),
        "",
        "| " + " | ".join(cols) + " |",
        "| --- | --- |" + " ---: |" * (len(cols) - 2),
    ]
    for r in sorted(rows, key=lambda r: (r["sampler"], float(r["unet_calls_per_image"]))):
        lines.append("| " + " | ".join(r[c] for c in cols) + " |")
    lines += ["", "![quality against model calls](solver_curve.png)", ""]
    if cas_rows:
        lines += ["## CAS", "", "The quality stage's network (`quality.feature_network`, `quality.epochs`) trained on "
                  "each set alone, epoch chosen on real validation AUC, tested on the real test images:", "",
                  "| trained on | images | CAS AUC | CAS balanced accuracy |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['set']} | {r['images']} | {float(r['cas_auc']):.3f} | {float(r['cas_balanced_accuracy']):.3f} |"
                  for r in cas_rows]
        lines.append("")
    (out / "solver_curve.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
