"""The `mgdm_pipeline` Prefect flow: the six stages as tasks, with cross-run caching and MLflow nesting.

Every task only calls the library (`run_stage`, or `evaluate.plan` / `run_unit` / `summarise` for
the evaluation grid, which fans out through the flow's task runner). Why the caching looks like it
does (an explicit key over parameters, upstream files and code, plus an outputs-on-disk check)
is explained in docs/prefect.md.
"""

# No `from __future__ import annotations`: the runner loads this file by path, and pydantic
# must resolve the flow's parameter annotations (PipelineOptions) without the module namespace.

import base64
import hashlib
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, runtime, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               update_progress_artifact)
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field

from mgdm_core import progress, tracking
from mgdm_core.conditions import AUGMENTS
from mgdm_core.config import MEASURES, Measure, Params, load_params
from mgdm_core.errors import ConfigError, MgdmError
from mgdm_core.evaluation.networks import NETWORKS
from mgdm_core.io import source_digest, tree_digest
from mgdm_core.layout import Layout
from mgdm_core.launch import run_stage
from mgdm_core.stages import STAGES, reads, stage_module
from mgdm_core.stages import evaluate as evaluate_stage
from mgdm_core.stages.common import dataset_name

REPO_ROOT = Path(__file__).resolve().parents[1]
# The flow's own pool runs every stage task in a worker process (spawned), as `dvc repro` runs each
# stage in its own process: torch's RNG is per process, so the two trainings, side by side, give
# the models `dvc repro` gives (in threads they shared one RNG and interleaved by timing).
# The evaluation units fan out through the runner `PipelineOptions.task_runner` picks (processes by
# default, see `grid_task_runner`). `python -m flows.serve --max-workers N` (or this variable)
# sizes both for a bigger machine.
MAX_WORKERS = int(os.environ.get("MGDM_PREFECT_MAX_WORKERS", "2"))
GridRunner = Literal["processes", "dask", "threads"]
# Stages before the evaluation grid, in dependency order; the two trainings only need `prepare`.
_INDEPENDENT = ("train_diffusion", "train_classifier")


NetworkChoice = Literal[NETWORKS]  # type: ignore[valid-type]  # the networks evaluate can build
# Every data part with and without each augmentation policy (mgdm_core.conditions' grammar), so the
# form offers the baselines (real+trivialaugment, ...) and their combinations with synthetic data.
_CONDITION_DATA = ("real", "real+stage1", "real+stage2", *(f"real+stage2:{m}" for m in MEASURES), "synthetic")
ConditionChoice = Literal[tuple(  # type: ignore[valid-type]
    f"{data}{suffix}" for data in _CONDITION_DATA for suffix in ("", *(f"+{a}" for a in AUGMENTS)))]


def _defaults_from(path: Path) -> Params:
    """The parameters the form shows as its defaults: params.yaml when the flow is loaded (that is,
    when `flows.serve` or a worker imports this module), else the built-in defaults."""
    try:
        return load_params(path)
    except (MgdmError, OSError) as exc:
        logging.getLogger("mgdm").warning("run form: %s unreadable (%s); showing built-in defaults", path, exc)
        return Params()


# Form field -> dotted params key (the same keys `Params.with_overrides` and `dvc exp run -S` take).
OVERRIDE_KEYS: dict[str, str] = {
    "data_source": "data.source",
    "data_path": "data.path",
    "data_flag": "data.flag",
    "diffusion_steps": "train_diffusion.steps",
    "classifier_steps": "train_classifier.steps",
    "guidance": "generate.guidance",
    "guidance_scale": "generate.scale",
    "counts": "generate.counts",
    "measures": "disturb.measure",
    "disturb_scale": "disturb.scale",
    "networks": "evaluate.networks",
    "conditions": "evaluate.conditions",
    "seeds": "evaluate.seeds",
    "epochs": "evaluate.epochs",
    "synthetic_ratio": "evaluate.synthetic_ratio",
    "device": "device",
}
_OPTIONAL_PATHS = ("data_path", "data_flag")  # "" in the form is null in params.yaml


