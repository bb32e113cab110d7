from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
