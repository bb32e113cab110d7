"""The six stages on the smoke profile, in process, in a temporary project: their data contracts."""

import json
import os
import shutil

import numpy as np
import pytest

from mgdm_core import tracking
from mgdm_core.config import load_params
from mgdm_core.io import MANIFEST_COLUMNS, read_image, read_manifest
from mgdm_core.layout import Layout
from mgdm_core.launch import run_stage
from mgdm_core.stages import STAGES


@pytest.fixture(scope="module")
def smoke(repo_root, tmp_path_factory):
    """Run the whole chain once under one MLflow parent run; the tests read what it left."""
    root = tmp_path_factory.mktemp("project")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The round trip checks 4 of the 6 stage-1 images: the sampled path, not the every-image one.
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides({"disturb.round_trip_images": 4})
    layout = Layout(root)
    parent = tracking.open_pipeline_run(root, "pipeline", {"dataset": "phantom"})
    metrics = {name: run_stage(name, params, layout, parent_run_id=parent.run_id) for name in STAGES}
    parent.finish()
    yield params, layout, metrics, parent.run_id
    mp.undo()


def test_prepare_writes_uint8_splits_and_class_names(smoke):
    params, layout, metrics, _ = smoke
    meta = json.loads(layout.classes_file.read_text())
    assert meta["class_names"] == ["benign", "malignant"]
    for split in ("train", "val", "test"):
        with np.load(layout.split_file(split)) as arrays:
            images, labels = arrays["images"], arrays["labels"]
        size = params.data.image_size
        assert images.dtype == np.uint8 and images.shape[1:] == (size, size, params.data.channels)
        assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1}
    total = sum(metrics["prepare"][f"{s}_images"] for s in ("train", "val", "test"))
    assert total == sum(params.data.phantom_counts)


