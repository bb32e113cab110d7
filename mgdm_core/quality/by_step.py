"""Quality by training step: which EMA snapshots to judge, and a small unguided sample from one.

`train_diffusion` saves the EMA weights along the way as `step_{step:07d}.pt` (the format of
`models/diffusion.pt`). Each chosen snapshot draws the same class-conditional, unguided DDPM
sample (same labels, same per-image seeds), so differences between steps come from training alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mgdm_core.data.loaders import from_model_tensor
from mgdm_core.device import autocast
from mgdm_core.diffusion.sampling import PerImageNoise, ddpm_sample, initial_noise
from mgdm_core.diffusion.schedule import Schedule
from mgdm_core.quality.features import features_and_probs
from mgdm_core.quality.judge import class_fidelity, floor_ratio, saturated_fraction
from mgdm_core.quality.metrics import frechet_distance

SNAPSHOT_NAME = re.compile(r"step_(\d+)\.pt")


def list_snapshots(directory: Path) -> list[tuple[int, Path]]:
    """(training step, path) of every `step_<digits>.pt` in `directory`, by step; [] when absent."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := SNAPSHOT_NAME.fullmatch(p.name))]
    return sorted(found)


def choose_snapshots(snapshots: Sequence[tuple[int, Path]], max_count: int) -> list[tuple[int, Path]]:
    """At most `max_count` snapshots, evenly spread over the list, always the first and the last
    (only the last when max_count is 1; none when 0)."""
    n = len(snapshots)
    if max_count <= 0 or n == 0:
        return []
    if n <= max_count:
        return list(snapshots)
    if max_count == 1:
        return [snapshots[-1]]
    # n > max_count, so rounded positions of an even spacing are distinct and include n - 1.
    return [snapshots[i] for i in np.round(np.linspace(0, n - 1, max_count)).astype(int)]


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """int64 [n]: class c repeated n // K times (the first n % K classes once more), grouped by class."""
    return np.sort(np.arange(n) % num_classes).astype(np.int64)


def unguided_sample(
    model: torch.nn.Module,
    schedule: Schedule,
    labels: np.ndarray,
    seeds: Sequence[int],
    image_shape: tuple[int, int, int],
    device: torch.device,
    batch_size: int,
) -> np.ndarray:
    """Class-conditional ancestral DDPM sampling without guidance: uint8 [N,H,W,C] for labels [N].

    Image i starts from `initial_noise` and draws its step noise from `PerImageNoise`, both seeded
    with seeds[i], so it does not depend on the batch it falls in.
    """
    out = []
    for start in range(0, len(labels), batch_size):
        batch_seeds = list(seeds[start : start + batch_size])
        y = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long, device=device)
        x_T = initial_noise(batch_seeds, image_shape, device, torch.float32)
        with autocast(device):
            x0 = ddpm_sample(model, x_T, schedule, y=y, noise=PerImageNoise(batch_seeds, device))
        out.append(from_model_tensor(x0.float().cpu()))
    if not out:
        return np.zeros((0, image_shape[1], image_shape[2], image_shape[0]), np.uint8)
    return np.concatenate(out)


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def judge_sample(
    images: np.ndarray, labels: np.ndarray, reference: torch.nn.Module, test_feats: np.ndarray,
    fd_floor: float | None, device: torch.device,
) -> dict[str, float | None]:
    """One snapshot's unguided sample (uint8 [N,H,W,C], intended labels [N]) judged by the
    reference classifier: FD of its penultimate features to the real test set's `test_feats` and
    that over `fd_floor`, class fidelity (AUC, balanced accuracy) and the saturated-pixel fraction;
    None where undefined (JSON has no NaN)."""
    feats, probs = features_and_probs(reference, images, device)
    fidelity = class_fidelity(labels, probs)
    fd = _finite(frechet_distance(feats, test_feats)) if len(feats) >= 2 else None
    return {"fd": fd, "fd_ratio": floor_ratio(fd, fd_floor), "fidelity_auc": _finite(fidelity["auc"]),
            "fidelity_balanced_accuracy": _finite(fidelity["balanced_accuracy"]),
            "saturated_fraction": saturated_fraction(images)}
