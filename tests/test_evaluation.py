"""Evaluation: networks, the MedMNIST metric contract, paired statistics, training, report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import t as t_dist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS, classification_metrics, metric_batch, predict
from mgdm_core.evaluation.networks import MIN_SIDE, NETWORKS, build_network, input_size_for
from mgdm_core.evaluation.report import build_summary, markdown_table, plot_rows, plot_summary
from mgdm_core.evaluation.stats import (
    bootstrap_difference,
    difference_to_baseline,
    paired_difference,
    summarise,
)
from mgdm_core.evaluation.train import EvalData, UnitResult, mix_synthetic, train_and_test

# The two with > 20 M parameters (vgg16_bn: 138 M, ~4 s just to initialise on CPU).
_SLOW_NETWORKS = {"vgg16_bn", "resnet50"}




@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a CPU shared with other processes (parallel test runs, other jobs): two
    OpenMP threads spend most of their time at barriers (measured 10x slower per step than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- networks


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_NETWORKS else n for n in NETWORKS]
)
def test_every_network_maps_gray_28px_and_rgb_32px_batches_to_logits(name: str) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for channels, size in ((1, 28), (3, 32)):
            model = build_network(name, in_channels=channels, num_classes=3, image_size=size).eval()
            out = model(torch.rand(2, channels, size, size))
            assert out.shape == (2, 3)
            assert torch.isfinite(out).all()


def test_unknown_network_error_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="resnet18.*simple_cnn|simple_cnn.*resnet18"):
        build_network("resnet17", 1, 2, 28)


def test_input_size_keeps_simple_cnn_native_and_enlarges_torchvision_nets() -> None:
    assert input_size_for("simple_cnn", 28) == 28
    assert input_size_for("resnet18", 28) == MIN_SIDE
    assert input_size_for("resnet18", 128) == 128


# ---------------------------------------------------------------- metrics


def test_binary_metrics_follow_medmnist_contract_on_hand_computed_example() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.3, 0.7, 0.5])  # 0.5 is not > 0.5: predicted 0
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1))
    # AUC: positive 0.7 beats all 3 negatives, 0.5 beats 2 of 3 -> 5/6
    assert m["auc"] == pytest.approx(5 / 6)
    # predictions [0, 1, 0, 1, 0]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["recall_0"] == pytest.approx(2 / 3)
    assert m["recall_1"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["f1_macro"] == pytest.approx((4 / 6 + 2 / 4) / 2)  # 2tp / (2tp + fp + fn) per class
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]


def test_binary_prediction_thresholds_label_one_probability_strictly() -> None:
    probs = np.array([[0.5, 0.5], [0.49, 0.51]])
    assert predict(probs).tolist() == [0, 1]


def test_multiclass_auc_is_macro_one_vs_rest_and_accuracy_argmax() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    m = classification_metrics(y, probs)
    per_class = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
    assert m["auc"] == pytest.approx(np.mean(per_class))
    assert m["accuracy"] == pytest.approx(3 / 4)  # the last image is argmax 0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_metrics_reject_a_test_set_missing_a_class() -> None:
    with pytest.raises(DataError, match="every class"):
        classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]))


@pytest.mark.parametrize("k", [2, 4])
def test_batched_metrics_equal_scikit_learn_including_ties(k: int) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % k
    probs = rng.dirichlet(np.ones(k), size=(5, 60)).round(1)  # rounding creates ties
    probs /= probs.sum(axis=-1, keepdims=True)
    sk = {
        "auc": lambda p: roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr"),
        "accuracy": lambda p: accuracy_score(y, predict(p)),
        "balanced_accuracy": lambda p: balanced_accuracy_score(y, predict(p)),
        "f1_macro": lambda p: f1_score(y, predict(p), average="macro", labels=range(k), zero_division=0),
    }
    for name in COMPARED_METRICS:
        np.testing.assert_allclose(metric_batch(name, y, probs), [sk[name](p) for p in probs], atol=1e-12)


# ---------------------------------------------------------------- stats


def test_summarise_uses_sample_std_and_leaves_it_undefined_for_one_value() -> None:
    assert summarise([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarise([0.7]) == {"mean": 0.7, "std": None, "n": 1}


_BASE = {s: v for s, v in enumerate([0.80, 0.82, 0.79, 0.85, 0.81, 0.90])}


def test_paired_t_interval_of_a_zero_mean_difference_contains_zero() -> None:
    noise = [0.01, -0.01, 0.02, -0.02, 0.0]  # mean exactly 0; seed 5 has no partner
    cond = {s: _BASE[s] + e for s, e in enumerate(noise)}
    d = paired_difference(cond, _BASE)
    assert d["n"] == 5 and d["method"] == "t_over_seeds"
    assert d["delta"] == pytest.approx(0.0, abs=1e-12)
    assert d["ci_low"] < 0 < d["ci_high"]
    half = t_dist.ppf(0.975, df=4) * np.std(noise, ddof=1) / np.sqrt(5)  # textbook paired t-interval
    assert d["ci_high"] == pytest.approx(half)


def test_paired_t_interval_of_a_consistent_gain_excludes_zero() -> None:
    cond = {s: _BASE[s] + e for s, e in enumerate([0.05, 0.06, 0.04, 0.05, 0.055])}
    d = paired_difference(cond, _BASE)
    assert d["delta"] == pytest.approx(0.051)
    assert d["ci_low"] > 0


def _probs(y: np.ndarray, signal: float, seed: int) -> np.ndarray:
    """Binary probs whose label-1 logit is signal * (+1/-1 by label) plus unit Gaussian noise."""
    logit = signal * (2 * y - 1) + np.random.default_rng(seed).normal(size=len(y))
    p1 = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p1, p1], axis=1)


_Y = np.r_[np.zeros(40, dtype=np.int64), np.ones(110, dtype=np.int64)]  # BreastMNIST-like size


@pytest.mark.parametrize("metric", COMPARED_METRICS)
def test_bootstrap_interval_of_equally_good_conditions_contains_zero(metric: str) -> None:
    cond = [_probs(_Y, 1.0, seed) for seed in (1, 2, 3)]
    base = [_probs(_Y, 1.0, seed) for seed in (4, 5, 6)]
    d = bootstrap_difference(_Y, cond, base, metric, n_boot=1000, seed=0)
    assert d["method"] == "bootstrap_test_images" and d["n"] == len(_Y)
    assert d["ci_low"] < 0 < d["ci_high"]


@pytest.mark.parametrize("metric", COMPARED_METRICS)
def test_bootstrap_interval_of_a_clearly_better_condition_excludes_zero(metric: str) -> None:
    cond = [_probs(_Y, 3.0, seed) for seed in (1, 2)]
    base = [_probs(_Y, 0.3, seed) for seed in (4, 5)]
    d = bootstrap_difference(_Y, cond, base, metric, n_boot=1000, seed=0)
    assert d["ci_low"] > 0
    assert d["ci_low"] <= d["delta"] <= d["ci_high"]


def test_bootstrap_is_reproducible_for_a_seed() -> None:
    args = (_Y, [_probs(_Y, 1.0, 1)], [_probs(_Y, 1.0, 2)], "auc")
    assert bootstrap_difference(*args, n_boot=300, seed=7) == bootstrap_difference(*args, n_boot=300, seed=7)


def test_difference_uses_t_over_seeds_from_five_seeds_and_bootstrap_below() -> None:
    cond = {s: _probs(_Y, 2.0, s) for s in range(5)}
    base = {s: _probs(_Y, 1.0, 10 + s) for s in range(5)}
    assert difference_to_baseline(_Y, cond, base, "auc")["method"] == "t_over_seeds"
    three = {s: cond[s] for s in range(3)}
    assert difference_to_baseline(_Y, three, base, "auc", n_boot=200)["method"] == "bootstrap_test_images"


# ---------------------------------------------------------------- mixing and training


def test_mix_synthetic_adds_ratio_times_real_keeping_real_class_shares() -> None:
    real_labels = np.r_[np.zeros(30), np.ones(70)].astype(np.int64)
    real = np.zeros((100, 2, 2, 1), np.uint8)
    syn_labels = np.r_[np.zeros(100), np.ones(100)].astype(np.int64)
    syn = np.arange(200, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2)  # id in pixels
    images, labels = mix_synthetic(real, real_labels, syn, syn_labels, ratio=0.5, seed=0)
    added = labels[100:]
    assert len(added) == 50 and (added == 0).sum() == 15 and (added == 1).sum() == 35
    ids = images[100:, 0, 0, 0]
    assert len(np.unique(ids)) == 50  # without replacement
    assert np.array_equal(syn_labels[ids], added)  # images stay with their labels


def test_mix_synthetic_takes_all_of_a_class_with_fewer_images_than_its_quota() -> None:
    real_labels = np.r_[np.zeros(30), np.ones(70)].astype(np.int64)
    syn_labels = np.r_[np.zeros(10), np.ones(100)].astype(np.int64)
    _, labels = mix_synthetic(
        np.zeros((100, 2, 2, 1), np.uint8), real_labels, np.zeros((110, 2, 2, 1), np.uint8), syn_labels, 1.0, 0
    )
    assert (labels[100:] == 0).sum() == 10 and (labels[100:] == 1).sum() == 70


def test_mix_synthetic_with_ratio_zero_returns_the_real_set() -> None:
    real_labels = np.array([0, 1, 1], np.int64)
    images, labels = mix_synthetic(
        np.zeros((3, 2, 2, 1), np.uint8), real_labels, np.zeros((5, 2, 2, 1), np.uint8), np.ones(5, np.int64), 0, 0
    )
    assert len(images) == 3 and np.array_equal(labels, real_labels)


def _squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28 px noisy images; class 1 holds a bright 8 px square at a random place, class 0 does not."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 80, size=(n, 28, 28, 1))
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 20, size=2)
        images[i, r : r + 8, c : c + 8] += 150
    return images.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def squares() -> EvalData:
    (tr, ytr), (va, yva), (te, yte), (sy, ysy) = (_squares(n, s) for n, s in ((160, 0), (60, 1), (60, 2), (80, 3)))
    return EvalData(tr, ytr, va, yva, te, yte, num_classes=2, synthetic_images=sy, synthetic_labels=ysy)


def _train(data: EvalData, seed: int, **kwargs) -> UnitResult:
    cpu = torch.device("cpu")
    return train_and_test(
        network="simple_cnn", data=data, epochs=4, batch_size=32, lr=3e-3, seed=seed, device=cpu, **kwargs
    )


def test_simple_cnn_learns_bright_vs_dark_squares(squares: EvalData) -> None:
    real_only = dataclasses.replace(squares, synthetic_images=None, synthetic_labels=None)
    epochs_seen = []
    result = _train(real_only, seed=0, augment=False, on_epoch=epochs_seen.append)
    assert result.metrics["auc"] > 0.9
    assert result.test_probs.shape == (60, 2) and result.n_synthetic == 0
    assert len(result.val_auc_history) == 4 == len(epochs_seen)
    assert result.val_auc_history[result.best_epoch] == max(result.val_auc_history)


def test_training_with_augmentation_and_synthetic_data_is_deterministic_for_a_seed(squares: EvalData) -> None:
    a = _train(squares, seed=3, augment=True, synthetic_ratio=0.25)
    b = _train(squares, seed=3, augment=True, synthetic_ratio=0.25)
    assert a.n_synthetic == 40
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    assert a.val_auc_history == b.val_auc_history


def test_eval_data_rejects_a_validation_set_missing_a_class() -> None:
    images = np.zeros((4, 28, 28, 1), np.uint8)
    with pytest.raises(DataError, match="every class must occur in val"):
        EvalData(images, np.array([0, 1, 0, 1]), images, np.zeros(4, np.int64), images, np.array([0, 1, 0, 1]), 2)


# ---------------------------------------------------------------- report


def _records(conditions: dict[str, float], seeds: range) -> list[dict]:
    records = []
    for i, (condition, signal) in enumerate(conditions.items()):
        for seed in seeds:
            probs = _probs(_Y, signal, 100 * i + seed)
            metrics = classification_metrics(_Y, probs)
            unit = {"network": "simple_cnn", "condition": condition, "seed": seed, "metrics": metrics}
            records.append({**unit, "test_probs": probs, "test_labels": _Y})
    return records


def test_summary_lists_baseline_first_with_stats_and_differences_to_it() -> None:
    summary = build_summary(_records({"stage1": 2.0, "real": 1.0}, range(3)), n_boot=200)
    assert summary["minority_class"] == 0 and summary["test_class_counts"] == [40, 110]
    conditions = summary["networks"]["simple_cnn"]
    assert list(conditions) == ["real", "stage1"]
    assert conditions["real"]["vs_baseline"] is None
    assert set(conditions["stage1"]["metrics"]["auc"]) == {"mean", "std", "n"}
    assert conditions["stage1"]["metrics"]["auc"]["n"] == 3
    diff = conditions["stage1"]["vs_baseline"]
    assert set(diff) == set(COMPARED_METRICS)
    assert diff["auc"]["method"] == "bootstrap_test_images" and diff["auc"]["ci_low"] > 0


def test_summary_requires_the_baseline_and_one_shared_test_set() -> None:
    with pytest.raises(ConfigError, match="baseline condition 'real'"):
        build_summary(_records({"stage1": 1.0}, range(2)))
    records = _records({"real": 1.0, "stage1": 1.0}, range(2))
    records[-1] = {**records[-1], "test_labels": _Y[::-1]}
    with pytest.raises(DataError, match="different test sets"):
        build_summary(records)


def test_markdown_table_has_a_row_per_network_and_condition() -> None:
    summary = build_summary(_records({"real": 1.0, "stage1": 2.0}, range(2)), n_boot=200)
    table = markdown_table(summary, "BreastMNIST")
    assert "BreastMNIST" in table and "recall class 0 (minority)" in table
    assert "| simple_cnn | real |" in table and "| simple_cnn | stage1 |" in table
    stage1_row = next(line for line in table.splitlines() if "| stage1 |" in line)
    assert "*" in stage1_row and "boot" in stage1_row


def test_plot_rows_and_png_are_written(tmp_path) -> None:
    summary = build_summary(_records({"real": 1.0, "stage1": 2.0}, range(2)), n_boot=100)
    rows = plot_rows(summary)
    assert {"network", "condition", "metric", "mean", "std"} == set(rows[0])
    assert {(r["condition"], r["metric"]) for r in rows} >= {("real", "auc"), ("stage1", "recall_0")}
    png = tmp_path / "plots" / "evaluate.png"
    plot_summary(summary, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["evaluate.png"]  # no temporary file left
