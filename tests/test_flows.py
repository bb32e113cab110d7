"""The Prefect front door: form -> overrides, cache keys, retry condition, and a real served run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.states import Completed, Failed  # a requirement (requirements.txt): missing, these tests fail

from flows import pipeline
from flows.pipeline import PipelineOptions, cache_key, overrides_of, resolve_params
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.layout import Layout
from mgdm_core.stages import STAGES


@pytest.fixture()
def project(tmp_path: Path, repo_root: Path) -> Path:
    """A project root holding only what the pipeline reads: params.yaml and profiles/."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    shutil.copytree(repo_root / "profiles", root / "profiles")
    return root


# --- the form ----------------------------------------------------------------------------------

def test_empty_form_means_params_yaml(project: Path) -> None:
    options = PipelineOptions(project_root=str(project), profile="smoke")
    assert overrides_of(options) == {}
    from mgdm_core.config import load_params

    assert resolve_params(options) == load_params(project / "params.yaml", "smoke")


def test_form_fields_map_to_dotted_overrides(project: Path) -> None:
    options = PipelineOptions(project_root=str(project), profile="smoke", disturb_scale=2.0, measures=["margin"],
                              guidance="cfg", guidance_scale=0.5, counts=[2, 2], networks=["resnet18"], seeds=[3],
                              device="cpu", extra_overrides={"evaluate.epochs": 2})
    assert overrides_of(options) == {"disturb.scale": 2.0, "disturb.measure": ["margin"], "generate.guidance": "cfg",
                                     "generate.scale": 0.5, "generate.counts": [2, 2], "evaluate.networks": ["resnet18"],
                                     "evaluate.seeds": [3], "device": "cpu", "evaluate.epochs": 2}
    params = resolve_params(options)
    assert params.disturb.scale == 2.0 and params.disturb.measures == ("margin",)
    assert params.generate.counts == (2, 2) and params.evaluate.epochs == 2 and params.device == "cpu"
    # Overrides are for this run only: params.yaml is untouched.
    assert yaml.safe_load((project / "params.yaml").read_text())["disturb"]["scale"] == 4.0


def test_bad_override_is_a_config_error_naming_the_key(project: Path) -> None:
    with pytest.raises(ConfigError, match="evaluate.nope"):
        resolve_params(PipelineOptions(project_root=str(project), extra_overrides={"evaluate.nope": 1}))
    with pytest.raises(ConfigError, match="disturb.scale"):
        resolve_params(PipelineOptions(project_root=str(project), extra_overrides={"disturb.scale": "x"}))


def test_form_schema_is_typed_for_the_ui(repo_root: Path) -> None:
    """Each field renders as its own input with params.yaml's value (no "str / None" toggles),
    choices as drop-downs, covering the keys users change most."""
    from mgdm_core.config import load_params
    from mgdm_core.evaluation.networks import NETWORKS

    schema = pipeline.mgdm_pipeline.parameters.model_dump()
    options = schema["definitions"]["PipelineOptions"]["properties"]
    assert set(pipeline.OVERRIDE_KEYS) <= set(options)
    assert {"train_diffusion.steps", "train_classifier.steps", "evaluate.epochs", "evaluate.conditions",
            "evaluate.synthetic_ratio", "evaluate.networks", "disturb.scale"} <= set(pipeline.OVERRIDE_KEYS.values())
    for name, field in options.items():
        assert "anyOf" not in field and field.get("type") != "null", name  # a plain typed input
    params = load_params(repo_root / "params.yaml")
    assert options["epochs"]["default"] == params.evaluate.epochs and options["epochs"]["type"] == "integer"
    assert options["diffusion_steps"]["default"] == params.train_diffusion.steps
    assert options["synthetic_ratio"]["default"] == params.evaluate.synthetic_ratio
    assert options["disturb_scale"]["default"] == params.disturb.scale
    assert options["conditions"]["default"] == list(params.evaluate.conditions)
    assert options["measures"]["default"] == list(params.disturb.measures)
    assert options["networks"]["items"]["enum"] == list(NETWORKS)  # a multi-select of the fixed list
    assert {"real", "real+stage2", "real+stage2:margin", "synthetic"} <= set(options["conditions"]["items"]["enum"])
    assert options["guidance"]["enum"] == ["classifier", "cfg", "none"]
    assert "margin" in options["measures"]["items"]["enum"]


