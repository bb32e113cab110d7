"""benchmarks/bench_core.py times the product's own settings: the model calls it makes are the stages'."""

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

BENCH_CORE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_core", BENCH_CORE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Bench(torch.device("cpu"), contextlib.nullcontext, channels_last=False)


def unet_calls(bench, run) -> int:
    calls = []
    handle = bench.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def test_stage1_ddpm_makes_one_unet_call_per_step(bench):
    assert unet_calls(bench, bench.sampler("3", "stage1_classifier", "ddpm")) == 3


def test_stage2_as_the_disturb_stage_runs_it_counts_refinement_and_round_trip(bench):
    # ddim2 with refinement 2: 2 x (1 + 2) inversion calls, 2 for the round trip, 2 for the guided decode.
    product = bench.sampler("ddim2", "stage2_entropy", inversion_refine=2, round_trip=True)
    assert unet_calls(bench, product) == 2 * 3 + 2 + 2


def test_stage2_reference_configuration_is_plain_inversion_and_one_decode(bench):
    assert unet_calls(bench, bench.sampler("ddim2", "stage2_entropy")) == 2 + 2


def test_judge_noise_repeat_zero_is_the_rules_own_seed_set_and_repeats_share_no_seed():
    from types import SimpleNamespace

    from mgdm_core.stages.common import seed_for

    spec = importlib.util.spec_from_file_location("judge_noise", BENCH_CORE.parent / "judge_noise.py")
    judge_noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(judge_noise)
    labels = [0, 1, 0, 1]
    rule_seeds = [seed_for(7000, y, i) for i, y in enumerate(labels)]  # as SnapshotJudge draws them
    judge = SimpleNamespace(labels=labels, seeds=list(rule_seeds))
    seen = []
    for repeat in range(3):
        judge_noise.reseed(judge, 7000, repeat)
        seen.append(list(judge.seeds))
    assert seen[0] == rule_seeds
    assert len({s for seeds in seen for s in seeds}) == 3 * len(labels)