def form_values(params: Params) -> dict[str, Any]:
    """The form fields' values for `params` (lists for tuples, "" for null)."""
    raw = params.model_dump(mode="json")
    values: dict[str, Any] = {}
    for field, key in OVERRIDE_KEYS.items():
        section, _, name = key.rpartition(".")
        value = raw[section][name] if section else raw[name]
        if key == "disturb.measure":
            value = list(params.disturb.measures)
        values[field] = "" if value is None and field in _OPTIONAL_PATHS else value
    return values


_FORM_DEFAULTS = form_values(_defaults_from(REPO_ROOT / "params.yaml"))


class PipelineOptions(BaseModel):
    """The run form. Every field starts at the value params.yaml holds (when the deployment was
    served); a field left at that value is not an override, so the run uses params.yaml and the
    profile as they are when it starts. Change a field to override that key for this run."""

    model_config = ConfigDict(extra="forbid")

    project_root: str = Field(str(REPO_ROOT), description="Folder holding params.yaml; outputs are written here")
    profile: str = Field("", description="A profile merged over params.yaml: a name under profiles/ (smoke, gpu, "
                         "breastmnist) or a YAML path; empty: none")
    data_source: Literal["phantom", "npz", "imagefolder", "medmnist"] = Field(
        _FORM_DEFAULTS["data_source"], description="data.source")
    data_path: str = Field(_FORM_DEFAULTS["data_path"], description="data.path: npz file or image-folder root, "
                           "relative to the project root (empty: none)")
    data_flag: str = Field(_FORM_DEFAULTS["data_flag"], description="data.flag: medmnist data set, e.g. breastmnist")
    # A plain integer input (the form avoids type toggles); `auto` goes through extra_overrides.
    diffusion_steps: int = Field(_FORM_DEFAULTS["diffusion_steps"], ge=1, description=(
        'train_diffusion.steps (for auto, train until the judged snapshots stop improving: '
        'extra_overrides {"train_diffusion.steps": "auto"})'))
    classifier_steps: int = Field(_FORM_DEFAULTS["classifier_steps"], ge=1, description="train_classifier.steps")
    guidance: Literal["classifier", "cfg", "none"] = Field(_FORM_DEFAULTS["guidance"],
                                                          description="generate.guidance (stage 1)")
    guidance_scale: float = Field(_FORM_DEFAULTS["guidance_scale"], description="generate.scale (stage 1)")
    counts: list[int] = Field(_FORM_DEFAULTS["counts"], description="generate.counts: images per class "
                              "(generate.mode counts)")
    measures: list[Measure] = Field(_FORM_DEFAULTS["measures"], min_length=1,
                                    description="disturb.measure: stage-2 uncertainty measure(s)")
    disturb_scale: float = Field(_FORM_DEFAULTS["disturb_scale"], description="disturb.scale (stage 2)")
    networks: list[NetworkChoice] = Field(_FORM_DEFAULTS["networks"], min_length=1,
                                          description="evaluate.networks: downstream networks")
    conditions: list[ConditionChoice] = Field(_FORM_DEFAULTS["conditions"], min_length=1,
                                              description="evaluate.conditions (real is the baseline)")
    seeds: list[int] = Field(_FORM_DEFAULTS["seeds"], min_length=1, description="evaluate.seeds")
    epochs: int = Field(_FORM_DEFAULTS["epochs"], ge=1, description="evaluate.epochs")
    synthetic_ratio: float = Field(_FORM_DEFAULTS["synthetic_ratio"], gt=0,
                                   description="evaluate.synthetic_ratio: synthetic images per real training image")
    device: str = Field(_FORM_DEFAULTS["device"], description="device: auto, cpu, cuda or cuda:N")
    extra_overrides: dict[str, Any] = Field(
        default_factory=dict, description='any other dotted params key, e.g. {"evaluate.batch_size": 32}'
    )
    task_runner: GridRunner = Field(
        "processes", description="how the evaluation units run: processes (bit-reproducible), dask (a local Dask "
        "cluster, or the scheduler at dask_address), threads (NOT bit-reproducible: torch's RNG is shared)")
    dask_address: str = Field("", description="an existing Dask scheduler, e.g. tcp://scheduler:8786 "
                              "(task_runner=dask); empty: a local cluster")