def test_a_field_left_at_its_default_lets_the_profile_decide(project: Path) -> None:
    from mgdm_core.config import load_params

    smoke = load_params(project / "params.yaml", "smoke")
    options = PipelineOptions(**{**pipeline._FORM_DEFAULTS, "project_root": str(project), "profile": "smoke"})
    assert overrides_of(options) == {} and resolve_params(options) == smoke  # e.g. the profile's epochs
    changed = PipelineOptions(project_root=str(project), profile="smoke", epochs=3, data_path="x.npz")
    assert overrides_of(changed) == {"evaluate.epochs": 3, "data.path": "x.npz"}


def test_the_ui_calls_the_api_on_the_port_the_server_listens_on() -> None:
    from flows.serve import server_settings

    settings = server_settings("127.0.0.1", 4255)
    assert settings["PREFECT_UI_API_URL"] == settings["PREFECT_API_URL"] == "http://127.0.0.1:4255/api"
    assert settings["PREFECT_SERVER_API_PORT"] == "4255"


def test_progress_reports_become_one_throttled_progress_artifact(monkeypatch) -> None:
    import uuid

    from mgdm_core import progress

    calls: list[tuple] = []
    artifact = uuid.uuid4()

    def create(percent, key=None, description=None):
        calls.append(("create", percent, key))
        return artifact

    monkeypatch.setattr(pipeline, "create_progress_artifact", create)
    monkeypatch.setattr(pipeline, "update_progress_artifact",
                        lambda artifact_id, percent, description=None: calls.append(("update", percent, artifact_id)))
    clock = iter([0.0, 0.5, 1.0, 2.5, 2.6, 2.7])
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: next(clock))
    with progress.reporting(pipeline.ProgressArtifact("train_diffusion", every=2.0)):
        for step in (25, 50, 75, 100, 125, 200):  # of 200
            progress.report("train_diffusion", step, 200)
    progress.report("train_diffusion", 200, 200)  # outside the context: nobody listens
    assert calls == [("create", 12.5, "mgdm-progress-train-diffusion"), ("update", 50.0, artifact),
                     ("update", 100.0, artifact)]


def test_core_logs_reach_the_run_log_view() -> None:
    import logging

    pipeline.attach_core_loggers()
    pipeline.attach_core_loggers()  # idempotent
    extra = logging.getLogger("prefect.extra").handlers
    for name in pipeline.CORE_LOGGERS:
        logger = logging.getLogger(name)
        assert extra and all(logger.handlers.count(h) == 1 for h in extra)
        assert logger.isEnabledFor(logging.INFO)


def test_flow_loads_from_its_entrypoint_and_validates(repo_root: Path, project: Path, monkeypatch) -> None:
    """The deployment's entrypoint loads and validates the form (the served run also needs the flow
    module to avoid `from __future__ import annotations`; only the slow test catches that one)."""
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(repo_root)
    loaded = load_flow_from_entrypoint("flows/pipeline.py:mgdm_pipeline")
    validated = loaded.validate_parameters({"options": {"project_root": str(project), "disturb_scale": 2.0}})
    assert validated["options"].disturb_scale == 2.0
    with pytest.raises(Exception, match="measures"):
        loaded.validate_parameters({"options": {"measures": ["not-a-measure"]}})


# --- caching -----------------------------------------------------------------------------------

