"""Quality measures: distances behave as distances, memorisation flags copies, the independent
judges (fidelity, CAS) give real images the real rows, the stage core runs, by training step too."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import shutil

import numpy as np
import pytest
import torch

from mgdm_core.data.phantom import generate_phantom, phantom_class_names
from mgdm_core.evaluation.metrics import auc
from mgdm_core.io import save_npz_atomic, write_json_atomic, write_manifest, write_png
from mgdm_core.layout import Layout
from mgdm_core.networks.unet import UNet, UNetConfig
from mgdm_core.quality.by_step import balanced_labels, choose_snapshots
from mgdm_core.quality.judge import class_fidelity, floor_ratio, saturated_fraction
from mgdm_core.quality.metrics import (
    frechet_distance, kernel_inception_distance, memorisation_threshold, nearest_neighbours, pixel_vectors,
    precision_recall, predictive_scores,
)
from mgdm_core.stages.quality import compute_quality, flat_metrics
from mgdm_core.tracking import NullTracker
from mgdm_core.training.checkpoint import save_checkpoint

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


# ---- judged independently -------------------------------------------------------------------------

def test_saturated_fraction_counts_both_ends_within_one_grey_level() -> None:
    image = np.array([0, 1, 2, 127, 253, 254, 255, 128], dtype=np.uint8).reshape(1, 2, 4, 1)
    assert saturated_fraction(image) == pytest.approx(4 / 8)  # 0, 1, 254, 255
    assert saturated_fraction(np.full((3, 5, 5, 1), 128, np.uint8)) == 0.0
    assert saturated_fraction(np.zeros((0, 5, 5, 1), np.uint8)) is None


def test_floor_ratio_divides_by_a_positive_floor_only() -> None:
    assert floor_ratio(8.2, 0.33) == pytest.approx(8.2 / 0.33)
    assert floor_ratio(1e-3, -2e-4) is None  # KID of two real splits can be negative: no scale
    assert floor_ratio(None, 0.33) is None and floor_ratio(1.0, None) is None


def test_class_fidelity_of_faithful_wrong_and_one_class_sets() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    faithful = np.eye(2)[labels] * 0.8 + 0.1
    assert class_fidelity(labels, faithful) == {"auc": 1.0, "balanced_accuracy": 1.0, "recall": [1.0, 1.0]}
    # Everything called class 0, the BreastMNIST failure: minority recall 0, balanced accuracy 0.5.
    benign = np.tile([0.9, 0.1], (5, 1))
    fid = class_fidelity(labels, benign)
    assert fid["recall"] == [1.0, 0.0] and fid["balanced_accuracy"] == 0.5 and fid["auc"] == 0.5
    one_class = class_fidelity(np.array([1, 1]), np.array([[0.2, 0.8], [0.7, 0.3]]))
    assert one_class["auc"] is None and one_class["recall"] == [None, 0.5]
    # More classes: macro one-vs-rest AUC, as the evaluation metrics define it.
    labels3 = np.array([0, 1, 2, 2])
    probs3 = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    assert class_fidelity(labels3, probs3)["auc"] == pytest.approx(auc(labels3, probs3))


def _judged_layout(root: Path) -> Layout:
    """Stage 1 is a copy of the real training set, the `entropy` measure a copy of the real test set."""
    layout = _fake_layout(root)
    names = phantom_class_names(2)
    shutil.rmtree(layout.stage1_dir)
    shutil.rmtree(layout.stage2_dir)
    source = ""
    for split, directory in (("train", layout.stage1_dir), ("test", layout.stage2_measure_dir("entropy"))):
        with np.load(layout.split_file(split)) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        rows = []
        for i, (img, y) in enumerate(zip(images, labels)):
            file = f"{names[y]}/{i:04d}.png"
            write_png(directory / file, img)
            rows.append({"file": file, "class": names[y], "label": int(y), "source": source, "guidance": "",
                         "scale": "", "seed": i, "confidence": "", "entropy": "", "roundtrip_error": "0"})
        write_manifest(directory / "manifest.csv", rows)
        source = f"stage1/{rows[0]['file']}"  # any stage-1 image will do as the stage-2 rows' source
    return layout


def test_real_images_posing_as_synthetic_get_the_real_rows(tmp_path: Path) -> None:
    layout = _judged_layout(tmp_path)
    summary = compute_quality(layout, epochs=2, batch_size=16, seed=0, device="cpu", kid_subsets=5, kid_subset_size=8)
    real, stage1, copy_of_test = summary["real"], summary["stage1"], summary["stage2"]["entropy"]
    # Fidelity: the reference classifier on a copy of the real test set is the real row.
    assert real["fidelity_auc"] == summary["reference"]["test_auc"]
    for key in ("fidelity_auc", "fidelity_balanced_accuracy"):
        assert copy_of_test[key] == real[key] and math.isfinite(real[key])
    assert copy_of_test["fidelity_recall"] == real["fidelity_recall"]
    # CAS: the same network trained on a copy of the real training set is the real row.
    for key in ("cas_auc", "cas_balanced_accuracy"):
        assert stage1[key] == real[key] and math.isfinite(real[key])
    assert stage1["saturated_fraction"] == pytest.approx(saturated_fraction(np.load(layout.split_file("train"))["images"]))
    assert real["saturated_fraction"] == pytest.approx(saturated_fraction(np.load(layout.split_file("test"))["images"]))


def test_fd_and_kid_ratios_divide_by_the_real_validation_floor(tmp_path: Path) -> None:
    layout = _fake_layout(tmp_path)
    summary = compute_quality(layout, epochs=1, batch_size=16, seed=0, device="cpu", kid_subsets=5, kid_subset_size=8,
                              by_step_max_snapshots=0)
    sets = summary["sets"]
    for scope in ("overall", *summary["class_names"]):
        floor = sets["real_val"][scope]
        assert floor["fd_ratio"] == pytest.approx(1.0)
        assert sets["stage1"][scope]["fd_ratio"] == pytest.approx(sets["stage1"][scope]["fd"] / floor["fd"])
        assert sets["real_test"][scope]["fd_ratio"] is None  # no distance of the test set to itself
        expected_kid = sets["stage1"][scope]["kid"] / floor["kid"] if floor["kid"] > 0 else None
        assert sets["stage1"][scope]["kid_ratio"] == (pytest.approx(expected_kid) if expected_kid else None)
    assert summary["real"]["fd_floor"] == sets["real_val"]["overall"]["fd"]
    assert summary["stage1"]["fd_ratio"] == sets["stage1"]["overall"]["fd_ratio"]
    report = (layout.reports_dir / "quality.md").read_text()
    assert "## Judged independently" in report and "Skipped: quality.by_step_max_snapshots is 0." in report
    flat = flat_metrics(summary)
    assert flat["stage1.fd_ratio"] == summary["stage1"]["fd_ratio"]
    assert flat["stage2.entropy.cas_auc"] == summary["stage2"]["entropy"]["cas_auc"]


# ---- quality by training step -----------------------------------------------------------------------

def test_choose_snapshots_spreads_evenly_and_keeps_the_last() -> None:
    snaps = [(s, Path(f"step_{s:07d}.pt")) for s in range(100, 1100, 100)]  # 10 snapshots
    assert [s for s, _ in choose_snapshots(snaps, 4)] == [100, 400, 700, 1000]
    assert [s for s, _ in choose_snapshots(snaps, 1)] == [1000]
    assert choose_snapshots(snaps, 20) == snaps and choose_snapshots(snaps, 0) == []
    assert balanced_labels(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]


class RecordingTracker(NullTracker):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((dict(metrics), step))


def test_quality_by_step_judges_each_snapshot(tmp_path: Path) -> None:
    layout = _fake_layout(tmp_path)
    config = {"image_size": 16, "in_channels": 1, "num_classes": 2, "width": 32, "channel_mult": [1],
              "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1, "num_head_channels": -1,
              "dropout": 0.0, "scale_shift_norm": True, "resblock_updown": True, "learn_sigma": True}
    torch.manual_seed(0)
    state = {"model": UNet(UNetConfig(**config)).state_dict()}
    save_checkpoint(layout.diffusion_model, kind="unet", config=config, state=state)
    for step in (5, 10):  # the same weights twice: the same seeds must give the same row
        save_checkpoint(layout.diffusion_snapshots_dir / f"step_{step:07d}.pt", kind="unet", config=config, state=state)
    other = {**config, "learn_sigma": False}  # left by an earlier run of another architecture
    save_checkpoint(layout.diffusion_snapshots_dir / "step_0000001.pt", kind="unet", config=other,
                    state={"model": UNet(UNetConfig(**other)).state_dict()})
    tracker = RecordingTracker()
    summary = compute_quality(layout, epochs=1, batch_size=16, seed=0, device="cpu", kid_subsets=5, kid_subset_size=8,
                              schedule_steps=100, by_step_samples=6, by_step_respacing="4", tracker=tracker)
    by_step = summary["by_step"]
    assert by_step["found"] == 3 and by_step["skipped"] == ["step_0000001.pt"]
    rows = by_step["rows"]
    assert [r["step"] for r in rows] == [5, 10] and all(r["n"] == 6 for r in rows)
    assert rows[0]["fd"] == rows[1]["fd"] and math.isfinite(rows[0]["fd"])
    assert rows[0]["fd_ratio"] == pytest.approx(rows[0]["fd"] / summary["real"]["fd_floor"])
    assert rows[0]["fidelity_auc"] == rows[1]["fidelity_auc"]
    assert by_step["first"] == rows[0] and by_step["last"] == rows[1]
    assert json.loads(layout.metrics_file("quality").read_text())["by_step"]["last"]["step"] == 10
    with open(layout.plot_file("quality_by_step.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in table] == [5, 10]
    assert float(table[1]["fd_ratio"]) == pytest.approx(rows[1]["fd_ratio"])
    assert layout.plot_file("quality_by_step.png").is_file()
    report = (layout.reports_dir / "quality.md").read_text()
    assert "## Quality by training step" in report and "| 10 |" in report and "../plots/quality_by_step.png" in report
    stepped = [(m, s) for m, s in tracker.logged if s is not None]
    assert [s for _, s in stepped] == [5, 10] and stepped[0][0]["by_step.fd"] == rows[0]["fd"]


def test_quality_by_step_without_snapshots_says_so(tmp_path: Path) -> None:
    layout = _fake_layout(tmp_path)
    summary = compute_quality(layout, epochs=1, batch_size=16, seed=0, device="cpu", kid_subsets=5, kid_subset_size=8)
    assert summary["by_step"]["rows"] == [] and "no EMA snapshots" in summary["by_step"]["note"]
    assert "Skipped: no EMA snapshots in models/diffusion/snapshots." in (layout.reports_dir / "quality.md").read_text()
    assert layout.plot_file("quality_by_step.csv").read_text().startswith("step,snapshot,n,fd,fd_ratio")
    assert layout.plot_file("quality_by_step.png").is_file()  # dvc.yaml lists it: it always exists
