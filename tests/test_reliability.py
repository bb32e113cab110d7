"""Crash safety through the real CLI: SIGKILL a training or generate run, rerun it, get what an
uninterrupted run gets; plus a non-finite loss stopping the stage with one clear line.

The run that gets killed is `python -m mgdm_core <stage>` as a subprocess; setup, reruns and
reference runs go through the same entry point (`cli.main`) in this process to save start-up time.
Each scenario has its own tmp project (a copy of params.yaml and profiles/, with the smoke profile
sized so there is something to interrupt). Both sides of a comparison use the same params, seed
and device (CPU, one thread).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from mgdm_core import cli
from mgdm_core.io import read_image
from mgdm_core.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DIFFUSION_STEPS = 24

# Merged over the smoke profile: enough steps / images that a kill lands mid-way.
OVERRIDES = {
    "device": "cpu",
    "train_diffusion": {"steps": DIFFUSION_STEPS, "checkpoint_every": 5, "log_every": 5},
    "generate": {"counts": [8, 8], "batch_size": 2, "respacing": "ddim10"},
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return env


def _cmd(stage: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "mgdm_core", stage, "--params", str(root / "params.yaml"),
            "--profile", "smoke", "--root", str(root)]


def _run(stage: str, root: Path) -> None:
    """Run a stage to completion through the CLI's entry point, in this process (no start-up cost).

    Single-threaded like the subprocesses, so both sides of a comparison run the same kernels.
    """
    assert cli.main(_cmd(stage, root)[3:]) == 0, f"{stage} failed in {root}"


def _start(stage: str, root: Path) -> subprocess.Popen:
    log = open(root / f"{stage}.stderr", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(_cmd(stage, root), env=_env(), stdout=subprocess.DEVNULL, stderr=log)


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 90.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 10 ms); fail if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"process exited ({proc.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "profiles", root / "profiles")
    smoke = yaml.safe_load((root / "profiles" / "smoke.yaml").read_text())
    for key, value in OVERRIDES.items():
        if isinstance(value, dict):
            smoke.setdefault(key, {}).update(value)
        else:
            smoke[key] = value
    (root / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    return root


def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.stderr"))
    return dst


@pytest.fixture(scope="module", autouse=True)
def _single_thread_no_shared_mlflow():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        mp.delenv(key)
    yield
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A project with prepared data and a trained classifier (its own MLflow store, copied with it)."""
    root = _project(tmp_path_factory.mktemp("rel") / "base")
    _run("prepare", root)
    _run("train_classifier", root)
    return root


@pytest.fixture(scope="module")
def reference(base: Path, tmp_path_factory) -> Path:
    """`base` plus an uninterrupted train_diffusion."""
    root = _clone(base, tmp_path_factory.mktemp("rel") / "reference")
    _run("train_diffusion", root)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_diffusion_killed_after_a_checkpoint_resumes_to_the_same_weights(base, reference, tmp_path, caplog) -> None:
    root = _clone(base, tmp_path / "killed")
    checkpoint = root / "models" / "diffusion" / "checkpoint.pt"
    _kill_when(_start("train_diffusion", root), checkpoint.is_file)
    assert not (root / "models" / "diffusion.pt").exists()
    _, state = load_checkpoint(checkpoint, kind="unet")
    assert 0 < int(state["step"]) < DIFFUSION_STEPS  # really killed mid-way

    with caplog.at_level("INFO"):
        _run("train_diffusion", root)
    assert f"resumed from step {int(state['step'])}" in caplog.text

    _, resumed = load_checkpoint(root / "models" / "diffusion.pt", kind="unet")
    _, uninterrupted = load_checkpoint(reference / "models" / "diffusion.pt", kind="unet")
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        assert torch.allclose(resumed["model"][key], value, rtol=0, atol=1e-6), key
    _, final = load_checkpoint(checkpoint, kind="unet")
    assert int(final["step"]) == DIFFUSION_STEPS
    # No temp file of a checkpoint write survives in the stage's directories.
    assert not [p.name for p in (root / "models").rglob(".*")]


def _visible_pngs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.png") if not p.name.startswith("."))


def test_generate_killed_mid_way_leaves_whole_pngs_and_rerun_matches_an_uninterrupted_run(reference, tmp_path) -> None:
    uninterrupted = _clone(reference, tmp_path / "uninterrupted")
    killed = _clone(reference, tmp_path / "killed")
    stage1 = killed / "synthetic" / "stage1"
    total = sum(OVERRIDES["generate"]["counts"])

    _kill_when(_start("generate", killed), lambda: len(_visible_pngs(stage1)) >= 3)
    _run("generate", uninterrupted)
    written = _visible_pngs(stage1)
    assert 3 <= len(written) < total and not (stage1 / "manifest.csv").exists()
    for png in written:  # every visible file is a complete image
        assert read_image(png).shape == (16, 16, 1)

    # A kill during a PNG write leaves only a hidden temp file: plant one as that crash would.
    stale = stage1 / "benign" / ".benign_00007.png.0123456789ab.tmp.png"
    stale.write_bytes(b"\x89PNG half written")
    _run("generate", killed)
    assert not stale.exists()

    got, want = _tree(stage1), _tree(uninterrupted / "synthetic" / "stage1")
    assert sorted(got) == sorted(want)
    assert len([name for name in got if name.endswith(".png")]) == total
    for name in want:
        assert got[name] == want[name], name


def test_non_finite_loss_stops_train_diffusion_with_one_line_and_keeps_the_checkpoint(base, tmp_path, capsys) -> None:
    root = _clone(base, tmp_path / "nan")
    # AdamW moves every weight by about lr on the first step; 1e30 overflows the activations after it.
    params = yaml.safe_load((root / "profiles" / "smoke.yaml").read_text())
    params["train_diffusion"].update(lr=1e30, checkpoint_every=1)
    (root / "profiles" / "smoke.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(_cmd("train_diffusion", root)[3:]) == 2
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mgdm train_diffusion: error: unet: non-finite loss"), last
    assert "Traceback" not in stderr
    assert "the last good checkpoint (step 1) is kept" in last, last
    _, state = load_checkpoint(root / "models" / "diffusion" / "checkpoint.pt", kind="unet")
    assert int(state["step"]) == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (root / "models" / "diffusion.pt").exists()