def test_cache_key_follows_reads_upstream_files_and_nothing_else(project: Path) -> None:
    layout = Layout(project)
    params = resolve_params(PipelineOptions(project_root=str(project), profile="smoke"))
    key = cache_key("disturb", params, layout)
    assert cache_key("disturb", params, layout) == key
    # A parameter disturb reads changes its key; one it does not read (evaluate.*) does not.
    assert cache_key("disturb", params.with_overrides({"disturb.scale": 2.0}), layout) != key
    assert cache_key("disturb", params.with_overrides({"diffusion.steps": 200}), layout) != key
    assert cache_key("disturb", params.with_overrides({"evaluate.epochs": 7}), layout) == key
    assert cache_key("disturb", params.with_overrides({"diffusion.width": 16}), layout) == key  # not in READS
    # ... but train_diffusion reads the whole diffusion section.
    assert cache_key("train_diffusion", params.with_overrides({"diffusion.width": 16}), layout) != \
        cache_key("train_diffusion", params, layout)
    # An upstream file (the diffusion model) appearing or changing changes the key.
    layout.diffusion_model.parent.mkdir(parents=True)
    layout.diffusion_model.write_bytes(b"weights v1")
    with_model = cache_key("disturb", params, layout)
    assert with_model != key
    layout.diffusion_model.write_bytes(b"weights v2")
    assert cache_key("disturb", params, layout) != with_model
    # prepare does not depend on the model.
    assert cache_key("prepare", params, layout) == cache_key("prepare", params, Layout(project))


def test_outputs_digest_sees_deleted_or_rewritten_outputs(project: Path) -> None:
    layout = Layout(project)
    params = resolve_params(PipelineOptions(project_root=str(project), profile="smoke"))
    assert set(pipeline.outputs_digest("generate", params, layout).values()) == {None}
    (layout.stage1_dir / "benign").mkdir(parents=True)
    (layout.stage1_dir / "benign" / "a.png").write_bytes(b"1")
    first = pipeline.outputs_digest("generate", params, layout)
    (layout.stage1_dir / "benign" / "a.png").write_bytes(b"2")
    assert pipeline.outputs_digest("generate", params, layout) != first
    assert list(pipeline.outputs_digest("disturb", params, layout)) == ["synthetic/stage2/entropy", "synthetic/stage2/margin"]


def test_file_lists_mirror_dvc_yaml(repo_root: Path, project: Path) -> None:
    """upstream_paths/output_paths must say what dvc.yaml says (ignoring code and persist dirs)."""
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    layout = Layout(project)
    params = resolve_params(PipelineOptions(project_root=str(project), profile="smoke"))
    for stage in STAGES:
        deps = {d for d in dvc[stage]["deps"] if not d.startswith("mgdm_core")}
        assert {layout.relative(p) for p in pipeline.upstream_paths(stage, params, layout)} == deps, stage
        outs = {next(iter(o)) if isinstance(o, dict) else o for o in dvc[stage]["outs"]}
        outs = {o for o in outs if o not in ("models/diffusion", "models/classifier")}  # resumable state
        ours = {layout.relative(p) for p in pipeline.output_paths(stage, params, layout)}
        metrics = {next(iter(m)) for m in dvc[stage].get("metrics", [])}
        assert ours <= outs | metrics | {f"synthetic/stage2/{m}" for m in params.disturb.measures}, stage


class _FakeFuture:
    def __init__(self, record: dict, state_name: str):
        self._record, self.state = record, type("S", (), {"name": state_name})()

    def result(self) -> dict:
        return self._record


def test_cache_hit_with_changed_outputs_is_rerun(project: Path, monkeypatch) -> None:
    layout = Layout(project)
    params = resolve_params(PipelineOptions(project_root=str(project), profile="smoke"))
    calls: list[dict] = []

    class FakeTask:
        def with_options(self, **kwargs):
            calls.append(kwargs)
            return lambda *args: {"fresh": True}

    monkeypatch.setattr(pipeline, "stage_task", FakeTask())
    current = pipeline.outputs_digest("generate", params, layout)
    ok = pipeline._resolve_stage(_FakeFuture({"outputs": current}, "Cached"), "generate", params, layout, "p", {})
    assert ok == ({"outputs": current}, "cached") and not calls
    stale = {"outputs": {"synthetic/stage1": "0123456789abcdef"}}
    again = pipeline._resolve_stage(_FakeFuture(stale, "Cached"), "generate", params, layout, "p", {})
    assert again == ({"fresh": True}, "ran (cache stale)") and calls == [{"refresh_cache": True}]
    assert pipeline._resolve_stage(_FakeFuture(stale, "Completed"), "generate", params, layout, "p", {})[1] == "ran"


