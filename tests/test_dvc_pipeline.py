"""`dvc repro` end to end on the smoke profile, in a temporary copy of the repository:
the chain runs, a second repro does nothing, and a changed `disturb` parameter reruns exactly
`disturb` and `evaluate`."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    files = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        source = repo_root / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for stale in ("dvc.lock",):
        (root / stale).unlink(missing_ok=True)
    sh(["git", "init", "-q"], root, env)
    sh([sys.executable, "-m", "mgdm_core", "profile", "smoke"], root, env)
    return root, env


def test_dvc_repro_runs_the_whole_chain_then_nothing_then_only_what_changed(project):
    root, env = project
    first = sh([sys.executable, "-m", "mgdm_core", "repro"], root, env)
    assert stages_run(first) == ["prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate"]
    assert (root / "metrics" / "evaluate.json").is_file() and (root / "dvc.lock").is_file()
    metrics = sh(["dvc", "metrics", "show", "--json"], root, env)
    assert "evaluate.json" in metrics

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
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == {"prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate"}
