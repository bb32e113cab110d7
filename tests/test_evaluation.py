"""Evaluation: networks, the MedMNIST metric contract, paired statistics, training, report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import nct
from scipy.stats import t as t_dist
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from mgdm_core.config import Params
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.evaluation.metrics import COMPARED_METRICS, classification_metrics, metric_batch, predict
from mgdm_core.evaluation.networks import MIN_SIDE, NETWORKS, build_network, input_size_for
from mgdm_core.evaluation.report import build_summary, markdown_table, plot_rows, plot_summary, verdict_sentences
from mgdm_core.evaluation.stats import (
    bootstrap_difference,
    difference_to_baseline,
    holm,
    minimum_detectable_effect,
    paired_difference,
    summarise,
)
from mgdm_core.evaluation import train as train_module
from mgdm_core.evaluation.train import EvalData, UnitResult, lr_milestones, mix_synthetic, train_and_test
from mgdm_core.layout import Layout
from mgdm_core.stages.evaluate import plan

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


def test_input_size_keeps_small_image_nets_native_and_enlarges_torchvision_nets() -> None:
    assert input_size_for("simple_cnn", 28) == 28
    assert input_size_for("resnet18", 28) == 28
    assert input_size_for("resnet18_imagenet", 28) == MIN_SIDE
    assert input_size_for("resnet18_imagenet", 128) == 128


@pytest.mark.parametrize("channels, size, maps", [(1, 28, [28, 14, 7, 4]), (3, 32, [32, 16, 8, 4])])
def test_cifar_resnet18_keeps_native_resolution_and_the_data_channels(channels, size, maps) -> None:
    torch.manual_seed(0)
    model = build_network("resnet18", in_channels=channels, num_classes=5, image_size=size).eval()
    assert model.conv1.in_channels == channels and model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    seen = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        stage.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert seen == maps  # stride 1 stem, no max-pool: the first stage works at the input's size
    assert out.shape == (2, 5)


def test_imagenet_resnet18_downsamples_32x_after_resizing_to_min_side() -> None:
    model = build_network("resnet18_imagenet", in_channels=1, num_classes=2, image_size=28).eval()
    seen = []
    model.net.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    with torch.no_grad():
        model(torch.rand(1, 1, 28, 28))
    assert seen == [MIN_SIDE // 32]


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


def test_holm_matches_a_hand_computed_step_down() -> None:
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06 > 0.05: stop), 0.04 (x1 = 0.04,
    # but the running max keeps 0.06): two rejections although 0.04 alone is below 0.05.
    h = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert h["p_adjusted"] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert h["reject"] == [True, False, False, True]
    # decisions only: intervals at the step levels would not be simultaneous (test_stats.py)
    assert set(h) == {"p_adjusted", "reject"}


def test_holm_with_one_comparison_is_the_unadjusted_test() -> None:
    assert holm([0.04]) == {"p_adjusted": [0.04], "reject": [True]}


def test_minimum_detectable_effect_has_80_percent_power_in_the_paired_t_test() -> None:
    sd, n = 0.02, 5
    mde = minimum_detectable_effect(sd / np.sqrt(n), alpha=0.05, dof=n - 1)
    # exact power of the two-sided paired t-test when the true mean difference equals the MDE:
    # the noncentral t with noncentrality mde / se
    crit, nc = t_dist.ppf(0.975, n - 1), mde / (sd / np.sqrt(n))
    assert nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=1e-6)
    assert mde == pytest.approx(1.682 * sd, rel=1e-3)  # 3.761 / sqrt(5); the textbook sum gave 1.663
    # more seeds detect smaller effects; with many the t tends to the normal (2.80 se)
    assert minimum_detectable_effect(sd / np.sqrt(10), dof=9) < mde
    assert minimum_detectable_effect(1.0, dof=10_000) == pytest.approx(minimum_detectable_effect(1.0), rel=1e-3)
    assert minimum_detectable_effect(1.0) == pytest.approx(2.8016, rel=1e-4)  # 1.960 + 0.842 plus the far tail


def test_paired_difference_reports_p_value_and_mde_of_its_interval() -> None:
    noise = [0.01, -0.01, 0.02, -0.02, 0.0]
    d = paired_difference({s: _BASE[s] + e for s, e in enumerate(noise)}, _BASE)
    assert d["p_value"] == pytest.approx(1.0)  # mean difference exactly 0
    assert d["mde"] == pytest.approx(minimum_detectable_effect(np.std(noise, ddof=1) / np.sqrt(5), dof=4))
    wide = paired_difference({s: _BASE[s] + e for s, e in enumerate(noise)}, _BASE, confidence=0.99)
    assert wide["ci_high"] > d["ci_high"] and wide["mde"] > d["mde"]


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
    result = _train(real_only, seed=0, augment=None, on_epoch=epochs_seen.append)
    assert result.metrics["auc"] > 0.9
    assert result.test_probs.shape == (60, 2) and result.n_synthetic == 0
    assert len(result.val_auc_history) == 4 == len(epochs_seen)
    assert result.val_auc_history[result.best_epoch] == max(result.val_auc_history)


def test_lr_steps_down_tenfold_at_half_and_three_quarters_of_training(squares: EvalData) -> None:
    assert lr_milestones(100) == [50, 75]  # MedMNIST's 100-epoch schedule
    assert lr_milestones(30) == [15, 22]
    assert lr_milestones(2) == [1]  # 1 and 1: one drop, not two at once
    assert lr_milestones(1) == []
    real_only = dataclasses.replace(squares, synthetic_images=None, synthetic_labels=None)
    rows = []
    _train(real_only, seed=0, augment=None, on_epoch=rows.append)  # 4 epochs: drops after 2 and 3
    assert [row["lr"] for row in rows] == pytest.approx([3e-3, 3e-3, 3e-4, 3e-5])


def test_the_best_validation_epoch_is_the_one_tested(squares: EvalData, monkeypatch) -> None:
    # Validation AUCs scripted per epoch (peak at epoch 1, tie at 3) and test = validation images:
    # the tested probabilities must be epoch 1's validation probabilities, not the last epoch's.
    same = dataclasses.replace(
        squares, test_images=squares.val_images, test_labels=squares.val_labels,
        synthetic_images=None, synthetic_labels=None,
    )
    scripted = iter([0.6, 0.9, 0.7, 0.9])
    monkeypatch.setattr(train_module, "auc", lambda y, probs: next(scripted))
    outputs = []
    real_predict = train_module.predict_probs
    monkeypatch.setattr(train_module, "predict_probs", lambda *a: outputs.append(real_predict(*a)) or outputs[-1])
    result = _train(same, seed=0, augment=None)
    assert result.val_auc_history == [0.6, 0.9, 0.7, 0.9]
    assert result.best_epoch == 1  # the earliest of the tied best
    assert len(outputs) == 5  # 4 validation passes, then the test pass
    np.testing.assert_array_equal(result.test_probs, outputs[1])
    assert not np.array_equal(result.test_probs, outputs[3])


def test_training_with_augmentation_and_synthetic_data_is_deterministic_for_a_seed(squares: EvalData) -> None:
    a = _train(squares, seed=3, augment="classic", synthetic_ratio=0.25)
    b = _train(squares, seed=3, augment="classic", synthetic_ratio=0.25)
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


def _five_seed_summary(conditions: dict[str, float]) -> dict:
    return build_summary(_records(conditions, range(5)))


def test_summary_holm_adjusts_each_family_and_stars_exactly_its_rejections() -> None:
    summary = _five_seed_summary({"real": 1.0, "strong": 3.0, "same": 1.0, "slight": 1.1})
    assert summary["adjustment"] == "holm"
    conditions = summary["networks"]["simple_cnn"]
    for condition in ("strong", "same", "slight"):
        for metric, d in conditions[condition]["vs_baseline"].items():
            assert d["comparisons"] == 3 and d["adjustment"] == "holm" and d["method"] == "t_over_seeds"
            # Bonferroni intervals, Holm decisions: an interval that excludes 0 is always a
            # rejection (p_holm <= m p); Holm may also reject inside an interval that touches 0
            if d["ci_low"] > 0 or d["ci_high"] < 0:
                assert d["reject"]
            assert d["interval"] == "bonferroni" and d["family_confidence"] == 0.95
            assert d["confidence"] == pytest.approx(1 - 0.05 / 3) and d["mde_alpha"] == pytest.approx(0.05 / 3)
            assert d["p_holm"] >= d["p_value"]
    strong = conditions["strong"]["vs_baseline"]["auc"]
    assert strong["reject"] and strong["delta"] > 0
    # every interval is at 1 - 0.05 / 3: wider than the unadjusted 95% one
    runs = {c: {r["seed"]: r["test_probs"] for r in _records({"real": 1.0, "strong": 3.0}, range(5)) if r["condition"] == c}
            for c in ("real", "strong")}
    plain = difference_to_baseline(_Y, runs["strong"], runs["real"], "auc")
    assert strong["confidence"] == pytest.approx(1 - 0.05 / 3)
    assert strong["ci_high"] - strong["ci_low"] > plain["ci_high"] - plain["ci_low"]


def test_stage2_measures_are_also_compared_with_stage1() -> None:
    summary = _five_seed_summary({"real": 1.0, "real+stage1": 1.5, "real+stage2:entropy": 2.5, "real+stage2:margin": 1.5})
    conditions = summary["networks"]["simple_cnn"]
    assert "vs_stage1" not in conditions["real+stage1"]
    for measure in ("entropy", "margin"):
        d = conditions[f"real+stage2:{measure}"]["vs_stage1"]["auc"]
        assert d["comparisons"] == 2 and d["adjustment"] == "holm"
    assert conditions["real+stage2:entropy"]["vs_stage1"]["auc"]["delta"] > 0


def test_augmented_stage2_is_compared_with_stage1_under_the_same_augmentation() -> None:
    summary = _five_seed_summary({"real": 1.0, "real+stage1": 1.5, "real+stage1+mixup": 1.0,
                                  "real+stage2:entropy": 2.5, "real+stage2:entropy+mixup": 1.0,
                                  "real+stage2:entropy+cutmix": 1.0})
    conditions = summary["networks"]["simple_cnn"]
    plain = conditions["real+stage2:entropy"]["vs_stage1"]["auc"]
    mixed = conditions["real+stage2:entropy+mixup"]["vs_stage1"]["auc"]
    assert plain["reference"] == "real+stage1" and mixed["reference"] == "real+stage1+mixup"
    assert plain["comparisons"] == 1 and mixed["comparisons"] == 1  # one family per augmentation
    assert "vs_stage1" not in conditions["real+stage2:entropy+cutmix"]  # real+stage1+cutmix was not run
    sentence = verdict_sentences(summary)[0]
    assert "stage 2 against real+stage1 (one measure" in sentence
    assert "stage 2 against real+stage1+mixup (one measure" in sentence


def test_report_opens_with_one_verdict_sentence_per_network_then_the_table() -> None:
    records = _records({"real": 1.0, "strong": 3.0}, range(5))
    real = [r for r in records if r["condition"] == "real"]
    # "same": the real runs with their seeds rotated, so the paired differences sum to exactly 0
    records += [{**real[(i + 1) % 5], "condition": "same", "seed": r["seed"]} for i, r in enumerate(real)]
    records += [{**r, "network": "resnet18"} for r in records]
    summary = build_summary(records)
    sentences = verdict_sentences(summary)
    assert len(sentences) == 2 and sentences[0].startswith("**simple_cnn** (5 seeds, real AUC ")
    same = summary["networks"]["simple_cnn"]["same"]["vs_baseline"]["auc"]
    assert not same["reject"]
    assert "better than real: strong +" in sentences[0]
    assert ("no difference from real detected for same (smallest detectable with 80% power at level 0.025: "
            f"{same['mde']:.3f})") in sentences[0]
    assert "simultaneous 95% intervals (Bonferroni, each 97.5%)" in sentences[0]
    assert "verdicts: Holm's test over 2 comparisons at family-wise 5%" in sentences[0]
    table = markdown_table(summary, "BreastMNIST").splitlines()
    assert table[2:4] == [f"- {s}" for s in sentences]
    assert table.index(f"- {sentences[-1]}") < next(i for i, line in enumerate(table) if line.startswith("| network"))
    same_row = next(line for line in table if "| simple_cnn | same |" in line)
    assert f"| {same['mde']:.3f} |" in same_row  # the detectable difference of a null result


def _with_validation(records: list[dict], val: dict[str, float]) -> list[dict]:
    """Give each record its condition's validation AUC (seed-dependent jitter, same mean order)."""
    return [{**r, "val_auc": val[r["condition"]] + 0.001 * r["seed"]} for r in records]