def test_retry_condition_refuses_user_errors() -> None:
    assert not pipeline.is_transient(None, None, Failed(data=DataError("x.npz: not found")))
    assert not pipeline.is_transient(None, None, Failed(data=ConfigError("bad key")))
    assert pipeline.is_transient(None, None, Failed(data=OSError("database is locked")))
    assert not pipeline.is_transient(None, None, Completed(data=1))


def test_tasks_call_the_library(project: Path) -> None:
    """`.fn()` runs a task body without Prefect: the plan task is evaluate.plan."""
    params = resolve_params(PipelineOptions(project_root=str(project), profile="smoke",
                                            extra_overrides={"evaluate.conditions": ["real", "real+stage1"]}))
    units = pipeline.plan_task.fn(params, Layout(project))
    assert [(u.condition, u.seed) for u in units] == [("real", 0), ("real+stage1", 0)]


# --- a real server -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_deployment(client, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.read_deployment_by_name(name)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _same_models_and_stage1_images(dvc_root: Path, prefect_root: Path, counts) -> None:
    """Bit for bit: both trained models (config and every tensor) and every stage-1 file."""
    import torch

    from mgdm_core.training.checkpoint import load_checkpoint

    for name, kind in (("diffusion.pt", "unet"), ("classifier.pt", "classifier")):
        (dvc_config, dvc_state), (prefect_config, prefect_state) = (
            load_checkpoint(r / "models" / name, kind=kind, map_location="cpu") for r in (dvc_root, prefect_root))
        assert prefect_config == dvc_config, name
        weights, theirs = dvc_state["model"], prefect_state["model"]
        assert weights.keys() == theirs.keys()
        differing = [k for k in weights if not torch.equal(weights[k], theirs[k])]
        assert differing == [], f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"

    def stage1(root: Path) -> dict[str, bytes]:
        folder = root / "synthetic" / "stage1"
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
                and not p.name.startswith(".")}

    dvc_images, prefect_images = stage1(dvc_root), stage1(prefect_root)
    assert len([n for n in dvc_images if n.endswith(".png")]) == sum(counts)
    assert prefect_images.keys() == dvc_images.keys()
    assert [n for n in dvc_images if prefect_images[n] != dvc_images[n]] == []


