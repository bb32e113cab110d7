"""Scale-out (docs/scaling.md): the evaluation grid on a Dask cluster, a shared `mlflow server`, a DVC remote.

One smoke project serves the first two tests: prepare..disturb run once (module fixture) against
a real `mlflow server` on 127.0.0.1; then the evaluation grid runs in this process (`run_stage`)
and through a two-worker Dask LocalCluster (the Prefect `evaluate_grid` subflow), and the two
`metrics/evaluate.json` must be identical, because every unit runs in its own process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_repository, run_ok
from flows.serve import wait_healthy

pytestmark = pytest.mark.slow

BEFORE_EVALUATE = ("prepare", "train_diffusion", "train_classifier", "generate", "disturb")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """The server and the uvicorn workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`: SQLite backend, proxied artifacts in a temporary folder."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", (home / "artifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        try:
            wait_healthy(uri, 120, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"mlflow server did not start ({exc}):\n{(home / 'server.log').read_text()[-3000:]}") from None
        yield uri, home
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def smoke(repo_root: Path, tmp_path_factory, mlflow_server):
    """prepare..disturb on the smoke profile, tracked on the server, under one pipeline run."""
    from mgdm_core import tracking
    from mgdm_core.config import load_params
    from mgdm_core.layout import Layout
    from mgdm_core.launch import run_stage

    uri, _ = mlflow_server
    root = tmp_path_factory.mktemp("project")
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    shutil.copytree(repo_root / "profiles", root / "profiles")
    # Smoke, with even shorter trainings: these tests are about where things run, not about numbers.
    params = load_params(root / "params.yaml", "smoke").with_overrides({
        "train_diffusion.steps": 4, "train_diffusion.checkpoint_every": 4, "train_diffusion.log_every": 2,
        "train_classifier.steps": 4, "train_classifier.checkpoint_every": 4, "train_classifier.log_every": 2,
    })
    layout = Layout(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # inherited by the Dask worker processes too
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv(tracking.PARENT_ENV, raising=False)
        parent = tracking.open_pipeline_run(root, "scaleout smoke", {"front_door": "test"})
        for stage in BEFORE_EVALUATE:
            run_stage(stage, params, layout, parent_run_id=parent.run_id)
        yield params, layout, parent.run_id, uri


def test_stage_runs_and_artifacts_land_on_the_shared_server(smoke) -> None:
    from mlflow import MlflowClient

    params, layout, parent_id, uri = smoke
    assert not (layout.root / "mlruns.db").exists()  # nothing went to the local SQLite default
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mgdm")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == set(BEFORE_EVALUATE)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "stage_seconds" in by_stage["prepare"].data.metrics
    # An artifact went through the server's artifact proxy and comes back from it.
    artifacts = {a.path for a in client.list_artifacts(by_stage["generate"].info.run_id)}
    assert artifacts, "generate logged no artifacts"
    files = [a for a in client.list_artifacts(by_stage["generate"].info.run_id) if not a.is_dir]
    folder = files[0] if files else client.list_artifacts(by_stage["generate"].info.run_id, sorted(artifacts)[0])[0]
    local = client.download_artifacts(by_stage["generate"].info.run_id, folder.path, str(layout.root / "downloaded"))
    assert Path(local).is_file() and Path(local).stat().st_size > 0


def _unit_metrics(uri: str, stage_run_id: str) -> dict[str, dict[str, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mgdm")
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{stage_run_id}'", max_results=100)
    assert all(r.info.status == "FINISHED" for r in runs)
    # The unit runs; the per-(network, condition) summary runs sit beside them.
    return {r.info.run_name: r.data.metrics for r in runs if r.data.tags.get("kind") == "unit"}


@pytest.fixture(scope="module")
def in_process(smoke):
    """`mgdm evaluate` in this process (torch on one thread, as in a Dask worker): the reference."""
    import torch

    from mgdm_core.launch import run_stage

    params, layout, parent_id, uri = smoke
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a single-threaded worker, so the kernels reduce alike
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            run_stage("evaluate", params, layout, parent_run_id=parent_id)
    finally:
        torch.set_num_threads(threads)
    reference = json.loads(layout.metrics_file("evaluate").read_text())
    del reference["cost"]  # what run_stage adds; the Prefect grid's summarise does not pass through it
    layout.metrics_file("evaluate").unlink()
    return reference


def _grid(smoke, runner: str, prefect_api: str) -> tuple[dict, dict]:
    """The Prefect evaluate-grid subflow on `runner` with two workers, on the session's Prefect server."""
    from conftest import pointing_at
    from flows import pipeline

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    params, layout, parent_id, uri = smoke
    # Unit cache keys do not depend on the runner, so each runner gets its own result store:
    # otherwise the second grid would be served from the first one's cache.
    storage = layout.root / f".prefect-results-{runner}"
    with pytest.MonkeyPatch.context() as patch, pointing_at(prefect_api), \
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # the worker processes inherit it
        patch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
        out = pipeline._run_evaluate(params, layout, parent_id, {"test": runner}, runner=runner, max_workers=2)
    written = json.loads(layout.metrics_file("evaluate").read_text())
    layout.metrics_file("evaluate").unlink()
    return out, written


def _check_same_grid(smoke, out: dict, written: dict, reference: dict) -> None:
    from flows import pipeline

    params, layout, parent_id, uri = smoke
    units = pipeline.evaluate_stage.plan(params, layout)
    assert len(units) >= 2  # real, real+stage1, real+stage2:<measure>...: something to spread
    assert out["total_units"] == len(units) and out["cached_units"] == 0
    assert set(out["units"]) == {u.name for u in units}
    # Same structure: networks, conditions (in order), seeds.
    assert written["networks"].keys() == reference["networks"].keys()
    for network, conditions in reference["networks"].items():
        assert list(written["networks"][network]) == list(conditions)
        for condition, entry in conditions.items():
            assert written["networks"][network][condition]["seeds"] == entry["seeds"]
    # Units in worker processes are bit-reproducible: the very same numbers.
    assert written == reference
    # Each unit logged its own finished run on the shared server, under this evaluate stage run.
    assert set(_unit_metrics(uri, out["mlflow_run_id"])) == {u.name for u in units}
    # Every unit reports its own run, a run under this stage run.
    assert len(set(out["units"].values())) == len(units), out["units"]
    assert set(out["units"].values()) <= set(_run_ids(uri, out["mlflow_run_id"]))


def test_evaluation_grid_on_a_dask_cluster_matches_the_in_process_run(smoke, in_process, prefect_api) -> None:
    out, written = _grid(smoke, "dask", prefect_api)
    _check_same_grid(smoke, out, written, in_process)


def test_evaluation_grid_in_prefect_worker_processes_matches_the_in_process_run(smoke, in_process, prefect_api) -> None:
    out, written = _grid(smoke, "processes", prefect_api)
    _check_same_grid(smoke, out, written, in_process)


def _run_ids(uri: str, stage_run_id: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mgdm")
    runs = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{stage_run_id}'", max_results=100)
    return [r.info.run_id for r in runs]


def test_grid_runner_choices() -> None:
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from flows import pipeline
    from mgdm_core.errors import ConfigError

    assert pipeline.PipelineOptions().task_runner == "processes"
    assert isinstance(pipeline.grid_task_runner("processes", 2), ProcessPoolTaskRunner)
    assert isinstance(pipeline.grid_task_runner("threads", 2), ThreadPoolTaskRunner)
    with pytest.raises(ConfigError, match="dask_address"):
        pipeline.grid_task_runner("processes", 2, "tcp://scheduler:8786")
    # prefect-dask is a requirement (requirements.txt, the `pipeline` extra): without it this fails.
    remote = pipeline.grid_task_runner("dask", 2, "tcp://scheduler:8786")
    assert remote.address == "tcp://scheduler:8786"
    local = pipeline.grid_task_runner("dask", 3)
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}


# --- a DVC remote -----------------------------------------------------------------------------

def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_restores_outputs_from_a_remote(repo_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    env = copy_repository(repo_root, root)
    run_ok(["dvc", "repro", "prepare"], root, env)
    prepared = root / "data" / "prepared"
    before = _tree(prepared)
    assert "train.npz" in before and "classes.json" in before

    remote = tmp_path / "remote"
    run_ok(["dvc", "remote", "add", "-d", "shared", str(remote)], root, env)
    run_ok(["dvc", "push"], root, env)
    assert any(p.is_file() for p in remote.rglob("*"))

    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(prepared)
    # Pull the stage we ran: a bare `dvc pull` also asks for the outputs of stages never run here.
    run_ok(["dvc", "pull", "prepare"], root, env)
    assert _tree(prepared) == before
    assert "up to date" in run_ok(["dvc", "status", "prepare"], root, env)  # the workspace matches dvc.lock again
