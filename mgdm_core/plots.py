"""Pictures people would rather look at than read: sample grids and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mgdm_core.io import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def class_grid(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path, per_class: int = 8, title: str = ""
) -> None:
    """One row per class, `per_class` images each (uint8 [N,H,W,C]); empty cells stay blank."""
    rows = len(class_names)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 1.1, rows * 1.2 + 0.4), squeeze=False)
    for r, name in enumerate(class_names):
        chosen = np.flatnonzero(labels == r)[:per_class]
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(chosen):
                img = images[chosen[c]]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def paired_grid(
    before: np.ndarray, after: np.ndarray, path: Path, labels: Sequence[str], title: str = ""
) -> None:
    """Stage-1 images (top row) over their stage-2 counterparts (bottom row)."""
    n = len(before)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(max(n, 1) * 1.1, 2.8), squeeze=False)
    for c in range(n):
        for r, img in enumerate((before[c], after[c])):
            ax = axes[r, c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, c].set_title(labels[c], fontsize=7)
    axes[0, 0].set_ylabel("stage 1", fontsize=8)
    axes[1, 0].set_ylabel("stage 2", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def curve(steps: Sequence[int], series: dict[str, Sequence[float]], path: Path, title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in series.items():
        ax.plot(steps[: len(values)], values, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def histograms(values: dict[str, np.ndarray], path: Path, title: str, xlabel: str, bins: int = 30) -> None:
    """Overlaid density histograms, one per set (e.g. entropy on real, stage-1, stage-2)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    finite = [v[np.isfinite(v)] for v in values.values() if len(v)]
    lo = min((v.min() for v in finite), default=0.0)
    hi = max((v.max() for v in finite), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    for name, v in values.items():
        if len(v):
            ax.hist(v, bins=edges, density=True, alpha=0.45, label=f"{name} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


__all__ = ["class_grid", "paired_grid", "curve", "histograms"]
