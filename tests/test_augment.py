"""Baseline augmentation conditions: the condition grammar, the policies, and what each unit reads.

Augmentation runs on training batches only, from the unit's seed; conditions without a synthetic
set never read (or key on) the generated images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from mgdm_core.conditions import AUGMENTS, Condition, parse_condition
from mgdm_core.config import Params
from mgdm_core.errors import ConfigError
from mgdm_core.evaluation import train as train_module
from mgdm_core.evaluation.train import EvalData, augmentation, train_and_test
from mgdm_core.io import MANIFEST_COLUMNS, write_manifest, write_png
from mgdm_core.layout import Layout
from mgdm_core.stages.common import Prepared
from mgdm_core.stages.evaluate import Unit, condition_data, expand_conditions, synthetic_manifest, unit_keys, unit_params

# ---------------------------------------------------------------- the grammar


@pytest.mark.parametrize("condition, parsed", [
    ("real", Condition("real")),
    ("real+classic", Condition("real", None, "classic")),
    ("real+trivialaugment", Condition("real", None, "trivialaugment")),
    ("real+stage1", Condition("real+stage1")),
    ("real+stage1+trivialaugment", Condition("real+stage1", None, "trivialaugment")),
    ("real+stage2", Condition("real+stage2")),
    ("real+stage2+mixup", Condition("real+stage2", None, "mixup")),
    ("real+stage2:entropy+cutmix", Condition("real+stage2", "entropy", "cutmix")),
    ("synthetic", Condition("synthetic")),
    ("synthetic+randaugment", Condition("synthetic", None, "randaugment")),
])
def test_a_condition_parses_into_data_measure_augment_and_prints_back(condition: str, parsed: Condition) -> None:
    assert parse_condition(condition) == parsed
    assert str(parsed) == condition


@pytest.mark.parametrize("condition, message", [
    ("real+autoaugment", "unknown augmentation 'autoaugment' \\(valid: classic, trivialaugment, randaugment, mixup, cutmix\\)"),
    ("real+stage1+flip", "unknown augmentation 'flip'"),
    ("real+mixup+cutmix", "expected <data>\\[\\+<augment>\\]"),
    ("real+stage1:entropy", "needs real\\+stage2"),
    ("stage1", "must start with real or synthetic"),
])
def test_malformed_conditions_are_config_errors_naming_the_valid_parts(condition: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_condition(condition)


def test_params_reject_an_unknown_augmentation_naming_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="evaluate.conditions.*valid: classic, trivialaugment, randaugment, mixup, cutmix"):
        Params().with_overrides({"evaluate.conditions": ["real", "real+augmix"]})
    with pytest.raises(ConfigError, match="one of"):
        Params().with_overrides({"evaluate.conditions": ["real", "real+stage2:entropi+mixup"]})
    ok = Params().with_overrides({"evaluate.conditions": ["real", "real+cutmix", "real+stage2:entropy+mixup"]})
    assert ok.evaluate.conditions == ("real", "real+cutmix", "real+stage2:entropy+mixup")


def test_stage2_with_an_augment_expands_over_the_measures_like_plain_stage2() -> None:
    measures = ("entropy", "margin")
    assert expand_conditions(("real", "real+stage2+mixup", "real+stage2:entropy+cutmix"), measures) == [
        "real", "real+stage2:entropy+mixup", "real+stage2:margin+mixup", "real+stage2:entropy+cutmix"]
    with pytest.raises(ConfigError, match="needs 'margin' in disturb.measure"):
        expand_conditions(("real", "real+stage2:margin+cutmix"), ("entropy",))


# ---------------------------------------------------------------- the policies


def _image(channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (channels, size, size), dtype=np.uint8))


@pytest.mark.parametrize("name", ["classic", "trivialaugment", "randaugment"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_per_image_policies_keep_gray_and_rgb_uint8_and_draw_from_torchs_seeded_rng(name, channels, size) -> None:
    policy = augmentation(name, num_classes=2).per_image
    image = _image(channels, size)

    def draws(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [policy(image) for _ in range(8)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(out.dtype == torch.uint8 and out.shape == image.shape for out in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the global RNG is all they read
    assert any(not torch.equal(out, image) for out in first)  # and they do change images
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_no_policy_flips_vertically() -> None:
    # Ultrasound's transducer is at the top. The auto-augment operation lists hold no flip at all;
    # the one flip each policy adds is horizontal.
    for policy in (v2.TrivialAugmentWide, v2.RandAugment):
        assert not [op for op in policy._AUGMENTATION_SPACE if "Flip" in op]
    for name in ("trivialaugment", "randaugment"):
        flips = [t for t in augmentation(name, 2).per_image.transforms if "Flip" in type(t).__name__]
        assert [type(t).__name__ for t in flips] == ["RandomHorizontalFlip"]
    classic = augmentation("classic", 2).per_image.transforms
    assert [type(t).__name__ for t in classic if "Flip" in type(t).__name__] == ["RandomHorizontalFlip"]


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
@pytest.mark.parametrize("channels", [1, 3])
def test_batch_policies_mix_neighbours_and_return_soft_labels(name: str, channels: int) -> None:
    policy = augmentation(name, num_classes=3).batch
    x = torch.rand(6, channels, 28, 28) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(0)
    mixed, soft = policy(x.clone(), y)
    assert mixed.shape == x.shape and soft.shape == (6, 3) and soft.dtype.is_floating_point
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    lam = float(soft[0, 0])  # image 0 (label 0) keeps weight lam, its neighbour 5 (label 2) 1 - lam
    assert 0 < lam < 1 and soft[0, 2] == pytest.approx(1 - lam)
    if name == "mixup":
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    else:  # every pixel comes from the image itself or from its neighbour, a 1 - lam share of them
        from_self = (mixed == x).all(dim=1)
        assert ((mixed == x) | (mixed == x.roll(1, 0))).all()
        assert from_self[0].float().mean() == pytest.approx(lam)
    torch.manual_seed(0)
    again, _ = policy(x.clone(), y)
    assert torch.equal(mixed, again)


def test_no_augmentation_and_unknown_names() -> None:
    assert augmentation(None, 2) == train_module.Augmentation()
    assert set(AUGMENTS) == {"classic", "trivialaugment", "randaugment", "mixup", "cutmix"}
    with pytest.raises(ConfigError, match="valid: classic, trivialaugment"):
        augmentation("augmix", 2)


# ---------------------------------------------------------------- training with them


def _tiny(channels: int, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int64)
    images = rng.integers(0, 60, size=(n, 28, 28, channels)) + 120 * labels[:, None, None, None]
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module", params=[1, 3], ids=["gray", "rgb"])
def tiny(request) -> EvalData:
    c = request.param
    (tr, ytr), (va, yva), (te, yte) = _tiny(c, 0, 32), _tiny(c, 1, 8), _tiny(c, 2, 8)
    return EvalData(tr, ytr, va, yva, te, yte, num_classes=2)


def _spy_training_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (model input, loss target) of every training step."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_loss = train_module.F.cross_entropy
    real_build = train_module.build_network

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: seen.append((inputs[0].clone(), None)) if m.training else None)
        return model

    def loss(logits, target, *args, **kwargs):
        seen[-1] = (seen[-1][0], target.clone())
        return real_loss(logits, target, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_network", build)
    monkeypatch.setattr(train_module.F, "cross_entropy", loss)
    return seen


def _unit(data: EvalData, augment: str | None):
    return train_and_test(network="simple_cnn", data=data, augment=augment, epochs=1, batch_size=16, lr=1e-3,
                          seed=7, device=torch.device("cpu"))


@pytest.mark.parametrize("name", AUGMENTS)
def test_an_augmented_unit_is_bit_reproducible_and_trains_on_changed_batches(tiny, name, monkeypatch) -> None:
    seen = _spy_training_batches(monkeypatch)
    _unit(tiny, None)
    plain_batches, seen[:] = list(seen), []
    first = _unit(tiny, name)
    first_batches, seen[:] = list(seen), []
    second = _unit(tiny, name)
    assert first.metrics == second.metrics
    np.testing.assert_array_equal(first.test_probs, second.test_probs)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first_batches, seen))
    # Same seed, same batch order (the permutation is drawn before any augmentation): only the
    # policy changes what the network sees.
    assert len(first_batches) == len(plain_batches) == 2
    assert not torch.equal(first_batches[0][0], plain_batches[0][0])
    targets = first_batches[0][1]
    if name in ("mixup", "cutmix"):  # soft labels reach the loss
        assert targets.shape == (16, 2) and targets.dtype.is_floating_point
        assert not torch.equal(targets, torch.nn.functional.one_hot(plain_batches[0][1], 2).float())
    else:
        assert torch.equal(targets, plain_batches[0][1])


def test_augmentation_leaves_validation_and_test_images_alone(tiny, monkeypatch) -> None:
    # The selection and test passes go through predict_probs: it must see the stored uint8 images.
    passed = []
    real_predict = train_module.predict_probs
    monkeypatch.setattr(train_module, "predict_probs", lambda m, images, d: passed.append(images.clone()) or real_predict(m, images, d))
    _unit(tiny, "trivialaugment")
    assert torch.equal(passed[0], torch.from_numpy(tiny.val_images).permute(0, 3, 1, 2))
    assert torch.equal(passed[-1], torch.from_numpy(tiny.test_images).permute(0, 3, 1, 2))


# ---------------------------------------------------------------- what a condition reads


def _prepared_with_stage1(root) -> tuple[Prepared, Layout]:
    """Real splits (pixel value 10 + split index) and a stage-1 set of 4 images (value 200)."""
    layout = Layout(root)
    images = {s: np.full((4, 8, 8, 1), 10 + i, np.uint8) for i, s in enumerate(("train", "val", "test"))}
    labels = {s: np.array([0, 1, 0, 1], np.int64) for s in images}
    data = Prepared(images, labels, ("benign", "malignant"), "toy", "digest")
    rows = []
    for i in range(4):
        name = f"{data.class_names[i % 2]}/{i}.png"
        write_png(layout.stage1_dir / name, np.full((8, 8, 1), 200, np.uint8))
        rows.append({**{c: "" for c in MANIFEST_COLUMNS}, "file": name, "class": data.class_names[i % 2], "label": i % 2})
    write_manifest(layout.stage1_dir / "manifest.csv", rows)
    return data, layout


@pytest.mark.parametrize("condition", ["real", "real+classic", "real+cutmix", "real+stage1", "real+stage1+mixup",
                                       "synthetic", "synthetic+trivialaugment"])
def test_condition_data_keeps_real_validation_and_test_and_synthetic_swaps_in_stage1(tmp_path, condition) -> None:
    data, layout = _prepared_with_stage1(tmp_path)
    d = condition_data(condition, data, layout)
    assert np.array_equal(d.val_images, data.images["val"]) and np.array_equal(d.val_labels, data.labels["val"])
    assert np.array_equal(d.test_images, data.images["test"]) and np.array_equal(d.test_labels, data.labels["test"])
    data_part = parse_condition(condition).data
    if data_part == "synthetic":  # trained on stage 1 alone, nothing to add
        assert (d.train_images == 200).all() and len(d.train_images) == 4 and d.synthetic_images is None
    else:
        assert np.array_equal(d.train_images, data.images["train"])
        if data_part == "real+stage1":
            assert (d.synthetic_images == 200).all() and d.synthetic_labels.tolist() == [0, 1, 0, 1]
        else:
            assert d.synthetic_images is None


def test_generator_independent_conditions_never_read_or_key_on_the_synthetic_sets(tmp_path) -> None:
    data, layout = _prepared_with_stage1(tmp_path)
    independent = ["real", *(f"real+{a}" for a in AUGMENTS)]  # real+classic among them
    dependent = ["real+stage1", "real+stage1+trivialaugment", "real+stage2:entropy+cutmix", "synthetic"]
    assert all(synthetic_manifest(c, layout) is None for c in independent)
    assert all(synthetic_manifest(c, layout) is not None for c in dependent)

    params = Params().with_overrides({"device": "cpu"})
    units = [Unit("simple_cnn", c, 0) for c in independent + dependent[:2]]
    keys = unit_keys(units, params, layout)
    assert len(set(keys.values())) == len(units)  # the condition string is part of every key
    write_png(layout.stage1_dir / "benign/0.png", np.full((8, 8, 1), 201, np.uint8))  # regenerate stage 1
    changed = unit_keys(units, params, layout)
    assert [u.condition for u in units if changed[u] != keys[u]] == dependent[:2]

    logged = unit_params(Unit("simple_cnn", "real+stage1+mixup", 0), params, layout)
    assert logged["augment"] == "mixup" and logged["measure"] == "-" and logged["synthetic_ratio"] == 0.5
    assert unit_params(Unit("simple_cnn", "real+randaugment", 0), params, layout)["synthetic_ratio"] == "-"
