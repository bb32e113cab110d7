"""MLflow tracking: the only module that imports mlflow.

Runs are addressed by id through `MlflowClient`, never through the fluent "active run" stack,
so a stage process started by DVC, a Prefect task in a thread, or a Dask worker can all log into
the right run: nesting is the `mlflow.parentRunId` tag with an explicitly passed parent id
(an exported MLFLOW_RUN_ID would silently override a fluent parent, see mlflow#15713).

Default store: SQLite by absolute path in the project (`mlruns.db`, artifacts in `mlartifacts/`);
`MLFLOW_TRACKING_URI` overrides it (for example a shared `mlflow server`).

What every run carries (see docs/architecture.md, "MLflow records"):

* MLflow's system tags (`mlflow.user`, `mlflow.source.name`, `mlflow.source.type`,
  `mlflow.source.git.commit` / `branch` / `repoURL` of the project root), which
  `MlflowClient.create_run` leaves out (only the fluent `mlflow.start_run` adds them), plus
  `pid` and `host` of the process that owns the run.
* A stage run is created lazily, when the stage first logs something: a stage that refuses its
  input (an `MgdmError` before it logged anything) leaves no run behind.
* Opening a stage or pipeline run first marks the runs this host left RUNNING whose process is
  gone (killed mid-stage) as KILLED.
* Under plain `dvc repro` / `dvc exp run` (no `mgdm repro` parent), the stage runs of one DVC
  invocation share one parent run (`run_group` tag), named after the DVC experiment when there is one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mgdm_core.errors import MgdmError

log = logging.getLogger(__name__)

EXPERIMENT = "mgdm"
PARENT_ENV = "MGDM_PARENT_RUN_ID"  # our own variable: the pipeline run a stage nests under
PID_TAG, HOST_TAG, GROUP_TAG, ERROR_TAG = "pid", "host", "run_group", "error"
_RETRIES = 8
_FLUENT = threading.Lock()  # mlflow.pytorch.log_model reads the global tracking URI


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlruns.db'}"


def _retry(fn, *args, transient: tuple[str, ...] = ("locked",), **kwargs):
    """SQLite allows one writer at a time; parallel evaluation units may meet 'database is locked'."""
    for attempt in range(_RETRIES):
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if not any(t in str(exc).lower() for t in transient) or attempt == _RETRIES - 1:
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


@lru_cache(maxsize=8)
def _git_tags(root: str) -> dict[str, str]:
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    found = {MLFLOW_GIT_COMMIT: git_utils.get_git_commit(root), MLFLOW_GIT_BRANCH: git_utils.get_git_branch(root),
             MLFLOW_GIT_REPO_URL: git_utils.get_git_repo_url(root)}
    return {k: v for k, v in found.items() if v} if found[MLFLOW_GIT_COMMIT] else {}


def system_tags(root: Path | None) -> dict[str, str]:
    """MLflow's context tags (user, source, git) and the owning process (`pid`, `host`).

    MLflow finds git from the main script, which under a Prefect worker or pytest lies outside the
    project; the project root's repository (the code and params.yaml the run used) takes precedence.
    """
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items()}
    if root is not None:
        tags.update(_git_tags(str(Path(root).resolve())))
    tags[PID_TAG] = str(os.getpid())
    tags[HOST_TAG] = socket.gethostname()
    return tags


@dataclass(frozen=True)
class DataInput:
    """A data set a run used, for `Tracker.log_inputs`: uint8 images [N,H,W,C] and labels [N]."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    source: str  # the file or folder it came from
    context: str  # train | validation | test | synthetic

    @property
    def digest(self) -> str:
        """Content hash of exactly these arrays (shape, dtype and bytes)."""
        h = hashlib.sha256()
        for array in (self.images, self.labels):
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]


