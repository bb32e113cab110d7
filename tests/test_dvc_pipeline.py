"""`dvc repro` end to end on the smoke profile, in a temporary copy of the repository:
the chain runs, a second repro does nothing, and a changed `disturb` parameter reruns exactly
`disturb`, `quality` and `evaluate`."""

import re
import subprocess
import sys

import pytest
import yaml

from conftest import copy_repository

pytestmark = pytest.mark.slow


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


@pytest.fixture(scope="module")
def project(repo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    return root, copy_repository(repo_root, root)


def test_dvc_repro_runs_the_whole_chain_then_nothing_then_only_what_changed(project):
    root, env = project
    first = sh([sys.executable, "-m", "mgdm_core", "repro"], root, env)
    assert stages_run(first) == ["prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate"]
    assert (root / "metrics" / "evaluate.json").is_file() and (root / "dvc.lock").is_file()
    shown = sh(["dvc", "metrics", "show"], root, env)  # the headline rows only, 120 columns at most
    assert "metrics/evaluate/simple_cnn/real+stage1.json" in shown and "metrics/quality/stage1.json" in shown
    assert "metrics/evaluate.json" not in shown and max(len(line) for line in shown.splitlines()) <= 120, shown

    second = sh(["dvc", "repro"], root, env)
    assert stages_run(second) == []

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["disturb"]["scale"] = params["disturb"]["scale"] + 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh(["dvc", "repro"], root, env)
    assert stages_run(third) == ["disturb", "quality", "evaluate"]


def test_mgdm_repro_nests_every_stage_under_one_pipeline_run(project):
    root, env = project
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("mgdm")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline" and "run_group" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["disturb.scale"]  # mgdm repro logs the full resolved parameters
    children = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate"}
    # The plain `dvc repro` after the disturb change grouped its stage runs under one parent of its own.
    (group,) = [r for r in runs if "run_group" in r.data.tags]
    assert group.info.run_name == "dvc repro" and group.info.status == "FINISHED"
    grouped = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id}
    assert grouped == {"disturb", "quality", "evaluate"}


def test_changed_input_data_makes_prepare_stale(project):
    """Input data under data/raw (where `dvc add` / `dvc import` put it) is a dependency of prepare."""
    root, env = project
    assert "prepare" not in sh(["dvc", "status", "prepare"], root, env)
    (root / "data" / "raw" / "new-set.npz").write_bytes(b"another data set")
    status = sh(["dvc", "status", "prepare"], root, env)
    assert "prepare" in status and "data/raw" in status
