"""Screenshots for the docs, taken from the real servers with real runs in them.

    python scripts/screenshots.py                 # writes docs/img/*.png (about 10 min on 2 CPU cores)
    python scripts/screenshots.py --out /tmp/img  # somewhere else

What it does, all on 127.0.0.1 and in a temporary folder (nothing in the repository changes
except the PNGs):

1. copies the repository's tracked files into a temporary project;
2. starts `mlflow server` (SQLite store, proxied artifacts) and `python -m flows.serve` (a Prefect
   server plus the `mgdm-pipeline/mgdm` deployment), each with a temporary home;
3. runs the deployment once on the smoke profile (CPU, two seeds) with MLFLOW_TRACKING_URI
   pointing at the MLflow server, so both UIs hold the runs of one real pipeline run;
4. takes PNG screenshots with headless Chromium (Debian's `chromium`; `apt-get install chromium`):
   - `mlflow_compare.png`: MLflow's compare view of the evaluation summary runs, baseline `real`
     against the augmented conditions (parameters, `delta_auc` and its interval);
   - `prefect_run_form.png`: the deployment's custom-run form (defaults from params.yaml);
   - `prefect_flow_run.png`: the flow run's artifacts (progress, evaluation, MLflow runs);
5. stops both servers and removes the temporary folder (`--keep` keeps it).

`--reuse DIR` takes the screenshots again from a folder an earlier `--keep` run left (both servers
restarted on its stores, no new pipeline run): for re-framing the pictures in a minute.

The PNGs are quantised to 256 colours (PIL) to stay small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.serve import stop, wait_healthy  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_project(dest: Path) -> None:
    """The repository's tracked files (no outputs, no dvc.lock), as a fresh user's clone has them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        source = ROOT / name
        if source.is_file() and name != "dvc.lock" and not name.startswith("docs/img/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def screenshot(chromium: str, url: str, png: Path, profile_dir: Path, size: str, budget_ms: int) -> None:
    profile_dir.mkdir(parents=True, exist_ok=True)
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={png}",
               f"--window-size={size}", f"--virtual-time-budget={budget_ms}", url]
    subprocess.run(command, check=True, capture_output=True, timeout=180)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")


def shrink(png: Path) -> None:
    """256-colour palette PNG: UI screenshots keep their look at a fraction of the size."""
    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default docs/img)")
    parser.add_argument("--profile", default="smoke", help="the profile of the pipeline run (default smoke)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (servers' homes, run outputs)")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds allowed for the pipeline run")
    parser.add_argument("--reuse", type=Path, help="a folder kept by --keep: screenshots of its runs, no new run")
    args = parser.parse_args(argv)
    if not Path(args.chromium).is_file():
        parser.error(f"no chromium at {args.chromium}: apt-get install chromium, or pass --chromium PATH")

    tmp = args.reuse.resolve() if args.reuse else Path(tempfile.mkdtemp(prefix="mgdm-screenshots-"))
    project = tmp / "project"
    if not args.reuse:
        project.mkdir()
        copy_project(project)
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}"
    # This process's Prefect client talks to that server (set before anything imports prefect).
    os.environ.update(PREFECT_API_URL=f"{prefect_url}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in ("DVC_STAGE", "DVC_EXP_NAME")}
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share few cores
    env.update(DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", PREFECT_HOME=str(tmp / "prefect"),
               MLFLOW_TRACKING_URI=mlflow_url, MGDM_PREFECT_MAX_WORKERS="2")
    servers: list[subprocess.Popen] = []
    try:
        print(f"MLflow server on {mlflow_url}, Prefect on {prefect_url} (temporary folder {tmp})", flush=True)
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "mlartifacts"),
             "--workers", "1"],
            cwd=tmp, env=env, stdout=open(logs / "mlflow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True))
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--port", str(prefect_port), "--startup-timeout", "300"],
            cwd=project, env=env, stdout=open(logs / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        servers.append(serve)
        wait_healthy(mlflow_url, 300, servers[0])
        wait_healthy(f"{prefect_url}/api", 300, serve)

        if args.reuse:
            flow_run, deployment_id = last_run(prefect_url)
        else:
            flow_run, deployment_id = run_pipeline(prefect_url, project, args.profile, args.timeout)
        print(f"flow run {flow_run.name}: {flow_run.state.name}", flush=True)

        from mlflow import MlflowClient

        client = MlflowClient(mlflow_url)
        experiment = client.get_experiment_by_name("mgdm")
        summaries = client.search_runs([experiment.experiment_id], "tags.kind = 'summary'", order_by=["metrics.delta_auc DESC"])
        if not summaries:
            raise RuntimeError(f"no summary runs in MLflow; see {logs}")
        baseline = [r for r in summaries if r.data.tags["condition"] == "real"]
        runs = [r.info.run_id for r in baseline + [r for r in summaries if r not in baseline]]
        args.out.mkdir(parents=True, exist_ok=True)
        shots = {
            "mlflow_compare.png": (f"{mlflow_url}/#/compare-runs?runs={json.dumps(runs)}"
                                   f"&experiments={json.dumps([experiment.experiment_id])}", "1400,2300"),
            "prefect_run_form.png": (f"{prefect_url}/deployments/deployment/{deployment_id}/run", "1400,2900"),
            "prefect_flow_run.png": (f"{prefect_url}/runs/flow-run/{flow_run.id}", "1400,1000"),
        }
        for name, (url, size) in shots.items():
            png = args.out / name
            screenshot(args.chromium, url, png, tmp / "chromium", size, 20000)
            shrink(png)
            print(f"wrote {png} ({png.stat().st_size // 1024} KiB) from {url}", flush=True)
        return 0
    finally:
        for process in reversed(servers):
            if process is servers[-1] and process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: flows.serve stops its own Prefect server
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    pass
            stop(process)
        pid_file = tmp / "prefect" / "server.pid"
        if pid_file.is_file():  # flows.serve's Prefect server, should it have outlived it
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if args.keep or args.reuse:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def served_deployment(prefect_url: str):
    """The `mgdm-pipeline/mgdm` deployment, once `flows.serve` has registered it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 180
        while True:
            try:
                return client.read_deployment_by_name("mgdm-pipeline/mgdm")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)


def last_run(prefect_url: str):
    """The newest completed top-level run of the deployment (for --reuse)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.sorting import FlowRunSort

    deployment = served_deployment(prefect_url)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                                          state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs:
        raise RuntimeError("no completed run of mgdm-pipeline/mgdm in this folder")
    return runs[0], deployment.id


def run_pipeline(prefect_url: str, project: Path, profile: str, timeout: float):
    """One run of the served deployment; returns (flow run, deployment id)."""
    from prefect.deployments import run_deployment

    deployment = served_deployment(prefect_url)
    # Two seeds through extra_overrides: a form field left at params.yaml's value ([0, 1]) is no
    # override, so the smoke profile's single seed would win.
    options = {"project_root": str(project), "profile": profile, "device": "cpu",
               "extra_overrides": {"evaluate.seeds": [0, 1]}}
    flow_run = run_deployment("mgdm-pipeline/mgdm", parameters={"options": options}, timeout=timeout,
                              poll_interval=5, as_subflow=False)
    if flow_run.state is None or not flow_run.state.is_completed():
        raise RuntimeError(f"the pipeline run did not complete: {flow_run.state}")
    return flow_run, deployment.id


if __name__ == "__main__":
    sys.exit(main())
