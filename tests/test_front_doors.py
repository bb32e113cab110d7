"""One lineage from every front door, on the smoke profile, from a clean clone:

* `mgdm repro --profile smoke` is a DVC experiment (`dvc exp run -S ...`): `dvc exp show` lists
  it, and the tracked params.yaml is left exactly as committed;
* a Prefect run of the same profile gives bit for bit the models and stage-1 images DVC gives.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_repository
from mgdm_core.config import load_params

pytestmark = pytest.mark.slow

GIT_USER = {"GIT_AUTHOR_NAME": "mgdm test", "GIT_AUTHOR_EMAIL": "test@mgdm.invalid",
            "GIT_COMMITTER_NAME": "mgdm test", "GIT_COMMITTER_EMAIL": "test@mgdm.invalid"}


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dvc_run(repo_root, tmp_path_factory):
    """A clean clone (params.yaml as committed) and `mgdm repro --profile smoke` in it."""
    root = tmp_path_factory.mktemp("clone")
    env = {**copy_repository(repo_root, root, profile=None), **GIT_USER}
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-q", "-m", "clean clone"], root, env)
    sh([sys.executable, "-m", "mgdm_core", "repro", "--profile", "smoke"], root, env)
    return root, env


def test_a_profile_run_is_a_dvc_experiment_and_leaves_params_yaml_as_committed(dvc_run):
    root, env = dvc_run
    assert sh(["git", "status", "--porcelain", "params.yaml"], root, env) == ""
    assert sh(["git", "diff", "params.yaml"], root, env) == ""
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], root, env))
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert len(experiments) == 1, shown
    revision = experiments[0]["revs"][0]["data"]
    steps = revision["params"]["params.yaml"]["data"]["train_diffusion"]["steps"]
    assert steps == 12  # the smoke profile's value, recorded in the experiment (params.yaml says 1000)
    # The outputs in the workspace are the experiment's; DVC shows their headline rows, readably.
    assert json.loads((root / "metrics" / "train_diffusion.json").read_text())
    shown = sh(["dvc", "metrics", "show"], root, env)
    rows = [line.split()[0] for line in shown.splitlines()[1:] if line.strip()]
    assert rows and all(r.startswith(("metrics/evaluate/", "metrics/quality/")) for r in rows), shown
    assert max(len(line) for line in shown.splitlines()) <= 120, shown


def _state(path: Path, kind: str) -> tuple[dict, dict]:
    from mgdm_core.training.checkpoint import load_checkpoint

    return load_checkpoint(path, kind=kind, map_location="cpu")


def test_a_prefect_run_gives_the_models_and_images_dvc_gives(dvc_run, repo_root, tmp_path, prefect_api):
    import torch
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from conftest import pointing_at
    from flows import pipeline

    dvc_root, _ = dvc_run
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    shutil.copytree(repo_root / "profiles", project / "profiles")
    storage = tmp_path / "prefect-results"
    with pytest.MonkeyPatch.context() as patch, pointing_at(prefect_api), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
            patch.delenv(name, raising=False)
        patch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
        result = pipeline.mgdm_pipeline(pipeline.PipelineOptions(project_root=str(project), profile="smoke"))
    assert result["stages"]["train_diffusion"] == "ran" and result["stages"]["train_classifier"] == "ran"

    for name, kind in (("diffusion.pt", "unet"), ("classifier.pt", "classifier")):
        (dvc_config, dvc_state), (prefect_config, prefect_state) = (
            _state(r / "models" / name, kind) for r in (dvc_root, project))
        assert prefect_config == dvc_config, name
        weights, theirs = dvc_state["model"], prefect_state["model"]
        assert weights.keys() == theirs.keys()
        differing = [k for k in weights if not torch.equal(weights[k], theirs[k])]
        assert differing == [], f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"

    def stage1(root: Path) -> dict[str, bytes]:
        folder = root / "synthetic" / "stage1"
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
                and not p.name.startswith(".")}

    dvc_images, prefect_images = stage1(dvc_root), stage1(project)
    counts = load_params(repo_root / "params.yaml", "smoke").generate.counts
    assert len([n for n in dvc_images if n.endswith(".png")]) == sum(counts)
    assert prefect_images.keys() == dvc_images.keys()
    assert [n for n in dvc_images if prefect_images[n] != dvc_images[n]] == []
