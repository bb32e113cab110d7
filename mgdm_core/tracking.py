"""MLflow tracking: the only module that imports mlflow.

Runs are addressed by id through `MlflowClient`, never through the fluent "active run" stack,
so a stage process started by DVC, a Prefect task in a thread, or a Dask worker can all log into
the right run: nesting is the `mlflow.parentRunId` tag with an explicitly passed parent id
(an exported MLFLOW_RUN_ID would silently override a fluent parent, see mlflow#15713).

Default store: SQLite by absolute path in the project (`mlruns.db`, artifacts in `mlartifacts/`);
`MLFLOW_TRACKING_URI` overrides it (for example a shared `mlflow server`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

EXPERIMENT = "mgdm"
PARENT_ENV = "MGDM_PARENT_RUN_ID"  # our own variable: the pipeline run a stage nests under
_RETRIES = 8


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlruns.db'}"


def _retry(fn, *args, **kwargs):
    """SQLite allows one writer at a time; parallel evaluation units may meet 'database is locked'."""
    for attempt in range(_RETRIES):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if "locked" not in str(exc).lower() or attempt == _RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class Tracker:
    """One MLflow run, by id. Thread-safe: every call goes through the client with the run id."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id

    @property
    def url_path(self) -> str:
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            _retry(self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        for start in range(0, len(items), 1000):
            _retry(self.client.log_batch, self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        _retry(self.client.log_text, self.run_id, text, artifact_file)

    def child(self, name: str, tags: Mapping[str, Any]) -> "Tracker":
        """A nested run (for example one evaluation unit) under this one."""
        return start_run(self.client, self.experiment_id, name, tags, parent_run_id=self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        _retry(self.client.set_terminated, self.run_id, status)


def connect(root: Path) -> tuple[MlflowClient, str]:
    """The client and the `mgdm` experiment, created once before any fan-out."""
    uri = tracking_uri(root)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return client, experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:"):
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
    try:
        return client, client.create_experiment(EXPERIMENT, artifact_location=artifacts)
    except MlflowException:  # created concurrently by another process
        return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


def start_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    tags: Mapping[str, Any],
    parent_run_id: str | None = None,
) -> Tracker:
    all_tags = {k: str(v) for k, v in tags.items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = _retry(client.create_run, experiment_id, tags=all_tags, run_name=name)
    return Tracker(client, experiment_id, run.info.run_id)


def open_pipeline_run(root: Path, name: str, tags: Mapping[str, Any]) -> Tracker:
    """The parent run of one pipeline execution (`mgdm repro`, a Prefect flow run)."""
    client, experiment_id = connect(root)
    return start_run(client, experiment_id, name, {"kind": "pipeline", **tags})


def attach(root: Path, run_id: str) -> Tracker:
    client, experiment_id = connect(root)
    return Tracker(client, experiment_id, run_id)


@contextlib.contextmanager
def stage_run(
    root: Path,
    stage: str,
    params: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """A child run for one stage; FAILED if the stage raises, FINISHED otherwise."""
    client, experiment_id = connect(root)
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    tracker = start_run(client, experiment_id, stage, {"stage": stage, **(tags or {})}, parent)
    tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


class NullTracker(Tracker):
    """A tracker that logs nothing: the non-zero ranks of a torchrun stage (rank 0 logs the run)."""

    def __init__(self) -> None:
        super().__init__(client=None, experiment_id="", run_id="")  # type: ignore[arg-type]

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def child(self, name: str, tags: Mapping[str, Any]) -> "Tracker":
        return NullTracker()

    def finish(self, status: str = "FINISHED") -> None:
        pass
