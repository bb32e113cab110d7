"""Why does unguided deterministic DDIM drift off the data where DDPM does not? A measurement, not a test.

From one trained run (its models/diffusion.pt, the EMA weights, and models/diffusion/checkpoint.pt,
which also holds the raw weights), the same seeds and labels are sampled with

- DDIM-50 (eta 0) from the EMA weights, from the raw weights, and unclipped;
- DDIM-250 (eta 0) from the EMA weights (is it the step size?);
- DDIM-50 with eta 1 (stochastic; is it determinism?);
- ancestral DDPM-50 (the stage-1 default).

Each variant prints the saturated-pixel fraction, the median mean-|Laplacian| per image (a
high-frequency noise measure) and the fraction of "noise-like" images (|Laplacian| above 3x real
images' median), beside real test images, and saves a class grid.

    python benchmarks/ddim_probe.py --root <run root> [--profile P] --out <dir> [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgdm_core.config import load_params  # noqa: E402
from mgdm_core.data.loaders import from_model_tensor  # noqa: E402
from mgdm_core.diffusion.sampling import PerImageNoise, ddim_sample, ddpm_sample, initial_noise  # noqa: E402
from mgdm_core.diffusion.schedule import respace  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.plots import class_grid  # noqa: E402
from mgdm_core.quality.judge import saturated_fraction  # noqa: E402
from mgdm_core.stages.common import diffusion_schedule, load_prepared, load_unet  # noqa: E402
from mgdm_core.training.checkpoint import load_checkpoint  # noqa: E402


def laplacian_energy(images: np.ndarray) -> np.ndarray:
    """Mean |4-neighbour Laplacian| per image (first channel) of uint8 images [N, H, W, C]: [N]."""
    x = images.astype(np.float32)[..., 0]
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="project root of a trained run")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True, help="folder for the grids")
    args = parser.parse_args()

    params = load_params(args.root / args.params, args.profile)
    layout = Layout(args.root)
    data = load_prepared(layout)
    device = torch.device("cpu")
    ema = load_unet(layout.diffusion_model, device, data)
    raw = load_unet(layout.diffusion_model, device, data)
    _, state = load_checkpoint(layout.diffusion_dir / "checkpoint.pt", kind="unet", map_location="cpu")
    raw.load_state_dict(state["model"])
    print(f"checkpoint at step {int(state['step'])}")

    base = diffusion_schedule(params)
    labels = torch.arange(args.samples) % data.num_classes
    seeds = [7919 * i + 17 for i in range(args.samples)]
    x_T = initial_noise(seeds, (data.channels, data.image_size, data.image_size), device, torch.float32)
    noise = PerImageNoise(seeds, device)
    ddim50, ddim250 = respace(base, "ddim50"), respace(base, "ddim250")
    variants = {
        "ddim50_ema": lambda: ddim_sample(ema, x_T, ddim50, y=labels),
        "ddim50_raw": lambda: ddim_sample(raw, x_T, ddim50, y=labels),
        "ddim50_unclipped_ema": lambda: ddim_sample(ema, x_T, ddim50, y=labels, clip_denoised=False),
        "ddim250_ema": lambda: ddim_sample(ema, x_T, ddim250, y=labels),
        "ddim50_eta1_ema": lambda: ddim_sample(ema, x_T, ddim50, y=labels, eta=1.0, noise=noise),
        "ddpm50_ema": lambda: ddpm_sample(ema, x_T, respace(base, "50"), y=labels, noise=noise),
    }
    real = data.images["test"]
    threshold = 3 * float(np.median(laplacian_energy(real)))
    args.out.mkdir(parents=True, exist_ok=True)
    print("| images | saturated | median |Laplacian| | noise-like |\n|---|---:|---:|---:|")
    print(f"| real test | {saturated_fraction(real):.4f} | {np.median(laplacian_energy(real)):.1f} | "
          f"{np.mean(laplacian_energy(real) > threshold):.2f} |")
    for name, sample in variants.items():
        with torch.no_grad():
            images = from_model_tensor(sample().cpu())
        energy = laplacian_energy(images)
        print(f"| {name} | {saturated_fraction(images):.4f} | {np.median(energy):.1f} | "
              f"{np.mean(energy > threshold):.2f} |", flush=True)
        class_grid(images, labels.numpy(), data.class_names, args.out / f"{name}.png", 8, title=name)


if __name__ == "__main__":
    main()
