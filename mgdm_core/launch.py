"""Launching stages: the one layer above `stages/` and `distributed.py` (used by every front door).

`run_stage(name, params, layout)` is what the CLI, `dvc repro` (through the CLI) and the Prefect
flow call: it checks the parameters against the prepared data (`stages.checks`), opens the stage's
MLflow run and runs the stage here, or, with `launcher.kind: torchrun` for a multi-process stage
(`distributed.DISTRIBUTED_STAGES`), on `launcher.nproc_per_node` processes started by
`python -m torch.distributed.run ... -m mgdm_core.launch <stage>`; each of those processes runs
`_worker` and rank 0 logs into the launcher's MLflow run.

Import graph (no cycle): `launch` -> `stages` -> `distributed`; `distributed` imports neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mgdm_core import distributed, runtime, tracking
from mgdm_core.config import Params, validate_params
from mgdm_core.device import resolve_device
from mgdm_core.errors import MgdmError
from mgdm_core.io import write_json_atomic
from mgdm_core.layout import Layout
from mgdm_core.stages import reads, stage_module
from mgdm_core.stages.checks import check_stage_inputs

log = logging.getLogger("mgdm")

WORKER_MODULE = "mgdm_core.launch"
RUN_ID_ARG = "--run-id"


def run_stage(
    name: str,
    params: Params,
    layout: Layout,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Run one stage inside its own MLflow run (a child of `parent_run_id` when given).

    Parameters that depend on the data are checked first (a ConfigError naming the key, before
    any run is opened or any model loaded). With `launcher.kind: torchrun` a multi-process stage
    runs on `launcher.nproc_per_node` torchrun processes started from here; the MLflow run is
    still opened once, here, and rank 0 logs into it. Inside a torchrun worker (for example
    `torchrun -m mgdm_core train_diffusion`), only rank 0 opens a run.
    """
    from mgdm_core.stages.common import dataset_name

    runtime.configure_process()  # threads and allocator, for this process and the ones it starts
    module = stage_module(name)
    check_stage_inputs(name, params, layout)
    started = time.perf_counter()
    clock = CostClock.start()
    launching = (params.launcher.kind == "torchrun" and name in distributed.DISTRIBUTED_STAGES
                 and not distributed.in_worker())
    if distributed.in_worker() and name in distributed.DISTRIBUTED_STAGES:
        distributed.init_from_env(params.device)
        if not distributed.is_main():
            return module.run(params, layout, tracking.NullTracker())
    launcher_tags = {"launcher": "torchrun", "nproc_per_node": params.launcher.nproc_per_node} if launching else {}
    with tracking.stage_run(
        layout.root, name, reads(params, module.READS), parent_run_id=parent_run_id,
        tags={"dataset": dataset_name(params), **launcher_tags, **(tags or {})},
    ) as tracker:
        if launching:
            metrics = launch(name, params, layout, tracker.run_id)
        else:
            metrics = module.run(params, layout, tracker)
        seconds = time.perf_counter() - started
        tracker.log_metrics({"stage_seconds": seconds})
        cost = stage_cost(clock, params.device)
        record_cost(layout.metrics_file(name), cost)
        tracker.log_metrics({f"cost.{k}": v for k, v in cost.items() if k != "machine"})
        tracker.log_params({f"cost.machine.{k}": v for k, v in cost["machine"].items()})
    log.info("%s finished in %.1f s (%.1f CPU s)", name, seconds, cost["cpu_seconds"])
    return metrics


# ---- what a stage cost ---------------------------------------------------------------------------


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CostClock:
    """Wall time and CPU time (this process; its children that were waited for) at a stage's start."""

    wall: float
    cpu_process: float
    cpu_children: float

    @classmethod
    def start(cls) -> "CostClock":
        return cls(time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN))


def cpu_model() -> str:
    """The CPU's name: `model name` in /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_facts(device: str) -> dict[str, Any]:
    """The machine a stage ran on, as flat JSON values: CPU model, logical cores (the machine's
    and those this process may use), torch's intra-op threads, the device and the accelerator's name."""
    dev = resolve_device(device)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count() or 0,
        "usable_cores": usable or 0,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "accelerator": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none",
        "platform": platform.platform(),
    }


def stage_cost(clock: CostClock, device: str) -> dict[str, Any]:
    """Seconds since `clock` started: wall, CPU of this process, CPU of its finished child
    processes (torchrun ranks, evaluation workers: `RUSAGE_CHILDREN` counts the children, and
    theirs, once waited for) and their sum; with the machine under `machine`."""
    process = _cpu_seconds(resource.RUSAGE_SELF) - clock.cpu_process
    children = _cpu_seconds(resource.RUSAGE_CHILDREN) - clock.cpu_children
    return {"wall_seconds": time.perf_counter() - clock.wall, "cpu_seconds": process + children,
            "cpu_seconds_process": process, "cpu_seconds_children": children, "machine": machine_facts(device)}


def record_cost(metrics_file: Path, cost: dict[str, Any]) -> None:
    """Add `cost` to the stage's metrics JSON (written by the stage itself; left alone when the stage
    wrote none, e.g. a torchrun rank other than 0)."""
    if not metrics_file.is_file():
        return
    metrics = json.loads(metrics_file.read_text())
    if isinstance(metrics, dict):
        write_json_atomic(metrics_file, {**metrics, "cost": cost})


def launch(stage: str, params: Params, layout: Layout, run_id: str | None) -> dict[str, float]:
    """Run `stage` on `params.launcher.nproc_per_node` torchrun processes; the metrics rank 0 wrote."""
    n = params.launcher.nproc_per_node
    fd, params_file = tempfile.mkstemp(prefix=f"mgdm-{stage}-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(params.model_dump(mode="json"), f)
        args = [stage, "--params-json", params_file, "--root", str(Path(layout.root).resolve())]
        if run_id:
            args += [RUN_ID_ARG, run_id]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        log.info("%s: launching %d processes with torchrun", stage, n)
        code = subprocess.call(distributed.torchrun_command(n, WORKER_MODULE, args), env=env)
    finally:
        os.unlink(params_file)
    if code != 0:
        raise MgdmError(f"{stage}: torchrun with {n} processes failed (exit code {code}); the error is printed above")
    return json.loads(layout.metrics_file(stage).read_text())


def _worker(argv: list[str] | None = None) -> int:
    """One torchrun process: join the group, run the stage (rank 0 logs into the launcher's run)."""
    parser = argparse.ArgumentParser(prog=f"python -m {WORKER_MODULE}")
    parser.add_argument("stage", choices=distributed.DISTRIBUTED_STAGES)
    parser.add_argument("--params-json", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument(RUN_ID_ARG, default=None)
    args = parser.parse_args(argv)
    rank_env = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank_env == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s [rank {rank_env}]: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        params = validate_params(json.loads(Path(args.params_json).read_text()), source=args.params_json)
        runtime.configure_process()
        distributed.init_from_env(params.device)
        root = Path(args.root)
        tracker = tracking.attach(root, args.run_id) if distributed.is_main() and args.run_id else tracking.NullTracker()
        stage_module(args.stage).run(params, Layout(root), tracker)
        return 0
    except MgdmError as exc:
        print(f"mgdm {args.stage} [rank {rank_env}]: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    raise SystemExit(_worker())
