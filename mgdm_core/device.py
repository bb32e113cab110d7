"""Device selection and mixed precision: fp32 everywhere, bf16 autocast on CUDA only."""

from __future__ import annotations

import contextlib

import torch

from mgdm_core.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but no CUDA device is available")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda[:N]', got '{name}'")
    return torch.device(name)


def sampling_channels_last(device: torch.device) -> bool:
    """Whether the UNet samples on channels_last activations on `device` (`UNet.use_channels_last`).

    On CPU: a forward is 1.1-1.15x faster at the reference configuration (benchmarks/README.md).
    On CUDA it is not measured yet, so it stays off there. Training always runs NCHW.
    """
    return device.type == "cpu"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