def overrides_of(options: PipelineOptions) -> dict[str, Any]:
    """The dotted-key overrides this form asks for: the fields changed from the form's defaults."""
    chosen = {}
    for field, key in OVERRIDE_KEYS.items():
        value = getattr(options, field)
        if value != _FORM_DEFAULTS[field]:
            chosen[key] = None if value == "" and field in _OPTIONAL_PATHS else value
    return {**chosen, **options.extra_overrides}


def resolve_params(options: PipelineOptions) -> Params:
    """params.yaml + profile + form overrides, validated; never written back to params.yaml."""
    root = Path(options.project_root).expanduser().resolve()
    return load_params(root / "params.yaml", options.profile or None).with_overrides(overrides_of(options))


# ---------------------------------------------------------------------------------------------
# Caching: what a stage reads (parameters, upstream files, code) and what it leaves on disk.
# The file lists mirror the deps/outs in dvc.yaml (tests/test_flows.py checks they agree).

def upstream_paths(stage: str, params: Params, layout: Layout) -> list[Path]:
    prepared = [layout.prepared]
    models = [layout.diffusion_model, layout.classifier_model]
    if stage == "prepare":
        # data/raw, as in dvc.yaml, and input data kept elsewhere (which DVC cannot see). Relative
        # data paths are relative to the project root (as in stages/prepare.py).
        inputs = [layout.root / p for p in (params.data.path, params.data.val_path, params.data.test_path) if p]
        raw = layout.raw_data_dir.resolve()
        return [layout.raw_data_dir, *(p for p in inputs if not p.resolve().is_relative_to(raw))]
    if stage in _INDEPENDENT:
        return prepared
    if stage == "generate":
        return prepared + models
    if stage == "disturb":
        return prepared + models + [layout.stage1_dir]
    if stage == "quality":  # diffusion.pt stands for the EMA snapshots beside it (see dvc.yaml)
        return prepared + [layout.diffusion_model, layout.stage1_dir, layout.stage2_dir]
    if stage == "evaluate":
        return prepared + [layout.stage1_dir, layout.stage2_dir]
    raise KeyError(stage)


def output_paths(stage: str, params: Params, layout: Layout) -> list[Path]:
    if stage == "prepare":
        return [layout.prepared]
    if stage == "train_diffusion":
        return [layout.diffusion_model]
    if stage == "train_classifier":
        return [layout.classifier_model]
    if stage == "generate":
        return [layout.stage1_dir]
    if stage == "disturb":
        return [layout.stage2_measure_dir(m) for m in params.disturb.measures]
    if stage == "quality":
        return [layout.metrics_file("quality"), layout.reports_dir / "quality.md", layout.reports_dir / "quality_images.csv"]
    if stage == "evaluate":
        return [layout.metrics_file("evaluate"), layout.reports_dir / "evaluate.md"]
    raise KeyError(stage)


def path_digest(path: Path) -> str | None:
    """Content hash of a file or of every file under a folder; None when it does not exist."""
    return tree_digest(path)


def outputs_digest(stage: str, params: Params, layout: Layout) -> dict[str, str | None]:
    return {layout.relative(p): path_digest(p) for p in output_paths(stage, params, layout)}