class Tracker:
    """One MLflow run, by id. Thread-safe: every call goes through the client with the run id.

    With `opener`, the run is created by the first call that needs its id (see `stage_run`).
    """

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str | None = None, *,
                 root: Path | None = None, opener: Callable[[], str] | None = None):
        self.client = client
        self.experiment_id = experiment_id
        self.root = root
        self._run_id = run_id
        self._opener = opener
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            with self._lock:
                if self._run_id is None:
                    if self._opener is None:
                        raise RuntimeError("Tracker without a run id or an opener")
                    self._run_id = self._opener()
        return self._run_id

    @property
    def opened(self) -> bool:
        """Whether the run exists (a lazily created stage run exists once the stage logged)."""
        return self._run_id is not None

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

    def log_inputs(self, inputs: Sequence[DataInput]) -> None:
        """The data sets this run read, as MLflow dataset inputs (name, digest, source, context)."""
        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entries = []
        for item in inputs:
            with warnings.catch_warnings():  # "" and file:// both map local paths to the same source type
                warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
                dataset = mlflow.data.from_numpy(item.images, targets=item.labels, source=item.source,
                                                 name=item.name, digest=item.digest)
            entries.append(DatasetInput(Dataset(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, item.context)]))
        if entries:
            # Two units logging the same new data set at once race on MLflow's get-or-create of the
            # dataset row (a UNIQUE constraint error for the loser); a retry finds the row.
            _retry(self.client.log_inputs, self.run_id, datasets=entries, transient=("locked", "unique constraint"))

    def log_model(self, model: Any, name: str, config: Mapping[str, Any], *,
                  tensor_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> str:
        """Log a torch module as an MLflow model (pytorch flavour) of this run, with its config as
        metadata and `config.json`; the mgdm_core sources travel along (`code_paths`), so the model
        loads with `mlflow.pytorch.load_model` where mgdm is not installed. `tensor_shapes`
        (input, output; -1 for the batch) becomes its signature when it takes one float tensor.
        Returns the MLflow model id."""
        import json
        import tempfile

        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = None
        if tensor_shapes is not None:
            signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), tensor_shapes[0])]),
                                       Schema([TensorSpec(np.dtype(np.float32), tensor_shapes[1])]))

        core = Path(__file__).resolve().parent
        with tempfile.TemporaryDirectory() as tmp, _FLUENT:
            config_file = Path(tmp) / "config.json"
            config_file.write_text(json.dumps(config, indent=2, default=str))
            logged = _retry(self.client.create_logged_model, self.experiment_id, name=name, source_run_id=self.run_id)
            # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every later root and
            # child process would inherit: restore the variable and the fluent URI afterwards.
            saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(tracking_uri(self.root) if self.root is not None else saved_uri)
            try:
                info = mlflow.pytorch.log_model(
                    model, name=name, model_id=logged.model_id, run_id=self.run_id, serialization_format="pickle",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                    code_paths=[str(core)], extra_files=[str(config_file)], metadata={"config": dict(config)},
                    signature=signature,
                )
            finally:
                mlflow.set_tracking_uri(saved_uri)
                if saved_env is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = saved_env
        return info.model_id

    def child(self, name: str, tags: Mapping[str, Any]) -> "Tracker":
        """A nested run (for example one evaluation unit) under this one."""
        return start_run(self.client, self.experiment_id, name, tags, parent_run_id=self.run_id, root=self.root)

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
    *,
    root: Path | None = None,
) -> Tracker:
    """A new run with MLflow's system tags and ours (`tags` win over both)."""
    all_tags = {**system_tags(root), **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = _retry(client.create_run, experiment_id, tags=all_tags, run_name=name)
    return Tracker(client, experiment_id, run.info.run_id, root=root)


# ---------------------------------------------------------------------------------------------
# Runs left RUNNING by a killed process.

def _process_alive(pid: int, since: float) -> bool:
    """Whether process `pid` exists and is the one that was running at time `since` (not a
    later process that reused the id)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() <= since + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # no permission to look: assume it is alive
        return True


def mark_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs this host left RUNNING whose owning process (`pid` tag) is gone.

    Runs of other hosts are left alone (their processes cannot be checked from here)."""
    host = socket.gethostname().replace("'", "")
    runs = _retry(client.search_runs, [experiment_id], f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'",
                  max_results=1000)
    killed = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_alive(int(pid), run.info.start_time / 1000):
            continue
        _retry(client.set_tag, run.info.run_id, ERROR_TAG, f"killed: process {pid} on {host} ended without closing this run")
        _retry(client.set_terminated, run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    if killed:
        log.warning("MLflow: marked %d run(s) KILLED whose process is gone: %s", len(killed), ", ".join(killed))
    return killed


# ---------------------------------------------------------------------------------------------
# Parent runs: `mgdm repro`, a Prefect flow run, or one `dvc repro` / `dvc exp run` invocation.

def open_pipeline_run(root: Path, name: str, tags: Mapping[str, Any]) -> Tracker:
    """The parent run of one pipeline execution (`mgdm repro`, a Prefect flow run)."""
    client, experiment_id = connect(root)
    mark_stale_runs(client, experiment_id)
    return start_run(client, experiment_id, name, {"kind": "pipeline", **tags}, root=root)


def _dvc_process():
    """The `dvc` process this stage runs under (DVC starts stages as `sh -c <cmd>`), or None."""
    import psutil

    try:
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in cmdline[:2]) or "dvc" in cmdline[1:3]:
                return proc
    except psutil.Error:
        pass
    return None


def dvc_group() -> tuple[str, str, int | None] | None:
    """(group key, parent run name, dvc pid) of the DVC invocation running this stage, or None
    outside DVC. One `dvc repro` or `dvc exp run` is one group: the key holds the DVC process's
    host, pid and start time (and the experiment name DVC sets in DVC_EXP_NAME)."""
    if "DVC_STAGE" not in os.environ:
        return None
    experiment = os.environ.get("DVC_EXP_NAME", "")
    proc = _dvc_process()
    who = f"{proc.pid}-{int(proc.create_time())}" if proc is not None else f"ppid-{os.getppid()}"
    key = f"dvc:{experiment or 'repro'}:{socket.gethostname()}:{who}"
    return key, (f"dvc exp {experiment}" if experiment else "dvc repro"), (proc.pid if proc is not None else None)


def _group_parent(client: MlflowClient, experiment_id: str, root: Path, group: tuple[str, str, int | None]) -> str:
    """The parent run of this DVC invocation: found by its `run_group` tag, else created."""
    key, name, pid = group
    found = _retry(client.search_runs, [experiment_id], f"tags.{GROUP_TAG} = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        _retry(client.update_run, run_id, status="RUNNING")
        return run_id
    tags = {"kind": "pipeline", "front_door": "dvc", GROUP_TAG: key,
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    if pid is not None:
        tags[PID_TAG] = str(pid)  # the parent lives as long as the dvc process
    return start_run(client, experiment_id, name, tags, root=root).run_id


def attach(root: Path, run_id: str) -> Tracker:
    client, experiment_id = connect(root)
    return Tracker(client, experiment_id, run_id, root=root)


@contextlib.contextmanager
def stage_run(
    root: Path,
    stage: str,
    params: Mapping[str, Any],
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker]:
    """A child run for one stage; FINISHED, FAILED (with an `error` tag) or KILLED (Ctrl-C).

    The run is created when the stage first logs: an `MgdmError` raised before that (the stage
    refused its input before doing any work) leaves no run. Its parent is `parent_run_id`, else
    MGDM_PARENT_RUN_ID (`mgdm repro`), else the group parent of the DVC invocation running it.
    """
    client, experiment_id = connect(root)
    explicit = parent_run_id or os.environ.get(PARENT_ENV) or None
    group_parent: list[str] = []

    def open_run() -> str:
        mark_stale_runs(client, experiment_id)
        parent = explicit
        if parent is None and (group := dvc_group()) is not None:
            parent = _group_parent(client, experiment_id, root, group)
            group_parent.append(parent)
        run = start_run(client, experiment_id, stage, {"stage": stage, **(tags or {})}, parent, root=root)
        run.log_params(params)
        return run.run_id

    tracker = Tracker(client, experiment_id, root=root, opener=open_run)

    def close(status: str, error: BaseException | None = None) -> None:
        if error is not None:
            tracker.set_tags({ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]})
        tracker.finish(status)
        for run_id in group_parent:  # the group parent reflects the last stage that ran
            _retry(client.set_terminated, run_id, status)

    try:
        yield tracker
    except MgdmError as exc:
        if tracker.opened:
            close("FAILED", exc)
        else:
            log.info("%s refused its input before doing any work: no MLflow run recorded", stage)
        raise
    except KeyboardInterrupt as exc:
        if tracker.opened:
            close("KILLED", exc)
        raise
    except BaseException as exc:
        close("FAILED", exc)
        raise
    close("FINISHED")


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

    def log_inputs(self, inputs: Sequence[DataInput]) -> None:
        pass

    def log_model(self, model: Any, name: str, config: Mapping[str, Any], *,
                  tensor_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> str:
        return ""

    def child(self, name: str, tags: Mapping[str, Any]) -> "Tracker":
        return NullTracker()

    def finish(self, status: str = "FINISHED") -> None:
        pass
