"""Parameters: one typed schema, unknown keys and bad values are errors that name the key."""

import math

import pytest
import yaml

from mgdm_core.config import Params, load_params
from mgdm_core.errors import ConfigError


def write(tmp_path, tree, name="params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_committed_params_and_every_profile_validate(repo_root):
    base = load_params(repo_root / "params.yaml")
    assert isinstance(base, Params)
    for profile in sorted((repo_root / "profiles").glob("*.yaml")):
        assert isinstance(load_params(repo_root / "params.yaml", profile.stem), Params)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'disturb.gama'"):
        load_params(write(tmp_path, {"disturb": {"gama": 2.0}}))


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train_diffusion.steps"):
        load_params(write(tmp_path, {"train_diffusion": {"steps": "many"}}))


def test_negative_steps_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train_diffusion.steps"):
        load_params(write(tmp_path, {"train_diffusion": {"steps": -5}}))


def test_unknown_guidance_name_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="generate.guidance"):
        load_params(write(tmp_path, {"generate": {"guidance": "clasifier"}}))


def test_nan_scale_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("disturb:\n  scale: .nan\n")
    with pytest.raises(ConfigError, match="disturb.scale"):
        load_params(path)


def test_unknown_measure_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="disturb.measure"):
        load_params(write(tmp_path, {"disturb": {"measure": "confusion"}}))


def test_auto_respacing_needs_a_tolerance_and_well_formed_candidates(tmp_path):
    with pytest.raises(ConfigError, match="round_trip_tolerance"):
        load_params(write(tmp_path, {"disturb": {"respacing": "auto", "round_trip_tolerance": None}}))
    with pytest.raises(ConfigError, match="auto_candidates"):
        load_params(write(tmp_path, {"disturb": {"respacing": "auto", "auto_candidates": []}}, "b.yaml"))
    with pytest.raises(ConfigError, match="disturb.auto_candidates"):
        load_params(write(tmp_path, {"disturb": {"auto_candidates": [{"respacing": "dim10", "inversion_refine": 3}]}}, "c.yaml"))
    fixed = load_params(write(tmp_path, {"disturb": {"respacing": "ddim20", "inversion_refine": 1}}, "d.yaml")).disturb
    assert [(s.respacing, s.inversion_refine) for s in fixed.decode_settings] == [("ddim20", 1)]
    auto = load_params(write(tmp_path, {"disturb": {"respacing": "auto"}}, "e.yaml")).disturb
    assert auto.decode_settings == auto.auto_candidates and auto.decode_settings[0].respacing == "ddim10"


def test_classifier_free_guidance_is_refused_for_a_unet_trained_without_label_dropout(tmp_path):
    tree = {"train_diffusion": {"p_uncond": 0.0}, "generate": {"guidance": "cfg"}}
    with pytest.raises(ConfigError, match="p_uncond"):
        load_params(write(tmp_path, tree))
    tree["generate"]["guidance"] = "classifier"  # classifier guidance never reads the null class
    assert load_params(write(tmp_path, tree, "b.yaml")).train_diffusion.p_uncond == 0.0


def test_measure_may_be_one_name_or_a_list(tmp_path):
    one = load_params(write(tmp_path, {"disturb": {"measure": "margin"}}))
    many = load_params(write(tmp_path, {"disturb": {"measure": ["entropy", "margin", "entropy"]}}, "b.yaml"))
    assert one.disturb.measures == ("margin",)
    assert many.disturb.measures == ("entropy", "margin")


def test_npz_source_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path is required"):
        load_params(write(tmp_path, {"data": {"source": "npz"}}))


def test_evaluate_conditions_need_the_baseline(tmp_path):
    with pytest.raises(ConfigError, match="baseline 'real'"):
        load_params(write(tmp_path, {"evaluate": {"conditions": ["real+stage1"]}}))


def test_profile_overrides_key_by_key(tmp_path):
    base = write(tmp_path, {"seed": 3, "generate": {"scale": 2.0, "counts": [4, 4]}})
    (tmp_path / "profiles").mkdir()
    write(tmp_path / "profiles", {"generate": {"scale": 0.5}}, "tiny.yaml")
    params = load_params(base, "tiny")
    assert params.generate.scale == 0.5 and params.generate.counts == (4, 4) and params.seed == 3


def test_missing_profile_lists_the_available_ones(tmp_path):
    base = write(tmp_path, {})
    (tmp_path / "profiles").mkdir()
    write(tmp_path / "profiles", {}, "smoke.yaml")
    with pytest.raises(ConfigError, match="available: smoke"):
        load_params(base, "nope")


def test_overrides_are_validated_again():
    params = Params().with_overrides({"disturb.scale": 2.5})
    assert params.disturb.scale == 2.5
    with pytest.raises(ConfigError, match="disturb.scale"):
        Params().with_overrides({"disturb.scale": math.nan})
    with pytest.raises(ConfigError, match="unknown key"):
        Params().with_overrides({"disturb.gamma": 1.0})


def test_params_are_frozen():
    with pytest.raises(Exception):
        Params().seed = 4  # type: ignore[misc]
