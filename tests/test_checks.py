"""Errors before work: data-dependent parameters and unusable data fail in seconds, naming the key.

`prepare` checks the parameters against the source it loaded before writing anything, and
every other stage checks them against the prepared data when it starts (`launch.run_stage`,
before any MLflow run or model). A refused `prepare` leaves the previous `data/prepared` as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mgdm_core.config import load_params
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.io import write_png
from mgdm_core.launch import run_stage
from mgdm_core.layout import Layout
from mgdm_core.stages import STAGES, prepare
from mgdm_core.stages.checks import check_stage_inputs
from mgdm_core.tracking import NullTracker

# 16 px phantom, two classes, the smoke networks: prepare takes well under a second.
SMALL = {"data.image_size": 16, "data.phantom_counts": [20, 20]}


@pytest.fixture()
def params(repo_root):
    return load_params(repo_root / "params.yaml", "smoke").with_overrides(SMALL)


def _one_line_error(error: type[Exception], key: str, call, *args) -> str:
    with pytest.raises(error) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message and key in message, message
    return message


def _prepare(params, root: Path):
    return prepare.run(params, Layout(root), NullTracker())


def _snapshot(layout: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.prepared.iterdir())}


# --- at prepare: parameters against the source ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"generate.mode": "counts", "generate.counts": [5, 5, 5]}, "generate.counts: 3 numbers given"),
        ({"data.class_names": ["a", "b", "c"]}, "data.class_names: 3 names given"),
        ({"disturb.class_map": {0: 2}}, "disturb.class_map: 0 -> 2"),
        # 16 px halves to 8, 4, 2, 1: a sixth level cannot be reached.
        ({"diffusion.channel_mult": [1, 1, 1, 1, 1, 1], "diffusion.attention_resolutions": [4]}, "diffusion.channel_mult"),
        ({"classifier.attention_resolutions": [7]}, "classifier.attention_resolutions"),
        ({"diffusion.num_heads": 3}, "diffusion.num_heads"),  # 32 and 64 channels do not split into 3 heads
    ],
)
def test_prepare_refuses_parameters_that_do_not_fit_the_data_and_writes_nothing(params, tmp_path, overrides, key):
    _one_line_error(ConfigError, key, _prepare, params.with_overrides(overrides), tmp_path)
    assert not Layout(tmp_path).prepared.exists()


def test_a_refused_prepare_leaves_the_previous_prepared_data_untouched(params, tmp_path):
    layout = Layout(tmp_path)
    _prepare(params, tmp_path)
    before = _snapshot(layout)
    bad = params.with_overrides({"generate.mode": "counts", "data.phantom_counts": [30, 30, 30]})  # counts [3, 3] no longer fit
    _one_line_error(ConfigError, "generate.counts", _prepare, bad, tmp_path)
    too_small = params.with_overrides({"data.phantom_counts": [20, 4]})
    _one_line_error(DataError, "too few images", _prepare, too_small, tmp_path)
    assert _snapshot(layout) == before
    assert [p.name for p in layout.prepared.parent.iterdir()] == ["prepared"]  # no staging left behind


def test_a_successful_prepare_replaces_the_previous_one(params, tmp_path):
    layout = Layout(tmp_path)
    _prepare(params, tmp_path)
    _prepare(params.with_overrides({"data.phantom_counts": [30, 20]}), tmp_path)
    with np.load(layout.split_file("train")) as arrays, np.load(layout.split_file("val")) as val, \
            np.load(layout.split_file("test")) as test:
        assert len(arrays["labels"]) + len(val["labels"]) + len(test["labels"]) == 50
    assert [p.name for p in layout.prepared.parent.iterdir()] == ["prepared"]


# --- at prepare: data mgdm cannot use --------------------------------------------------------


def _folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        for i in range(n):
            write_png(root / name / f"{i}.png", rng.integers(0, 256, (16, 16, 1), dtype=np.uint8))
    return root


def test_single_class_data_is_refused(params, tmp_path):
    _folder(tmp_path / "images", {"only": 30})
    one = params.with_overrides({"data.source": "imagefolder", "data.path": str(tmp_path / "images")})
    _one_line_error(DataError, "at least 2", _prepare, one, tmp_path / "project")


def test_a_class_too_small_for_the_split_is_refused_with_the_counts(params, tmp_path):
    _folder(tmp_path / "images", {"a": 30, "b": 3})
    small = params.with_overrides({"data.source": "imagefolder", "data.path": str(tmp_path / "images"),
                                   "data.val_fraction": 0.2, "data.test_fraction": 0.2})
    message = _one_line_error(DataError, "too few images", _prepare, small, tmp_path / "project")
    assert "{1: 3}" in message and "at least 5" in message


# --- when a stage starts: parameters against the prepared data -------------------------------


@pytest.fixture()
def prepared(params, tmp_path):
    _prepare(params, tmp_path)
    return Layout(tmp_path)


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "prepare"])
def test_every_stage_checks_the_parameters_against_the_prepared_data_before_work(params, prepared, stage):
    bad = params.with_overrides({"generate.mode": "counts", "generate.counts": [1, 2, 3, 4, 5]})
    _one_line_error(ConfigError, "generate.counts: 5 numbers given, the prepared data", run_stage, stage, bad, prepared)
    assert not (prepared.root / "mlruns.db").exists()  # refused before any MLflow run was opened


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"data.image_size": 32}, "data.image_size: 32, but the prepared data"),
        ({"data.channels": 3}, "data.channels: 3, but the prepared data"),
        ({"data.class_names": ["x", "y", "z"]}, "data.class_names: 3 names given"),
        ({"disturb.class_map": {5: 0}}, "disturb.class_map"),
        ({"classifier.channel_mult": [1, 2, 2, 2, 2, 2]}, "classifier.channel_mult"),
    ],
)
def test_stage_start_names_the_key_that_does_not_fit(params, prepared, overrides, key):
    _one_line_error(ConfigError, key, check_stage_inputs, "train_diffusion", params.with_overrides(overrides), prepared)


def test_matching_parameters_pass_the_stage_check(params, prepared):
    for stage in STAGES:
        check_stage_inputs(stage, params, prepared)
