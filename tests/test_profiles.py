"""Profiles never rewrite the tracked params.yaml: they reach DVC as `dvc exp run -S` overrides
(each profile run is a DVC experiment) and everything else as `load_params(path, profile)`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mgdm_core.cli import profile_overrides
from mgdm_core.config import load_params


PROFILES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("name", PROFILES)
def test_overrides_applied_by_dvc_give_the_profile_merged_params(repo_root, tmp_path, name):
    """DVC's own -S machinery (Hydra) applied to a copy of params.yaml yields exactly what
    `load_params(params.yaml, profile)` gives every other front door."""
    from dvc.utils.hydra import apply_overrides

    profile = repo_root / "profiles" / f"{name}.yaml"
    copy = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", copy)
    apply_overrides(copy, profile_overrides(repo_root / "params.yaml", profile))
    assert load_params(copy) == load_params(repo_root / "params.yaml", profile)


def test_map_values_replace_rather_than_merge(tmp_path):
    from dvc.utils.hydra import apply_overrides

    (tmp_path / "params.yaml").write_text("disturb:\n  class_map: {0: 1}\n  scale: 4.0\n")
    (tmp_path / "p.yaml").write_text("disturb:\n  class_map: {1: 0}\n  scale: 2.5\ngenerate:\n  respacing: '100'\n")
    overrides = profile_overrides(tmp_path / "params.yaml", tmp_path / "p.yaml")
    assert overrides == ["~disturb.class_map", "+disturb.class_map={1:0}", "++disturb.scale=2.5",
                         '++generate.respacing="100"']
    apply_overrides(tmp_path / "params.yaml", overrides)
    params = load_params(tmp_path / "params.yaml")
    assert params.disturb.class_map == {1: 0} and params.disturb.scale == 2.5 and params.generate.respacing == "100"


def test_profile_command_prints_the_experiment_and_leaves_params_yaml_alone(repo_root, tmp_path):
    for name in ("params.yaml", "profiles"):
        (shutil.copytree if name == "profiles" else shutil.copy)(repo_root / name, tmp_path / name)
    before = (tmp_path / "params.yaml").read_bytes()
    done = subprocess.run([sys.executable, "-m", "mgdm_core", "profile", "gpu"], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert done.stdout.startswith("dvc exp run -S ") and "'++device=\"cuda\"'" in done.stdout
    assert (tmp_path / "params.yaml").read_bytes() == before


# profiles/breastmnist_quality.yaml is profiles/breastmnist.yaml with these keys changed (its header
# says why); profiles cannot inherit, so this keeps the copy from drifting.
QUALITY_PROFILE_CHANGES = {"train_diffusion.lr"}


def test_the_quality_profile_differs_from_breastmnist_only_in_its_documented_keys(repo_root):
    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    base = flat(yaml.safe_load((repo_root / "profiles" / "breastmnist.yaml").read_text()))
    quality = flat(yaml.safe_load((repo_root / "profiles" / "breastmnist_quality.yaml").read_text()))
    changed = {k for k in base.keys() | quality.keys() if base.get(k, "absent") != quality.get(k, "absent")}
    assert changed == QUALITY_PROFILE_CHANGES
