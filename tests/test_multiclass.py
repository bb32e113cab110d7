"""The whole chain on 64 px RGB data with 5 classes (the phantom), at smoke size, in a temporary project.

Everything so far defaults to 28 px grey two-class data; this runs prepare -> ... -> evaluate on
another shape of data with `generate.mode: balance` and network sizes for 64 px, and checks each
stage's contract for K = 5.
"""

import json
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

pytestmark = pytest.mark.slow  # about 5 CPU-minutes: 64 px networks through all seven stages

from mgdm_core import tracking
from mgdm_core.config import load_params
from mgdm_core.device import resolve_device
from mgdm_core.evaluation.train import predict_probs
from mgdm_core.io import read_image, read_manifest
from mgdm_core.launch import run_stage
from mgdm_core.layout import Layout
from mgdm_core.stages import STAGES

K = 5
SIZE = 64

OVERRIDES = {
    "data.image_size": SIZE,
    "data.channels": 3,
    "data.phantom_counts": [16, 13, 11, 10, 10],
    "data.val_fraction": 0.2,
    "data.test_fraction": 0.2,
    # Three levels 64 -> 32 -> 16, attention only at 16 px: the smallest network that still
    # goes through every kind of block at 64 px.
    "diffusion.width": 32,
    "diffusion.channel_mult": [1, 1, 2],
    "diffusion.attention_resolutions": [16],
    "classifier.width": 32,
    "classifier.channel_mult": [1, 1, 2],
    "classifier.attention_resolutions": [16],
    "generate.mode": "balance",
    "train_diffusion.steps": 6,
    "train_classifier.steps": 6,
}


@pytest.fixture(scope="module")
def chain(repo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(repo_root / "params.yaml", "smoke").with_overrides(OVERRIDES)
    layout = Layout(root)
    parent = tracking.open_pipeline_run(root, "pipeline", {"dataset": "phantom"})
    metrics = {name: run_stage(name, params, layout, parent_run_id=parent.run_id) for name in STAGES}
    parent.finish()
    yield params, layout, metrics
    mp.undo()


def test_prepare_keeps_five_classes_of_64px_rgb(chain):
    _, layout, metrics = chain
    meta = json.loads(layout.classes_file.read_text())
    assert len(meta["class_names"]) == K and metrics["prepare"]["num_classes"] == K
    for split in ("train", "val", "test"):
        with np.load(layout.split_file(split)) as arrays:
            assert arrays["images"].shape[1:] == (SIZE, SIZE, 3)
            assert np.bincount(arrays["labels"], minlength=K).min() >= 1  # every class in every split


def test_generate_balance_fills_every_class_up_to_the_largest(chain):
    _, layout, metrics = chain
    with np.load(layout.split_file("train")) as arrays:
        real = np.bincount(arrays["labels"], minlength=K)
    rows = read_manifest(layout.stage1_dir / "manifest.csv")
    made = np.bincount([int(r["label"]) for r in rows], minlength=K)
    assert (real + made == real.max()).all()
    assert made.sum() == metrics["generate"]["images"] > 0
    assert read_image(layout.stage1_dir / rows[0]["file"]).shape == (SIZE, SIZE, 3)


def test_disturb_decodes_every_stage1_image_per_measure(chain):
    params, layout, metrics = chain
    stage1 = read_manifest(layout.stage1_dir / "manifest.csv")
    for measure in params.disturb.measures:
        rows = read_manifest(layout.stage2_measure_dir(measure) / "manifest.csv")
        assert len(rows) == len(stage1)
        assert all(np.isfinite(float(r["roundtrip_error"])) for r in rows)


def test_evaluate_reports_macro_auc_accuracy_and_per_class_recall_for_five_classes(chain):
    params, layout, _ = chain
    evaluate = json.loads(layout.metrics_file("evaluate").read_text())
    assert len(evaluate["class_names"]) == K
    conditions = evaluate["networks"]["simple_cnn"]
    # real+stage2 runs once per disturb measure (real+stage2:<measure>)
    assert {c.partition(":")[0] for c in conditions} == set(params.evaluate.conditions)
    for condition in conditions:
        metrics = conditions[condition]["metrics"]
        assert 0.0 <= metrics["auc"]["mean"] <= 1.0 and 0.0 <= metrics["accuracy"]["mean"] <= 1.0
        assert [f"recall_{k}" in metrics for k in range(K)] == [True] * K


def _logged_unit_models(layout):
    """(network, condition) -> (unit run, MLflow model URI) of each classifier evaluate logged."""
    client, experiment_id = tracking.connect(layout.root)
    models = {}
    for model in client.search_logged_models([experiment_id]):
        run = client.get_run(model.source_run_id)
        if run.data.tags.get("stage") == "evaluate" and run.data.tags.get("kind") == "unit":
            models[(run.data.tags["network"], run.data.tags["condition"])] = (run, model.artifact_location)
    return models


def test_evaluate_auc_is_sklearns_macro_one_vs_rest_auc_of_the_logged_classifiers(chain, monkeypatch):
    """The stage keeps no test probabilities (unit results are dropped once summarised), but it
    logs each (network, condition)'s classifier as an MLflow model (`log_models: best`; with one
    seed, that unit's). Its probabilities on the prepared test set give scikit-learn's macro
    one-vs-rest AUC, which must be the AUC the unit logged and evaluate.json reports."""
    import mlflow.pytorch

    params, layout, _ = chain
    assert params.evaluate.log_models == "best" and params.evaluate.seeds_for("simple_cnn") == (0,)
    evaluate = json.loads(layout.metrics_file("evaluate").read_text())
    with np.load(layout.split_file("test")) as arrays:
        images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).contiguous()  # uint8 [N,C,H,W]
        labels = arrays["labels"]
    models = _logged_unit_models(layout)
    conditions = evaluate["networks"]["simple_cnn"]
    assert set(models) == {("simple_cnn", c) for c in conditions}
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code directory
    device = resolve_device(params.device)  # where the units ran (bf16 on CUDA): the same probabilities
    for (_, condition), (run, uri) in models.items():
        probs = predict_probs(mlflow.pytorch.load_model(uri).to(device), images, device)
        assert probs.shape == (len(labels), K)
        expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
        assert run.data.metrics["auc"] == pytest.approx(expected, abs=1e-12), condition
        assert conditions[condition]["metrics"]["auc"]["mean"] == pytest.approx(expected, abs=1e-12), condition


def test_sample_grids_have_one_row_per_class(chain):
    _, layout, _ = chain
    from PIL import Image

    grid = Image.open(layout.plot_file("generate_samples.png"))
    # 8 square-ish cells per row: K = 5 rows make the figure ~0.7 as high as wide, 2 rows ~0.3.
    assert grid.height > 0.5 * grid.width
