"""Data sources -> `Splits` (uint8 [N,H,W,C] images, int64 [N] labels, class names in index order).

Every loader validates its input and raises `DataError` (one line naming the file, folder
or key) or `ConfigError` (naming the parameter) instead of passing malformed data on.

Decisions for `imagefolder` (documented in the loader):
* class folders are sorted naturally ("2" before "10"); the order is the label index;
* hidden entries (leading ".") are ignored: OS metadata such as `.DS_Store`, `.ipynb_checkpoints`;
* files with a non-image extension are ignored with one warning listing them; a file with an
  image extension that fails to decode is an error;
* a class name must be a safe single path component (it becomes an output folder later);
  a folder or file that is a symlink resolving outside the root is refused;
* images of mixed sizes are resized to the most common size with a warning, and mixed
  gray/colour files are all made RGB; both are recorded in `Splits.notes`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from mgdm_core.data.loaders import convert_channels, resize_image
from mgdm_core.data.phantom import generate_phantom, phantom_class_names
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.io import read_image

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("phantom", "npz", "imagefolder", "medmnist")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
NPZ_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in SPLIT_NAMES for k in ("images", "labels"))
_UNSAFE_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Split:
    """One split: images uint8 [N, H, W, C] (C in {1, 3}), labels int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        # Loaders validate user data first; reaching this is a bug in a loader, hence ValueError.
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] not in (1, 3):
            raise ValueError(f"Split.images must be uint8 [N,H,W,1|3], got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),):
            expected = f"int64 [{len(self.images)}]"
            raise ValueError(f"Split.labels must be {expected}, got {self.labels.dtype} {self.labels.shape}")


@dataclass(frozen=True)
class Splits:
    """train/val/test of one source; `class_names[k]` names label k; `notes` records conversions made."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: str
    notes: tuple[str, ...] = field(default=())


def natural_key(name: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """Sort key ordering digit runs by value: "class2" < "class10", "2" < "10".

    Each chunk is tagged (0 = number, 1 = text) so numbers and text never compare directly.
    The raw name breaks ties ("a"/"A", "2"/"02") so the order never depends on `os.listdir`.
    """
    chunks = re.split(r"(\d+)", name)
    return tuple((0, int(c)) if c.isdigit() else (1, c.casefold()) for c in chunks if c), name


def check_class_name(name: str, where: str) -> None:
    """Refuse a class name that is not a safe single path component (it becomes a folder name)."""
    if not name or name in (".", "..") or name.startswith(".") or _UNSAFE_CHARS.search(name) or os.path.isabs(name):
        raise DataError(
            f"{where}: unsafe class name {name!r}; expected a plain folder name without separators or a leading '.'"
        )


# --- phantom -------------------------------------------------------------------------------


def load_phantom(
    counts: Sequence[int], image_size: int, channels: int, seed: int, val_fraction: float, test_fraction: float
) -> Splits:
    """Generate `counts[k]` phantoms of class k once, then split them stratified by `seed`."""
    images, labels = generate_phantom(counts, image_size, channels, seed)
    train, val, test = _stratified_split(images, labels, val_fraction, test_fraction, seed, "phantom")
    return Splits(train, val, test, phantom_class_names(len(counts)), "phantom")


def _stratified_split(
    images: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int, where: str
) -> tuple[Split, Split, Split]:
    """Hold out `test_fraction` then `val_fraction` of all images, stratified by label."""
    train_val, test = _hold_out(images, labels, test_fraction, seed, where)
    # Rescale so val is `val_fraction` of the whole set, not of what is left after test.
    train, val = _hold_out(train_val.images, train_val.labels, val_fraction / (1.0 - test_fraction), seed + 1, where)
    return train, val, test


def _hold_out(images: np.ndarray, labels: np.ndarray, fraction: float, seed: int, where: str) -> tuple[Split, Split]:
    """Split off `fraction` of the images, stratified by label -> (rest, held out).

    Every class needs at least max(2, ceil(1 / fraction)) images, so that both parts hold one.
    """
    need = max(2, math.ceil(1.0 / fraction))
    small = {k: int(n) for k, n in enumerate(np.bincount(labels)) if 0 < n < need}
    if small:
        raise DataError(
            f"{where}: too few images in class(es) {small} (label: images) to hold out {fraction:.3g} of each "
            f"class in a stratified split; every class needs at least {need} (data.val_fraction / data.test_fraction)"
        )
    try:
        rest_x, out_x, rest_y, out_y = train_test_split(
            images, labels, test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError as exc:  # too few images of a class for a stratified split
        raise DataError(f"{where}: cannot split {len(labels)} images stratified by class ({exc})") from exc
    return Split(rest_x, rest_y), Split(out_x, out_y)


# --- npz (MedMNIST layout) -----------------------------------------------------------------


def load_npz(path: str | os.PathLike[str]) -> Splits:
    """Load a MedMNIST-layout `.npz`: `{train,val,test}_{images,labels}`, optional `class_names`.

    Images [N, H, W] or [N, H, W, C] (C in {1, 3}) uint8; integer arrays or floats within
    0..255 are accepted and rounded with a warning. Labels [N] or [N, 1], integers from 0.
    """
    file = Path(path)
    arrays = _read_npz(file)
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{file}: missing keys {missing}; expected {list(NPZ_KEYS)} (MedMNIST layout)")
    notes: list[str] = []
    splits = {s: _npz_split(file, s, arrays[f"{s}_images"], arrays[f"{s}_labels"], notes) for s in SPLIT_NAMES}
    _check_same_image_shape(file, splits)
    class_names = _npz_class_names(file, arrays.get("class_names"), splits)
    return Splits(splits["train"], splits["val"], splits["test"], class_names, "npz", tuple(notes))


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Read every array of an npz without pickle; DataError when missing or not an npz."""
    if not file.is_file():
        raise DataError(f"{file}: npz file not found")
    # Check the zip magic first: numpy would otherwise try .npy and then pickle and blame pickling.
    if not zipfile.is_zipfile(file):
        raise DataError(f"{file}: not an .npz archive (expected a zip of arrays, as numpy.savez writes)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        # ValueError covers object arrays (they would need pickle) and bytes that are not numpy.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{file}: not a readable .npz archive ({reason})") from exc


def _npz_split(file: Path, split: str, images: np.ndarray, labels: np.ndarray, notes: list[str]) -> Split:
    """Validate and normalise one split's arrays."""
    images = _npz_images(file, f"{split}_images", images, notes)
    labels = _npz_labels(file, f"{split}_labels", labels)
    if len(images) != len(labels):
        raise DataError(f"{file}: {split}_images has {len(images)} images but {split}_labels has {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{file}: {split} split is empty; expected at least one image")
    return Split(images, labels)


def _npz_images(file: Path, key: str, images: np.ndarray, notes: list[str]) -> np.ndarray:
    """-> uint8 [N, H, W, C]; refuse non-numeric data, values outside 0..255 and [0, 1]-scaled floats."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise DataError(f"{file}: {key} has shape {images.shape}; expected [N,H,W] or [N,H,W,C] with C in 1 or 3")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iuf":
        raise DataError(f"{file}: {key} has dtype {images.dtype}; expected uint8 pixel values 0..255")
    if images.size and not np.isfinite(images).all():
        raise DataError(f"{file}: {key} contains NaN or infinite values; expected uint8 0..255")
    low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise DataError(f"{file}: {key} has values in [{low:g}, {high:g}] ({images.dtype}); expected uint8 0..255")
    if images.dtype.kind == "f" and images.size and high <= 1.0:
        raise DataError(f"{file}: {key} holds floats in [0, 1]; expected uint8 0..255 (multiply by 255 first)")
    note = f"{key}: {images.dtype} converted to uint8 (values within 0..255)"
    log.warning("%s: %s", file, note)
    notes.append(note)
    return np.rint(images).astype(np.uint8)


def _npz_labels(file: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """-> int64 [N]; labels must be non-negative integers shaped [N] or [N, 1]."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{file}: {key} has shape {labels.shape}; expected [N] or [N,1] (one class per image)")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{file}: {key} has dtype {labels.dtype}; expected integer class indices")
    if labels.size and labels.min() < 0:
        raise DataError(f"{file}: {key} contains negative label {int(labels.min())}; expected indices from 0")
    return labels.astype(np.int64)