def test_training_stages_write_loadable_models_and_curves(smoke):
    _, layout, metrics, _ = smoke
    assert layout.diffusion_model.is_file() and layout.classifier_model.is_file()
    assert (layout.diffusion_dir / "checkpoint.pt").is_file()
    assert np.isfinite(metrics["train_diffusion"]["final_loss"])
    curve = layout.plot_file("train_diffusion.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) > 2
    assert any(k.startswith("val_balanced_accuracy_t") for k in metrics["train_classifier"])


def test_generate_writes_the_requested_count_per_class_with_a_manifest(smoke):
    params, layout, metrics, _ = smoke
    rows = read_manifest(layout.stage1_dir / "manifest.csv")
    assert tuple(rows[0])[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS
    for label, count in enumerate(params.generate.counts):
        mine = [r for r in rows if int(r["label"]) == label]
        assert len(mine) == count
        for r in mine:
            image = read_image(layout.stage1_dir / r["file"])
            assert image.shape == (params.data.image_size, params.data.image_size, 1)
            assert r["file"].startswith(f"{r['class']}/")  # the original's <class>/<name>.png layout
            assert 0.0 < float(r["confidence"]) <= 1.0 and float(r["entropy"]) >= 0.0
    assert len({r["seed"] for r in rows}) == len(rows)


def test_the_round_trip_checks_a_sample_spread_over_the_manifest_or_every_image():
    from mgdm_core.stages.disturb import round_trip_indices

    assert round_trip_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    assert round_trip_indices(5, 64).tolist() == [0, 1, 2, 3, 4]
    sample = round_trip_indices(320, 64)
    assert len(sample) == 64 and sample[0] == 0 and sample[-1] == 319
    assert (sample[:32] < 160).all() and (sample[32:] >= 160).all()  # half from each half: both classes


def test_a_round_trip_above_the_tolerance_warns_and_names_the_keys_that_shrink_it():
    from mgdm_core.config import DisturbParams
    from mgdm_core.stages.disturb import round_trip_warning

    d = DisturbParams(respacing="ddim10", inversion_refine=3, round_trip_tolerance=0.01)
    message = round_trip_warning(0.0135, d)
    assert "0.0135" in message and "ddim10" in message
    assert "disturb.inversion_refine" in message and "disturb.round_trip_tolerance" in message
    assert round_trip_warning(0.0076, d) is None
    assert round_trip_warning(0.5, d.model_copy(update={"round_trip_tolerance": None})) is None  # null: never warn
    assert round_trip_warning(float("nan"), d) is None  # no image checked on this rank


def test_the_first_decode_setting_within_the_tolerance_is_chosen_and_none_after_it_is_tried():
    from mgdm_core.stages.disturb import first_within_tolerance

    errors = {"ddim10": 0.0123, "ddim15": 0.0081, "ddim20": 0.0062}
    tried = []

    def error(setting):
        tried.append(setting)
        return errors[setting]

    assert first_within_tolerance(list(errors), error, 0.01) == (1, [0.0123, 0.0081])
    assert tried == ["ddim10", "ddim15"]  # ddim20 is never run
    assert first_within_tolerance(list(errors), errors.get, None) == (0, [0.0123])  # a fixed setting
    assert first_within_tolerance(list(errors), errors.get, 0.001) == (2, [0.0123, 0.0081, 0.0062])  # none passes: the last
    with pytest.raises(ValueError):
        first_within_tolerance([], errors.get, 0.01)


def test_auto_respacing_keeps_the_cheapest_setting_whose_round_trip_passes_and_records_the_ones_tried(
    smoke, tmp_path, caplog
):
    import logging

    from mgdm_core.stages import disturb
    from mgdm_core.tracking import NullTracker

    params, layout, _, _ = smoke
    root = tmp_path / "project"
    for part in ("data", "models", "synthetic"):
        if (layout.root / part).exists():
            shutil.copytree(layout.root / part, root / part)
    copy = Layout(root)
    candidates = [{"respacing": "ddim3", "inversion_refine": 0}, {"respacing": "ddim5", "inversion_refine": 2}]
    auto = params.with_overrides({"disturb.measure": "entropy", "disturb.respacing": "auto",
                                  "disturb.auto_candidates": candidates, "disturb.round_trip_tolerance": 10.0})
    easy = disturb.run(auto, copy, NullTracker())
    assert easy["decode_settings_tried"] == 1 and easy["decode_steps"] == 3 and easy["inversion_refine"] == 0
    assert easy["auto_roundtrip_error_ddim3_refine0"] == pytest.approx(easy["roundtrip_error_mean"])
    assert "auto_roundtrip_error_ddim5_refine2" not in easy  # never tried
    easy_images = {p.name: read_image(p) for p in copy.stage2_measure_dir("entropy").rglob("*.png")}

    strict = auto.with_overrides({"disturb.round_trip_tolerance": 1e-9})
    with caplog.at_level(logging.WARNING, logger="mgdm"):
        hard = disturb.run(strict, copy, NullTracker())
    assert hard["decode_settings_tried"] == 2 and hard["decode_steps"] == 5 and hard["inversion_refine"] == 2
    assert hard["roundtrip_error_mean"] == pytest.approx(hard["auto_roundtrip_error_ddim5_refine2"])
    assert hard["roundtrip_error_mean"] < hard["auto_roundtrip_error_ddim3_refine0"]  # more steps, refined: closer
    assert "no entry of disturb.auto_candidates passed" in caplog.text
    # The stage-2 images were decoded again at the setting chosen, not kept from the easier run.
    hard_images = {p.name: read_image(p) for p in copy.stage2_measure_dir("entropy").rglob("*.png")}
    assert hard_images.keys() == easy_images.keys() and len(hard_images) == hard["images"]
    assert any(not np.array_equal(hard_images[k], easy_images[k]) for k in hard_images)


def test_disturb_writes_one_set_per_measure_pointing_at_its_sources(smoke):
    params, layout, metrics, _ = smoke
    stage1 = read_manifest(layout.stage1_dir / "manifest.csv")
    for measure in params.disturb.measures:
        rows = read_manifest(layout.stage2_measure_dir(measure) / "manifest.csv")
        assert len(rows) == len(stage1)
        assert {r["guidance"] for r in rows} == {measure}
        assert {r["source"] for r in rows} == {f"stage1/{r['file']}" for r in stage1}
        checked = [k for k, r in enumerate(rows) if r["roundtrip_error"]]
        assert checked == [0, 2, 3, 5]  # 4 of 6, evenly spread, the first and the last among them
        assert all(np.isfinite(float(rows[k]["roundtrip_error"])) for k in checked)
    assert metrics["disturb"]["roundtrip_images"] == 4
    assert metrics["disturb"]["latent_std_mean"] > 0


def test_evaluate_writes_summary_report_and_plot(smoke):
    params, layout, metrics, _ = smoke
    summary = json.loads(layout.metrics_file("evaluate").read_text())
    conditions = summary["networks"]["simple_cnn"]
    expected = {"real", "real+stage1"} | {f"real+stage2:{m}" for m in params.disturb.measures}
    assert set(conditions) == expected
    assert conditions["real"]["vs_baseline"] is None
    assert "auc" in conditions["real+stage1"]["vs_baseline"]
    assert "simple_cnn" in (layout.reports_dir / "evaluate.md").read_text()
    assert layout.plot_file("evaluate.png").stat().st_size > 0


def test_every_stage_writes_its_metrics_file(smoke):
    _, layout, _, _ = smoke
    for name in STAGES:
        assert json.loads(layout.metrics_file(name).read_text())


def test_evaluate_and_quality_write_the_headline_rows_dvc_shows(smoke):
    params, layout, _, _ = smoke
    rows = {str(p.relative_to(layout.headline_dir("evaluate"))): json.loads(p.read_text())
            for p in layout.headline_dir("evaluate").rglob("*.json")}
    conditions = ["real", "real+stage1", *(f"real+stage2-{m}" for m in params.disturb.measures)]
    assert sorted(rows) == sorted(f"simple_cnn/{c}.json" for c in conditions)
    assert set(rows["simple_cnn/real.json"]) == {"auc", "acc"}
    assert set(rows["simple_cnn/real+stage1.json"]) == {"auc", "acc", "d_auc", "d_lo", "d_hi"}
    assert rows["simple_cnn/real+stage1.json"]["d_lo"] <= rows["simple_cnn/real+stage1.json"]["d_hi"]
    quality = {p.name: json.loads(p.read_text()) for p in layout.headline_dir("quality").glob("*.json")}
    assert {"stage1.json", *(f"stage2-{m}.json" for m in params.disturb.measures)} <= set(quality)
    assert all(set(row) <= {"fd_ratio", "fidelity"} and row for row in quality.values())


def test_mlflow_holds_one_child_run_per_stage_and_one_per_evaluation_unit(smoke):
    params, layout, _, parent_id = smoke
    client, experiment_id = tracking.connect(layout.root)
    runs = client.search_runs([experiment_id], max_results=500)
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["stage"] for r in stage_runs) == sorted(STAGES)
    assert all(r.info.status == "FINISHED" for r in stage_runs)
    evaluate_id = next(r.info.run_id for r in stage_runs if r.data.tags["stage"] == "evaluate")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate_id]
    units = [r for r in children if r.data.tags.get("kind") == "unit"]
    summaries = [r for r in children if r.data.tags.get("kind") == "summary"]
    n_conditions = 2 + len(params.disturb.measures)
    assert len(units) == len(params.evaluate.networks) * n_conditions * len(params.evaluate.seeds)
    # One summary run per (network, condition), beside the unit runs.
    assert len(summaries) == len(params.evaluate.networks) * n_conditions
    assert len(children) == len(units) + len(summaries)
    assert {"network", "condition", "seed", "dataset"} <= set(units[0].data.tags)
    assert "auc" in units[0].data.metrics


