"""The pipeline stages. Every front door (CLI, dvc.yaml, Prefect) runs them through `run_stage`."""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from mgdm_core.config import Params
from mgdm_core.layout import Layout

STAGES: tuple[str, ...] = (
    "prepare", "train_diffusion", "train_classifier", "generate", "disturb", "quality", "evaluate",
)


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}' (expected one of {', '.join(STAGES)})")
    return importlib.import_module(f"mgdm_core.stages.{name}")


def reads(params: Params, keys: tuple[str, ...]) -> dict[str, Any]:
    """The parameter values a stage declares it reads (`READS`), as a nested dict."""
    raw = params.model_dump(mode="json")
    selected: dict[str, Any] = {}
    for key in keys:
        section, _, field = key.partition(".")
        if field:
            selected.setdefault(section, {})[field] = raw[section][field]
        else:
            selected[section] = raw[section]
    return selected


def run_stage(
    name: str,
    params: Params,
    layout: Layout,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Run one stage inside its own MLflow run (a child of `parent_run_id` when given).

    With `launcher.kind: torchrun` a multi-process stage (`distributed.DISTRIBUTED_STAGES`) runs
    on `launcher.nproc_per_node` torchrun processes started from here; the MLflow run is still
    opened once, here, and rank 0 logs into it. Inside a torchrun worker (for example
    `torchrun -m mgdm_core train_diffusion`), only rank 0 opens a run.
    """
    from mgdm_core import distributed, tracking
    from mgdm_core.stages.common import dataset_name, log

    module = stage_module(name)
    started = time.perf_counter()
    launch = (params.launcher.kind == "torchrun" and name in distributed.DISTRIBUTED_STAGES
              and not distributed.in_worker())
    if distributed.in_worker() and name in distributed.DISTRIBUTED_STAGES:
        distributed.init_from_env(params.device)
        if not distributed.is_main():
            return module.run(params, layout, tracking.NullTracker())
    launcher_tags = {"launcher": "torchrun", "nproc_per_node": params.launcher.nproc_per_node} if launch else {}
    with tracking.stage_run(
        layout.root, name, reads(params, module.READS), parent_run_id=parent_run_id,
        tags={"dataset": dataset_name(params), **launcher_tags, **(tags or {})},
    ) as tracker:
        if launch:
            metrics = distributed.launch(name, params, layout, tracker.run_id)
        else:
            metrics = module.run(params, layout, tracker)
        seconds = time.perf_counter() - started
        tracker.log_metrics({"stage_seconds": seconds})
    log.info("%s finished in %.1f s", name, seconds)
    return metrics