def _check_same_image_shape(where: Path | str, splits: dict[str, Split]) -> None:
    shapes = {s: split.images.shape[1:] for s, split in splits.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{where}: image sizes differ between splits {shapes}; expected one [H,W,C] for all")


def _npz_class_names(file: Path, names: np.ndarray | None, splits: dict[str, Split]) -> tuple[str, ...]:
    """Class names from the `class_names` key, else "0".."K-1"; every label must index one."""
    top = max(int(split.labels.max()) for split in splits.values())
    if names is None:
        class_names = tuple(str(k) for k in range(top + 1))
    else:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{file}: class_names must be a 1-D array of strings, got {names.dtype} {names.shape}")
        class_names = tuple(str(n) for n in names)
        if len(set(class_names)) != len(class_names):
            raise DataError(f"{file}: class_names has duplicates {list(class_names)}; expected unique names")
        for name in class_names:
            check_class_name(name, f"{file}: class_names")
        if top >= len(class_names):
            raise DataError(
                f"{file}: label {top} is out of range for {len(class_names)} class_names {list(class_names)}"
            )
    absent = sorted(set(range(len(class_names))) - set(splits["train"].labels.tolist()))
    if absent:
        raise DataError(
            f"{file}: train_labels has no images of classes {absent}; "
            f"expected every class 0..{len(class_names) - 1}"
        )
    return class_names


# --- imagefolder ---------------------------------------------------------------------------


def load_imagefolder(
    root: str | os.PathLike[str],
    val_root: str | os.PathLike[str] | None = None,
    test_root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Splits:
    """Load `root/<class>/<image>` (the original release layout) into Splits.

    Label k is the k-th class folder in natural order. Without `val_root`/`test_root`, that
    split is held out of `root` stratified by `seed`. See the module docstring for the rules
    on hidden files, non-images, unsafe names and mixed sizes.
    """
    root_dir = Path(root)
    class_names = _class_folders(root_dir)
    images, labels = _read_folder(root_dir, class_names)
    extra = {s: Path(r) for s, r in (("val", val_root), ("test", test_root)) if r is not None}
    loaded = {"train": (images, labels)}
    for split, split_root in extra.items():
        found = _class_folders(split_root)
        if found != class_names:
            raise DataError(f"{split_root}: class folders {list(found)} do not match {root_dir}'s {list(class_names)}")
        loaded[split] = _read_folder(split_root, class_names)
    notes: list[str] = []
    arrays = _harmonise([img for imgs, _ in loaded.values() for img in imgs], root_dir, notes)
    merged = _regroup(arrays, loaded)
    train, val, test = _assemble(merged, val_fraction, test_fraction, seed, str(root_dir))
    return Splits(train, val, test, class_names, "imagefolder", tuple(notes))


def _class_folders(root: Path) -> tuple[str, ...]:
    """Safe, non-hidden class folder names under `root`, naturally sorted."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found; expected <root>/<class>/<image>.png")
    resolved_root = root.resolve()
    names, stray = [], []
    for name in os.listdir(root):
        entry = root / name
        if name.startswith("."):
            continue  # OS and tool metadata (.DS_Store, .ipynb_checkpoints, .git)
        if not entry.is_dir():
            stray.append(name)
            continue
        check_class_name(name, str(root))
        _check_inside(entry, resolved_root)
        names.append(name)
    if stray:
        log.warning("%s: ignoring %d file(s) outside class folders: %s", root, len(stray), sorted(stray)[:5])
    if not names:
        raise DataError(f"{root}: no class folders; expected <root>/<class>/<image>.png")
    return tuple(sorted(names, key=natural_key))


def _check_inside(entry: Path, resolved_root: Path) -> None:
    """Refuse a symlink that leads outside the data root (reading or writing there is a surprise)."""
    if entry.is_symlink() and not entry.resolve().is_relative_to(resolved_root):
        raise DataError(
            f"{entry}: symlink points outside {resolved_root} (to {entry.resolve()}); copy the data instead"
        )


def _read_folder(root: Path, class_names: tuple[str, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode every image of every class folder -> (images [H, W, C] each, labels int64 [N])."""
    resolved_root = root.resolve()
    images: list[np.ndarray] = []
    labels: list[int] = []
    ignored: list[str] = []
    for label, name in enumerate(class_names):
        folder = root / name
        files = sorted((f for f in os.listdir(folder) if not f.startswith(".")), key=natural_key)
        count = 0
        for file_name in files:
            file = folder / file_name
            _check_inside(file, resolved_root)
            if file.is_dir() or file.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(f"{name}/{file_name}")
                continue
            images.append(read_image(file))
            count += 1
        if count == 0:
            raise DataError(
                f"{folder}: class folder holds no images; expected files with extensions {sorted(IMAGE_EXTENSIONS)}"
            )
        labels.extend([label] * count)
    if ignored:
        log.warning("%s: ignoring %d non-image entry(ies): %s", root, len(ignored), ignored[:5])
    return images, np.asarray(labels, dtype=np.int64)


def _harmonise(images: list[np.ndarray], where: Path, notes: list[str]) -> np.ndarray:
    """Stack images [H, W, C] of possibly mixed sizes/channels -> uint8 [N, H, W, C].

    Mixed sizes are resized to the most common size (ties: the largest) rather than refused:
    `prepare` resizes to `data.image_size` anyway, and scans exported from a scanner often
    differ by a few pixels. Mixed gray/RGB files become RGB, which loses nothing.
    """
    sizes = Counter(img.shape[:2] for img in images)
    height, width = max(sizes, key=lambda hw: (sizes[hw], hw[0] * hw[1]))
    if len(sizes) > 1:
        resized = len(images) - sizes[(height, width)]
        note = f"{where}: {resized} of {len(images)} images resized to the most common size {height}x{width}"
        log.warning("%s", note)
        notes.append(note)
    channels = max(img.shape[2] for img in images)
    if any(img.shape[2] != channels for img in images):
        note = f"{where}: mixed grayscale and colour images; grayscale repeated to RGB"
        log.warning("%s", note)
        notes.append(note)
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = convert_channels(resize_image(img, height, width)[None], channels)[0]
    return out


def _regroup(
    stacked: np.ndarray, loaded: dict[str, tuple[list[np.ndarray], np.ndarray]]
) -> dict[str, Split]:
    """Cut the stacked images back into the splits they were read from, in order."""
    splits, start = {}, 0
    for split, (imgs, labels) in loaded.items():
        splits[split] = Split(stacked[start : start + len(imgs)], labels)
        start += len(imgs)
    return splits


def _assemble(
    splits: dict[str, Split], val_fraction: float, test_fraction: float, seed: int, where: str
) -> tuple[Split, Split, Split]:
    """Hold out of train whichever of val/test has no folder of its own."""
    train = splits["train"]
    test = splits.get("test")
    if test is None:
        train, test = _hold_out(train.images, train.labels, test_fraction, seed, where)
    val = splits.get("val")
    if val is None:
        # Same rescaling as `_stratified_split` when test was also carved from this folder.
        fraction = val_fraction / (1.0 - test_fraction) if "test" not in splits else val_fraction
        train, val = _hold_out(train.images, train.labels, fraction, seed + 1, where)
    return train, val, test


# --- medmnist ------------------------------------------------------------------------------


def load_medmnist(flag: str, root: str | os.PathLike[str]) -> Splits:
    """Download (if needed) the 28 px MedMNIST set `flag` into `root` and load it as npz.

    Needs the optional `medmnist` package and network access on first use; otherwise use
    `data.source: npz` with a downloaded `<flag>.npz`.
    """
    hint = f"or download {flag}.npz yourself and set data.source: npz, data.path: <file>"
    try:
        import medmnist  # optional dependency: pip install 'mgdm[medmnist]'
    except ImportError as exc:
        raise DataError(f"data.source medmnist needs the 'medmnist' package (pip install medmnist), {hint}") from exc
    info = medmnist.INFO.get(flag)
    if info is None:
        raise ConfigError(f"data.flag: unknown MedMNIST flag {flag!r}; expected one of {sorted(medmnist.INFO)}")
    directory = Path(root)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        getattr(medmnist, info["python_class"])(split="train", download=True, root=str(directory))
    except Exception as exc:  # noqa: BLE001 - network/HTTP/checksum errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{directory}: MedMNIST download of {flag!r} failed ({reason}); {hint}") from exc
    splits = load_npz(directory / f"{flag}.npz")
    names = tuple(info["label"][str(k)] for k in range(len(info["label"])))
    return Splits(splits.train, splits.val, splits.test, names, "medmnist", splits.notes)


# --- dispatch ------------------------------------------------------------------------------


def load_source(
    source: str,
    *,
    path: str | os.PathLike[str] | None,
    val_path: str | os.PathLike[str] | None,
    test_path: str | os.PathLike[str] | None,
    flag: str | None,
    phantom_counts: Sequence[int],
    image_size: int,
    channels: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Splits:
    """Load `source` ("phantom", "npz", "imagefolder", "medmnist") with the `data.*` parameters.

    `image_size`/`channels` shape the phantom only; other sources keep their own, and
    `prepare` converts. medmnist downloads into `path` (default ~/.medmnist).
    """
    if source == "phantom":
        return load_phantom(phantom_counts, image_size, channels, seed, val_fraction, test_fraction)
    if source == "medmnist":
        if not flag:
            raise ConfigError("data.flag: required when data.source is 'medmnist' (e.g. breastmnist)")
        return load_medmnist(flag, path or Path.home() / ".medmnist")
    if source not in SOURCES:
        raise ConfigError(f"data.source: unknown source {source!r}; expected one of {list(SOURCES)}")
    if not path:
        raise ConfigError(f"data.path: required when data.source is {source!r}")
    if source == "npz":
        return load_npz(path)
    return load_imagefolder(
        path, val_path, test_path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