def test_the_best_standard_augmentation_is_chosen_on_validation_not_on_test() -> None:
    # mixup is worse on the test images than cutmix but better on validation: it must be chosen
    conditions = {"real": 1.0, "real+mixup": 1.0, "real+cutmix": 3.0, "real+stage1": 2.0,
                  "real+stage2:entropy": 2.0, "real+stage2:entropy+mixup": 2.5, "real+stage2:entropy+cutmix": 2.5}
    val = {"real": 0.80, "real+mixup": 0.90, "real+cutmix": 0.85, "real+stage1": 0.99,
           "real+stage2:entropy": 0.99, "real+stage2:entropy+mixup": 0.99, "real+stage2:entropy+cutmix": 0.99}
    summary = build_summary(_with_validation(_records(conditions, range(5)), val))
    chosen = summary["best_augmentation"]["simple_cnn"]
    assert chosen["condition"] == "real+mixup"  # synthetic conditions are not candidates
    assert chosen["validation_auc"] == pytest.approx({"real+mixup": 0.902, "real+cutmix": 0.852})
    nets = summary["networks"]["simple_cnn"]
    assert nets["real+mixup"]["validation"]["auc"]["mean"] == pytest.approx(0.902)
    # compared with it: the synthetic sets alone and combined with mixup, not with another augmentation
    compared = [c for c, e in nets.items() if e.get("vs_best_augmentation")]
    assert compared == ["real+stage1", "real+stage2:entropy", "real+stage2:entropy+mixup"]
    d = nets["real+stage2:entropy"]["vs_best_augmentation"]["auc"]
    assert d["reference"] == "real+mixup" and d["comparisons"] == 3 and d["adjustment"] == "holm"
    assert d["confidence"] == pytest.approx(1 - 0.05 / 3) and d["reject"] and d["delta"] > 0
    sentence = verdict_sentences(summary)[0]
    assert "against the best standard augmentation on validation AUC, real+mixup" in sentence
    assert "better than real+mixup: real+stage1 +" in sentence
    report = markdown_table(summary, "BreastMNIST")
    assert "## Against the best standard augmentation (chosen on validation AUC)" in report
    assert "real+mixup 0.902, real+cutmix 0.852 (real: 0.802); chosen: **real+mixup**" in report
    assert any(line.startswith("| real+stage2:entropy+mixup |") for line in report.splitlines())


