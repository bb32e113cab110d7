"""The DVC front door end to end, from a clean clone, on the smoke profile (one chain for all):

* `mgdm repro --profile smoke` is a DVC experiment (`dvc exp run -S ...`): it runs every stage,
  `dvc exp show` lists it, the tracked params.yaml is left exactly as committed, and every stage
  run nests under one MLflow pipeline run;
* applied to the workspace, the experiment reproduces to nothing, and a changed `disturb`
  parameter reruns exactly `disturb`, `quality` and `evaluate` (grouped under one MLflow run);
* input data under data/raw is a dependency of prepare.

The Prefect front door's run of the same profile is compared with this one, model for model and
image for image, in test_flows.py (test_served_deployment_runs_and_caches).
"""

import json
import re
import sys

import pytest
import yaml

from conftest import run_ok

pytestmark = pytest.mark.slow

STAGE_ORDER = ["prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate"]


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def test_a_profile_run_is_a_dvc_experiment_and_leaves_params_yaml_as_committed(dvc_smoke_experiment):
    root, env, output = dvc_smoke_experiment
    assert stages_run(output) == STAGE_ORDER
    assert run_ok(["git", "status", "--porcelain", "params.yaml"], root, env) == ""
    assert run_ok(["git", "diff", "params.yaml"], root, env) == ""
    shown = json.loads(run_ok(["dvc", "exp", "show", "--json"], root, env))
    experiments = [exp for baseline in shown for exp in (baseline.get("experiments") or [])]
    assert len(experiments) == 1, shown
    revision = experiments[0]["revs"][0]["data"]
    steps = revision["params"]["params.yaml"]["data"]["train_diffusion"]["steps"]
    assert steps == 12  # the smoke profile's value, recorded in the experiment, not params.yaml's
    # The outputs in the workspace are the experiment's; DVC shows their headline rows, readably.
    assert json.loads((root / "metrics" / "train_diffusion.json").read_text())
    assert (root / "metrics" / "evaluate.json").is_file() and (root / "dvc.lock").is_file()
    shown = run_ok(["dvc", "metrics", "show"], root, env)
    rows = [line.split()[0] for line in shown.splitlines()[1:] if line.strip()]
    assert rows and all(r.startswith(("metrics/evaluate/", "metrics/quality/")) for r in rows), shown
    assert "metrics/evaluate/simple_cnn/real+stage1.json" in shown and "metrics/quality/stage1.json" in shown
    assert max(len(line) for line in shown.splitlines()) <= 120, shown
    # `mgdm compare`: the experiment beside its baseline commit, a row per figure that differs.
    compared = run_ok([sys.executable, "-m", "mgdm_core", "compare", "--width", "120"], root, env)
    assert max(len(line) for line in compared.splitlines()) <= 120, compared
    assert "simple_cnn real+stage1 auc" in compared, compared
    branch = run_ok(["git", "rev-parse", "--abbrev-ref", "HEAD"], root, env).strip()
    (name,) = run_ok(["dvc", "exp", "list", "--name-only"], root, env).split()
    compared = run_ok([sys.executable, "-m", "mgdm_core", "compare", branch, name], root, env)
    assert compared.splitlines()[0].split() == ["figure", branch, name], compared
    steps_row = next(line for line in compared.splitlines() if line.startswith("train_diffusion.steps "))
    committed = yaml.safe_load((root / "params.yaml").read_text())["train_diffusion"]["steps"]
    assert committed != 12 and steps_row.split()[1:] == [str(committed), "12"], compared


def test_mgdm_repro_nests_every_stage_under_one_pipeline_run(dvc_smoke_experiment):
    from mlflow import MlflowClient

    root, _, _ = dvc_smoke_experiment
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("mgdm")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline" and "run_group" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["disturb.scale"]  # mgdm repro logs the full resolved parameters
    children = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert children == set(STAGE_ORDER)


def test_the_applied_experiment_reproduces_nothing_then_only_what_changed(dvc_smoke_experiment):
    from mlflow import MlflowClient

    root, env, _ = dvc_smoke_experiment
    (name,) = run_ok(["dvc", "exp", "list", "--name-only"], root, env).split()
    run_ok(["dvc", "exp", "apply", name], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["train_diffusion"]["steps"] == 12
    assert stages_run(run_ok(["dvc", "repro"], root, env)) == []

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["disturb"]["scale"] = params["disturb"]["scale"] + 1.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run_ok(["dvc", "repro"], root, env)) == ["disturb", "quality", "evaluate"]

    # The plain `dvc repro` grouped its stage runs under one parent run of its own.
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mgdm").experiment_id], max_results=1000)
    (group,) = [r for r in runs if "run_group" in r.data.tags]
    assert group.info.run_name == "dvc repro" and group.info.status == "FINISHED"
    grouped = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id}
    assert grouped == {"disturb", "quality", "evaluate"}


def test_changed_input_data_makes_prepare_stale(dvc_smoke_experiment):
    """Input data under data/raw (where `dvc add` / `dvc import` put it) is a dependency of prepare."""
    root, env, _ = dvc_smoke_experiment
    assert "prepare" not in run_ok(["dvc", "status", "prepare"], root, env)
    (root / "data" / "raw" / "new-set.npz").write_bytes(b"another data set")
    status = run_ok(["dvc", "status", "prepare"], root, env)
    assert "prepare" in status and "data/raw" in status