@pytest.mark.slow
def test_served_deployment_runs_and_caches(project: Path, repo_root: Path, tmp_path: Path, dvc_smoke_experiment) -> None:
    """The real front door (`python -m flows.serve`, a deployment run as the UI starts one): every
    stage runs and logs, a second run is served from the cache, and the run gives bit for bit the
    models and stage-1 images that `mgdm repro --profile smoke` (DVC) gives."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import wait_healthy

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MGDM_PREFECT_MAX_WORKERS="2", PYTHONUNBUFFERED="1")
    log = open(tmp_path / "serve.log", "wb")
    # The real front door: `python -m flows.serve` starts the server and serves the deployment.
    orphaned = False
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--port", str(port), "--startup-timeout", "150"],
                             cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api, 150, serve)
        options = {"project_root": str(project), "profile": "smoke", "disturb_scale": 2.0, "measures": ["margin"],
                   "device": "cpu"}
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            _wait_for_deployment(client, "mgdm-pipeline/mgdm", 60)

            def run() -> tuple[object, float]:
                started = time.monotonic()
                flow_run = run_deployment("mgdm-pipeline/mgdm", parameters={"options": options}, timeout=240,
                                          poll_interval=2, as_subflow=False)
                return flow_run, time.monotonic() - started

            first, first_seconds = run()
            assert first.state is not None and first.state.is_completed(), (first.state, _tail(tmp_path / "serve.log"))
            by_run = FlowRunFilter(id=FlowRunFilterId(any_=[first.id]))
            artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=by_run)}
            assert {"mgdm-params", "mgdm-evaluation", "mgdm-mlflow-runs", "mgdm-samples"} <= set(artifacts)
            # Progress artifacts of the long stages, left at 100% when they finished.
            for stage in ("train-diffusion", "train-classifier", "generate", "disturb"):
                assert artifacts[f"mgdm-progress-{stage}"].data == 100.0, stage
            assert "real+stage2:margin" in artifacts["mgdm-evaluation"].data
            assert '"scale": 2.0' in artifacts["mgdm-params"].data

            mlflow = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
            experiment = mlflow.get_experiment_by_name("mgdm")
            parents = mlflow.search_runs([experiment.experiment_id],
                                         f"tags.prefect_flow_run_id = '{first.id}' and tags.kind = 'pipeline'")
            assert len(parents) == 1 and parents[0].data.tags["front_door"] == "prefect"
            assert parents[0].info.status == "FINISHED"
            children = mlflow.search_runs([experiment.experiment_id],
                                          f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
            assert {c.data.tags["stage"] for c in children} == set(STAGES)
            assert all(c.data.tags["prefect_flow_run_id"] == str(first.id) for c in children)
            disturb = next(c for c in children if c.data.tags["stage"] == "disturb")
            assert disturb.data.params["disturb.scale"] == "2.0"
            # One lineage from both front doors (the form's disturb and measure fields change
            # neither the models nor stage 1).
            counts = resolve_params(PipelineOptions(project_root=str(project), profile="smoke")).generate.counts
            _same_models_and_stage1_images(dvc_smoke_experiment[0], project, counts)

            second, second_seconds = run()
            assert second.state is not None and second.state.is_completed(), second.state
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[second.id])))
            states = {t.name: t.state.name for t in tasks if t.state is not None}
            for stage in STAGES[:-1]:
                assert states.get(stage) == "Cached", states
            # The grid's unit tasks run in the `mgdm-evaluate-grid` subflow (its own task runner).
            grid = client.read_task_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[second.id])))
            units = {t.name: t.state.name for t in grid if t.state is not None and t.name.startswith("evaluate: ")}
            assert units and set(units.values()) == {"Cached"}, states
            print(f"first run {first_seconds:.1f} s, cached rerun {second_seconds:.1f} s")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)  # `kill`: flows.serve stops the runner and its server
            try:
                serve.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        # If flows.serve was killed before it stopped its server, stop the server here.
        pid_file = home / "server.pid"
        if pid_file.is_file():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                orphaned = True
            except ProcessLookupError:
                pass
        log.close()
    assert not orphaned, "flows.serve left its Prefect server running after SIGTERM"


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- failed runs -------------------------------------------------------------------------------

@pytest.fixture
def harness(prefect_api):
    """Flows called in this process talk to the session's temporary Prefect server (conftest)."""
    from conftest import pointing_at

    with pointing_at(prefect_api):
        yield


def _failure_markdown(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mgdm-failure"])),
                                            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return artifact.data


@pytest.mark.slow  # a temporary Prefect server (shared by the session): about 1 min to start
def test_a_failed_run_leaves_an_artifact_naming_the_stage_and_why(harness, project: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad_data = PipelineOptions(project_root=str(project), profile="smoke", data_source="npz", data_path="missing.npz")
    state = pipeline.mgdm_pipeline(options=bad_data, return_state=True)
    assert state.is_failed()
    markdown = _failure_markdown(state.state_details.flow_run_id)
    assert "Stage `prepare` failed" in markdown and "missing.npz" in markdown and "DataError" in markdown
    # prepare refused its input before any work: the pipeline run is FAILED and no stage run was left.
    mlflow = MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("mgdm").experiment_id])
    assert [(r.data.tags["kind"], r.info.status) for r in runs] == [("pipeline", "FAILED")]

    bad_key = PipelineOptions(project_root=str(project), extra_overrides={"evaluate.nope": 1})
    state = pipeline.mgdm_pipeline(options=bad_key, return_state=True)
    assert state.is_failed()
    markdown = _failure_markdown(state.state_details.flow_run_id)
    assert "Stage `parameters` failed" in markdown and "evaluate.nope" in markdown