def cache_key(stage: str, params: Params, layout: Layout, unit: str | None = None) -> str:
    """Stage name + its READS values + its upstream files + the code version (+ the grid unit)."""
    payload = {
        "stage": stage,
        "unit": unit,
        "root": str(layout.root),  # the result store may be shared by several projects
        "reads": reads(params, stage_module(stage).READS),
        "upstream": {str(p): path_digest(p) for p in upstream_paths(stage, params, layout)},
        "code": source_digest(),
    }
    return f"mgdm-{stage}-" + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return cache_key(parameters["stage"], parameters["params"], parameters["layout"])


def _unit_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The evaluate stage's own unit key (what the unit's result depends on: its synthetic set, not
    the generator's parameters), so a run that changes only generator parameters reuses the
    generator-independent units (real, real+<augment>) from Prefect's cache too."""
    unit, params, layout = parameters["unit"], parameters["params"], parameters["layout"]
    key = evaluate_stage.unit_keys([unit], params, layout)[unit]
    root = hashlib.sha256(str(layout.root).encode()).hexdigest()[:8]  # the result store may be shared
    return f"mgdm-evaluate-unit-{root}-{key}"


def is_transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry I/O trouble (a locked SQLite, a busy file system), never the user's bad input."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, Exception) and not isinstance(error, MgdmError)


_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": is_transient}


def _mlflow_run_of(layout: Layout, task_run_id: str) -> str | None:
    """The MLflow run a task created (found by the tag we gave it; run_stage does not return it)."""
    client, experiment_id = tracking.connect(layout.root)
    runs = client.search_runs([experiment_id], f"tags.prefect_task_run_id = '{task_run_id}'", max_results=5)
    finished = [r for r in runs if r.info.status == "FINISHED"] or runs
    return finished[0].info.run_id if finished else None


# ---------------------------------------------------------------------------------------------
# Tasks.

CORE_LOGGERS = ("mgdm", "mgdm_core")


def attach_core_loggers() -> None:
    """Send the core's log records to this run's log view, wherever the flow runs (a worker, a
    task-runner process), as PREFECT_LOGGING_EXTRA_LOGGERS does for `make serve`: give the core's
    loggers the handlers of Prefect's `prefect.extra` logger. Idempotent."""
    handlers = logging.getLogger("prefect.extra").handlers
    for name in CORE_LOGGERS:
        logger = logging.getLogger(name)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


class ProgressArtifact:
    """A `mgdm_core.progress` reporter that keeps one Prefect progress artifact per stage up to date
    (created at the first report, updated at most every `every` seconds and at 100%)."""

    def __init__(self, stage: str, every: float = 2.0):
        self.stage, self.every = stage, every
        self.artifact_id = None
        self.last, self.shown = 0.0, -1.0

    def __call__(self, task: str, done: int, total: int) -> None:
        percent = round(100.0 * min(done, total) / total, 1)
        now = time.monotonic()
        description = f"{task}: {done} of {total}"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                percent, key=f"mgdm-progress-{self.stage.replace('_', '-')}", description=description)
        elif percent != self.shown and (percent >= 100.0 or now - self.last >= self.every):
            update_progress_artifact(self.artifact_id, percent, description=description)
        else:
            return
        self.last, self.shown = now, percent


@task(cache_key_fn=_stage_cache_key, persist_result=True, task_run_name="{stage}", **_RETRIES)
def stage_task(stage: str, params: Params, layout: Layout, parent_run_id: str | None, tags: dict[str, str]) -> dict[str, Any]:
    attach_core_loggers()
    task_run_id = str(runtime.task_run.id)
    try:
        with progress.reporting(ProgressArtifact(stage)):
            metrics = run_stage(stage, params, layout, parent_run_id=parent_run_id,
                                tags={**tags, "prefect_task_run_id": task_run_id})
    except Exception as exc:
        with contextlib.suppress(AttributeError):
            exc.mgdm_stage = stage  # which stage failed, for the flow's failure artifact
        raise
    # The outputs digest travels with the cached result so a later run can tell whether the
    # files on disk are still the ones this result describes (see `_run_stage`).
    return {"stage": stage, "metrics": metrics, "mlflow_run_id": _mlflow_run_of(layout, task_run_id),
            "outputs": outputs_digest(stage, params, layout)}


