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
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mgdm_core import distributed, runtime, tracking
from mgdm_core.config import Params, validate_params
from mgdm_core.errors import MgdmError
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
    log.info("%s finished in %.1f s", name, seconds)
    return metrics


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
