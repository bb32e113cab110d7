"""dvc.yaml mirrors the code: each stage's params are its READS, its command calls the CLI,
and its outputs are the paths of `Layout`."""

import yaml

from mgdm_core.layout import Layout
from mgdm_core.stages import STAGES, stage_module


def load_dvc(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_has_every_stage_in_order(repo_root):
    assert tuple(load_dvc(repo_root)) == STAGES


def test_each_stage_command_only_calls_the_cli(repo_root):
    for name, stage in load_dvc(repo_root).items():
        assert stage["cmd"] == f"python -m mgdm_core {name}"


def test_each_stage_declares_exactly_the_params_it_reads(repo_root):
    for name, stage in load_dvc(repo_root).items():
        assert tuple(stage["params"]) == stage_module(name).READS, name


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def test_outputs_are_layout_paths(repo_root, tmp_path):
    layout = Layout(tmp_path)
    stages = load_dvc(repo_root)
    expected = {
        "prepare": [layout.prepared],
        "train_diffusion": [layout.diffusion_dir, layout.diffusion_model],
        "train_classifier": [layout.classifier_dir, layout.classifier_model],
        "generate": [layout.stage1_dir],
        "disturb": [layout.stage2_dir],
        "quality": [layout.reports_dir / "quality.md", layout.reports_dir / "quality_images.csv"],
        "evaluate": [layout.reports_dir / "evaluate.md"],
    }
    for name, paths in expected.items():
        # Every stage's detailed metrics file is an output, not a DVC metric.
        assert _paths(stages[name]["outs"]) == [layout.relative(p) for p in [*paths, layout.metrics_file(name)]], name


def test_only_the_headline_rows_are_dvc_metrics(repo_root, tmp_path):
    """`dvc metrics show` / `dvc exp show` see the small per-row files of evaluate and quality only."""
    layout = Layout(tmp_path)
    metrics = {name: _paths(stage.get("metrics", [])) for name, stage in load_dvc(repo_root).items()}
    assert metrics == {name: [layout.relative(layout.headline_dir(name))] if name in ("evaluate", "quality") else []
                       for name in metrics}


def test_checkpoint_directories_persist_and_metrics_are_not_cached(repo_root):
    stages = load_dvc(repo_root)
    for name in ("train_diffusion", "train_classifier"):
        checkpoint_dir = stages[name]["outs"][0]
        assert next(iter(checkpoint_dir.values()))["persist"] is True
    for name, stage in stages.items():
        for entry in [*stage.get("metrics", []), stage["outs"][-1]]:
            assert next(iter(entry)).startswith("metrics/") and next(iter(entry.values()))["cache"] is False, name
