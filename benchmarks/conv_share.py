"""How much of each bench_core figure is convolution: the bound on what any other speed-up can give.

Profiles each workload of `bench_core.py` at the reference configuration (same networks, batch,
layouts and process settings) with torch.profiler and splits its CPU time into oneDNN
convolutions (forward and backward) and everything else. If everything else cost nothing, a
figure would run 1 / share faster than now; against the original release, whose convolutions
are the same oneDNN calls at the same FLOPs, the ratio could at most reach
(today's ratio) / share. The profiler's per-op overhead falls on the many small ops, so the share
is if anything understated and the bounds overstated. Sampling figures are profiled over one
5-step run, training over 3 steps.

    python benchmarks/conv_share.py [--only NAMES] [--ratios r1,r2,r3,r4,r5] [--threads N]

`--ratios` takes today's `compare.sh` ratios (in the order of bench_core.FIGURES) and adds the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import FIGURES, Bench  # noqa: E402

from mgdm_core import runtime  # noqa: E402

CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::slow_conv2d_forward")


def profile_share(run, steps: int) -> tuple[float, float]:
    """(convolution seconds, total seconds) of `steps` calls of `run`, after one unprofiled call."""
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    convolution = sum(event.self_cpu_time_total for event in events if event.key in CONVOLUTION_OPS) / 1e6
    return convolution, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(FIGURES), help="comma-separated figures")
    parser.add_argument("--ratios", help="today's compare.sh ratios, comma-separated, in bench_core's figure order")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime.configure_process(threads=args.threads, malloc=True)
    ratios = dict(zip(FIGURES, (float(r) for r in args.ratios.split(",")))) if args.ratios else {}
    print("| figure | convolution share of CPU time | bound from removing everything else | bound on the ratio to the original |")
    print("| --- | ---: | ---: | ---: |")
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        bench = Bench(torch.device("cpu"), contextlib.nullcontext, channels_last=False)  # fresh: sampling converts the UNet
        if name in ("train_diffusion", "train_classifier"):
            convolution, total = profile_share(getattr(bench, name), steps=3)
        else:
            convolution, total = profile_share(bench.sampler("ddim5", name), steps=1)
        share = convolution / total
        bound = f"{ratios[name] / share:.2f}x" if name in ratios else "-"
        print(f"| {name} | {share:.0%} ({convolution:.1f} of {total:.1f} s) | {1 / share:.2f}x | {bound} |", flush=True)


if __name__ == "__main__":
    main()