@task(task_run_name="evaluate-plan")
def plan_task(params: Params, layout: Layout) -> list[evaluate_stage.Unit]:
    return evaluate_stage.plan(params, layout)


@task(cache_key_fn=_unit_cache_key, persist_result=True, task_run_name="evaluate: {unit.name}", **_RETRIES)
def unit_task(unit: evaluate_stage.Unit, params: Params, layout: Layout, stage_run_id: str) -> dict[str, Any]:
    attach_core_loggers()
    return evaluate_stage.run_unit(unit, params, layout, tracking.attach(layout.root, stage_run_id), progress=False)


@task(task_run_name="evaluate-summarise", **_RETRIES)
def summarise_task(results: list[dict[str, Any]], params: Params, layout: Layout, stage_run_id: str) -> dict[str, Any]:
    return evaluate_stage.summarise(results, params, layout, tracking.attach(layout.root, stage_run_id))


# ---------------------------------------------------------------------------------------------
# The flow.

def _resolve_stage(future: PrefectFuture, stage: str, params: Params, layout: Layout,
                   parent_run_id: str, tags: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The stage's result; a cache hit whose outputs are gone or overwritten is run again."""
    record = future.result()
    state = future.state
    if state.name != "Cached":
        return record, "ran"
    if record.get("outputs") == outputs_digest(stage, params, layout):
        return record, "cached"
    # Another run (other parameters) rewrote the files, or someone deleted them: the cached
    # result no longer describes the disk, so recompute and overwrite the cache entry.
    fresh = stage_task.with_options(refresh_cache=True)(stage, params, layout, parent_run_id, tags)
    return fresh, "ran (cache stale)"


def grid_task_runner(kind: GridRunner = "processes", max_workers: int = MAX_WORKERS,
                     dask_address: str | None = None) -> TaskRunner:
    """The task runner for the evaluation units (a fresh instance per call: runners hold state).

    `processes` and `dask` run each unit in a worker process with its own torch RNG, so a unit's
    metrics do not depend on what runs beside it. `threads` shares torch's global RNG between the
    units (weight init, dropout, augmentation): faster to start, NOT bit-reproducible.
    """
    if dask_address and kind != "dask":
        raise ConfigError(f"dask_address is set but task_runner is '{kind}'; use task_runner: dask")
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ConfigError("task_runner 'dask' needs prefect-dask: pip install prefect-dask") from exc
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        # One single-threaded worker process per unit slot (Dask's nanny also sets OMP_NUM_THREADS=1).
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1, "processes": True})
    raise ConfigError(f"unknown task_runner '{kind}' (expected processes, dask or threads)")


@flow(name="mgdm-evaluate-grid", task_runner=ProcessPoolTaskRunner(max_workers=MAX_WORKERS), log_prints=False)
def evaluate_grid(params: Params, layout: Layout, stage_run_id: str) -> dict[str, Any]:
    """plan -> one task per (network, condition, seed) unit -> summarise, under the MLflow run
    `stage_run_id`. A subflow so the grid gets its own task runner: `_run_evaluate` calls it as
    `evaluate_grid.with_options(task_runner=grid_task_runner(...))`. Only run ids cross into the
    workers (each unit attaches its own MLflow client)."""
    units = plan_task(params, layout)
    if not units:
        raise ConfigError("evaluate: the grid is empty (check evaluate.networks, conditions and seeds)")
    futures = [unit_task.submit(u, params, layout, stage_run_id) for u in units]
    results = [f.result() for f in futures]
    cached = sum(f.state.name == "Cached" for f in futures)
    summary = summarise_task(results, params, layout, stage_run_id)
    return {"summary": summary, "results": results, "cached_units": cached, "total_units": len(units)}


