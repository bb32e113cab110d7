"""Quality measures: distances behave as distances, memorisation flags copies, the stage core runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mgdm_core.data.phantom import generate_phantom, phantom_class_names
from mgdm_core.io import save_npz_atomic, write_json_atomic, write_manifest, write_png
from mgdm_core.layout import Layout
from mgdm_core.quality.metrics import (
    frechet_distance, kernel_inception_distance, memorisation_threshold, nearest_neighbours, pixel_vectors,
    precision_recall, predictive_scores,
)
from mgdm_core.stages.quality import compute_quality

RNG = np.random.default_rng(0)
BASE = RNG.normal(size=(400, 8))


def test_frechet_zero_on_itself_and_monotone_in_shift() -> None:
    assert frechet_distance(BASE, BASE) == pytest.approx(0.0, abs=1e-8)
    values = [frechet_distance(BASE, BASE + shift) for shift in (0.25, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(values) > 0)
    # A pure mean shift of s in every one of D dimensions adds exactly D s^2.
    assert values[2] == pytest.approx(8 * 1.0**2, rel=1e-6)


def test_frechet_matches_sqrtm_formula_and_stays_finite_when_rank_deficient() -> None:
    import scipy.linalg

    other = RNG.normal(size=(300, 8)) * 1.5 + 0.3
    cov_a, cov_b = np.cov(BASE, rowvar=False), np.cov(other, rowvar=False)
    reference = ((BASE.mean(0) - other.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * np.trace(
        scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(BASE, other) == pytest.approx(reference, rel=1e-6)
    assert math.isfinite(frechet_distance(RNG.normal(size=(5, 64)), RNG.normal(size=(6, 64))))


def test_kid_near_zero_on_itself_and_monotone_in_shift() -> None:
    # Two disjoint halves of one large sample: the same rows on both sides would enter the cross
    # term as k(x, x) and bias MMD^2 below zero; halves much larger than a subset keep the subsets
    # nearly independent, so the subset standard error is honest.
    big = np.random.default_rng(1).normal(size=(4000, 8))
    mean, se = kernel_inception_distance(big[:2000], big[2000:], subsets=30, subset_size=100)
    assert abs(mean) <= 3 * se
    values = [kernel_inception_distance(BASE, BASE + s, subsets=30, subset_size=100)[0] for s in (0.25, 0.5, 1.0, 2.0)]
    assert np.all(np.diff(values) > 0)
    assert values[0] > 3 * se


def test_precision_recall_on_itself_and_shifted() -> None:
    assert precision_recall(BASE, BASE, k=3) == (1.0, 1.0)
    precision, recall = precision_recall(BASE, BASE + 2.0, k=3)
    assert precision < 0.5 and recall < 0.5
    # Collapsed fakes (one mode repeated): faithful but not diverse.
    collapsed = np.repeat(BASE[:5], 20, axis=0) + 1e-3 * RNG.normal(size=(100, 8))
    precision, recall = precision_recall(BASE, collapsed, k=3)
    assert precision > 0.9 and recall < 0.2


def test_predictive_scores() -> None:
    scores = predictive_scores(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.2, 0.7, 0.1]]))
    np.testing.assert_allclose(scores["entropy"], [0.0, np.log(3), -(0.2 * np.log(0.2) + 0.7 * np.log(0.7) + 0.1 * np.log(0.1))], atol=1e-9)
    np.testing.assert_allclose(scores["margin"], [1.0, 0.0, 0.5])
    assert scores["predicted"].tolist() == [0, 0, 1]


def test_copy_is_memorised_fresh_phantom_is_not() -> None:
    train, _ = generate_phantom([20, 20], 28, 1, seed=1)
    test, _ = generate_phantom([15, 15], 28, 1, seed=2)
    fresh, _ = generate_phantom([1, 1], 28, 1, seed=3)
    train_px = pixel_vectors(train)
    threshold = memorisation_threshold(nearest_neighbours(pixel_vectors(test), train_px)[0], 1.0)
    distance, index = nearest_neighbours(pixel_vectors(np.concatenate([train[7:8], fresh])), train_px)
    assert distance[0] < 1e-4 and index[0] == 7 and distance[0] < threshold  # 0 up to float32 rounding
    assert np.all(distance[1:] >= threshold)


def _fake_layout(root: Path, size: int = 16) -> Layout:
    """prepared splits + stage 1 + one stage-2 measure, all phantoms (no diffusion model needed)."""
    layout = Layout(root)
    names = phantom_class_names(2)
    for split, count, seed in (("train", 24, 10), ("val", 10, 11), ("test", 10, 12)):
        images, labels = generate_phantom([count, count], size, 1, seed=seed)
        save_npz_atomic(layout.split_file(split), images=images, labels=labels)
    write_json_atomic(layout.classes_file, {"class_names": list(names), "dataset": "phantom", "source": "phantom",
                                            "image_size": size, "channels": 1, "notes": []})
    train = np.load(layout.split_file("train"))["images"]
    images, labels = generate_phantom([6, 6], size, 1, seed=13)
    images[0] = train[0]  # one exact copy of a training image
    rows = []
    for i, (img, y) in enumerate(zip(images, labels)):
        file = f"{names[y]}/{i:04d}.png"
        write_png(layout.stage1_dir / file, img)
        rows.append({"file": file, "class": names[y], "label": int(y), "source": "", "guidance": "", "scale": "",
                     "seed": i, "confidence": "", "entropy": ""})
    write_manifest(layout.stage1_dir / "manifest.csv", rows)
    stage2 = layout.stage2_measure_dir("entropy")
    disturbed = np.clip(images.astype(int) + 20, 0, 255).astype(np.uint8)
    write_manifest(stage2 / "manifest.csv", [
        {**r, "source": f"stage1/{r['file']}", "guidance": "entropy", "roundtrip_error": "0.01"}
        for r in rows
    ])
    for r, img in zip(rows, disturbed):
        write_png(stage2 / r["file"], img)
    return layout


def test_compute_quality_on_fake_layout(tmp_path: Path) -> None:
    layout = _fake_layout(tmp_path)
    summary = compute_quality(layout, epochs=1, batch_size=16, seed=0, device="cpu", kid_subsets=5, kid_subset_size=8)
    assert set(summary["sets"]) == {"real_val", "real_test", "stage1", "stage2_entropy"}
    for name in ("real_val", "stage1", "stage2_entropy"):
        overall = summary["sets"][name]["overall"]
        for key in ("fd", "kid", "precision", "recall", "entropy_mean", "mismatch_rate", "nn_pixel_median"):
            assert math.isfinite(overall[key]), (name, key)
    assert math.isfinite(summary["reference"]["test_auc"])
    assert summary["sets"]["stage2_entropy"]["overall"]["pixel_change_mean"] > 0
    assert json.loads(layout.metrics_file("quality").read_text())["reference"]["network"] == "simple_cnn"
    with open(layout.reports_dir / "quality_images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 12
    flagged = {(r["set"], r["file"].split("/")[-1]) for r in rows if r["memorised"] == "1"}
    assert ("stage1", "0000.png") in flagged  # the copied training image
    assert all(math.isfinite(float(r["entropy_change"])) for r in rows if r["set"] == "stage2_entropy")
    report = (layout.reports_dir / "quality.md").read_text()
    for picture in ("quality_entropy.png", "quality_nearest.png"):
        assert f"../plots/{picture}" in report and layout.plot_file(picture).is_file()
