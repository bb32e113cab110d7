"""Data layer behaviour: phantom generator, sources, conversions and file I/O on good input."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mgdm_core.data.loaders import class_weights, from_model_tensor, resize_and_convert, to_model_tensor
from mgdm_core.data.phantom import generate_phantom
from mgdm_core.data.sources import load_imagefolder, load_npz, load_phantom, load_source, natural_key
from mgdm_core.io import (
    MANIFEST_COLUMNS,
    atomic_write,
    read_image,
    read_manifest,
    save_npz_atomic,
    write_json_atomic,
    write_manifest,
    write_png,
)

# --- phantom ---------------------------------------------------------------------------------


def test_phantom_is_deterministic_per_seed() -> None:
    a_images, a_labels = generate_phantom([20, 10], 28, 1, seed=7)
    b_images, b_labels = generate_phantom([20, 10], 28, 1, seed=7)
    c_images, _ = generate_phantom([20, 10], 28, 1, seed=8)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


@pytest.mark.parametrize("image_size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_phantom_has_requested_shape_and_class_counts(image_size: int, channels: int) -> None:
    images, labels = generate_phantom([12, 5, 3], image_size, channels, seed=0)
    assert images.shape == (20, image_size, image_size, channels) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [12, 5, 3]
    if channels == 3:  # the grey scan under a per-image colour cast: channels differ, structure does not
        gray, _ = generate_phantom([12, 5, 3], image_size, 1, seed=0)
        assert not (images == images[..., :1]).all()
        for rgb, grey in zip(images.astype(float), gray[..., 0].astype(float)):
            for c in range(3):
                assert np.corrcoef(rgb[..., c].ravel(), grey.ravel())[0, 1] > 0.99


def test_phantom_defines_ten_classes_each_with_its_own_lesions() -> None:
    images, labels = generate_phantom([6] * 10, 32, 1, seed=0)
    assert np.bincount(labels).tolist() == [6] * 10
    class_means = np.array([images[labels == k].mean() for k in range(10)])
    assert len(np.unique(np.round(class_means, 3))) == 10  # no two classes draw identical images


def test_phantom_uses_the_dynamic_range_without_saturating() -> None:
    images, _ = generate_phantom([50, 50], 28, 1, seed=0)
    assert 60 < images.mean() < 160
    assert (images == 255).mean() < 0.02


def test_phantom_generates_1000_images_of_28px_fast() -> None:
    start = time.perf_counter()
    generate_phantom([500, 500], 28, 1, seed=0)
    assert time.perf_counter() - start < 2.0


def _raw_pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _intensity_statistics(images: np.ndarray) -> np.ndarray:
    """Hand features that ignore shape: global mean/spread/percentiles, centre, deep half."""
    x = images[..., 0].astype(np.float64) / 255.0
    flat = x.reshape(len(x), -1)
    size = x.shape[1]
    centre = x[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4].reshape(len(x), -1)
    deep = x[:, size // 2 :].reshape(len(x), -1)
    percentiles = np.percentile(flat, [10, 50, 90], axis=1)
    return np.stack([flat.mean(1), flat.std(1), *percentiles, centre.mean(1), centre.min(1), deep.mean(1)], 1)


@pytest.fixture(scope="module")
def phantom_task() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """600 training and 2000 held-out phantoms (separate seeds); the large test set keeps the
    balanced-accuracy standard error near 0.01, so the thresholds below are not seed luck."""
    train_x, train_y = generate_phantom([300, 300], 28, 1, seed=1)
    test_x, test_y = generate_phantom([1000, 1000], 28, 1, seed=1001)
    return train_x, train_y, test_x, test_y


def test_phantom_is_learnable_by_logistic_regression_on_raw_pixels(phantom_task) -> None:
    train_x, train_y, test_x, test_y = phantom_task
    model = LogisticRegression(C=0.1, max_iter=3000).fit(_raw_pixels(train_x), train_y)
    # Measured about 0.74 to 0.75 over eight training seeds; chance is 0.5.
    assert balanced_accuracy_score(test_y, model.predict(_raw_pixels(test_x))) > 0.7


def test_phantom_classes_are_not_separable_by_intensity_statistics_alone(phantom_task) -> None:
    train_x, train_y, test_x, test_y = phantom_task
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(_intensity_statistics(train_x), train_y)
    score = balanced_accuracy_score(test_y, model.predict(_intensity_statistics(test_x)))
    # Shadows and echogenicity leak some signal (measured about 0.6); the margin must carry the rest.
    assert 0.52 < score < 0.8


def test_load_phantom_splits_are_stratified_and_sized_by_fraction() -> None:
    splits = load_phantom([200, 100], 28, 1, seed=3, val_fraction=0.15, test_fraction=0.2)
    assert splits.class_names == ("benign", "malignant") and splits.source == "phantom"
    assert len(splits.test.labels) == 60 and len(splits.val.labels) == 45 and len(splits.train.labels) == 195
    for split in (splits.train, splits.val, splits.test):
        assert abs(split.labels.mean() - 1 / 3) < 0.03


def test_load_source_dispatches_to_the_phantom() -> None:
    splits = load_source(
        "phantom", path=None, val_path=None, test_path=None, flag=None, phantom_counts=(8, 8, 8),
        image_size=32, channels=3, seed=0, val_fraction=0.25, test_fraction=0.25,
    )
    assert splits.class_names == ("benign", "malignant", "cyst")
    assert splits.train.images.shape[1:] == (32, 32, 3)


# --- sources ---------------------------------------------------------------------------------


def test_natural_key_orders_digit_runs_by_value() -> None:
    names = ["10", "2", "1", "class10", "class2", "Class3", "b", "a", "B", "02"]
    expected = ["1", "02", "2", "10", "a", "B", "b", "class2", "Class3", "class10"]
    assert sorted(names, key=natural_key) == expected


def _npz_arrays(rng: np.random.Generator, shape: tuple[int, ...] = (8, 8)) -> dict[str, np.ndarray]:
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]  # MedMNIST: [N, 1]
    return arrays


def test_npz_round_trip_keeps_images_and_labels(tmp_path: Path) -> None:
    arrays = _npz_arrays(np.random.default_rng(0))
    save_npz_atomic(tmp_path / "set.npz", **arrays, class_names=np.array(["benign", "malignant"]))
    splits = load_npz(tmp_path / "set.npz")
    assert splits.class_names == ("benign", "malignant") and splits.source == "npz"
    np.testing.assert_array_equal(splits.val.images[..., 0], arrays["val_images"])
    np.testing.assert_array_equal(splits.test.labels, arrays["test_labels"][:, 0])
    assert splits.train.labels.dtype == np.int64


def test_npz_without_class_names_uses_indices_and_accepts_integer_pixels(tmp_path: Path) -> None:
    arrays = _npz_arrays(np.random.default_rng(0), shape=(8, 8, 3))
    arrays["train_images"] = arrays["train_images"].astype(np.int32)  # within 0..255: converted with a note
    save_npz_atomic(tmp_path / "set.npz", **arrays)
    splits = load_npz(tmp_path / "set.npz")
    assert splits.class_names == ("0", "1")
    assert splits.train.images.dtype == np.uint8 and splits.train.images.shape[1:] == (8, 8, 3)
    assert any("train_images" in note for note in splits.notes)


def _write_folder(root: Path, per_class: dict[str, int], size: int = 8, channels: int = 1) -> None:
    rng = np.random.default_rng(len(per_class))
    for name, count in per_class.items():
        for i in range(count):
            write_png(root / name / f"img{i}.png", rng.integers(0, 256, (size, size, channels), dtype=np.uint8))


def test_imagefolder_round_trip_orders_classes_naturally(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"10": 6, "2": 6, "1": 6})
    _write_folder(tmp_path / "test", {"10": 2, "2": 2, "1": 1})
    splits = load_imagefolder(
        tmp_path / "train", test_root=tmp_path / "test", val_fraction=0.2, test_fraction=0.2, seed=0
    )
    assert splits.class_names == ("1", "2", "10")
    assert len(splits.test.labels) == 5 and len(splits.val.labels) + len(splits.train.labels) == 18
    assert np.bincount(splits.test.labels).tolist() == [1, 2, 2]
    # Pixels survive the PNG round trip: each test image is one of the files written.
    first = read_image(tmp_path / "test" / "1" / "img0.png")
    np.testing.assert_array_equal(splits.test.images[splits.test.labels == 0][0], first)


def test_imagefolder_ignores_hidden_and_non_image_files_with_a_warning(tmp_path: Path, caplog) -> None:
    _write_folder(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "a" / "notes.txt").write_text("scanner settings")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "README.md").write_text("data set")
    with caplog.at_level(logging.WARNING):
        splits = load_imagefolder(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.class_names == ("a", "b")
    assert "a/notes.txt" in caplog.text and "README.md" in caplog.text and ".DS_Store" not in caplog.text


def test_imagefolder_resizes_mixed_sizes_to_the_most_common_and_records_it(tmp_path: Path, caplog) -> None:
    _write_folder(tmp_path, {"a": 5, "b": 5}, size=8)
    write_png(tmp_path / "b" / "big.png", np.full((12, 10, 3), 200, dtype=np.uint8))
    with caplog.at_level(logging.WARNING):
        splits = load_imagefolder(tmp_path, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.train.images.shape[1:] == (8, 8, 3)  # one RGB file makes all RGB
    assert any("1 of 11 images resized" in note for note in splits.notes)
    assert any("grayscale repeated to RGB" in note for note in splits.notes)
    assert "resized" in caplog.text


# --- loaders ---------------------------------------------------------------------------------


def test_model_tensor_round_trip_is_exact() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    x = to_model_tensor(images)
    assert x.shape == (3, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(from_model_tensor(x), images)


def test_from_model_tensor_clamps_out_of_range_values() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).reshape(1, 1, 1, 5)
    assert from_model_tensor(x).ravel().tolist() == [0, 0, 128, 255, 255]


def test_resize_and_convert_changes_size_and_channels() -> None:
    rgb = np.zeros((2, 56, 56, 3), dtype=np.uint8)
    rgb[..., 1] = 100  # pure green: luma 0.587 * 100
    gray = resize_and_convert(rgb, 28, 1)
    assert gray.shape == (2, 28, 28, 1) and (gray == 59).all()
    back = resize_and_convert(gray, 32, 3)
    assert back.shape == (2, 32, 32, 3) and (back == 59).all()


def test_class_weights_give_each_class_equal_total_weight() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2])
    weights = class_weights(labels)
    totals = [weights[labels == k].sum() for k in range(3)]
    np.testing.assert_allclose(totals, [2.0, 2.0, 2.0])
    assert weights.mean() == pytest.approx(1.0)


# --- io --------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_and_no_temp_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert target.stat().st_mode & 0o044 == 0o044 & ~_umask()  # not the 0600 of a mkstemp file


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(tmp_path: Path, channels: int) -> None:
    image = np.random.default_rng(0).integers(0, 256, (9, 7, channels), dtype=np.uint8)
    write_png(tmp_path / "x.png", image)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == ("L" if channels == 1 else "RGB")
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), image)


def test_read_image_converts_palette_rgba_and_16_bit(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 3, dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # transparent pixel reads as black background
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "d.png")
    assert read_image(tmp_path / "p.png").shape == (4, 4, 1)
    colour = read_image(tmp_path / "a.png")
    assert colour.shape == (4, 4, 3) and colour[1, 1].tolist() == [200, 0, 0] and colour[0, 0].tolist() == [0, 0, 0]
    deep = read_image(tmp_path / "d.png")
    assert deep.shape == (4, 4, 1) and (deep == 255).all()


def test_manifest_round_trip_keeps_extra_columns_after_the_standard_ones(tmp_path: Path) -> None:
    row = {c: "" for c in MANIFEST_COLUMNS} | {"file": "b/0.png", "class": "b", "label": 0, "latent_std": 0.98}
    write_manifest(tmp_path / "manifest.csv", [row])
    header = (tmp_path / "manifest.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == (*MANIFEST_COLUMNS, "latent_std")
    rows = read_manifest(tmp_path / "manifest.csv")
    assert rows[0]["file"] == "b/0.png" and rows[0]["label"] == "0" and rows[0]["latent_std"] == "0.98"
