"""File I/O with no half-written artifacts: atomic writes, PNG read/write, manifest CSV.

Every writer goes through `atomic_write`: the bytes land in a temporary file in the target's
directory (same filesystem, so `os.replace` is atomic), are fsynced, then renamed over the
target. A crash or an exception leaves either the old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mgdm_core.errors import DataError

MANIFEST_COLUMNS: tuple[str, ...] = (
    "file",
    "class",
    "label",
    "source",
    "guidance",
    "scale",
    "seed",
    "confidence",
    "entropy",
)


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and parents) if needed and check that a file can be written in it.

    Raises DataError (one line naming the directory) when it cannot be created or written.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{directory}: cannot create output directory ({exc.strerror or exc})") from exc
    if not directory.is_dir():
        raise DataError(f"{directory}: expected a directory, found a file")
    # os.access lies for root and on some network filesystems; a real probe file does not.
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise DataError(f"{directory}: output directory is not writable ({exc.strerror or exc})") from exc
    return directory


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    The caller writes the complete file to the yielded path (by any library that takes a
    path). On an exception the temporary file is removed and `path` is left untouched.
    Parent directories are created.
    """
    target = Path(path)
    try:  # no write probe here (ensure_writable_dir): this runs once per PNG
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{target.parent}: cannot create output directory ({exc.strerror or exc})") from exc
    # Keep the real suffix last so libraries that infer the format from it (PIL) work.
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}")
    # os.open with 0o666 lets the umask decide the final permissions (mkstemp would force 0600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


# Temporary names our writers use: atomic_write's ".<name>.<12 hex>.tmp<suffix>", save_checkpoint's
# NamedTemporaryFile ".<name>.<8 chars>.tmp" and ensure_writable_dir's ".write-probe-<8 chars>".
_STALE_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{12}\.tmp(?:\.[^.]+)?|[a-z0-9_]{8}\.tmp)$|^\.write-probe-[a-z0-9_]{8}$")


def remove_stale_temps(
    directory: str | os.PathLike[str], *, recursive: bool = False, names: Sequence[str] | None = None
) -> list[Path]:
    """Delete temporary files a killed writer (SIGKILL, power loss) left in `directory`; return them.

    Only files matching our own temporary-name patterns are touched, and with `names` only the
    temporaries of those target file names, so a directory shared with a concurrently running
    stage (models/) can be cleaned without removing the other stage's in-flight temp file.
    Call it only where no other writer of the same targets can be running.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    candidates = root.rglob(".*") if recursive else root.glob(".*")
    removed = []
    for path in candidates:
        match = _STALE_TEMP.match(path.name)
        if not match or not path.is_file() or path.is_symlink():
            continue
        if names is not None and match.group("name") not in names:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort because some filesystems refuse directory fsync."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Write `arrays` to an uncompressed `.npz` at `path` atomically."""
    with atomic_write(path) as tmp, open(tmp, "wb") as handle:
        # Writing to a handle stops numpy from appending a second ".npz" to the temp name.
        np.savez(handle, **arrays)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON (trailing newline) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8 image [H, W, C], C in {1, 3}, as a PNG atomically (C=1 as mode "L")."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"write_png expects uint8 [H,W,1|3], got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)  # uint8 2-D -> "L", [H,W,3] -> "RGB"
    with atomic_write(path) as tmp:
        pil.save(tmp, format="PNG")


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file fully into uint8 [H, W, C] with C = 1 (grayscale) or 3 (colour).

    Palette images are expanded, alpha is composited on black (medical scans carry no
    meaningful transparency), 16-bit and float grayscale are rescaled to 0..255 by their
    type's range. Raises DataError naming the file when it is missing, not an image,
    truncated or corrupt.
    """
    file = Path(path)
    try:
        with Image.open(file) as img:
            img.load()  # Image.open only parses the header; truncation shows up on decode.
            return _to_uint8_array(img)
    except FileNotFoundError as exc:
        raise DataError(f"{file}: image file not found") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{file}: not a readable image (unknown format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL raises OSError for truncated data and SyntaxError/ValueError for broken chunks.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{file}: corrupt or truncated image ({reason})") from exc


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any common mode to uint8 [H, W, 1|3]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _rescale(np.asarray(img, dtype=np.float64), 65535.0)
    if img.mode == "I":
        array = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs often decode as mode "I"; only treat as 32-bit when values say so.
        full_scale = 65535.0 if array.max(initial=0) <= 65535 else float(2**31 - 1)
        return _rescale(array, full_scale)
    if img.mode == "F":  # float TIFFs: [0, 1] if they fit there, else taken as 0..255
        array = np.asarray(img, dtype=np.float64)
        return _rescale(array, 1.0 if array.max(initial=0) <= 1.0 else 255.0)
    if img.mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if img.mode == "LA" or (img.mode == "P" and _palette_is_gray(img)):
        return np.asarray(_drop_alpha(img.convert("LA")).convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(_drop_alpha(img.convert("RGBA")).convert("RGB"), dtype=np.uint8)


def _rescale(array: np.ndarray, full_scale: float) -> np.ndarray:
    """Map [0, full_scale] linearly onto uint8 [H, W, 1], clipping outliers."""
    scaled = np.clip(np.rint(array / full_scale * 255.0), 0, 255)
    return scaled.astype(np.uint8)[:, :, None]


def _palette_is_gray(img: Image.Image) -> bool:
    """True when every palette entry has R == G == B, so the image is really grayscale."""
    palette = np.asarray(img.convert("RGB"))
    return bool(np.all(palette[..., 0] == palette[..., 1]) and np.all(palette[..., 1] == palette[..., 2]))


def _drop_alpha(img: Image.Image) -> Image.Image:
    """Composite an LA/RGBA image on black so transparent pixels read as background."""
    background = Image.new(img.mode, img.size, (0,) * len(img.mode))
    return Image.alpha_composite(background.convert("RGBA"), img.convert("RGBA")).convert(img.mode)


def write_manifest(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write `rows` as CSV atomically: the standard columns first, then any extra ones in order seen.

    Every row must hold every standard column (use "" for "not applicable").
    """
    extras: list[str] = []
    for index, row in enumerate(rows):
        missing = [c for c in MANIFEST_COLUMNS if c not in row]
        if missing:
            raise DataError(f"{path}: manifest row {index} lacks columns {missing}")
        extras.extend(k for k in row if k not in MANIFEST_COLUMNS and k not in extras)
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*MANIFEST_COLUMNS, *extras], restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Read a manifest CSV into a list of row dicts (values as strings).

    Raises DataError naming the file when it is missing or lacks standard columns.
    """
    file = Path(path)
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"{file}: manifest lacks columns {missing}")
            return list(reader)
    except FileNotFoundError as exc:
        raise DataError(f"{file}: manifest not found") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: manifest is not a readable CSV ({exc})") from exc


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """Hash of the mgdm_core sources (names and bytes): a code change invalidates whatever was
    keyed on it (Prefect's stage cache, an interrupted evaluation's finished units). Coarse but safe."""
    core = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(core.rglob("*.py")):
        digest.update(str(file.relative_to(core)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def tree_digest(path: str | os.PathLike[str]) -> str | None:
    """Content hash of a file, or of every file under a folder (names and bytes, in sorted order);
    None when the path does not exist. The input data's identity for `prepare` and Prefect's cache."""
    path = Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