def test_no_augmentation_is_chosen_without_validation_aucs_or_candidates() -> None:
    # records written before validation AUCs were kept, and runs without standard augmentations
    old = build_summary(_records({"real": 1.0, "real+mixup": 1.0, "real+stage1": 2.0}, range(5)))
    assert old["best_augmentation"] == {} and "validation" not in old["networks"]["simple_cnn"]["real"]
    plain = build_summary(_with_validation(_records({"real": 1.0, "real+stage1": 2.0}, range(5)),
                                           {"real": 0.8, "real+stage1": 0.9}))
    assert plain["best_augmentation"] == {}
    assert "vs_best_augmentation" not in plain["networks"]["simple_cnn"]["real+stage1"]
    assert "best standard augmentation" not in markdown_table(plain, "BreastMNIST")


def test_plan_trains_each_network_on_its_own_seeds(tmp_path) -> None:
    params = Params().with_overrides({
        "evaluate.networks": ["resnet18", "simple_cnn"], "evaluate.conditions": ["real", "real+classic"],
        "evaluate.seeds": [0, 1, 2, 3, 4], "evaluate.seeds_per_network": {"simple_cnn": list(range(10))},
    })
    units = plan(params, Layout(tmp_path))
    assert sorted({u.seed for u in units if u.network == "resnet18"}) == [0, 1, 2, 3, 4]
    assert sorted({u.seed for u in units if u.network == "simple_cnn"}) == list(range(10))
    assert len(units) == 2 * (5 + 10)


@pytest.mark.parametrize("seeds_per_network, message", [
    ({"vgg16_bn": [0]}, "seeds_per_network: 'vgg16_bn' is not in networks"),
    ({"simple_cnn": [1, 1]}, "seeds_per_network.simple_cnn: needs distinct seeds"),
])
def test_seeds_per_network_must_name_a_listed_network_and_distinct_seeds(seeds_per_network, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Params().with_overrides({"evaluate.networks": ["simple_cnn"], "evaluate.seeds_per_network": seeds_per_network})
