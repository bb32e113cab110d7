"""Which diffusion training converges fastest? The same UNet, data, seed and batches, trained once
per variant and judged by training step with `generator_study.judge_snapshot` (a reference
classifier trained on real images only, never the guiding classifier). A measurement, not a test.

Variants (the first is the product's default):
- `sqrt_one_minus_alpha_bar`: eps-MSE weighted by 1/sqrt(1 + SNR_t), as the original release;
- `uniform`: DDPM's L_simple;
- `min_snr`: Min-SNR-5 (Hang et al. 2023);
- `groups32`: the default weighting with guided-diffusion's fixed 32 GroupNorm groups (at width 32:
  one channel per group, near instance norm) instead of `norm_groups` (>= 4 channels per group).
  The product has no knob for it; this script sets `blocks.MIN_CHANNELS_PER_GROUP = 1` while it
  builds, trains and loads that variant only.

    python benchmarks/training_variants.py --root RUN_ROOT --profile breastmnist --steps 800 \
        --every 200 --out docs/results/breastmnist_training_variants

RUN_ROOT holds `data/prepared` (run `prepare` there first); each variant trains in
`<out>/runs/<variant>/` (resumable: rerunning continues a killed training). With `--reuse-default
DIR`, the default variant's snapshots are read from DIR (for example the profile run's
`models/diffusion/snapshots`, same seed and parameters) instead of training it again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generator_study import judge_snapshot, real_judge  # noqa: E402

from mgdm_core import runtime  # noqa: E402
from mgdm_core.config import load_params  # noqa: E402
from mgdm_core.device import resolve_device  # noqa: E402
from mgdm_core.diffusion.schedule import respace  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.networks import blocks  # noqa: E402
from mgdm_core.quality.by_step import balanced_labels, list_snapshots  # noqa: E402
from mgdm_core.stages import train_diffusion  # noqa: E402
from mgdm_core.stages.common import diffusion_schedule, load_prepared, load_unet  # noqa: E402
from mgdm_core.tracking import NullTracker  # noqa: E402

VARIANTS = ("sqrt_one_minus_alpha_bar", "uniform", "min_snr", "groups32")


@contextlib.contextmanager
def variant_networks(variant: str):
    """guided-diffusion's 32 groups for `groups32`, the product's `norm_groups` otherwise."""
    saved = blocks.MIN_CHANNELS_PER_GROUP
    blocks.MIN_CHANNELS_PER_GROUP = 1 if variant == "groups32" else saved
    try:
        yield
    finally:
        blocks.MIN_CHANNELS_PER_GROUP = saved


def variant_params(base, variant: str, steps: int, every: int):
    weighting = "sqrt_one_minus_alpha_bar" if variant == "groups32" else variant
    return base.with_overrides({"train_diffusion.mse_weighting": weighting, "train_diffusion.steps": steps,
                                "train_diffusion.checkpoint_every": every, "train_diffusion.preview_respacing": "10"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="project root holding data/prepared")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=200, help="snapshot (and judging) interval")
    parser.add_argument("--reuse-default", default=None, help="snapshot folder of an earlier default-variant run")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; expected {', '.join(VARIANTS)}")

    runtime.configure_process()
    t0 = time.perf_counter()
    base = load_params(args.params, args.profile)
    root = Layout(Path(args.root))
    device = resolve_device(base.device)
    data = load_prepared(root)
    out = Path(args.out)
    _, reference, feats, floor = real_judge(base, data, device, epochs=20)
    feats = {s: f for s, (f, _) in feats.items()}
    print(f"reference: test AUC {reference.test_auc:.3f}, FD floor {floor:.3f}", flush=True)
    schedule = diffusion_schedule(base)
    schedules = (respace(schedule, "50"), respace(schedule, "ddim50"))
    labels = balanced_labels(args.samples, data.num_classes)
    seeds = [7919 * i + 17 for i in range(args.samples)]
    shape = (data.channels, data.image_size, data.image_size)
    judged_steps = set(range(args.every, args.steps + 1, args.every))

    rows, seconds = [], {}
    for variant in variants:
        layout = Layout(out / "runs" / variant)
        params = variant_params(base, variant, args.steps, args.every)
        with variant_networks(variant):
            if variant == VARIANTS[0] and args.reuse_default:
                snapshot_dir = Path(args.reuse_default)
            else:
                if not layout.prepared.exists():
                    shutil.copytree(root.prepared, layout.prepared)
                started = time.perf_counter()
                metrics = train_diffusion.run(params, layout, NullTracker())
                seconds[variant] = time.perf_counter() - started
                print(f"{variant}: trained to step {metrics.get('steps')} in {seconds[variant]:.0f} s", flush=True)
                snapshot_dir = layout.diffusion_snapshots_dir
            for step, path in list_snapshots(snapshot_dir):
                if step not in judged_steps:
                    continue
                row, _ = judge_snapshot(load_unet(path, device, data), step, reference.model, feats["test"], floor,
                                        schedules=schedules, labels=labels, seeds=seeds, shape=shape, device=device)
                rows.append({"variant": variant, **row})
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "by_step.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, variants, reference.test_auc, out / "by_step.png")
    _write_report(out, rows, variants, base, args, reference, floor, seconds, time.perf_counter() - t0)


def _plot(rows, variants, real_auc, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        steps = [r["step"] for r in mine]
        axes[0].plot(steps, [r["ddpm_fd_ratio"] for r in mine], marker="o", label=variant)
        axes[1].plot(steps, [r["ddpm_fidelity_auc"] for r in mine], marker="o", label=variant)
        axes[2].plot(steps, [r["ddim_fd_ratio"] for r in mine], marker="o", label=variant)
    axes[0].set(title="DDPM-50: FD / real floor", xlabel="training step", yscale="log")
    axes[1].axhline(real_auc, color="grey", ls="--", label="real test")
    axes[1].set(title="DDPM-50: class fidelity AUC", xlabel="training step")
    axes[2].set(title="DDIM-50: FD / real floor", xlabel="training step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_report(out, rows, variants, params, args, reference, floor, seconds, total) -> None:
    cols = ["ddpm_fd_ratio", "ddpm_fidelity_auc", "ddim_fd_ratio", "ddim_fidelity_auc", "ddim_saturated"]
    lines = [
        "# Diffusion training variants by step",
        "",
        f"Generated by `benchmarks/training_variants.py` ({total / 60:.0f} min). Profile `{args.profile}`: UNet width "
        f"{params.diffusion.width}, batch {params.train_diffusion.batch_size}, lr {params.train_diffusion.lr}, EMA "
        f"{params.train_diffusion.ema_decay}, seed {params.seed} (same initial weights and batches for every variant).",
        f"Judge: `{reference.network}` trained on real training images only, real test AUC {reference.test_auc:.3f}; "
        f"FD noise floor {floor:.3f}. {args.samples} unguided class-balanced samples per snapshot, same seeds "
        "everywhere (DDPM 50 steps, DDIM 50 steps).",
        "",
        "Training time per variant: " + (", ".join(f"{v} {s / 60:.0f} min" for v, s in seconds.items()) or "none trained")
        + (f"; `{variants[0]}` read from {args.reuse_default}." if args.reuse_default else "."),
        "",
        "| variant | step | " + " | ".join(cols) + " |",
        "| --- | ---: |" + " ---: |" * len(cols),
    ]
    for r in sorted(rows, key=lambda r: (r["step"], variants.index(r["variant"]))):
        lines.append(f"| {r['variant']} | {r['step']} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    lines += ["", f"![by step]({out.name}/by_step.png)", ""]
    Path(f"{out}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
