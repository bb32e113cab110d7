"""`python -m flows.serve [--port 4200]`: a local Prefect server plus the `mgdm` deployment.

Starts `prefect server start` on 127.0.0.1 as a child process (its own PREFECT_HOME under the
project's `.prefect/`, analytics off), waits until it answers, then serves `mgdm_pipeline` as the
deployment `mgdm-pipeline/mgdm`. Ctrl-C stops both. `--api-url URL` serves against an existing
server instead (no local server). Work pools for GPU machines: docs/prefect.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "mgdm"


def prefect_env(home: Path | None = None) -> dict[str, str]:
    """Settings for the server and the runner; set before `prefect` is imported (it reads them then)."""
    env = {
        "PREFECT_HOME": str(home or os.environ.get("PREFECT_HOME") or REPO_ROOT / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # The core logs through `mgdm` and `mgdm_core.*` loggers; show them in the flow-run logs.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "mgdm,mgdm_core",
    }
    return env


def server_settings(host: str, port: int) -> dict[str, str]:
    """Settings that make the server, its UI and the runner agree on the address.

    The UI asks the server for its API URL (`/ui-settings`), which Prefect derives from
    PREFECT_UI_API_URL, else PREFECT_API_URL (often 4200 in a user's profile), else
    PREFECT_SERVER_API_PORT, never from `prefect server start --port`: without these, a server on
    another port serves a UI that calls 4200."""
    api_url = f"http://{host}:{port}/api"
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_UI_URL": f"http://{host}:{port}",
    }


def start_server(host: str, port: int, env: dict[str, str], log_file: Path | None = None) -> subprocess.Popen:
    """`prefect server start` in its own process group, so stopping it also stops its workers."""
    out = open(log_file, "ab") if log_file else None
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        env={**os.environ, **env, **server_settings(host, port)}, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
    )


def wait_healthy(api_url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` (Prefect's API, MLflow's server); a cold start (database migrations)
    can take about a minute."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"no answer from {api_url}/health after {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # our own child's group, started with start_new_session
        process.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4200, help="local server port (default 4200)")
    parser.add_argument("--host", default="127.0.0.1", help="local server address (default 127.0.0.1: this machine only)")
    parser.add_argument("--api-url", help="use this running server (e.g. http://host:4200/api) instead of starting one")
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default mgdm)")
    parser.add_argument("--max-workers", type=int, default=None, help="concurrent evaluation units (worker count of the evaluation grid runner)")
    parser.add_argument("--limit", type=int, default=1,
                        help="concurrent flow runs (default 1: runs on one project root share its output files)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)

    _stop_on_signals()
    env = prefect_env()
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if args.max_workers:
        env["MGDM_PREFECT_MAX_WORKERS"] = str(args.max_workers)
    server = None
    if args.api_url:
        api_url = args.api_url.rstrip("/")
    else:
        api_url = f"http://{args.host}:{args.port}/api"
        server = start_server(args.host, args.port, env, Path(env["PREFECT_HOME"]) / "server.log")
        # Where whoever stops us can find the server, should we be killed before we stop it.
        (Path(env["PREFECT_HOME"]) / "server.pid").write_text(str(server.pid))
        print(f"Prefect server starting (log: {Path(env['PREFECT_HOME']) / 'server.log'}) ...", flush=True)
    try:
        if server is not None:
            wait_healthy(api_url, args.startup_timeout, server)
            print(f"Prefect UI: {api_url.removesuffix('/api')}", flush=True)
        os.environ.update(env)
        os.environ["PREFECT_API_URL"] = api_url
        from flows.pipeline import mgdm_pipeline  # imported only now: prefect reads the settings above

        mgdm_pipeline.serve(name=args.name, limit=args.limit, tags=["mgdm"],
                            description="MGDM pipeline: the form starts at what params.yaml holds; change a "
                                        "field to override it for this run.")
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            stop(server)
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (what `kill`, systemd and container runtimes send) both end serve
    through its `finally`, which stops the server it started (a plain SIGTERM would orphan it).
    A shell that starts us in the background (`make serve &`) makes us ignore SIGINT: undo that."""

    def terminate(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
