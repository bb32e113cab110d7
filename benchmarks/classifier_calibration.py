"""Calibration of noise-aware guidance classifiers by noise level: expected calibration error,
accuracy, negative log-likelihood and mean confidence on real held-out images noised to x_t.

    python benchmarks/classifier_calibration.py --root RUN_ROOT [--params params.yaml] [--profile P] \\
        --classifier ours=models/classifier.pt --classifier original=/other/root/models/classifier.pt \\
        --out DIR [--buckets 5] [--draws 8]

Stage 2's entropy, margin and least-confidence gradients come from this classifier, so how well its
probabilities match its accuracy at each noise level is the method's lever (docs/fidelity.md).
Images: the real validation and test splits of RUN_ROOT's prepared data (never trained on). Per
bucket of diffusion time t (equal width over the schedule, plus clean images at t = 0), every
image is noised `--draws` times with fixed seeds, the same x_t for every classifier. ECE: 15
equal-width bins of the top-class probability, |accuracy - confidence| weighted by the bin's share.
Writes DIR/classifier_calibration.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from mgdm_core import runtime
from mgdm_core.config import load_params
from mgdm_core.data.loaders import to_model_tensor
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.losses import q_sample
from mgdm_core.layout import Layout
from mgdm_core.stages.common import diffusion_schedule, load_classifier, load_prepared

BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Sum over equal-width confidence bins of (share of samples) x |accuracy - mean confidence|."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs((predicted[inside] == labels[inside]).mean() - confidence[inside].mean())
    return float(ece)


@torch.no_grad()
def noised_probabilities(classifier, schedule, images: torch.Tensor, lo: int, hi: int, draws: int, seed: int):
    """Probabilities [draws * N, K] of `classifier` on images noised at t uniform in [lo, hi)."""
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.tensor(schedule.timesteps)
    out = []
    for _ in range(draws):
        t = torch.randint(lo, hi, (len(images),), generator=gen)
        noise = torch.randn(images.shape, generator=gen)
        x_t = images if hi == 1 else q_sample(schedule, images, t, noise)
        logits = torch.cat([classifier(x_t[s:s + 256], timesteps[t[s:s + 256]]) for s in range(0, len(images), 256)])
        out.append(torch.softmax(logits.float(), 1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="project root whose prepared val/test images are scored")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--classifier", action="append", required=True, metavar="NAME=PATH",
                        help="a classifier checkpoint to score (repeatable; PATH relative to --root unless absolute)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--buckets", type=int, default=5)
    parser.add_argument("--draws", type=int, default=8, help="noise draws per image and bucket")
    args = parser.parse_args()
    runtime.configure_process()
    params = load_params(args.params, args.profile)
    device = resolve_device("cpu")  # scoring only; the same numbers on any machine
    layout = Layout(Path(args.root))
    data = load_prepared(layout)
    schedule = diffusion_schedule(params)
    images = torch.cat([to_model_tensor(data.images[s]) for s in ("val", "test")])
    labels = np.concatenate([data.labels[s] for s in ("val", "test")])
    edges = np.linspace(0, schedule.num_timesteps, args.buckets + 1).astype(int)
    buckets = [("clean", 0, 1)] + [(f"t{edges[k]}-{edges[k + 1] - 1}", int(edges[k]), int(edges[k + 1]))
                                   for k in range(args.buckets)]
    rows = []
    for item in args.classifier:
        name, _, path = item.partition("=")
        file = Path(path) if Path(path).is_absolute() else layout.root / path
        classifier = load_classifier(file, device, data).eval()
        for k, (bucket, lo, hi) in enumerate(buckets):
            probs = noised_probabilities(classifier, schedule, images, lo, hi, args.draws, seed=1000 + k)
            y = np.tile(labels, args.draws)
            rows.append({"classifier": name, "bucket": bucket, "samples": len(y),
                         "ece": expected_calibration_error(probs, y),
                         "accuracy": float((probs.argmax(1) == y).mean()),
                         "balanced_accuracy": float(balanced_accuracy_score(y, probs.argmax(1))),
                         "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()),
                         "mean_confidence": float(probs.max(1).mean())})
            print({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in rows[-1].items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "classifier_calibration.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_page(out, rows, len(labels), args)
    plot(out, rows)


def write_page(out: Path, rows: list[dict], n_images: int, args) -> None:
    lines = ["# Guidance classifier calibration by noise level", "",
             f"Generated by `benchmarks/classifier_calibration.py`: {n_images} real validation and test images, "
             f"{args.draws} noise draws per image and bucket (the same x_t for every classifier); ECE over "
             f"{BINS} equal-width bins of the top-class probability.", "",
             "Accuracy beside balanced accuracy: on imbalanced data a classifier that predicts the majority "
             "class at high noise is accurate and well calibrated there, and useless as a guide.", "",
             "| classifier | t bucket | ECE | accuracy | balanced accuracy | NLL | mean confidence |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['classifier']} | {r['bucket']} | {r['ece']:.3f} | {r['accuracy']:.3f} | "
              f"{r['balanced_accuracy']:.3f} | {r['nll']:.3f} | {r['mean_confidence']:.3f} |" for r in rows]
    lines += ["", "![ECE by noise level](classifier_calibration.png)", ""]
    (out / "classifier_calibration.md").write_text("\n".join(lines))


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    columns = ("ece", "accuracy", "balanced_accuracy")
    for name in dict.fromkeys(r["classifier"] for r in rows):
        mine = [r for r in rows if r["classifier"] == name]
        for ax, column in zip(axes, columns):
            ax.plot([r["bucket"] for r in mine], [r[column] for r in mine], marker="o", label=name)
    for ax, title in zip(axes, ("expected calibration error", "accuracy", "balanced accuracy")):
        ax.set(title=title, xlabel="noise level (diffusion time t)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "classifier_calibration.png", dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
