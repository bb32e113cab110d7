"""What to run first on a GPU runner: is the GPU path of mgdm usable here, and how fast is it?

    python scripts/gpu_check.py [--image-size 28] [--steps 20]      (or `make gpu-check`)

One verdict line per check (PASS / FAIL / SKIP, then what was measured):

  cuda      a CUDA device is visible to torch (name, memory, compute capability)
  bf16      bf16 autocast works and a UNet forward agrees with fp32 (relative error)
  train     a short diffusion + classifier training run at the preset network size: finite losses, s/step
  sample    classifier-guided DDIM-50 sampling of one batch (--respacing): finite images, images/s
  ddp       with >= 2 GPUs: 2 processes over nccl, DDP gradients identical on both ranks

Exit status: 0 every check passed, 1 a check failed, 3 no CUDA device (the CPU-only case is said
plainly and is not a crash). `--device cpu` runs the same checks on the CPU (bf16 autocast on
CPU, no DDP), so the script itself is tested without a GPU (tests/test_gpu_paths.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mgdm_core.diffusion.guidance import classifier_guidance  # noqa: E402
from mgdm_core.diffusion.losses import hybrid_loss, q_sample  # noqa: E402
from mgdm_core.diffusion.sampling import ddim_sample, initial_noise  # noqa: E402
from mgdm_core.diffusion.schedule import make_schedule, respace  # noqa: E402
from mgdm_core.networks.classifier import ClassifierConfig, NoisyClassifier  # noqa: E402
from mgdm_core.networks.presets import classifier_preset  # noqa: E402
from mgdm_core.networks.unet import UNet, default_unet_config  # noqa: E402

EXIT_FAILED = 1
EXIT_NO_CUDA = 3
BF16_RTOL = 0.05  # UNet output, bf16 autocast vs fp32, relative L2 (see tests/test_gpu_paths.py)


def verdict(name: str, ok: bool | None, detail: str) -> bool | None:
    word = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
    print(f"{word:4}  {name:7} {detail}", flush=True)
    return ok


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


WIDTH: int | None = None  # --width: both networks at this width instead of the presets (quick CPU runs)


def _models(image_size: int, channels: int, classes: int, device: torch.device):
    torch.manual_seed(0)
    narrow = {"width": WIDTH, "num_res_blocks": 1} if WIDTH else {}
    unet = UNet(default_unet_config(image_size, channels, classes, dropout=0.0, **narrow)).to(device)
    preset = {**classifier_preset(image_size), **({"width": WIDTH} if WIDTH else {})}
    classifier = NoisyClassifier(ClassifierConfig(
        image_size=image_size, in_channels=channels, num_classes=classes, depth=2, num_head_channels=64,
        pool="attention", scale_shift_norm=True, resblock_updown=True, dropout=0.0, **preset,
    )).to(device)
    return unet, classifier


def check_cuda() -> bool:
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        verdict("cuda", False, f"no CUDA device visible to torch {torch.__version__} ({build}); "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}. "
                "This is a CPU-only machine: mgdm runs here with device: cpu (or auto).")
        return False
    names = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        names.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    verdict("cuda", True, f"{torch.cuda.device_count()} device(s): {'; '.join(names)}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    return True


def check_bf16(device: torch.device, image_size: int, channels: int, classes: int) -> bool:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return bool(verdict("bf16", False, "this GPU does not support bf16 (needs sm_80 or newer); set device: cuda and expect fp32 speed"))
    unet, _ = _models(image_size, channels, classes, device)
    for p in unet.out.parameters():  # the zero-initialised output layer would make both outputs 0
        torch.nn.init.normal_(p, std=0.02)
    unet.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, channels, image_size, image_size, generator=gen).to(device)
    t = torch.randint(0, 1000, (8,), generator=gen).to(device)
    y = (torch.arange(8) % classes).to(device)
    with torch.no_grad():
        ref = unet(x, t, y).float()
        with _autocast(device):
            out = unet(x, t, y)
    rel = float((out.float() - ref).norm() / ref.norm())
    ok = out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all()) and rel < BF16_RTOL
    return bool(verdict("bf16", ok, f"UNet forward under bf16 autocast: output {out.dtype}, relative error vs fp32 {rel:.2e} (limit {BF16_RTOL})"))


def check_train(device: torch.device, image_size: int, channels: int, classes: int, steps: int, batch: int) -> bool:
    unet, classifier = _models(image_size, channels, classes, device)
    schedule = make_schedule("linear", 1000)
    opt_u = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    opt_c = torch.optim.AdamW(classifier.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    losses = []
    timings = {"unet": 0.0, "classifier": 0.0}
    for step in range(steps + 1):  # step 0 warms up (kernel selection, allocations) and is not timed
        x0 = (torch.rand(batch, channels, image_size, image_size, generator=gen) * 2 - 1).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        y = torch.randint(0, classes, (batch,), generator=gen).to(device)
        for name, model, opt in (("unet", unet, opt_u), ("classifier", classifier, opt_c)):
            _sync(device)
            started = time.perf_counter()
            with _autocast(device):
                if name == "unet":
                    loss = hybrid_loss(model, schedule, x0, t, y, noise)[0].mean()
                else:
                    loss = F.cross_entropy(model(q_sample(schedule, x0, t, noise), t).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            if step:
                timings[name] += time.perf_counter() - started
                losses.append(float(loss.detach()))
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    per_u, per_c = timings["unet"] / steps, timings["classifier"] / steps
    return bool(verdict("train", finite, (
        f"{steps} steps at {image_size} px x{channels}, batch {batch}: UNet {per_u:.3f} s/step "
        f"({unet_params(unet)} M parameters), classifier {per_c:.3f} s/step; losses finite: {finite}")))


def unet_params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}"


def check_sample(device: torch.device, image_size: int, channels: int, classes: int, batch: int,
                 respacing: str = "ddim50") -> bool:
    unet, classifier = _models(image_size, channels, classes, device)
    unet.eval()
    classifier.eval()
    schedule = respace(make_schedule("linear", 1000), respacing)
    seeds = list(range(batch))
    y = (torch.arange(batch) % classes).to(device)
    x_T = initial_noise(seeds, (channels, image_size, image_size), device, torch.float32)
    _sync(device)
    started = time.perf_counter()
    with _autocast(device):
        x0 = ddim_sample(unet, x_T, schedule, y=y, guidance=classifier_guidance(classifier), scale=1.0)
    _sync(device)
    seconds = time.perf_counter() - started
    ok = bool(torch.isfinite(x0).all()) and x0.shape == x_T.shape
    return bool(verdict("sample", ok, f"classifier-guided {respacing}, batch {batch}: {seconds:.2f} s "
                        f"({batch / seconds:.2f} images/s); finite: {ok}"))


def check_ddp(image_size: int, channels: int, classes: int) -> bool | None:
    if torch.cuda.device_count() < 2:
        return verdict("ddp", None, f"{torch.cuda.device_count()} GPU visible; the nccl check needs 2 or more")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).resolve()), "--ddp-worker", "--image-size", str(image_size),
               "--channels", str(channels), "--classes", str(classes)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return verdict("ddp", False, f"2 processes over nccl failed (exit {done.returncode}): {tail[0]}")
    return verdict("ddp", True, f"2 processes over nccl: {done.stdout.strip().splitlines()[-1]} ({seconds:.1f} s with start-up)")


def _ddp_worker(image_size: int, channels: int, classes: int) -> int:
    """One torchrun process: a DDP step of the UNet; rank 0 prints whether both ranks hold the same weights."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    device = torch.device("cuda", rank)
    unet, _ = _models(image_size, channels, classes, device)
    model = DistributedDataParallel(unet, device_ids=[rank])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank: only the all-reduce makes them agree
    x0 = (torch.rand(8, channels, image_size, image_size, generator=gen) * 2 - 1).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (8,), generator=gen).to(device)
    y = torch.randint(0, classes, (8,), generator=gen).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = hybrid_loss(model, make_schedule("linear", 1000), x0, t, y, noise)[0].mean()
    loss.backward()
    opt.step()
    flat = torch.cat([p.detach().flatten() for p in unet.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    same = bool(torch.equal(gathered[0], gathered[1]))
    if rank == 0:
        print(f"weights after one DDP step identical on both ranks: {same}", flush=True)
    dist.destroy_process_group()
    return 0 if same else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same checks on the CPU, no DDP)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--respacing", default="ddim50", help="sampler steps of the sampling check")
    parser.add_argument("--width", type=int, default=None, help="network width instead of the presets (quick runs)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global WIDTH
    WIDTH = args.width
    if args.ddp_worker:
        return _ddp_worker(args.image_size, args.channels, args.classes)
    shape = (args.image_size, args.channels, args.classes)
    if args.device == "cuda":
        if not check_cuda():
            for name in ("bf16", "train", "sample", "ddp"):
                verdict(name, None, "no CUDA device")
            print(f"verdict: no GPU here (exit status {EXIT_NO_CUDA})")
            return EXIT_NO_CUDA
        device = torch.device("cuda", 0)
    else:
        verdict("cuda", None, "--device cpu: checking the same paths on the CPU (bf16 autocast on CPU)")
        device = torch.device("cpu")
    results = [
        check_bf16(device, *shape),
        check_train(device, *shape, args.steps, args.batch),
        check_sample(device, *shape, args.batch, args.respacing),
        check_ddp(*shape) if device.type == "cuda" else verdict("ddp", None, "--device cpu"),
    ]
    failed = results.count(False)
    print(f"verdict: {'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