def test_quality_judges_every_set_and_the_snapshots_train_diffusion_saved(smoke):
    params, layout, metrics, parent_id = smoke
    quality = json.loads(layout.metrics_file("quality").read_text())
    for row in [quality["stage1"], *(quality["stage2"][m] for m in params.disturb.measures)]:
        for key in ("fidelity_auc", "cas_auc", "fd_ratio", "saturated_fraction"):
            assert 0 <= row[key] < float("inf"), key
    assert 0 <= quality["real"]["cas_auc"] <= 1 and quality["real"]["fd_floor"] > 0
    # One row per EMA snapshot of the smoke run (it has fewer than by_step_max_snapshots).
    snapshots = sorted(layout.diffusion_snapshots_dir.glob("step_*.pt"))
    steps = [row["step"] for row in quality["by_step"]["rows"]]
    assert snapshots and steps == [int(p.stem.removeprefix("step_")) for p in snapshots]
    assert quality["by_step"]["last"]["step"] == steps[-1] <= params.train_diffusion.steps
    assert layout.plot_file("quality_by_step.csv").read_text().count("\n") == 1 + len(steps)
    client, experiment_id = tracking.connect(layout.root)
    run = next(r for r in client.search_runs([experiment_id], max_results=500)
               if r.data.tags.get("mlflow.parentRunId") == parent_id and r.data.tags["stage"] == "quality")
    history = client.get_metric_history(run.info.run_id, "by_step.fd_ratio")
    assert sorted(m.step for m in history) == steps


