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
