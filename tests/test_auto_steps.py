"""`train_diffusion.steps: auto`: the stopping rule on scripted curves, and the stage on the phantom."""

import json
import shutil

import pytest
import torch

from mgdm_core import tracking
from mgdm_core.config import load_params
from mgdm_core.errors import ConfigError
from mgdm_core.launch import run_stage
from mgdm_core.layout import Layout
from mgdm_core.stages import train_diffusion
from mgdm_core.training.auto_steps import StopRule, decide
from mgdm_core.training.checkpoint import load_checkpoint

RULE = StopRule(patience=2, min_improvement=0.1, fidelity_tolerance=0.05)
REAL_AUC = 0.9


def curve(*points):
    """(step, FD / floor, fidelity AUC) -> judged rows."""
    return [{"step": s, "fd_ratio": fd, "fd": None if fd is None else 10 * fd, "fidelity_auc": auc}
            for s, fd, auc in points]


def test_training_goes_on_while_fd_improves_even_when_fidelity_is_reached():
    decision = decide(curve((100, 8.0, 0.9), (200, 4.0, 0.9), (300, 2.0, 0.9)), REAL_AUC, RULE)
    assert not decision.stop and decision.stale == 0 and decision.chosen_step == 300


def test_it_stops_once_faithful_and_fd_flat_for_patience_snapshots_and_keeps_the_best_faithful_one():
    points = curve((100, 8.0, 0.5), (200, 3.0, 0.86), (300, 2.9, 0.95), (400, 2.95, 0.95))
    assert decide(points[:3], REAL_AUC, RULE).stop is False  # 3.0 -> 2.9 is under 10 %: one flat snapshot
    decision = decide(points, REAL_AUC, RULE)
    assert decision.stop and decision.stale == 2
    assert decision.chosen_step == 300  # 200 has a lower distance than 400 but 0.86 < 0.9 - 0.05


def test_a_flat_fd_without_class_fidelity_never_stops_it():
    points = curve((100, 2.0, 0.6), (200, 2.0, 0.6), (300, 2.0, 0.6), (400, 2.0, 0.7))
    decision = decide(points, REAL_AUC, RULE)
    assert not decision.stop and "no snapshot faithful" in decision.reason
    assert decision.chosen_step == 100  # nothing faithful: the lowest distance, the earliest on ties


def test_a_clear_rise_stops_at_once_and_a_flat_or_falling_curve_waits_for_the_patience():
    rule = StopRule(patience=3, min_improvement=0.02, fidelity_tolerance=0.05, rise_stop=1.25)
    # BreastMNIST's profile re-run: best at 600, 1.44x it at 800.
    rising = curve((200, 8.37, 0.79), (400, 4.72, 0.90), (600, 3.93, 0.91), (800, 5.65, 0.92))
    decision = decide(rising, REAL_AUC, rule)
    assert decision.stop and decision.chosen_step == 600 and "1.44x" in decision.reason
    assert not decide(rising, REAL_AUC, StopRule(3, 0.02, 0.05)).stop  # without it: the patience waits
    flat = curve((200, 4.0, 0.9), (400, 4.6, 0.9), (600, 4.4, 0.9))  # under 1.25x: a noisy plateau
    assert not decide(flat, REAL_AUC, rule).stop
    unfaithful = curve((200, 4.0, 0.5), (400, 9.0, 0.6))  # a rise before class fidelity stops nothing
    assert not decide(unfaithful, REAL_AUC, rule).stop


def test_fd_is_the_distance_when_the_floor_is_undefined_and_an_empty_curve_waits():
    rows = [{"step": 1, "fd_ratio": None, "fd": 5.0, "fidelity_auc": 0.95},
            {"step": 2, "fd_ratio": None, "fd": 5.0, "fidelity_auc": 0.95},
            {"step": 3, "fd_ratio": None, "fd": 6.0, "fidelity_auc": 0.95}]
    assert decide(rows, REAL_AUC, RULE).stop and decide(rows, REAL_AUC, RULE).chosen_step == 1
    assert decide([], REAL_AUC, RULE).chosen_step is None and not decide([], REAL_AUC, RULE).stop
    assert not decide(curve((1, 1.0, 0.99)), None, RULE).stop  # no real AUC: nothing is faithful


def test_chunks_end_at_checkpoints_and_never_pass_the_maximum():
    assert [train_diffusion.next_chunk_end(c, 5, 12) for c in (0, 3, 5, 10)] == [5, 5, 10, 12]


def test_auto_keys_stay_out_of_the_checkpoint_config_so_integer_runs_resume_as_before():
    hp = load_params().train_diffusion
    kept = set(hp.model_dump(exclude=train_diffusion.NOT_IN_CHECKPOINT))
    assert not {k for k in kept if k.startswith("auto_")} and "steps" not in kept
    with pytest.raises(ConfigError, match="train_diffusion.steps: must be a positive integer or auto"):
        load_params().with_overrides({"train_diffusion.steps": "soon"})


# ---- the stage, tiny, on the phantom ------------------------------------------------------------