def test_generate_rerun_fills_in_only_missing_images(smoke):
    params, layout, _, _ = smoke
    rows = read_manifest(layout.stage1_dir / "manifest.csv")
    kept, removed = layout.stage1_dir / rows[0]["file"], layout.stage1_dir / rows[1]["file"]
    kept_bytes, removed_bytes = kept.read_bytes(), removed.read_bytes()
    kept_mtime = kept.stat().st_mtime_ns
    removed.unlink()
    run_stage("generate", params, layout)
    assert kept.stat().st_mtime_ns == kept_mtime and kept.read_bytes() == kept_bytes
    # The image is regenerated from its own seed: identical to the one deleted.
    assert removed.read_bytes() == removed_bytes


def test_generate_with_other_parameters_replaces_earlier_outputs(smoke):
    params, layout, _, _ = smoke
    changed = params.with_overrides({"generate.counts": [2, 1]})
    run_stage("generate", changed, layout)
    rows = read_manifest(layout.stage1_dir / "manifest.csv")
    assert len(rows) == 3
    pngs = sorted(p for p in layout.stage1_dir.rglob("*.png"))
    assert len(pngs) == 3


def test_dropping_a_measure_removes_its_set_and_later_stages_read_only_the_named_ones(smoke):
    import shutil

    from mgdm_core.errors import ConfigError, DataError
    from mgdm_core.stages import evaluate, quality
    from mgdm_core.stages.common import load_prepared

    params, layout, _, _ = smoke
    assert set(params.disturb.measures) == {"entropy", "margin"} and layout.stage2_measure_dir("margin").is_dir()
    only_entropy = params.with_overrides({"disturb.measure": "entropy"})
    run_stage("disturb", only_entropy, layout)
    assert sorted(p.name for p in layout.stage2_dir.iterdir()) == ["entropy"]
    assert not layout.plot_file("disturb_margin_pairs.png").exists()

    # A stage-2 folder on disk that disturb.measure does not name is never read downstream.
    shutil.copytree(layout.stage2_measure_dir("entropy"), layout.stage2_measure_dir("margin"))
    assert {u.condition for u in evaluate.plan(only_entropy, layout)} == {"real", "real+stage1", "real+stage2:entropy"}
    data = load_prepared(layout)
    sets = quality.load_sets(layout, data.images, data.labels, data.num_classes, only_entropy.disturb.measures)
    assert [s.name for s in sets] == ["real_val", "real_test", "stage1", "stage2_entropy"]
    # Asking for a measure disturb did not produce is an error, not a silent read of old files.
    with pytest.raises(ConfigError, match="disturb.measure"):
        evaluate.plan(only_entropy.with_overrides({"evaluate.conditions": ["real", "real+stage2:margin"]}), layout)
    with pytest.raises(DataError, match="least_confidence"):
        quality.load_sets(layout, data.images, data.labels, data.num_classes, ("least_confidence",))