def _run_evaluate(params: Params, layout: Layout, parent_run_id: str | None, tags: dict[str, str],
                  runner: GridRunner = "processes", dask_address: str | None = None,
                  max_workers: int = MAX_WORKERS) -> dict[str, Any]:
    """The evaluate stage's MLflow run (as run_stage opens it), with the grid fanned out as tasks."""
    task_runner = grid_task_runner(runner, max_workers, dask_address)
    with tracking.stage_run(layout.root, "evaluate", reads(params, evaluate_stage.READS), parent_run_id=parent_run_id,
                            tags={"dataset": dataset_name(params), "prefect_task_runner": runner, **tags}) as tracker:
        grid = evaluate_grid.with_options(task_runner=task_runner)(params, layout, tracker.run_id)
        results, cached = grid["results"], grid["cached_units"]
        tracker.set_tags({"prefect_cached_units": f"{cached}/{grid['total_units']}"})
    return {"stage": "evaluate", "mlflow_run_id": tracker.run_id, "summary": grid["summary"],
            "units": {r["network"] + " | " + r["condition"] + f" | seed {r['seed']}": r["run_id"] for r in results},
            "cached_units": cached, "total_units": grid["total_units"]}


@flow(name="mgdm-pipeline", task_runner=ProcessPoolTaskRunner(max_workers=MAX_WORKERS), log_prints=False)
def mgdm_pipeline(options: PipelineOptions = PipelineOptions()) -> dict[str, Any]:
    """prepare -> train_diffusion | train_classifier -> generate -> disturb -> quality -> evaluate (grid in parallel)."""
    attach_core_loggers()
    try:
        params = resolve_params(options)  # a ConfigError fails the run at once, naming the key
        grid_task_runner(options.task_runner, MAX_WORKERS, options.dask_address)  # fail now, not after training
    except Exception as exc:
        _failure_artifact("parameters", exc)
        raise
    layout = Layout(Path(options.project_root).expanduser())
    flow_run_id = str(runtime.flow_run.id)
    tags = {"prefect_flow_run_id": flow_run_id}
    parent = tracking.open_pipeline_run(layout.root, f"prefect {runtime.flow_run.name}", {"front_door": "prefect", **tags})
    parent.log_params({**params.model_dump(mode="json"), "profile": options.profile or "",
                       **{f"override.{k}": v for k, v in overrides_of(options).items()}})
    parent.log_text(json.dumps(params.model_dump(mode="json"), indent=2), "params.json")
    _params_artifact(options, params)

    stages: dict[str, tuple[dict[str, Any], str]] = {}
    try:
        def run(*names: str) -> None:
            # Stages in one call are independent (the two trainings) and run side by side.
            futures = {n: stage_task.submit(n, params, layout, parent.run_id, tags) for n in names}
            for n, fut in futures.items():
                stages[n] = _resolve_stage(fut, n, params, layout, parent.run_id, tags)

        run("prepare")
        run(*_INDEPENDENT)
        run("generate")
        run("disturb")
        run("quality")
        evaluation = _run_evaluate(params, layout, parent.run_id, tags, options.task_runner, options.dask_address)
        stages["evaluate"] = (evaluation, "ran" if evaluation["cached_units"] < evaluation["total_units"] else "cached")
    except BaseException as exc:
        parent.finish("FAILED")
        # The stage a task reported, else the first stage that has no result.
        failed = getattr(exc, "mgdm_stage", None) or next((n for n in STAGES if n not in stages), "evaluate")
        _failure_artifact(failed, exc, parent)
        raise
    parent.set_tags({f"prefect_{name}": how for name, (_, how) in stages.items()})
    parent.finish("FINISHED")
    _report_artifacts(layout, parent, stages)
    return {"mlflow_parent_run_id": parent.run_id, "stages": {n: how for n, (_, how) in stages.items()},
            "evaluate": evaluation["summary"]}


# ---------------------------------------------------------------------------------------------
# Artifacts (what the UI shows on the flow run page).

