"""The spread of `train_diffusion.steps: auto`'s judge: snapshots judged again with other seeds.

The stop rule reads one estimate per EMA snapshot: FD / floor and class fidelity of
`train_diffusion.auto_samples` unguided images with fixed labels and seeds
(`stages.train_diffusion.SnapshotJudge`). How far that estimate moves with the images drawn decides
what a threshold on it can mean, for example `train_diffusion.auto_rise_stop` (stop at once when
the latest FD / floor is that many times the best). For a run root that trained with `steps: auto`
(its snapshots in `models/diffusion_snapshots/`), this judges the given snapshots with the run's
own judge (the same reference classifier, real test features and floor) `--repeats` times, each
time with a disjoint set of seeds (repeat 0 is the rule's own set), and reports per snapshot the
mean, standard deviation and range of FD / floor and fidelity AUC, and the ratio of the rule's
values between the snapshots given.

    python benchmarks/judge_noise.py --root RUN --profile breastmnist --steps 600 800 --repeats 8 --out DIR

Writes DIR/judge_noise.csv (a row per snapshot and repeat) and DIR/judge_noise.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgdm_core import runtime  # noqa: E402
from mgdm_core.config import load_params  # noqa: E402
from mgdm_core.device import resolve_device  # noqa: E402
from mgdm_core.errors import ConfigError  # noqa: E402
from mgdm_core.layout import Layout  # noqa: E402
from mgdm_core.stages.common import load_prepared, seed_for  # noqa: E402
from mgdm_core.stages.train_diffusion import SnapshotJudge, snapshot_path  # noqa: E402


def reseed(judge: SnapshotJudge, base_seed: int, repeat: int) -> None:
    """Give the judge the seeds of `repeat`: repeat 0 is the rule's own set; repeat r takes the next
    N indices of the same seed sequence (`seed_for`), so no two repeats share an image's noise."""
    offset = repeat * len(judge.labels)
    judge.seeds = [seed_for(base_seed, int(y), offset + i) for i, y in enumerate(judge.labels)]


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} | {sd:.3f} | {sd / statistics.mean(values):.1%} | {min(values):.3f}-{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a run root that trained with steps: auto")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="snapshot steps to judge")
    parser.add_argument("--repeats", type=int, default=8, help="seed sets per snapshot (at least 2)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (a spread needs two estimates)")
    runtime.configure_process()
    try:
        params = load_params(args.params, args.profile)
    except ConfigError as exc:
        parser.error(str(exc))
    layout = Layout(Path(args.root))
    paths = {step: snapshot_path(layout, step) for step in args.steps}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        parser.error(f"no such snapshot: {', '.join(missing)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(params.device)
    t0 = time.perf_counter()
    judge = SnapshotJudge(params, load_prepared(layout), device)  # the rule's judge, built as the stage builds it
    print(f"judge: reference test AUC {judge.reference.test_auc:.3f}, FD floor {judge.fd_floor:.4f}", flush=True)
    rows = []
    for repeat, step in itertools.product(range(args.repeats), args.steps):
        reseed(judge, params.seed * 1000, repeat)
        row = judge.judge(step, paths[step])
        rows.append({"step": step, "repeat": repeat, "fd_ratio": row["fd_ratio"], "fidelity_auc": row["fidelity_auc"]})
        print(f"step {step} repeat {repeat}: FD / floor {row['fd_ratio']:.3f}, fidelity AUC {row['fidelity_auc']:.3f}", flush=True)
    with (out / "judge_noise.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    by_step = {s: [r for r in rows if r["step"] == s] for s in args.steps}
    lines = [
        f"# The auto rule's judge, judged again: {args.repeats} seed sets of {len(judge.labels)} images per snapshot",
        "",
        f"Run root `{args.root}`, profile `{args.profile}`; reference classifier test AUC "
        f"{judge.reference.test_auc:.3f}, FD floor {judge.fd_floor:.4f}. Repeat 0 is the rule's own seed set. "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        "| step | figure | mean | sd | sd / mean | range |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for step, rs in by_step.items():
        lines.append(f"| {step} | FD / floor | {summary([r['fd_ratio'] for r in rs])} |")
        lines.append(f"| {step} | fidelity AUC | {summary([r['fidelity_auc'] for r in rs])} |")
    if len(args.steps) > 1:
        first = args.steps[0]
        lines += ["", f"FD / floor of each snapshot over step {first}'s, repeat by repeat (the same seeds):", "",
                  "| step | " + " | ".join(f"r{k}" for k in range(args.repeats)) + " | min |",
                  "| ---: | " + " | ".join("---:" for _ in range(args.repeats)) + " | ---: |"]
        for step in args.steps[1:]:
            ratios = [b["fd_ratio"] / a["fd_ratio"] for a, b in zip(by_step[first], by_step[step])]
            lines.append(f"| {step} | " + " | ".join(f"{x:.2f}" for x in ratios) + f" | {min(ratios):.2f} |")
    (out / "judge_noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
