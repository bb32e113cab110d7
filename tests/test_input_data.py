"""The input data is a dependency: `data/raw` in dvc.yaml, its content hash in Prefect's cache key,
and the hash of what `prepare` read recorded with the prepared data."""

import json
import logging
from pathlib import Path

import numpy as np
import yaml

from mgdm_core.config import Params
from mgdm_core.io import save_npz_atomic
from mgdm_core.layout import Layout
from mgdm_core.stages import prepare
from mgdm_core.tracking import NullTracker


def _npz(path: Path, seed: int) -> None:
    """A small MedMNIST-layout npz: 8 px grayscale, two classes in every split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz_atomic(path, **arrays)


def _params(path: str) -> Params:
    return Params.model_validate({"data": {"source": "npz", "path": path, "image_size": 8}})


def test_dvc_yaml_makes_data_raw_a_dependency_of_prepare(repo_root: Path, tmp_path: Path) -> None:
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    layout = Layout(tmp_path)
    assert layout.relative(layout.raw_data_dir) in stages["prepare"]["deps"]
    # It exists in a clean clone (a tracked README), or DVC would refuse a missing dependency.
    assert (repo_root / "data" / "raw" / "README.md").is_file()


def test_prepare_records_the_content_hash_of_its_input(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    data = layout.raw_data_dir / "set.npz"
    _npz(data, seed=0)
    prepare.run(_params("data/raw/set.npz"), layout, NullTracker())
    first = json.loads(layout.classes_file.read_text())["inputs"]
    assert list(first) == ["data.path"] and first["data.path"]["path"] == "data/raw/set.npz"
    _npz(data, seed=1)  # the same file name, other images
    prepare.run(_params("data/raw/set.npz"), layout, NullTracker())
    second = json.loads(layout.classes_file.read_text())["inputs"]
    assert second["data.path"]["digest"] != first["data.path"]["digest"]


def test_input_outside_data_raw_is_named_in_a_warning(tmp_path: Path, caplog) -> None:
    layout = Layout(tmp_path / "project")
    _npz(tmp_path / "elsewhere" / "set.npz", seed=0)
    with caplog.at_level(logging.WARNING, logger="mgdm"):
        prepare.run(_params(str(tmp_path / "elsewhere" / "set.npz")), layout, NullTracker())
    assert "dvc status" in caplog.text and "data/raw" in caplog.text


def test_prefect_cache_key_of_prepare_follows_the_data(tmp_path: Path) -> None:
    from flows.pipeline import cache_key

    layout = Layout(tmp_path)
    inside, outside = layout.raw_data_dir / "set.npz", tmp_path / "elsewhere.npz"
    for path, params in ((inside, _params("data/raw/set.npz")), (outside, _params(str(outside)))):
        _npz(path, seed=0)
        key = cache_key("prepare", params, layout)
        assert cache_key("prepare", params, layout) == key
        _npz(path, seed=1)
        assert cache_key("prepare", params, layout) != key, path