def _params_artifact(options: PipelineOptions, params: Params) -> None:
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in overrides_of(options).items()) or "| (none) | |"
    create_markdown_artifact(
        key="mgdm-params",
        description="The parameters this run used (params.yaml + profile + form overrides)",
        markdown=(f"# Parameters\n\nprofile: `{options.profile or '-'}`, project: `{options.project_root}`\n\n"
                  f"| override | value |\n| --- | --- |\n{rows}\n\n"
                  f"```json\n{json.dumps(params.model_dump(mode='json'), indent=2)}\n```\n"),
    )


def _failure_artifact(stage: str, error: BaseException, parent: "tracking.Tracker | None" = None) -> None:
    """A failed run says which stage failed and why (the one-line message of a user error)."""
    kind = "a problem with the input or parameters" if isinstance(error, MgdmError) else "an unexpected error"
    mlflow = f"\n\nMLflow pipeline run: `{parent.run_id}`" if parent is not None else ""
    with contextlib.suppress(Exception):  # the report must not hide the error itself
        create_markdown_artifact(
            key="mgdm-failure", description=f"mgdm: stage {stage} failed",
            markdown=(f"# Stage `{stage}` failed\n\n{kind}:\n\n```\n{type(error).__name__}: {error}\n```"
                      f"{mlflow}\n\nThe task's log holds the traceback."),
        )


def _mlflow_link(layout: Layout, experiment_id: str, run_id: str | None) -> str:
    if not run_id:
        return "-"
    uri = tracking.tracking_uri(layout.root)
    if uri.startswith("http"):
        return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


# The sample grids stages write, shown inline; larger files are referenced by path only, since
# an artifact is stored in the Prefect database and the UI has no file server for local paths.
_GRIDS = ("prepare_real_samples.png", "generate_samples.png", "evaluate.png")
_INLINE_LIMIT = 300_000


def _report_artifacts(layout: Layout, parent: tracking.Tracker, stages: dict[str, tuple[dict[str, Any], str]]) -> None:
    report = layout.reports_dir / "evaluate.md"
    create_markdown_artifact(key="mgdm-evaluation", description="Downstream evaluation (reports/evaluate.md)",
                             markdown=report.read_text() if report.is_file() else "_no report written_")

    exp = parent.experiment_id
    lines = [f"# MLflow runs\n\ntracking URI: `{tracking.tracking_uri(layout.root)}`\n",
             f"pipeline (parent) run: {_mlflow_link(layout, exp, parent.run_id)}\n",
             "| stage | this run | MLflow run |", "| --- | --- | --- |"]
    for name, (record, how) in stages.items():
        lines.append(f"| {name} | {how} | {_mlflow_link(layout, exp, record.get('mlflow_run_id'))} |")
    for unit, run_id in stages.get("evaluate", ({}, ""))[0].get("units", {}).items():
        lines.append(f"| evaluate: {unit} | | {_mlflow_link(layout, exp, run_id)} |")
    create_markdown_artifact(key="mgdm-mlflow-runs", description="MLflow runs of this flow run", markdown="\n".join(lines))
    uri = tracking.tracking_uri(layout.root)
    if uri.startswith("http"):
        create_link_artifact(key="mgdm-mlflow-parent", link=f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{parent.run_id}",
                             link_text="MLflow pipeline run")

    pictures = [layout.plot_file(n) for n in _GRIDS]
    pictures += sorted(layout.plots_dir.glob("disturb_*_pairs.png"))
    parts = ["# Sample grids\n"]
    for png in pictures:
        if not png.is_file():
            continue
        data = png.read_bytes()
        if len(data) <= _INLINE_LIMIT:
            parts.append(f"## {png.name}\n\n![{png.name}](data:image/png;base64,{base64.b64encode(data).decode()})\n")
        else:
            parts.append(f"## {png.name}\n\n`{png}` ({len(data) // 1024} KiB, too large to inline)\n")
    create_markdown_artifact(key="mgdm-samples", description="Sample grids and the evaluation plot", markdown="\n".join(parts))
