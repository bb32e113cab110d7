"""What a stage cost: every stage's metrics JSON and MLflow run record wall and CPU seconds and the machine."""

import json
import subprocess
import sys

import pytest

from mgdm_core import launch, tracking
from mgdm_core.config import load_params
from mgdm_core.launch import CostClock, record_cost, run_stage, stage_cost
from mgdm_core.layout import Layout

MACHINE_KEYS = {"cpu_model", "logical_cores", "usable_cores", "torch_threads", "device", "accelerator", "platform"}


def test_cpu_seconds_of_a_finished_child_process_are_counted():
    clock = CostClock.start()
    # About 0.4 CPU seconds in a child process, none in this one.
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"],
                   check=True)
    cost = stage_cost(clock, "cpu")
    assert cost["cpu_seconds_children"] >= 0.35
    assert cost["cpu_seconds"] == pytest.approx(cost["cpu_seconds_process"] + cost["cpu_seconds_children"])
    assert cost["wall_seconds"] >= 0.35
    assert set(cost["machine"]) == MACHINE_KEYS
    assert cost["machine"]["device"] == "cpu" and cost["machine"]["accelerator"] == "none"
    assert cost["machine"]["logical_cores"] >= cost["machine"]["usable_cores"] >= 1


def test_the_cpu_model_is_named():
    assert launch.cpu_model() and launch.cpu_model() != "unknown"


def test_the_cost_is_added_to_the_metrics_the_stage_wrote(tmp_path):
    metrics = tmp_path / "stage.json"
    metrics.write_text(json.dumps({"final_loss": 0.5}))
    record_cost(metrics, {"wall_seconds": 1.0})
    assert json.loads(metrics.read_text()) == {"final_loss": 0.5, "cost": {"wall_seconds": 1.0}}
    missing = tmp_path / "none.json"
    record_cost(missing, {"wall_seconds": 1.0})  # a stage (rank) that wrote no metrics gets none
    assert not missing.exists()


def test_run_stage_records_the_cost_in_the_metrics_file_and_the_mlflow_run(repo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(repo_root / "params.yaml", "smoke")
    layout = Layout(tmp_path)
    run_stage("prepare", params, layout)
    cost = json.loads(layout.metrics_file("prepare").read_text())["cost"]
    assert cost["wall_seconds"] > 0 and cost["cpu_seconds"] > 0
    assert set(cost["machine"]) == MACHINE_KEYS
    client, experiment_id = tracking.connect(layout.root)
    (run,) = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("stage") == "prepare"]
    assert run.data.metrics["cost.wall_seconds"] == pytest.approx(cost["wall_seconds"])
    assert run.data.metrics["cost.cpu_seconds"] == pytest.approx(cost["cpu_seconds"])
    assert run.data.params["cost.machine.cpu_model"] == cost["machine"]["cpu_model"]
    assert run.data.params["cost.machine.torch_threads"] == str(cost["machine"]["torch_threads"])
