"""What MLflow records: system tags, unit parameters and data sets, summary runs, stale and refused runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from mgdm_core import tracking
from mgdm_core.config import load_params
from mgdm_core.errors import DataError
from mgdm_core.evaluation.metrics import classification_metrics
from mgdm_core.evaluation.report import build_summary
from mgdm_core.launch import run_stage
from mgdm_core.layout import Layout
from mgdm_core.stages import evaluate


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema in place (creating one costs ~15 s on 2 busy cores)."""
    path = tmp_path_factory.mktemp("store") / "mlruns.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def root(tmp_path: Path, monkeypatch, empty_store: Path) -> Path:
    """A project root that is its own git repository with one commit (for the git system tags)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", tracking.PARENT_ENV, "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(empty_store, project / "mlruns.db")
    (project / "README").write_text("test project\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "README"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=project, check=True)
    return project


def _runs(root: Path, query: str = "") -> list:
    client, experiment_id = tracking.connect(root)
    return client.search_runs([experiment_id], query, max_results=1000)


def _head(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_stage_runs_carry_mlflow_system_tags_and_their_process(root: Path) -> None:
    with tracking.stage_run(root, "prepare", {"seed": 0}) as tracker:
        tracker.log_metrics({"x": 1.0})
    (run,) = _runs(root)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == _head(root)
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["pid"] == str(os.getpid()) and tags["host"]
    assert tags["stage"] == "prepare" and run.data.params == {"seed": "0"} and run.info.status == "FINISHED"


def test_a_refused_input_leaves_no_run_but_a_failure_after_work_does(root: Path) -> None:
    with pytest.raises(DataError), tracking.stage_run(root, "prepare", {"seed": 0}):
        raise DataError("data/x.npz: not found")
    assert _runs(root) == []
    with pytest.raises(DataError), tracking.stage_run(root, "evaluate", {"seed": 0}) as tracker:
        tracker.log_metrics({"units_done": 1})
        raise DataError("evaluate: a manifest vanished")
    (run,) = _runs(root)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "DataError: evaluate: a manifest vanished"
    with pytest.raises(RuntimeError), tracking.stage_run(root, "generate", {"seed": 0}):
        raise RuntimeError("a bug")  # not a refusal: recorded even though nothing was logged
    assert {r.data.tags["stage"]: r.info.status for r in _runs(root)} == {"evaluate": "FAILED", "generate": "FAILED"}


def test_prepare_refusing_a_missing_file_leaves_no_run(root: Path, repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides(
        {"data.source": "npz", "data.path": "missing.npz"})
    for _ in range(3):
        with pytest.raises(DataError, match="missing.npz"):
            run_stage("prepare", params, Layout(root))
    assert _runs(root) == []


def test_a_run_left_running_by_a_dead_process_is_marked_killed_at_the_next_start(root: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client, experiment_id = tracking.connect(root)
    orphan = tracking.start_run(client, experiment_id, "train_diffusion", {"stage": "train_diffusion", "pid": dead.pid}, root=root)
    alive = tracking.start_run(client, experiment_id, "generate", {"stage": "generate"}, root=root)  # this process
    elsewhere = tracking.start_run(client, experiment_id, "disturb", {"stage": "disturb", "pid": dead.pid,
                                                                     "host": "another-machine"}, root=root)
    with tracking.stage_run(root, "train_diffusion", {"seed": 0}) as tracker:
        tracker.log_metrics({"loss": 1.0})
    status = {run.info.run_id: run.info.status for run in _runs(root)}
    assert status[orphan.run_id] == "KILLED"
    assert "ended without closing this run" in client.get_run(orphan.run_id).data.tags["error"]
    assert status[alive.run_id] == "RUNNING"  # its process (this one) still runs
    assert status[elsewhere.run_id] == "RUNNING"  # another host's processes cannot be checked from here


def test_stage_runs_of_one_dvc_invocation_share_a_parent_named_after_the_experiment(root: Path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_STAGE", "prepare")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-sail")
    for stage in ("prepare", "train_diffusion"):
        with tracking.stage_run(root, stage, {"seed": 0}) as tracker:
            tracker.log_metrics({"x": 1.0})
    runs = _runs(root)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert parent.info.run_name == "dvc exp brisk-sail" and parent.data.tags["front_door"] == "dvc"
    assert parent.info.status == "FINISHED"  # the status of the last stage that ran
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == ["prepare", "train_diffusion"]


def test_summary_runs_hold_the_verdict_as_metrics(root: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    results = []
    for condition, shift in (("real", 0.0), ("real+stage1", 0.3)):
        for seed in (0, 1, 2):
            p1 = np.clip(0.5 + (y - 0.5) * (0.2 + shift) + rng.normal(0, 0.15, len(y)), 0.01, 0.99)
            probs = np.stack([1 - p1, p1], axis=1)
            results.append({"network": "simple_cnn", "condition": condition, "seed": seed, "test_labels": y,
                            "test_probs": probs, "metrics": classification_metrics(y, probs)})
    summary = build_summary(results)
    client, experiment_id = tracking.connect(root)
    stage = tracking.start_run(client, experiment_id, "evaluate", {"stage": "evaluate"}, root=root)
    evaluate._log_summary_runs(summary, stage)
    runs = {r.data.tags["condition"]: r for r in _runs(root, "tags.kind = 'summary'")}
    assert set(runs) == {"real", "real+stage1"}
    entry = summary["networks"]["simple_cnn"]["real+stage1"]
    m = runs["real+stage1"].data.metrics
    assert m["delta_auc"] == pytest.approx(entry["vs_baseline"]["auc"]["delta"])
    assert m["delta_auc_low"] == pytest.approx(entry["vs_baseline"]["auc"]["ci_low"])
    assert m["delta_auc_high"] == pytest.approx(entry["vs_baseline"]["auc"]["ci_high"])
    assert m["auc_mean"] == pytest.approx(entry["metrics"]["auc"]["mean"])
    assert m["auc_std"] == pytest.approx(entry["metrics"]["auc"]["std"])
    assert m["delta_auc_low"] > 0 and runs["real+stage1"].data.tags["verdict"].startswith("better")
    base = runs["real"].data.metrics
    assert base["delta_auc"] == base["delta_auc_low"] == base["delta_auc_high"] == 0.0
    assert all(r.data.tags["mlflow.parentRunId"] == stage.run_id for r in runs.values())


def test_units_log_their_parameters_data_sets_and_the_best_model(root: Path, repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides(
        {"evaluate.conditions": ["real"], "evaluate.seeds": [0, 1], "evaluate.log_models": "best", "device": "cpu"})
    layout = Layout(root)
    run_stage("prepare", params, layout)
    client, experiment_id = tracking.connect(root)
    stage = tracking.start_run(client, experiment_id, "evaluate", {"stage": "evaluate"}, root=root)
    results = [evaluate.run_unit(u, params, layout, stage, progress=False) for u in evaluate.plan(params, layout)]
    unit = client.get_run(results[0]["run_id"])
    assert unit.data.params == {
        "network": "simple_cnn", "condition": "real", "measure": "-", "augment": "-", "synthetic_ratio": "-",
        "generate_guidance": "-", "generate_scale": "-", "disturb_scale": "-", "epochs": "1",
        "batch_size": "16", "lr": str(params.evaluate.lr), "seed": "0", "training_seed": "0"}
    inputs = {d.dataset.name: d for d in unit.inputs.dataset_inputs}
    assert set(inputs) == {"phantom/train", "phantom/val", "phantom/test"}
    contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
    assert contexts == {"phantom/train": "train", "phantom/val": "validation", "phantom/test": "test"}
    assert len(inputs["phantom/train"].dataset.digest) == 16

    evaluate.summarise(results, params, layout, stage)
    best = max(results, key=lambda r: (r["val_auc"], -r["seed"]))
    models = client.search_logged_models([experiment_id])
    assert [m.source_run_id for m in models] == [best["run_id"]]
    assert not (root / ".mgdm" / "evaluate-models" / stage.run_id).exists()


def test_unit_params_read_the_scales_from_the_synthetic_sets_manifests(root: Path, repo_root: Path) -> None:
    from mgdm_core.io import write_manifest

    params = load_params(repo_root / "params.yaml", "smoke")
    layout = Layout(root)
    row = {"file": "benign/a.png", "class": "benign", "label": 0, "source": "", "seed": 1, "confidence": 0.9,
           "entropy": 0.1}
    layout.stage1_dir.mkdir(parents=True)
    write_manifest(layout.stage1_dir / "manifest.csv", [{**row, "guidance": "classifier", "scale": 2.5}])
    layout.stage2_measure_dir("margin").mkdir(parents=True)
    write_manifest(layout.stage2_measure_dir("margin") / "manifest.csv",
                   [{**row, "source": "stage1/benign/a.png", "guidance": "margin", "scale": 6.0}])
    unit = evaluate.Unit("simple_cnn", "real+stage2:margin", 3)
    got = evaluate.unit_params(unit, params, layout)
    assert (got["measure"], got["generate_guidance"], got["generate_scale"], got["disturb_scale"]) == \
        ("margin", "classifier", "2.5", "6.0")
    assert got["synthetic_ratio"] == params.evaluate.synthetic_ratio and got["seed"] == 3
