import contextlib
import os
from pathlib import Path

# One thread per process: tests start subprocesses (dvc stages, Prefect workers, evaluation units)
# and two OpenMP thread pools spinning on two cores cost far more than they give.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


def copy_repository(repo_root: Path, dest: Path, profile: str | None = "smoke") -> dict[str, str]:
    """A temporary DVC project from the repository's tracked files (no outputs, no dvc.lock),
    git-initialised, with params.yaml merged with `profile` (in this copy only; None keeps it as
    committed). Returns the environment for running `dvc` and `mgdm` in it."""
    import shutil
    import subprocess
    import sys

    files = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        source = repo_root / name
        if source.is_file() and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["git", "init", "-q"], cwd=dest, env=env, check=True, capture_output=True)
    if profile is not None:
        import yaml

        from mgdm_core.config import deep_merge, read_yaml

        merged = deep_merge(read_yaml(dest / "params.yaml"), read_yaml(dest / "profiles" / f"{profile}.yaml"))
        (dest / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    return env


@contextlib.contextmanager
def pointing_at(api: str):
    """Flows called in this process, and the processes it starts, talk to the server at `api`
    (PREFECT_API_URL in the environment and in the settings) until the block ends."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    saved = os.environ.get("PREFECT_API_URL")
    try:
        os.environ["PREFECT_API_URL"] = api
        with temporary_settings({PREFECT_API_URL: api}):
            yield api
    finally:
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """A real, temporary Prefect server (own home and SQLite database) for every test that runs
    flows in-process; yields its API URL, to use with `pointing_at(api)`. The session shares it
    (starting one costs about a minute on 2 busy cores); tests that need a result store of their
    own set PREFECT_LOCAL_STORAGE_PATH themselves.

    Started with the front door's own `flows.serve.start_server` / `wait_healthy` (a wall-clock
    timeout) rather than `prefect_test_harness`, whose ephemeral server respawned forever once
    other tests had run in the same session (seen in a full `make test` on 2 busy cores).
    """
    import socket

    from flows.serve import prefect_env, start_server, stop, wait_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tmp_path_factory.mktemp("prefect-home")
    server = start_server("127.0.0.1", port, prefect_env(home), home / "server.log")
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api, 240, server)
        yield api
    finally:
        stop(server)


GIT_USER = {"GIT_AUTHOR_NAME": "mgdm test", "GIT_AUTHOR_EMAIL": "test@mgdm.invalid",
            "GIT_COMMITTER_NAME": "mgdm test", "GIT_COMMITTER_EMAIL": "test@mgdm.invalid"}


def run_ok(args, cwd, env, timeout: int = 900) -> str:
    """Run a command; fail the test with its output tail unless it succeeds. Returns stdout + stderr."""
    import subprocess

    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="session")
def dvc_smoke_experiment(repo_root, tmp_path_factory):
    """A clean clone (params.yaml as committed, one git commit) and `mgdm repro --profile smoke`
    in it: the whole chain once, as a DVC experiment. Shared by the DVC front-door tests and the
    Prefect test that compares its models and images with DVC's. Returns (root, env, output)."""
    import sys

    root = tmp_path_factory.mktemp("clone")
    env = {**copy_repository(repo_root, root, profile=None), **GIT_USER}
    run_ok(["git", "add", "-A"], root, env)
    run_ok(["git", "commit", "-q", "-m", "clean clone"], root, env)
    output = run_ok([sys.executable, "-m", "mgdm_core", "repro", "--profile", "smoke"], root, env)
    return root, env, output
