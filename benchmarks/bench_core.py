"""Throughput of the core at the reference configuration (28x28x1, two classes, batch 32).

Measures images/second for a diffusion training step (hybrid loss), a classifier training step,
stage 1 (classifier-guided DDIM-50 and classifier-free-guided DDIM-50) and stage 2 (DDIM-50
inversion + entropy-guided DDIM-50 decode). Each figure runs in its own child process, set up as
every mgdm process is (`mgdm_core.runtime.configure_process`: threads, glibc allocator), and
reports that process's peak RSS. The sampling figures run the UNet in the layout the sampling
stages use (`device.sampling_channels_last`: channels_last on CPU). CPU runs with 2 threads; CUDA
runs (when present) use bf16 autocast, optionally channels_last. bf16 autocast on CPU is measured
once, for speed and for its deviation from fp32, but is not what the pipeline uses.

Stage 1 at the product's own setting: `--sampler dpmpp_2m --respacing 20` times the stage-1
figures with that sampler and the sampling figures at that respacing, reported as images/s at it
(not scaled to 50 steps), to be read against the original's at `compare.sh --ref-respacing ddim250`
(`OURS_ARGS="--sampler dpmpp_2m --respacing 20"`). stage2_entropy always inverts and decodes with
DDIM (the inversion inverts the DDIM step), at --respacing when given, or at its own
--stage2-respacing. With --inversion-refine N and --round-trip it runs the disturb stage's own
functions (`stages.disturb.invert_with_round_trip`, `decode_guided`) with those settings, so the
figure is what one stage-2 measure costs in the product. The product's defaults
(`generate.sampler: ddpm`, `respacing: "100"`; `disturb.respacing: ddim25`, `inversion_refine: 2`):
`--sampler ddpm --respacing 100 --stage2-respacing ddim25 --inversion-refine 2 --round-trip`.

    python benchmarks/bench_core.py [--quick] [--json PATH] [--device cpu|cuda] [--channels-last] [--only NAMES]
        [--sampler ddim|ddpm|dpmpp_2m] [--respacing R | --spacing R]
        [--stage2-respacing R] [--inversion-refine N] [--round-trip]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mgdm_core import runtime
from mgdm_core.device import autocast, resolve_device, sampling_channels_last
from mgdm_core.diffusion.guidance import cfg_model, classifier_guidance, uncertainty_guidance
from mgdm_core.diffusion.losses import hybrid_loss, q_sample
from mgdm_core.config import DisturbParams
from mgdm_core.diffusion.sampling import PerImageNoise, ddim_invert, ddim_sample, ddpm_sample, dpmpp_2m_sample, initial_noise
from mgdm_core.diffusion.schedule import make_schedule, respace
from mgdm_core.errors import ConfigError
from mgdm_core.stages.disturb import decode_guided, invert_with_round_trip
from mgdm_core.networks.classifier import ClassifierConfig, NoisyClassifier
from mgdm_core.networks.unet import UNet, UNetConfig

BATCH = 32
CLASSIFIER_SCALE = 1.0
CFG_SCALE = 1.0
ENTROPY_SCALE = 1.0
FIGURES = ("train_diffusion", "train_classifier", "stage1_classifier", "stage1_cfg", "stage2_entropy")
# Stage-1 samplers, as `generate.sampler` names them; all take (model, x_T, schedule, *, y, guidance, scale).
STAGE1_SAMPLERS = {"ddim": ddim_sample, "ddpm": ddpm_sample, "dpmpp_2m": dpmpp_2m_sample}

UNET_CONFIG = UNetConfig(
    image_size=28, in_channels=1, num_classes=2, width=64, channel_mult=(1, 2, 2), num_res_blocks=2,
    attention_resolutions=(14, 7), num_heads=4, num_head_channels=-1, dropout=0.0,
    scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
)
CLASSIFIER_CONFIG = ClassifierConfig(
    image_size=28, in_channels=1, num_classes=2, width=32, depth=2, channel_mult=(1, 2, 2),
    attention_resolutions=(14, 7), num_head_channels=64, pool="attention", scale_shift_norm=True,
    resblock_updown=True, dropout=0.0,
)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run: Callable[[], None], images: int, repeats: int, device: torch.device) -> float:
    """Run once to warm up, then `repeats` timed runs; images processed per wall-clock second."""
    run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(device)
    return images * repeats / (time.perf_counter() - start)


class Bench:
    """Models, data and one closure per measured workload, all on one device and precision."""

    def __init__(self, device: torch.device, precision: Callable[[], contextlib.AbstractContextManager], channels_last: bool) -> None:
        torch.manual_seed(0)
        self.device = device
        self.precision = precision
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet = UNet(UNET_CONFIG).to(device, memory_format=memory_format)
        self.classifier = NoisyClassifier(CLASSIFIER_CONFIG).to(device, memory_format=memory_format)
        # Zero-initialised output layers make an untrained net trivially cheap to get right; perturb them.
        with torch.no_grad():
            for parameter in [*self.unet.parameters(), *self.classifier.parameters()]:
                parameter.add_(torch.randn_like(parameter) * 1e-3)
        self.schedule = make_schedule("linear", 1000)
        generator = torch.Generator().manual_seed(0)
        self.x0 = (torch.rand(BATCH, 1, 28, 28, generator=generator) * 2 - 1).to(device, memory_format=memory_format)
        self.y = torch.arange(BATCH, device=device) % 2
        self.unet_optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)
        self.classifier_optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=3e-4)

    def train_diffusion(self) -> None:
        self.unet.train()
        t = torch.randint(0, 1000, (BATCH,), device=self.device)
        with self.precision():
            loss, _ = hybrid_loss(self.unet, self.schedule, self.x0, t, self.y, torch.randn_like(self.x0))
        self.unet_optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        self.unet_optimizer.step()

    def train_classifier(self) -> None:
        self.classifier.train()
        t = torch.randint(0, 1000, (BATCH,), device=self.device)
        x_t = q_sample(self.schedule, self.x0, t, torch.randn_like(self.x0))
        with self.precision():
            loss = F.cross_entropy(self.classifier(x_t, t), self.y)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.classifier_optimizer.step()

    def sampler(self, spacing: str, workload: str, stage1_sampler: str = "ddim", inversion_refine: int = 0,
                round_trip: bool = False) -> Callable[[], None]:
        schedule = respace(self.schedule, spacing)
        sampler = STAGE1_SAMPLERS[stage1_sampler]
        # DDPM draws fresh noise at every step, per image, as the generate stage does.
        noise = {"noise": PerImageNoise(range(BATCH), self.device)} if stage1_sampler == "ddpm" else {}

        def sample(*args, **kwargs) -> torch.Tensor:
            return sampler(*args, **kwargs, **noise)

        if sampling_channels_last(self.device):
            self.unet.use_channels_last()  # as the sampling stages load it (`stages.common.load_unet`)
        x_T = initial_noise(range(BATCH), (1, 28, 28), self.device, torch.float32)
        disturb = DisturbParams(measure="entropy", scale=ENTROPY_SCALE, respacing=spacing,
                                inversion_refine=inversion_refine, batch_size=BATCH)

        def stage1_classifier() -> None:
            sample(self.unet, x_T, schedule, y=self.y, guidance=classifier_guidance(self.classifier), scale=CLASSIFIER_SCALE)

        def stage1_cfg() -> None:
            sample(cfg_model(self.unet, CFG_SCALE, UNET_CONFIG.null_class), x_T, schedule, y=self.y)

        def stage2_entropy() -> None:
            if round_trip:  # the disturb stage's inversion with its round-trip check
                latent, _ = invert_with_round_trip(self.unet, self.x0, self.y, schedule, disturb)
            else:
                latent = ddim_invert(self.unet, self.x0, schedule, y=self.y, refine=inversion_refine)
            if inversion_refine or round_trip:  # the disturb stage's guided decode
                decode_guided(self.unet, self.classifier, latent, self.y, schedule, "entropy", disturb)
            else:  # the reference configuration's decode, as the original's benchmark job runs it
                ddim_sample(self.unet, latent, schedule, y=self.y,
                            guidance=uncertainty_guidance(self.classifier, "entropy"), scale=ENTROPY_SCALE)

        workloads = {"stage1_classifier": stage1_classifier, "stage1_cfg": stage1_cfg, "stage2_entropy": stage2_entropy}
        run = workloads[workload]

        def timed() -> None:
            # Sampling never trains: no autograd graph outside the guidance's own enable_grad.
            self.unet.eval()
            self.classifier.eval()
            with torch.no_grad(), self.precision():
                run()

        return timed


def measure(bench: Bench, figure: str, quick: bool, spacing: str | None = None, respacing: str | None = None,
            sampler: str = "ddim", stage2_respacing: str | None = None, inversion_refine: int = 0,
            round_trip: bool = False) -> float:
    """images/s of one figure. Sampling figures: with `respacing` (stage2_entropy: `stage2_respacing`
    first), images/s of a run at that respacing as it is; otherwise for 50 steps (timed at `spacing`,
    quick mode at 10 steps, and scaled)."""
    if figure in ("train_diffusion", "train_classifier"):
        return images_per_second(getattr(bench, figure), BATCH, 3 if quick else 10, bench.device)
    stage2 = dict(inversion_refine=inversion_refine, round_trip=round_trip) if figure == "stage2_entropy" else {}
    respacing = (stage2_respacing or respacing) if figure == "stage2_entropy" else respacing
    if respacing:
        return images_per_second(bench.sampler(respacing, figure, sampler, **stage2), BATCH, 1, bench.device)
    spacing = spacing or ("ddim10" if quick else "ddim50")
    steps_factor = 50 / len(respace(bench.schedule, spacing).timesteps)
    return images_per_second(bench.sampler(spacing, figure, sampler, **stage2), BATCH, 1, bench.device) / steps_factor


def bf16_cpu_check(bench: Bench) -> dict[str, float]:
    """One fp32 vs bf16-autocast comparison on CPU: training-step speed and the UNet output's deviation."""
    t = torch.linspace(0, 999, BATCH).long()
    x_t = q_sample(bench.schedule, bench.x0, t, torch.randn_like(bench.x0))
    with torch.no_grad():
        reference = bench.unet(x_t, t, bench.y)[:, :1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            approx = bench.unet(x_t, t, bench.y)[:, :1].float()
    bf16_bench = Bench(bench.device, lambda: torch.autocast("cpu", dtype=torch.bfloat16), channels_last=False)
    return {
        "train_diffusion_fp32": images_per_second(bench.train_diffusion, BATCH, 3, bench.device),
        "train_diffusion_bf16": images_per_second(bf16_bench.train_diffusion, BATCH, 3, bench.device),
        "eps_relative_error_bf16": float((approx - reference).norm() / reference.norm()),
    }


def run_child(job: str, args: argparse.Namespace) -> dict[str, object]:
    """One job in this process: a figure's images/s, or the CPU bf16 check; with this process's peak RSS."""
    device = resolve_device(args.device)
    runtime.configure_process(threads=args.threads if device.type == "cpu" else None, malloc=not args.default_malloc)
    bench = Bench(device, (lambda: autocast(device)) if device.type == "cuda" else contextlib.nullcontext, args.channels_last)
    result: dict[str, object] = {}
    if job == "params":
        result["params_unet"] = sum(p.numel() for p in bench.unet.parameters())
        result["params_classifier"] = sum(p.numel() for p in bench.classifier.parameters())
        result["threads"] = torch.get_num_threads()
    elif job == "bf16_cpu":
        result.update(bf16_cpu_check(bench))
    else:
        before = resource.getrusage(resource.RUSAGE_SELF)
        result["img_per_s"] = measure(bench, job, args.quick, args.spacing, args.respacing, args.sampler,
                                      args.stage2_respacing, args.inversion_refine, args.round_trip)
        after = resource.getrusage(resource.RUSAGE_SELF)
        # Warm-up included: CPU seconds and page faults matter where wall clock is disturbed by other load.
        result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        result["sys_s"] = after.ru_stime - before.ru_stime
        result["minor_faults"] = after.ru_minflt - before.ru_minflt
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def spawn(job: str, args: argparse.Namespace) -> dict[str, object]:
    """Run `job` in a child process (its own peak RSS) and return what it reports."""
    command = [sys.executable, __file__, "--child", job, "--device", args.device, "--threads", str(args.threads)]
    command += ["--quick"] * args.quick + ["--channels-last"] * args.channels_last + ["--default-malloc"] * args.default_malloc
    command += ["--spacing", args.spacing] if args.spacing else []
    command += ["--respacing", args.respacing] if args.respacing else []
    command += ["--sampler", args.sampler, "--inversion-refine", str(args.inversion_refine)]
    command += ["--stage2-respacing", args.stage2_respacing] if args.stage2_respacing else []
    command += ["--round-trip"] * args.round_trip
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT_JSON:")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench_core: job {job} failed (exit code {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT_JSON:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; sampling timed at 10 steps, scaled to 50")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    parser.add_argument("--skip-bf16-cpu", action="store_true", help="skip the one-off CPU bf16 comparison")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2: the reference machine)")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated figures (default: all of {', '.join(FIGURES)})")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator at its defaults (A/B of mgdm_core.runtime's settings)")
    spacing = parser.add_mutually_exclusive_group()
    spacing.add_argument("--spacing", help="time sampling figures at this respacing (e.g. ddim2), still reported per 50 steps")
    spacing.add_argument("--respacing", help="time and report sampling figures at this respacing (e.g. 20): "
                                             "images/s of the product's setting, not scaled to 50 steps")
    parser.add_argument("--sampler", choices=sorted(STAGE1_SAMPLERS), default="ddim",
                        help="stage-1 sampler (generate.sampler) of stage1_classifier and stage1_cfg (default ddim)")
    parser.add_argument("--stage2-respacing", help="stage2_entropy at this respacing as timed (disturb.respacing, e.g. ddim25)")
    parser.add_argument("--inversion-refine", type=int, default=0,
                        help="stage2_entropy: fixed-point refinements per inversion step (disturb.inversion_refine; default 0)")
    parser.add_argument("--round-trip", action="store_true",
                        help="stage2_entropy: include the disturb stage's unguided round-trip decode (its check)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT_JSON:" + json.dumps(run_child(args.child, args)), flush=True)
        return

    figures = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(figures) - set(FIGURES))
    if unknown:
        parser.error(f"--only: unknown figures {unknown} (expected some of {', '.join(FIGURES)})")
    if args.inversion_refine < 0:
        parser.error("--inversion-refine must be at least 0")
    try:  # a bad respacing fails here, not in every child
        steps = respace(make_schedule("linear", 1000), args.respacing or args.spacing or ("ddim10" if args.quick else "ddim50")).num_timesteps
        stage2_steps = respace(make_schedule("linear", 1000), args.stage2_respacing).num_timesteps if args.stage2_respacing else steps
    except ConfigError as exc:
        parser.error(str(exc))
    device = resolve_device(args.device)
    info = spawn("params", args)
    print(f"device {device} ({platform.processor() or platform.machine()}), threads {info['threads']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"stage-1 sampler {args.sampler}; sampling timed at {steps} steps, figures "
          + (f"at {args.respacing} as timed" if args.respacing else "scaled to 50 steps"))
    if args.stage2_respacing or args.inversion_refine or args.round_trip:
        print(f"stage 2: DDIM at {args.stage2_respacing or args.respacing or args.spacing or 'the sampling steps'}"
              f"{' as timed' if args.stage2_respacing else ''}, inversion refinement {args.inversion_refine}, "
              f"round-trip decode {'on' if args.round_trip else 'off'}")
    print(f"parameters: UNet {info['params_unet']:,}, classifier {info['params_classifier']:,}")
    report: dict[str, object] = {"params_unet": info["params_unet"], "params_classifier": info["params_classifier"]}
    peak_by_figure: dict[str, float] = {}
    for name in figures:
        result = spawn(name, args)
        report[name] = result["img_per_s"]
        peak_by_figure[name] = float(result["peak_rss_mb"])
        cuda = f", peak CUDA {result['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in result else ""
        report[f"{name}_usage"] = {k: result[k] for k in ("cpu_s", "sys_s", "minor_faults")}
        print(f"{name:>18}: {result['img_per_s']:8.3f} images/s, peak RSS {result['peak_rss_mb']:6.0f} MB{cuda} "
              f"(CPU {result['cpu_s']:.1f} s, of it system {result['sys_s']:.1f} s, {result['minor_faults']:,} page faults)", flush=True)
    if device.type == "cpu" and not args.skip_bf16_cpu:
        bf16 = spawn("bf16_cpu", args)
        print(
            f"CPU bf16 autocast: train_diffusion {bf16['train_diffusion_bf16']:.2f} vs fp32 "
            f"{bf16['train_diffusion_fp32']:.2f} images/s; eps relative error {bf16['eps_relative_error_bf16']:.2e}"
        )
        report["bf16_cpu"] = {k: v for k, v in bf16.items() if k != "peak_rss_mb"}
    report.update(
        default_malloc=args.default_malloc, spacing=args.spacing, respacing=args.respacing, sampler=args.sampler,
        sampling_steps_timed=steps, sampling_figures_per=f"{steps} steps" if args.respacing else "50 steps",
        stage2_respacing=args.stage2_respacing, stage2_steps_timed=stage2_steps,
        inversion_refine=args.inversion_refine, round_trip=args.round_trip,
        peak_rss_mb=max(peak_by_figure.values(), default=0.0), peak_rss_mb_by_figure=peak_by_figure,
        device=str(device), quick=args.quick, channels_last=args.channels_last, threads=info["threads"],
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
