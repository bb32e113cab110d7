"""Malformed input: each case raises DataError/ConfigError with one line naming the file or key."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mgdm_core.data.phantom import generate_phantom
from mgdm_core.data.sources import load_imagefolder, load_medmnist, load_npz, load_source
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.io import ensure_writable_dir, read_image, read_manifest, save_npz_atomic, write_png

SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}


def _raises(error: type[Exception], names: str, call, *args, **kwargs) -> str:
    """Call, expect `error` whose message is one line containing `names`; return the message."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert names in message, message
    return message


def _png(path: Path, value: int = 0, size: int = 8) -> Path:
    write_png(path, np.full((size, size, 1), value, dtype=np.uint8))
    return path


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), count: int = 5) -> Path:
    for name in classes:
        for i in range(count):
            _png(root / name / f"{i}.png", value=i)
    return root


def _npz(path: Path, **changes: np.ndarray | None) -> Path:
    """A valid MedMNIST-layout npz with some arrays replaced (None removes the key)."""
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.zeros((n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.int64)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    save_npz_atomic(path, **arrays)
    return path


# --- image files -----------------------------------------------------------------------------


def test_corrupt_png_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "scan.png"
    write_png(file, np.random.default_rng(0).integers(0, 256, (64, 64, 1), dtype=np.uint8))
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside IDAT: the header parses, the zlib stream breaks
    file.write_bytes(bytes(data))
    _raises(DataError, "scan.png: corrupt or truncated image", read_image, file)


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "cut.png"
    write_png(file, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    file.write_bytes(file.read_bytes()[:200])  # header parses; the pixel data stops short
    _raises(DataError, "cut.png", read_image, file)


def test_non_image_with_image_extension_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "report.png"
    file.write_text("not an image")
    _raises(DataError, "report.png", read_image, file)


def test_imagefolder_refuses_an_undecodable_image_by_name(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    _raises(DataError, "broken.jpg", load_imagefolder, root, **SPLIT)


# --- imagefolder -----------------------------------------------------------------------------


def test_missing_imagefolder_root_names_it(tmp_path: Path) -> None:
    _raises(DataError, "nowhere", load_imagefolder, tmp_path / "nowhere", **SPLIT)


def test_imagefolder_without_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "loose.png")
    _raises(DataError, "no class folders", load_imagefolder, tmp_path, **SPLIT)


def test_empty_class_folder_names_it(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "c").mkdir()
    (root / "c" / ".DS_Store").write_bytes(b"\x00")  # hidden files do not count as images
    _raises(DataError, str(root / "c"), load_imagefolder, root, **SPLIT)


def test_class_folder_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    outside = _folder(tmp_path / "elsewhere", classes=("secret",))
    (root / "c").symlink_to(outside / "secret", target_is_directory=True)
    _raises(DataError, "outside", load_imagefolder, root, **SPLIT)


def test_image_symlink_escaping_root_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "a" / "linked.png").symlink_to(_png(tmp_path / "private.png"))
    _raises(DataError, "linked.png", load_imagefolder, root, **SPLIT)


def test_class_folder_with_a_separator_in_its_name_is_refused(tmp_path: Path) -> None:
    # "\" is legal in a Linux name but a separator on Windows: "..\evil" would escape the
    # output folder when this class name later becomes synthetic/stage1/<class>/.
    root = _folder(tmp_path, classes=("a", "b", "x\\..\\..\\evil"))
    _raises(DataError, "unsafe class name", load_imagefolder, root, **SPLIT)


def test_dot_prefixed_folder_like_dotdot_x_is_hidden_not_a_class(tmp_path: Path) -> None:
    # Decision: names starting with "." are hidden metadata (".git", ".ipynb_checkpoints"),
    # so "..x" is skipped rather than becoming a class with a traversal-looking name.
    root = _folder(tmp_path, classes=("a", "b", "..x"))
    assert load_imagefolder(root, **SPLIT).class_names == ("a", "b")


def test_val_root_with_other_class_folders_names_both(tmp_path: Path) -> None:
    root = _folder(tmp_path / "train")
    val = _folder(tmp_path / "val", classes=("a", "c"))
    message = _raises(DataError, str(val), load_imagefolder, root, val_root=val, **SPLIT)
    assert "'c'" in message


def test_mixed_image_sizes_are_resized_not_refused(tmp_path: Path) -> None:
    # Decision (documented in sources.py): resize to the most common size, warn, record a note.
    root = _folder(tmp_path)
    _png(root / "a" / "odd.png", size=16)
    splits = load_imagefolder(root, **SPLIT)
    assert splits.train.images.shape[1:3] == (8, 8) and splits.notes


def test_too_few_images_to_stratify_names_the_source(tmp_path: Path) -> None:
    root = _folder(tmp_path, count=1)
    _raises(DataError, "stratified", load_imagefolder, root, **SPLIT)


# --- npz -------------------------------------------------------------------------------------


def test_npz_missing_file_names_it(tmp_path: Path) -> None:
    _raises(DataError, "absent.npz", load_npz, tmp_path / "absent.npz")


def test_npz_that_is_not_a_zip_names_it(tmp_path: Path) -> None:
    (tmp_path / "fake.npz").write_text("hello")
    _raises(DataError, "fake.npz", load_npz, tmp_path / "fake.npz")


def test_npz_missing_keys_are_listed(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", val_images=None, test_labels=None)
    message = _raises(DataError, "d.npz", load_npz, file)
    assert "val_images" in message and "test_labels" in message


def test_npz_label_out_of_range_of_class_names(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", test_labels=np.array([0, 2]), class_names=np.array(["benign", "malignant"]))
    _raises(DataError, "label 2 is out of range", load_npz, file)


def test_npz_labels_with_a_gap_are_refused(tmp_path: Path) -> None:
    # Labels {0, 2} without class names: class 1 has no training images.
    file = _npz(tmp_path / "d.npz", train_labels=np.array([0, 2, 0, 2, 0, 2]))
    _raises(DataError, "train_labels", load_npz, file)


def test_npz_negative_label_names_the_key(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", val_labels=np.array([0, -1]))
    _raises(DataError, "val_labels contains negative label -1", load_npz, file)


def test_npz_image_label_count_mismatch_names_the_split(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", train_labels=np.array([0, 1, 0, 1, 0]))
    _raises(DataError, "train_images has 6 images but train_labels has 5", load_npz, file)


def test_npz_floats_beyond_255_are_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", train_images=np.full((6, 8, 8), 300.0))
    _raises(DataError, "train_images has values in [300, 300]", load_npz, file)


def test_npz_floats_scaled_to_unit_range_are_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", test_images=np.full((2, 8, 8), 0.5, dtype=np.float32))
    _raises(DataError, "test_images holds floats in [0, 1]", load_npz, file)


def test_npz_string_images_are_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", val_images=np.full((2, 8, 8), "x"))
    _raises(DataError, "val_images has dtype <U1", load_npz, file)


def test_npz_empty_split_is_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", test_images=np.zeros((0, 8, 8), np.uint8), test_labels=np.zeros(0, np.int64))
    _raises(DataError, "test split is empty", load_npz, file)


def test_npz_splits_with_different_image_sizes_are_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", val_images=np.zeros((2, 16, 16), np.uint8))
    _raises(DataError, "image sizes differ between splits", load_npz, file)


def test_npz_unsafe_class_name_is_refused(tmp_path: Path) -> None:
    file = _npz(tmp_path / "d.npz", class_names=np.array(["benign", "../malignant"]))
    _raises(DataError, "unsafe class name", load_npz, file)


# --- sources and phantom parameters ---------------------------------------------------------


def _load(source: str, **changes):
    kwargs = dict(path=None, val_path=None, test_path=None, flag=None, phantom_counts=(10, 10),
                  image_size=28, channels=1, seed=0, val_fraction=0.2, test_fraction=0.2)
    return load_source(source, **(kwargs | changes))


def test_unknown_source_names_the_key() -> None:
    _raises(ConfigError, "data.source", _load, "dicom")


def test_missing_path_names_the_key() -> None:
    _raises(ConfigError, "data.path", _load, "npz")


def test_phantom_with_more_classes_than_defined_names_the_key() -> None:
    _raises(ConfigError, "data.phantom_counts", generate_phantom, [5] * 11, 28, 1, 0)


def test_phantom_with_zero_images_names_the_key() -> None:
    _raises(ConfigError, "data.phantom_counts", generate_phantom, [0, 0], 28, 1, 0)


def test_phantom_with_bad_channels_names_the_key() -> None:
    _raises(ConfigError, "data.channels", generate_phantom, [5, 5], 28, 2, 0)


def test_medmnist_without_the_package_suggests_the_npz_source(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail here
    _raises(DataError, "data.source: npz", load_medmnist, "breastmnist", tmp_path)


def test_medmnist_download_failure_offline_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    def offline(**_: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution\nsecond line")

    fake = types.SimpleNamespace(INFO={"breastmnist": {"python_class": "BreastMNIST", "label": {"0": "m", "1": "b"}}},
                                 BreastMNIST=offline)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    _raises(DataError, "download of 'breastmnist' failed", load_medmnist, "breastmnist", tmp_path)
    _raises(ConfigError, "data.flag", load_medmnist, "nosuchmnist", tmp_path)


# --- output ----------------------------------------------------------------------------------


def test_unwritable_output_dir_names_it(tmp_path: Path) -> None:
    # Tests run as root, which ignores permission bits: a path below a regular file can never
    # be created, whoever runs it.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _raises(DataError, str(blocker / "out"), ensure_writable_dir, blocker / "out")


def test_manifest_missing_columns_are_listed(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("file,class\nx.png,benign\n")
    message = _raises(DataError, "manifest.csv", read_manifest, tmp_path / "manifest.csv")
    assert "'confidence'" in message