def test_a_killed_evaluation_resumes_with_only_the_missing_units_and_the_same_results(smoke, monkeypatch):
    from mgdm_core.stages import evaluate

    params, layout, _, _ = smoke
    grid = params.with_overrides({"evaluate.networks": ["simple_cnn"], "evaluate.conditions": ["real", "real+stage1"],
                                  "evaluate.seeds": [0, 1], "evaluate.epochs": 1, "evaluate.workers": 1})
    trained = []
    real_run_unit = evaluate.run_unit

    def killed_at_the_third_unit(unit, *args, **kwargs):
        if len(trained) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill of `dvc repro` does mid-grid
        trained.append(unit)
        return real_run_unit(unit, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_unit", killed_at_the_third_unit)
    shutil.rmtree(layout.root / ".mgdm" / "evaluate-units")  # the smoke run's units would serve two of these
    with pytest.raises(KeyboardInterrupt):
        run_stage("evaluate", grid, layout)
    assert len(list((layout.root / ".mgdm" / "evaluate-units").glob("*.pt"))) == 2

    trained.clear()
    monkeypatch.setattr(evaluate, "run_unit", lambda unit, *a, **k: trained.append(unit) or real_run_unit(unit, *a, **k))
    run_stage("evaluate", grid, layout)
    assert trained == evaluate.plan(grid, layout)[2:]  # the two finished units were not trained again
    # A completed run keeps its units for the next run on the same inputs.
    assert len(list((layout.root / ".mgdm" / "evaluate-units").glob("*.pt"))) == 4
    resumed = json.loads(layout.metrics_file("evaluate").read_text())

    trained.clear()
    shutil.rmtree(layout.root / ".mgdm" / "evaluate-units")
    run_stage("evaluate", grid, layout)  # from scratch: same units, same numbers
    assert len(trained) == 4
    assert json.loads(layout.metrics_file("evaluate").read_text())["networks"] == resumed["networks"]


def test_an_evaluation_resumes_only_units_whose_inputs_are_unchanged(smoke):
    from mgdm_core.stages import evaluate

    params, layout, _, _ = smoke
    units = evaluate.plan(params, layout)
    keys = evaluate.unit_keys(units, params, layout)
    assert len(set(keys.values())) == len(units)
    assert evaluate.unit_keys(units, params.with_overrides({"evaluate.workers": 3}), layout) == keys
    other_epochs = evaluate.unit_keys(units, params.with_overrides({"evaluate.epochs": params.evaluate.epochs + 1}), layout)
    assert not set(other_epochs.values()) & set(keys.values())
    stage1 = layout.stage1_dir / "manifest.csv"
    stage1.write_bytes(stage1.read_bytes())  # rewritten, same bytes: same set
    assert evaluate.unit_keys(units, params, layout) == keys
    image = next(layout.stage1_dir.rglob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")  # a changed stage-1 image: those units start over
    changed = evaluate.unit_keys(units, params, layout)
    uses_stage1 = {u for u in units if u.condition in ("real+stage1", "synthetic")}
    assert uses_stage1 and all((changed[u] == keys[u]) == (u not in uses_stage1) for u in units)


# ---- the evaluate unit cache across experiments ---------------------------------------------------


def _write_stage1(layout, scale: float, changed: bool) -> None:
    """A stand-in stage-1 set (3 training images per class, as `generate` would list them); with
    `changed`, one image differs, as a set generated at another scale would."""
    from mgdm_core.io import write_manifest, write_png
    from mgdm_core.stages.common import load_prepared

    data = load_prepared(layout)
    rows = []
    for label, name in enumerate(data.class_names):
        for i, index in enumerate(np.flatnonzero(data.labels["train"] == label)[:3]):
            image = data.images["train"][index].copy()
            if changed and label == 0 and i == 0:
                image = 255 - image
            file = f"{name}/{i:05d}.png"
            write_png(layout.stage1_dir / file, image)
            rows.append({"file": file, "class": name, "label": label, "source": "", "guidance": "classifier",
                         "scale": scale, "seed": i, "confidence": "", "entropy": ""})
    write_manifest(layout.stage1_dir / "manifest.csv", rows)


def test_a_later_experiment_that_changes_only_the_generator_retrains_only_the_units_that_read_its_images(
        repo_root, tmp_path, monkeypatch):
    from mgdm_core.stages import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = Layout(tmp_path)
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides({
        "evaluate.networks": ["simple_cnn"], "evaluate.conditions": ["real", "real+classic", "real+stage1"],
        "evaluate.seeds": [0], "evaluate.epochs": 1, "evaluate.workers": 1})
    run_stage("prepare", params, layout)
    _write_stage1(layout, params.generate.scale, changed=False)
    trained = []
    real_run_unit = evaluate.run_unit
    monkeypatch.setattr(evaluate, "run_unit", lambda unit, *a, **k: trained.append(unit.condition) or real_run_unit(unit, *a, **k))

    run_stage("evaluate", params, layout)
    assert trained == ["real", "real+classic", "real+stage1"]
    first = json.loads(layout.metrics_file("evaluate").read_text())["networks"]["simple_cnn"]

    # Another experiment: a new guidance scale, so `generate` made another stage-1 set.
    other = params.with_overrides({"generate.scale": params.generate.scale + 1.0})
    _write_stage1(layout, other.generate.scale, changed=True)
    trained.clear()
    run_stage("evaluate", other, layout)
    assert trained == ["real+stage1"]
    second = json.loads(layout.metrics_file("evaluate").read_text())["networks"]["simple_cnn"]
    assert second["real"] == first["real"] and second["real+classic"] == first["real+classic"]

    # Both experiments' units stay cached: going back to the first set trains nothing.
    _write_stage1(layout, params.generate.scale, changed=False)
    trained.clear()
    run_stage("evaluate", params, layout)
    assert trained == []
    assert json.loads(layout.metrics_file("evaluate").read_text())["networks"]["simple_cnn"] == first


def test_the_unit_keys_leave_out_the_grid_and_what_does_not_shape_a_unit(smoke):
    from mgdm_core.stages import evaluate

    params, layout, _, _ = smoke
    units = evaluate.plan(params, layout)
    keys = evaluate.unit_keys(units, params, layout)
    for change in ({"evaluate.seeds": [0, 5]}, {"evaluate.log_models": "none"}, {"evaluate.unit_cache_days": 1},
                   {"generate.scale": 7.0}, {"disturb.scale": 9.0}, {"generator_seed": 3}):
        assert evaluate.unit_keys(units, params.with_overrides(change), layout) == keys, change
    ratio = evaluate.unit_keys(units, params.with_overrides({"evaluate.synthetic_ratio": 2.0}), layout)
    assert {u.condition for u in units if ratio[u] == keys[u]} == {"real"}


def test_the_unit_cache_drops_only_units_unused_for_longer_than_its_limit(tmp_path):
    from mgdm_core.stages.evaluate import prune_unit_cache

    now = 1_000_000_000.0
    ages = {"used_old.pt": 90, "unused_old.pt": 31, "unused_recent.pt": 29}
    for name, days in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - days * 86400, now - days * 86400))
    removed = prune_unit_cache(tmp_path, {tmp_path / "used_old.pt"}, 30, now=now)
    assert removed == [tmp_path / "unused_old.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unused_recent.pt", "used_old.pt"]
    assert prune_unit_cache(tmp_path, {tmp_path / "used_old.pt"}, 0, now=now) == [tmp_path / "unused_recent.pt"]
    assert prune_unit_cache(tmp_path / "absent", set(), 0) == []


def test_generator_seed_reseeds_the_generator_stages_only():
    """G experiments differing only in generator_seed: G generators on one data split, with one
    set of evaluate seeds (so the real units are shared); null keeps everything on `seed`."""
    from mgdm_core.config import Params
    from mgdm_core.stages import stage_module

    assert Params(seed=4).generator_seed_value == 4
    assert Params(seed=4, generator_seed=9).generator_seed_value == 9
    generator = {"train_diffusion", "train_classifier", "generate", "disturb"}
    for stage in ("prepare", *generator, "quality", "evaluate"):
        assert ("generator_seed" in stage_module(stage).READS) == (stage in generator), stage
