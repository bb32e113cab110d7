"""The dtype and memory-layout paths a GPU run takes, exercised through the project's own switches.

Mixed precision is `mgdm_core.device.autocast(device)`: bf16 autocast on CUDA, a no-op (fp32) on
the CPU. On a CUDA machine the tests run it as is; on a CPU-only one they run the context it
returns for CUDA on the CPU instead (its device type and dtype, so a change to `device.autocast`
shows here): CPU bf16 autocast takes the same dtype path (matmuls and convolutions in bf16,
GroupNorm and the losses in float32), so its numerics stand in for the GPU's.
The memory layout is `UNet.use_channels_last()`, the switch the sampling stages use (the
classifier has none: it always runs NCHW).

Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation); the
losses and GroupNorm run in float32, so the loss of a correct bf16 path stays within a few 1e-4
of fp32. Measured on the CPU (28 px grey 2 classes, 32 px RGB 5 classes, zero-initialised layers
given random weights so every path counts; not yet on CUDA): hybrid loss 1.0e-4 to 1.6e-4
relative, classifier cross-entropy 0.5e-4 to 2.4e-4, gradient cosine >= 0.9995; limits are ~20x
those. channels_last changes only the summation order: losses agree to 2.4e-7 and gradients to
2e-7 absolute.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from mgdm_core.device import autocast
from mgdm_core.diffusion.losses import hybrid_loss, q_sample
from mgdm_core.diffusion.schedule import make_schedule
from mgdm_core.networks.blocks import is_channels_last
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


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _mixed_precision(device: torch.device):
    """The project's mixed-precision context for a run on `device` (see the module docstring)."""
    if device.type == "cuda":
        return autocast(device)
    with warnings.catch_warnings():  # "CUDA is not available ... Disabling autocast": expected here
        warnings.simplefilter("ignore", UserWarning)
        cuda_context = autocast(torch.device("cuda"))
    assert isinstance(cuda_context, torch.autocast) and cuda_context.device == "cuda"
    return torch.autocast("cpu", dtype=cuda_context.fast_dtype)


def _step(model, loss_fn, batch, context):
    """One training step (forward under `context`, backward, AdamW); returns (loss, flat gradient,
    the stepped model, the dtype of the network's output)."""
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtypes = []
    hook = model.register_forward_hook(lambda _module, _inputs, out: dtypes.append(out.dtype))
    with context:
        loss = loss_fn(model, *batch)
    hook.remove()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    optimizer.step()
    return loss.detach(), grad, model, dtypes[0]


NETWORKS = {
    "unet": (_unet, _unet_loss),
    "classifier": (_classifier, _classifier_loss),
}


def test_device_autocast_keeps_the_cpu_in_fp32():
    model = _classifier(28, 1, 2)
    x0, _, t, _ = _batch(28, 1, 2)
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert model(x0, t).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize(("image_size", "channels", "num_classes"), [(28, 1, 2), (32, 3, 5)])
def test_bf16_autocast_training_step_is_finite_and_matches_fp32(device, name, image_size, channels, num_classes):
    device = torch.device(device)
    build, loss_fn = NETWORKS[name]
    model = build(image_size, channels, num_classes).to(device)
    batch = tuple(x.to(device) for x in _batch(image_size, channels, num_classes))
    loss32, grad32, _, out32 = _step(model, loss_fn, batch, contextlib.nullcontext())
    loss16, grad16, stepped, out16 = _step(model, loss_fn, batch, _mixed_precision(device))
    print(f"{name} {image_size}px on {device}: fp32 {loss32:.6f} bf16 {loss16:.6f} "
          f"rel {abs(loss16 / loss32 - 1):.2e} grad cos {F.cosine_similarity(grad16, grad32, dim=0):.5f}")
    assert (out32, out16) == (torch.float32, torch.bfloat16)  # the context really switched the network to bf16
    assert loss16.dtype == torch.float32  # the losses are computed in float32 under autocast
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert all(torch.isfinite(p).all() for p in stepped.parameters())
    assert abs(float(loss16 / loss32) - 1) < LOSS_RTOL
    assert float(F.cosine_similarity(grad16, grad32, dim=0)) > GRAD_COSINE


def _conv_input_layouts(model: torch.nn.Module, *args) -> tuple[list[bool], torch.Tensor]:
    """Whether each convolution of one forward saw channels_last (NHWC) input, in call order; and the output."""
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda _module, inputs: seen.append(is_channels_last(inputs[0])))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        out = model(*args)
    for hook in hooks:
        hook.remove()
    return seen, out


def test_use_channels_last_runs_nhwc_inside_and_gives_the_same_outputs_and_gradients():
    model = _unet(32, 3, 5)
    batch = _batch(32, 3, 5)  # NCHW, as the sampling stages pass them: the UNet converts inside
    loss, grad, _, _ = _step(model, _unet_loss, batch, contextlib.nullcontext())
    last = copy.deepcopy(model).use_channels_last()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in last.parameters() if w.dim() == 4)
    loss_last, grad_last, _, _ = _step(last, _unet_loss, batch, contextlib.nullcontext())
    assert torch.allclose(loss_last, loss, atol=LAYOUT_ATOL, rtol=0)
    assert torch.allclose(grad_last, grad, atol=LAYOUT_ATOL, rtol=0)
    model.eval()
    last.eval()
    x0, _, t, y = batch
    layouts, out = _conv_input_layouts(model, x0, t, y)
    layouts_last, out_last = _conv_input_layouts(last, x0, t, y)
    assert not any(layouts) and all(layouts_last) and len(layouts_last) == len(layouts)
    assert out_last.is_contiguous()  # the output stays NCHW
    assert torch.allclose(out_last, out, atol=LAYOUT_ATOL, rtol=0)
    back, _ = _conv_input_layouts(last.use_channels_last(False), x0, t, y)
    assert not any(back)


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
