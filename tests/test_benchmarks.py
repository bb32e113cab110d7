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
