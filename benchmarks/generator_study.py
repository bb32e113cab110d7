"""How good is the diffusion model, step by step? A measurement for the generator, not a test.

Reads the EMA snapshots `train_diffusion` keeps (`models/diffusion/snapshots/step_*.pt`) under a
project root and judges each with a reference classifier trained on the real training images
only (the quality stage's `train_reference`), never with the guiding classifier:

- unguided class-conditional samples, ancestral DDPM and deterministic DDIM (same labels and
  seeds at every step): FD to the real test set as a ratio to the real noise floor
  FD(real val, real test), class fidelity (the reference classifier's AUC and balanced accuracy on
  the samples with their intended labels) and the fraction of saturated pixels beside real images';
- the stage-2 round trip of real test images through `ddim_invert` and back, decoding with the
  unclipped step the inversion inverts (the product's default) and with per-step clipping
  (the original release's decode), as mean |error| on the [-1, 1] scale.

    python benchmarks/generator_study.py --root RUN_ROOT --params params.yaml --profile PROFILE \
        --out docs/results/generator_study

Writes `<out>.md`, `<out>/by_step.csv`, `<out>/by_step.png` and DDIM sample grids of the first and last snapshot.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

from mgdm_core.config import load_params
from mgdm_core.data.loaders import from_model_tensor, to_model_tensor
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.sampling import ddim_invert, ddim_sample, initial_noise
from mgdm_core.diffusion.schedule import respace
from mgdm_core.layout import Layout
from mgdm_core.plots import class_grid
from mgdm_core.quality.by_step import balanced_labels, choose_snapshots, list_snapshots, unguided_sample
from mgdm_core.quality.features import features_and_probs, train_reference
from mgdm_core.quality.judge import class_fidelity, saturated_fraction
from mgdm_core.quality.metrics import frechet_distance
from mgdm_core.stages.common import diffusion_schedule, load_prepared, load_unet


def ddim_unguided(model, schedule, labels, seeds, shape, device, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(labels), batch_size):
        batch_seeds = list(seeds[start : start + batch_size])
        y = torch.as_tensor(labels[start : start + batch_size], device=device)
        x_T = initial_noise(batch_seeds, shape, device, torch.float32)
        out.append(from_model_tensor(ddim_sample(model, x_T, schedule, y=y).cpu()))
    return np.concatenate(out)


def roundtrip_errors(model, schedule, images: np.ndarray, labels: np.ndarray, device, refine: int) -> dict[str, float]:
    x0 = to_model_tensor(images).to(device)
    y = torch.as_tensor(labels, device=device)
    latents = ddim_invert(model, x0, schedule, y=y, refine=refine)
    errors = {}
    for name, clip in (("unclipped", False), ("clipped", True)):
        recon = ddim_sample(model, latents, schedule, y=y, clip_denoised=clip).clamp(-1, 1)
        errors[name] = float((recon - x0).abs().mean())
    return errors


def real_judge(params, data, device, epochs: int):
    """The judge and its yardstick: the quality stage's reference classifier trained on the real
    training images only, its (features, probabilities) on real val and test, and the FD noise
    floor FD(real val, real test). Returns (split, reference, feats, floor)."""
    split = {s: (data.images[s], np.asarray(data.labels[s], dtype=np.int64)) for s in ("train", "val", "test")}
    reference = train_reference(network=params.quality.feature_network, train=split["train"], val=split["val"],
                                test=split["test"], num_classes=data.num_classes, epochs=epochs,
                                batch_size=params.quality.batch_size, lr=params.quality.lr, seed=0, device=device)
    feats = {s: features_and_probs(reference.model, split[s][0], device) for s in ("val", "test")}
    return split, reference, feats, frechet_distance(feats["val"][0], feats["test"][0])


def judge_snapshot(model, step, judge, real_test_features, floor, *, schedules, labels, seeds, shape, device,
                   roundtrip=None) -> tuple[dict[str, float], np.ndarray]:
    """One snapshot's row: unguided DDPM and DDIM samples (FD ratio to the floor, class fidelity,
    saturation) and, with `roundtrip` = (schedule, images, labels, refine), the stage-2 round trip.
    Returns the row and the DDIM images."""
    ddpm, ddim = schedules
    with torch.no_grad():
        sets = {
            "ddpm": unguided_sample(model, ddpm, labels, seeds, shape, device, 64),
            "ddim": ddim_unguided(model, ddim, labels, seeds, shape, device, 64),
        }
        row: dict[str, float] = {"step": step}
        if roundtrip is not None:
            rt = roundtrip_errors(model, *roundtrip[:3], device, roundtrip[3])
            row.update({"roundtrip_unclipped": rt["unclipped"], "roundtrip_clipped": rt["clipped"]})
    for name, images in sets.items():
        f, p = features_and_probs(judge, images, device)
        fid = class_fidelity(labels, p)
        row[f"{name}_fd_ratio"] = frechet_distance(f, real_test_features) / floor
        row[f"{name}_fidelity_auc"] = fid["auc"] if fid["auc"] is not None else float("nan")
        row[f"{name}_balanced_accuracy"] = fid["balanced_accuracy"]
        row[f"{name}_saturated"] = saturated_fraction(images)
    return row, sets["ddim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="project root of a run (holds data/prepared and models/)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--samples", type=int, default=96, help="unguided samples per snapshot")
    parser.add_argument("--ddpm", default="50", help="DDPM respacing")
    parser.add_argument("--ddim", default="ddim50", help="DDIM respacing")
    parser.add_argument("--roundtrip-images", type=int, default=32)
    parser.add_argument("--reference-epochs", type=int, default=20)
    parser.add_argument("--max-snapshots", type=int, default=8, help="evenly chosen, first and last always")
    parser.add_argument("--out", required=True, help="output stem, e.g. docs/results/generator_study")
    args = parser.parse_args()

    t0 = time.perf_counter()
    params = load_params(args.params, args.profile)
    layout = Layout(Path(args.root))
    device = resolve_device(params.device)
    data = load_prepared(layout)
    split, reference, feats, floor = real_judge(params, data, device, args.reference_epochs)
    real_fidelity = class_fidelity(split["test"][1], feats["test"][1])
    real_saturated = saturated_fraction(split["test"][0])
    print(f"reference classifier: test AUC {reference.test_auc:.3f}; FD floor {floor:.3f}; "
          f"real saturated {real_saturated:.4f}", flush=True)

    base = diffusion_schedule(params)
    ddpm, ddim = respace(base, args.ddpm), respace(base, args.ddim)
    shape = (data.channels, data.image_size, data.image_size)
    labels = balanced_labels(args.samples, data.num_classes)
    seeds = [7919 * i + 17 for i in range(args.samples)]
    rt_images, rt_labels = split["test"][0][: args.roundtrip_images], split["test"][1][: args.roundtrip_images]
    rt_schedule = respace(base, params.disturb.respacing)

    rows, first_last = [], []
    snapshots = choose_snapshots(list_snapshots(layout.diffusion_snapshots_dir), args.max_snapshots)
    if not snapshots:
        raise SystemExit(f"no snapshots in {layout.diffusion_snapshots_dir}")
    for step, path in snapshots:
        model = load_unet(path, device, data)
        row, ddim_images = judge_snapshot(model, step, reference.model, feats["test"][0], floor, schedules=(ddpm, ddim),
                                          labels=labels, seeds=seeds, shape=shape, device=device,
                                          roundtrip=(rt_schedule, rt_images, rt_labels, params.disturb.inversion_refine))
        rows.append(row)
        if step in (snapshots[0][0], snapshots[-1][0]):
            first_last.append((step, ddim_images))
        print({k: round(v, 4) for k, v in row.items()}, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "by_step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, floor, real_fidelity["auc"], out / "by_step.png")
    for step, images in first_last:
        class_grid(images, labels, data.class_names, out / f"ddim_step_{step}.png", 8,
                   title=f"unguided DDIM ({args.ddim}) from the EMA weights at step {step}")
    _write_report(out, rows, params, args, reference, floor, real_fidelity, real_saturated, time.perf_counter() - t0)


def _plot(rows: list[dict], floor: float, real_auc: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in ("ddpm", "ddim"):
        axes[0].plot(steps, [r[f"{name}_fd_ratio"] for r in rows], marker="o", label=name)
        axes[1].plot(steps, [r[f"{name}_fidelity_auc"] for r in rows], marker="o", label=name)
        axes[2].plot(steps, [r[f"{name}_saturated"] for r in rows], marker="o", label=f"{name} saturated")
    axes[0].set(title="FD / real floor (1 = real)", xlabel="training step", yscale="log")
    if real_auc is not None:
        axes[1].axhline(real_auc, color="grey", ls="--", label="real test")
    axes[1].set(title="class fidelity AUC (reference classifier)", xlabel="training step")
    axes[2].plot(steps, [r["roundtrip_unclipped"] for r in rows], marker="s", label="round trip (unclipped)")
    axes[2].plot(steps, [r["roundtrip_clipped"] for r in rows], marker="s", label="round trip (clipped)")
    axes[2].set(title="saturation and stage-2 round trip", xlabel="training step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_report(out, rows, params, args, reference, floor, real_fidelity, real_saturated, seconds) -> None:
    cols = ["step", "ddpm_fd_ratio", "ddpm_fidelity_auc", "ddpm_saturated", "ddim_fd_ratio", "ddim_fidelity_auc",
            "ddim_saturated", "roundtrip_unclipped", "roundtrip_clipped"]
    lines = [
        f"# Generator by training step ({params.data.flag or params.data.path or params.data.source})",
        "",
        f"Generated by `benchmarks/generator_study.py` ({seconds / 60:.1f} min). Profile `{args.profile}`; "
        f"UNet width {params.diffusion.width}, {params.diffusion.num_res_blocks} res blocks, batch "
        f"{params.train_diffusion.batch_size}, lr {params.train_diffusion.lr}, EMA {params.train_diffusion.ema_decay} "
        f"(with warm-up), MSE weighting `{params.train_diffusion.mse_weighting}`.",
        "",
        f"Judge: `{reference.network}` trained on real training images only ({reference.epochs} epochs, best "
        f"validation epoch {reference.best_epoch + 1}), real test AUC {reference.test_auc:.3f}, balanced accuracy "
        f"{real_fidelity['balanced_accuracy']:.3f}. FD noise floor FD(real val, real test) = {floor:.3f}; real "
        f"test images have {real_saturated:.4f} saturated pixels.",
        "",
        f"{args.samples} unguided class-balanced samples per snapshot (DDPM `{args.ddpm}`, DDIM `{args.ddim}`, same "
        f"seeds at every step); round trip: {args.roundtrip_images} real test images, `{params.disturb.respacing}`, "
        f"inversion_refine {params.disturb.inversion_refine}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---:|" * len(cols),
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4g}" if c != "step" else str(r[c]) for c in cols) + " |")
    lines += ["", f"![by step]({out.name}/by_step.png)", ""]
    lines += [f"![DDIM at step {r['step']}]({out.name}/ddim_step_{r['step']}.png)" for r in (rows[0], rows[-1])]
    Path(f"{out}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
