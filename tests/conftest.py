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
