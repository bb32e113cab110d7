"""The dtype and memory-layout paths a GPU run takes, exercised on the CPU.

`device.autocast` turns on bf16 autocast on CUDA only; CPU bf16 autocast runs the same dtype
path (matmuls and convolutions in bf16, GroupNorm and the losses in float32), so its numerics
stand in for the GPU's here. channels_last is the layout cuDNN prefers for convolutions.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation); the
losses and GroupNorm run in float32, so the loss of a correct bf16 path stays within a few 1e-4
of fp32. Measured here (28 px grey 2 classes, 32 px RGB 5 classes, zero-initialised layers given
random weights so every path counts): hybrid loss 1.0e-4 to 1.6e-4 relative, classifier
cross-entropy 0.5e-4 to 2.4e-4, gradient cosine >= 0.9995; limits are ~20x those. channels_last
changes only the summation order: losses agree to 2.4e-7 and gradients to 2e-7 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mgdm_core.diffusion.losses import hybrid_loss, q_sample
from mgdm_core.diffusion.schedule import make_schedule
from mgdm_core.networks.classifier import ClassifierConfig, NoisyClassifier
from mgdm_core.networks.unet import UNet, default_unet_config

LOSS_RTOL = 5e-3  # bf16 vs fp32 loss, relative (measured <= 2.4e-4; see the docstring)
GRAD_COSINE = 0.99  # bf16 vs fp32 gradient direction over all parameters (measured >= 0.9995)
LAYOUT_ATOL = 1e-5  # channels_last vs contiguous: the same fp32 maths in another summation order (measured 2.4e-7)


def _unet(image_size: int, channels: int, num_classes: int) -> UNet:
    torch.manual_seed(0)
    config = default_unet_config(image_size, channels, num_classes, width=32, channel_mult=(1, 2, 2),
                                 num_res_blocks=1, attention_resolutions=(-(-image_size // 4),), dropout=0.0)
    return _unzeroed(UNet(config))


def _unzeroed(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers (guided-diffusion's residual-branch and output init) ordinary
    random weights, so every path of the network, as after some training, shapes the loss."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model


def _classifier(image_size: int, channels: int, num_classes: int) -> NoisyClassifier:
    torch.manual_seed(0)
    config = ClassifierConfig(
        image_size=image_size, in_channels=channels, num_classes=num_classes, width=32, depth=1,
        channel_mult=(1, 2, 2), attention_resolutions=(-(-image_size // 4),), num_head_channels=32,
        pool="attention", scale_shift_norm=True, resblock_updown=True, dropout=0.0,
    )
    return _unzeroed(NoisyClassifier(config))


def _batch(image_size: int, channels: int, num_classes: int, n: int = 4):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, channels, image_size, image_size, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 100, (n,), generator=gen)
    y = torch.arange(n) % num_classes
    return x0, noise, t, y


def _unet_loss(model, x0, noise, t, y):
    return hybrid_loss(model, make_schedule("linear", 100), x0, t, y, noise)[0].mean()


def _classifier_loss(model, x0, noise, t, y):
    x_t = q_sample(make_schedule("linear", 100), x0, t, noise)
    return F.cross_entropy(model(x_t, t).float(), y)


def _step(model, loss_fn, batch, bf16: bool):
    """One training step (forward, backward, AdamW); returns (loss, flat gradient, the stepped model)."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, *batch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return loss.detach(), grad, model


NETWORKS = {
    "unet": (_unet, _unet_loss),
    "classifier": (_classifier, _classifier_loss),
}


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize(("image_size", "channels", "num_classes"), [(28, 1, 2), (32, 3, 5)])
def test_bf16_autocast_training_step_is_finite_and_matches_fp32(name, image_size, channels, num_classes):
    build, loss_fn = NETWORKS[name]
    model = build(image_size, channels, num_classes)
    batch = _batch(image_size, channels, num_classes)
    loss32, grad32, _ = _step(model, loss_fn, batch, bf16=False)
    loss16, grad16, stepped = _step(model, loss_fn, batch, bf16=True)
    print(f"{name} {image_size}px: fp32 {loss32:.6f} bf16 {loss16:.6f} "
          f"rel {abs(loss16 / loss32 - 1):.2e} grad cos {F.cosine_similarity(grad16, grad32, dim=0):.5f}")
    assert loss16.dtype == torch.float32  # the losses are computed in float32 under autocast
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert all(torch.isfinite(p).all() for p in stepped.parameters())
    assert abs(float(loss16 / loss32) - 1) < LOSS_RTOL
    assert float(F.cosine_similarity(grad16, grad32, dim=0)) > GRAD_COSINE


@pytest.mark.parametrize("name", NETWORKS)
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    build, loss_fn = NETWORKS[name]
    model = build(32, 3, 5)
    batch = _batch(32, 3, 5)
    loss, grad, _ = _step(model, loss_fn, batch, bf16=False)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x0, noise, t, y = batch
    batch_last = (x0.contiguous(memory_format=torch.channels_last),
                  noise.contiguous(memory_format=torch.channels_last), t, y)
    loss_last, grad_last, _ = _step(last, loss_fn, batch_last, bf16=False)
    assert torch.allclose(loss_last, loss, atol=LAYOUT_ATOL, rtol=0)
    assert torch.allclose(grad_last, grad, atol=LAYOUT_ATOL, rtol=0)
    model.eval()
    last.eval()
    with torch.no_grad():
        args = (x0, t, y) if name == "unet" else (x0, t)
        out = model(*args)
        out_last = last(x0.contiguous(memory_format=torch.channels_last), *args[1:])
    assert torch.allclose(out_last, out, atol=LAYOUT_ATOL, rtol=0)


# --- scripts/gpu_check.py -----------------------------------------------------------------------


def _gpu_check(repo_root, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(repo_root / "scripts" / "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only verdict")
def test_gpu_check_on_a_cpu_only_machine_says_so_and_exits_3(repo_root):
    done = _gpu_check(repo_root)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 3, done.stderr
    assert lines[0].startswith("FAIL  cuda") and "CPU-only machine" in lines[0]
    assert [line.split()[:2] for line in lines[1:5]] == [["SKIP", name] for name in ("bf16", "train", "sample", "ddp")]
    assert "no GPU here" in lines[-1] and not done.stderr.strip().count("Traceback")


def test_gpu_check_runs_its_checks_on_the_cpu(repo_root):
    done = _gpu_check(repo_root, "--device", "cpu", "--image-size", "16", "--width", "32", "--steps", "1",
                      "--batch", "2", "--classes", "3", "--respacing", "ddim2")
    verdicts = {line.split()[1]: line.split()[0] for line in done.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")}
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdicts == {"cuda": "SKIP", "bf16": "PASS", "train": "PASS", "sample": "PASS", "ddp": "SKIP"}
    assert "s/step" in done.stdout and "images/s" in done.stdout
