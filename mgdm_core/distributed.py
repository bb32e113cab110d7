"""Running a stage on several processes (`launcher: {kind: torchrun, nproc_per_node: N}`).

The launcher never changes results, only where the work runs:

* **Training** (`train_diffusion`, `train_classifier`): DistributedDataParallel. Every rank draws
  the *same* global batch (indices, flips, timesteps, noise) from the step's generator, exactly
  as one process would, and keeps its slice `[rank::world]` (`rank_slice`). DDP averages the
  gradients of the per-rank mean losses, which equals the gradient of the global mean loss when
  the global batch divides evenly by the world size (otherwise a ConfigError). Batch size and lr
  stay what params.yaml says.
* **Sampling** (`generate`, `disturb`): each rank handles the images `[rank::world]` (`shard`),
  each image seeded by its own seed, writing disjoint files; rank 0 writes manifests, plots and
  metrics after a barrier.
* Rank 0 alone writes checkpoints, curves, models, plots, metrics and logs to MLflow; the other
  ranks get a `tracking.NullTracker`.

Starting the processes is the front doors' concern, one layer up: `mgdm_core.launch.run_stage`
runs `python -m torch.distributed.run --standalone --nproc_per_node=N -m mgdm_core.launch`; the
stage's MLflow run is created once, by the launching process, and rank 0 logs into it. This module
imports no stage. Without an initialised process group every helper here is the single-process
identity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from mgdm_core.errors import ConfigError

DISTRIBUTED_STAGES: tuple[str, ...] = ("train_diffusion", "train_classifier", "generate", "disturb")

T = TypeVar("T")


def in_worker() -> bool:
    """True inside a process started by torchrun (it sets WORLD_SIZE and LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """A CUDA device of this rank (cuda:LOCAL_RANK) under torchrun; `device` otherwise."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device_name: str) -> None:
    """Join the process group torchrun describes: nccl on CUDA, gloo on CPU. Idempotent."""
    if not in_worker() or (dist.is_available() and dist.is_initialized()):
        return
    from mgdm_core.device import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ConfigError(f"device: '{device_name}' pins every rank to one GPU; use 'cuda' or 'auto' with torchrun")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(batch_size: int, what: str) -> None:
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"{what}: the global batch ({batch_size}) must divide evenly by the number of processes ({world}) "
            f"so that the averaged gradient equals the one-process gradient"
        )


def rank_slice(x: T) -> T:
    """This rank's share `x[rank::world]` of a global batch (a tensor, array or sequence).

    Every rank draws the same global batch; the shares are disjoint and, with equal sizes, the
    mean of the per-rank mean losses is the global mean loss.
    """
    world = world_size()
    if world == 1:
        return x
    if len(x) % world:  # type: ignore[arg-type]
        raise ConfigError(f"a batch of {len(x)} cannot be split evenly over {world} processes")  # type: ignore[arg-type]
    return x[rank() :: world]  # type: ignore[index]


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items of per-image work (`items[rank::world]`), for sampling stages."""
    return list(items[rank() :: world_size()])


def assemble(values: np.ndarray, total: int) -> np.ndarray:
    """Gather per-rank values of `shard(range(total))` into one array in the original order (all ranks)."""
    world = world_size()
    if world == 1:
        return values
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, np.asarray(values))
    out = np.empty((total, *np.asarray(values).shape[1:]), dtype=np.asarray(values).dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over ranks (every rank gets it)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` when several ranks train; `model` itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def torchrun_command(nproc_per_node: int, module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", module, *args]