AUTO = {"train_diffusion.steps": "auto", "train_diffusion.checkpoint_every": 2, "train_diffusion.log_every": 2,
        "train_diffusion.auto_max_steps": 8, "train_diffusion.auto_patience": 1, "train_diffusion.auto_samples": 4,
        "train_diffusion.auto_respacing": "2", "train_diffusion.auto_reference_epochs": 1,
        "train_diffusion.preview_respacing": "2"}


@pytest.fixture(scope="module")
def prepared_once(repo_root, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides(AUTO)
    layout = Layout(tmp_path_factory.mktemp("prepared"))
    run_stage("prepare", params, layout)
    mp.undo()
    return params, layout


@pytest.fixture()
def prepared(prepared_once, tmp_path, monkeypatch):
    """A fresh project holding only the prepared phantom."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, source = prepared_once
    layout = Layout(tmp_path)
    shutil.copytree(source.prepared, layout.prepared)
    return params, layout


def scripted_judge(monkeypatch, distances, calls):
    """The judge reads FD / floor from `distances` by step (class fidelity always reached)."""

    def judge(self, step, path):
        calls.append(step)
        assert path.is_file()
        return {"step": step, "fd": distances[step], "fd_ratio": distances[step], "fidelity_auc": 1.0,
                "fidelity_balanced_accuracy": 1.0, "saturated_fraction": 0.0}

    monkeypatch.setattr(train_diffusion.SnapshotJudge, "judge", judge)


def test_the_stage_stops_by_the_rule_keeps_the_chosen_snapshot_and_records_the_curve(prepared, monkeypatch):
    params, layout = prepared
    calls = []
    scripted_judge(monkeypatch, {2: 5.0, 4: 3.0, 6: 3.1, 8: 1.0}, calls)
    metrics = run_stage("train_diffusion", params, layout)
    assert calls == [2, 4, 6]  # 6 did not improve on 4: patience 1 stops before step 8
    assert metrics["steps"] == 6 and metrics["chosen_step"] == 4
    written = json.loads(layout.metrics_file("train_diffusion").read_text())
    assert written["auto"]["stopped_by"] == "rule" and [r["step"] for r in written["auto"]["curve"]] == [2, 4, 6]
    assert "fidelity AUC" in written["auto"]["rule"]
    model = load_checkpoint(layout.diffusion_model, kind="unet")[1]["model"]
    chosen = load_checkpoint(layout.diffusion_snapshots_dir / "step_0000004.pt", kind="unet")[1]["model"]
    assert all(torch.equal(model[k], chosen[k]) for k in chosen)
    client, experiment_id = tracking.connect(layout.root)
    (run,) = [r for r in client.search_runs([experiment_id]) if r.data.tags.get("stage") == "train_diffusion"]
    history = client.get_metric_history(run.info.run_id, "auto.fd_ratio")
    assert sorted((m.step, m.value) for m in history) == [(2, 5.0), (4, 3.0), (6, 3.1)]
    assert run.data.metrics["auto.chosen_step"] == 4 and run.data.tags["auto.stopped_by"].startswith("rule")


def test_a_killed_auto_run_resumes_from_its_checkpoint_and_stops_at_the_maximum(prepared, monkeypatch):
    params, layout = prepared
    calls = []
    scripted_judge(monkeypatch, {2: 8.0, 4: 4.0, 6: 2.0, 8: 1.0}, calls)
    real_judge = train_diffusion.SnapshotJudge.judge

    def killed_at_step_4(self, step, path):
        if step == 4:
            raise KeyboardInterrupt
        return real_judge(self, step, path)

    monkeypatch.setattr(train_diffusion.SnapshotJudge, "judge", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train_diffusion", params, layout)
    monkeypatch.setattr(train_diffusion.SnapshotJudge, "judge", real_judge)
    (layout.diffusion_snapshots_dir / "step_0000004.pt").unlink()  # as if killed before the snapshot was written
    calls.clear()
    metrics = run_stage("train_diffusion", params, layout)
    assert metrics["resumed_from_step"] == 4  # steps 1-4 were not trained again
    assert calls == [2, 4, 6, 8]  # the snapshots it left are judged again, then training goes on
    assert metrics["steps"] == 8 and metrics["chosen_step"] == 8
    assert json.loads(layout.metrics_file("train_diffusion").read_text())["auto"]["stopped_by"] == "auto_max_steps"


def test_a_real_judge_on_a_tiny_model_runs_to_a_decision(prepared):
    params, layout = prepared
    metrics = run_stage("train_diffusion", params.with_overrides({"train_diffusion.auto_max_steps": 4}), layout)
    auto = json.loads(layout.metrics_file("train_diffusion").read_text())["auto"]
    assert [r["step"] for r in auto["curve"]][-1] == metrics["steps"] <= 4
    assert metrics["chosen_step"] in {r["step"] for r in auto["curve"]}
    assert auto["fd_floor"] > 0 and 0 <= auto["real_fidelity_auc"] <= 1
    assert all(r["fd"] is not None and r["fidelity_auc"] is not None for r in auto["curve"])
