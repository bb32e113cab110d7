"""`launcher: torchrun` on CPU (gloo, 2 processes): same results as one process, rank 0 alone writes.

One local run of the smoke chain's training and sampling stages is the reference; the same stages
then run with `launcher.kind: torchrun, nproc_per_node: 2` through `run_stage` (the CLI, DVC and
Prefect path) in a second project root that starts from the same prepared data.
"""

import shutil

import numpy as np
import pytest
import torch

from mgdm_core import distributed, tracking
from mgdm_core.config import load_params
from mgdm_core.errors import ConfigError
from mgdm_core.layout import Layout
from mgdm_core.launch import run_stage

# DDP all-reduces the two half-batch gradients (sum then / 2) where one process back-propagates
# the whole batch: the same maths in another float order (gradients agree to ~1e-8 absolute).
# AdamW divides by sqrt(v) + 1e-8, so for the few elements whose gradient is itself ~1e-8 that
# rounding becomes a visible part of one step (at most ~lr); all other weights agree to < 1e-6.
BULK_TOLERANCE = 1e-6  # 99.9% of the weights


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _flat_tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}"))
        return out
    return {}


def _assert_same_weights(a, b, lr):
    ta, tb = _flat_tensors(_weights(a)), _flat_tensors(_weights(b))
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        if not ta[k].is_floating_point():
            assert torch.equal(ta[k], tb[k]), k
    diff = torch.cat([(ta[k].double() - tb[k].double()).abs().flatten() for k in ta if ta[k].is_floating_point()])
    assert float(diff.max()) < lr, float(diff.max())
    assert float(diff.quantile(0.999)) < BULK_TOLERANCE


@pytest.fixture(scope="module")
def roots(repo_root, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    local_root, dist_root = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("torchrun")
    # train_diffusion is left to the local run (its DDP path is the same loop); its model feeds generate.
    base = load_params(repo_root / "params.yaml", "smoke").with_overrides(
        {"train_classifier.steps": 6, "train_classifier.checkpoint_every": 3, "train_classifier.log_every": 3,
         "train_diffusion.steps": 6, "train_diffusion.checkpoint_every": 3, "train_diffusion.log_every": 3,
         "disturb.measure": "entropy"})
    local = Layout(local_root)
    for stage in ("prepare", "train_diffusion", "train_classifier", "generate", "disturb"):
        run_stage(stage, base, local)
    shutil.copytree(local.prepared, Layout(dist_root).prepared)
    params = base.with_overrides({"launcher": {"kind": "torchrun", "nproc_per_node": 2}})
    yield base, params, local, Layout(dist_root)
    mp.undo()


def _stage_runs(root, stage):
    client, experiment_id = tracking.connect(root)
    return client.search_runs([experiment_id], filter_string=f"tags.stage = '{stage}'")


def test_two_process_training_equals_one_process(roots):
    _, params, local, dist = roots
    metrics = run_stage("train_classifier", params, dist)
    assert set(metrics) >= {"final_loss", "val_balanced_accuracy_clean"}
    # The EMA model and the resumable checkpoint (weights, EMA, AdamW state) match the one-process run.
    lr = params.train_classifier.lr
    _assert_same_weights(local.classifier_model, dist.classifier_model, lr)
    _assert_same_weights(local.classifier_dir / "checkpoint.pt", dist.classifier_dir / "checkpoint.pt", lr)
    # Logged losses are the mean over ranks, i.e. the one-process global-batch loss.
    local_curve = local.plot_file("train_classifier.csv").read_text().splitlines()
    dist_curve = dist.plot_file("train_classifier.csv").read_text().splitlines()
    assert local_curve[0] == dist_curve[0] and len(local_curve) == len(dist_curve)
    for a, b in zip(local_curve[1:], dist_curve[1:]):
        assert np.allclose([float(v) for v in a.split(",")], [float(v) for v in b.split(",")], rtol=1e-5)
    # Rank 0 alone wrote: one checkpoint and curve (no temp leftovers), one MLflow run tagged torchrun.
    assert sorted(p.name for p in dist.classifier_dir.iterdir()) == ["checkpoint.pt", "curve.json"]
    runs = _stage_runs(dist.root, "train_classifier")
    assert len(runs) == 1 and runs[0].data.tags["launcher"] == "torchrun"
    assert runs[0].info.status == "FINISHED" and "final_loss" in runs[0].data.metrics


def test_two_process_generate_and_disturb_write_the_same_files(roots):
    _, params, local, dist = roots
    for path in (local.diffusion_model, local.classifier_model):  # the same models on both sides
        (dist.root / path.relative_to(local.root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dist.root / path.relative_to(local.root))
    run_stage("generate", params, dist)
    assert _files(dist.stage1_dir) == _files(local.stage1_dir)  # names and bytes, manifest included
    run_stage("disturb", params, dist)
    local_files, dist_files = _files(local.stage2_dir), _files(dist.stage2_dir)
    assert local_files.keys() == dist_files.keys()
    for name in local_files:
        if name.endswith(".png") or name.endswith(".json"):
            assert local_files[name] == dist_files[name], name
    # Manifest values were gathered from both ranks: equal up to the last printed digit.
    from mgdm_core.io import read_manifest

    a, b = read_manifest(local.stage2_measure_dir("entropy") / "manifest.csv"), read_manifest(dist.stage2_measure_dir("entropy") / "manifest.csv")
    assert [r["file"] for r in a] == [r["file"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("roundtrip_error", "latent_mean", "latent_std", "entropy"):
            assert abs(float(ra[key]) - float(rb[key])) < 1e-4, key
    assert len(_stage_runs(dist.root, "generate")) == 1 and len(_stage_runs(dist.root, "disturb")) == 1


def test_mean_of_equal_slice_losses_has_the_global_mean_gradient():
    """What DDP relies on: averaging the gradients of the rank_slice mean losses = the one-process gradient."""
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)

    def grad(sl):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[sl]), y[sl]).backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    averaged = (grad(slice(0, None, 2)) + grad(slice(1, None, 2))) / 2
    assert torch.allclose(averaged, grad(slice(None)), atol=1e-7, rtol=1e-5)


def test_rank_slice_shard_and_divisibility_are_identities_in_one_process():
    x = torch.arange(6)
    assert distributed.rank_slice(x) is x and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.world_size() == 1 and distributed.is_main()
    distributed.check_divisible(7, "batch_size")  # one process divides everything


def test_launcher_section_is_validated(tmp_path, repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.launcher.kind == "local"
    with pytest.raises(ConfigError, match="launcher"):
        params.with_overrides({"launcher": {"kind": "mpirun", "nproc_per_node": 2}})
    with pytest.raises(ConfigError, match="launcher"):
        params.with_overrides({"launcher": {"kind": "torchrun", "nproc_per_node": 0}})


def test_torchrun_command_is_an_argument_list():
    cmd = distributed.torchrun_command(4, "mgdm_core.launch", ["generate", "--root", "/x y"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert cmd[-1] == "/x y"
