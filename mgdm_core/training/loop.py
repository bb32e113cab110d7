"""The training loop shared by the diffusion and classifier stages.

AdamW, an EMA copy through `torch.optim.swa_utils` (with a warm-up of its decay), bf16 autocast on CUDA, per-step seeding so a
resumed run is bit-identical (on CPU) to an uninterrupted one, atomic resumable checkpoints, and a
stop on the first non-finite loss that keeps the last good checkpoint.

Step numbering: `step` is the 0-based index passed to `loss_fn`; a checkpoint's `step` is the
number of completed steps, i.e. the index of the next step to run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import WeightedRandomSampler
from tqdm.auto import tqdm

from mgdm_core import distributed
from mgdm_core.device import autocast
from mgdm_core.errors import CheckpointError, ConfigError, NumericalError
from mgdm_core.training.checkpoint import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

# Large prime multiplier: seeds of neighbouring (seed, step) pairs never collide for steps < 1e6.
_SEED_STRIDE = 1_000_003

LossFn = Callable[[nn.Module, int, torch.Generator], Tensor]


@dataclass
class TrainResult:
    """Trained network, its EMA copy (a plain module, same class), this call's per-step losses, resume point."""

    model: nn.Module
    ema_model: nn.Module
    losses: list[float]
    resumed_from_step: int


def step_seed(seed: int, step: int) -> int:
    """Seed of everything step `step` draws (global torch RNG for dropout, the generator given to loss_fn)."""
    return seed * _SEED_STRIDE + step


def warmup_ema_decay(decay: float, n: int) -> float:
    """EMA decay of update n (n updates already averaged): min(decay, (1 + n) / (10 + n)).

    Without a warm-up the EMA keeps decay^n of its first weights: after 1,500 steps at 0.998 about
    5 % of it is still the initial network (whose zero-initialised output conv shrinks eps, which
    deterministic DDIM amplifies). The warm-up forgets the start within a few dozen updates.
    """
    return min(decay, (1.0 + n) / (10.0 + n))


class WarmupEMA:
    """`multi_avg_fn` for `AveragedModel`: an EMA whose decay is `warmup_ema_decay(decay, n)`.

    `n` (the number of updates averaged so far) is set by the caller before each update, from the
    step counter it already holds, so no device-to-host read of `AveragedModel.n_averaged` is needed.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.n = 0

    def __call__(self, ema_params: list[Tensor], current_params: list[Tensor], num_averaged: Tensor) -> None:
        weight = 1.0 - warmup_ema_decay(self.decay, self.n)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, weight)
        else:  # integer buffers (GroupNorm has none; BatchNorm's counter): follow the model
            for ema_value, value in zip(ema_params, current_params):
                ema_value.copy_(value)


def balanced_batch_indices(labels: Tensor, batch_size: int, generator: torch.Generator, balanced: bool) -> Tensor:
    """Draw `batch_size` training indices with replacement: [N] int64 labels -> [batch_size] int64 indices.

    `balanced` weights each sample by the inverse frequency of its class (WeightedRandomSampler),
    so every class is drawn equally often in expectation; otherwise indices are uniform.
    """
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {list(labels.shape)}")
    if not balanced:
        return torch.randint(0, labels.numel(), (batch_size,), generator=generator)
    counts = torch.bincount(labels)
    weights = (1.0 / counts.double())[labels]
    sampler = WeightedRandomSampler(weights, batch_size, replacement=True, generator=generator)
    return torch.tensor(list(sampler), dtype=torch.long)


def _rng_state() -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train_loop(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    steps: int,
    lr: float,
    weight_decay: float,
    ema_decay: float,
    device: torch.device,
    seed: int,
    checkpoint_path: str | Path,
    checkpoint_every: int,
    config: dict[str, Any],
    kind: str,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 100,
    grad_clip: float | None = 1.0,
    progress: bool = True,
    on_checkpoint: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `model` for `steps` optimisation steps in total, resuming from `checkpoint_path` when present.

    `loss_fn(model, step, generator)` returns a scalar loss; it must draw all its randomness (batch
    indices, timesteps, noise) from `generator`, a CPU generator seeded from (seed, step), and move
    the draws to the model's device. `config` (JSON-serialisable) is what a checkpoint must match to
    be resumed: put the architecture and the hyperparameters that shape the weights in it, and leave
    `steps` out so a finished run can be extended. `on_log(step, {"loss": mean})` runs every
    `log_every` steps and at the end, with `step` = completed steps. `on_checkpoint(step, ema_module)`
    runs (rank 0 only) after each checkpoint is written, e.g. to keep a snapshot of the EMA weights.

    Losses are synchronised to the host only every `log_every` / `checkpoint_every` steps; every
    checkpoint is written only after all losses before it were checked finite, so a non-finite loss
    raises NumericalError (naming its step) with the last good checkpoint intact on disk.
    Returns both networks in eval mode.

    Under torchrun (an initialised process group) `loss_fn` receives the DistributedDataParallel
    wrapper; it must draw the same global batch on every rank and compute its loss on
    `distributed.rank_slice` of it. Logged losses are the mean over ranks; only rank 0 writes
    checkpoints, shows the progress bar and calls `on_log`. Every rank seeds the global RNG
    (dropout) with the same per-step seed.
    """
    for name, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"ema_decay: must be in [0, 1), got {ema_decay}")
    checkpoint_path = Path(checkpoint_path)

    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema_update = WarmupEMA(ema_decay)
    ema = AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)

    start = 0
    last_checkpoint_step: int | None = None
    if checkpoint_path.exists():
        try:
            _, state = load_checkpoint(checkpoint_path, kind=kind, expected_config=config, map_location="cpu")
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}. To start over, delete {checkpoint_path.parent}; to resume, change the params back"
            ) from None
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        # Each step reseeds from (seed, step); the saved state only restores the RNG callers see afterwards.
        _restore_rng_state(state["rng"])
        start = last_checkpoint_step = int(state["step"])
        logger.info("%s: resumed from step %d (%s)", kind, start, checkpoint_path)

    net = distributed.wrap_model(model, device)  # the model itself in one process
    main = distributed.is_main()

    def write_checkpoint(completed: int) -> None:
        if not main:
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": completed,
            "rng": _rng_state(),
        }
        save_checkpoint(checkpoint_path, kind=kind, config=config, state=state)

    losses: list[float] = []
    pending: list[Tensor] = []  # detached per-step losses not yet copied to the host
    logged_until = 0  # index into `losses` of the first loss not yet reported by on_log
    bar = tqdm(total=steps, initial=min(start, steps), desc=kind, disable=not (progress and main), dynamic_ncols=True)
    try:
        for step in range(start, steps):
            seed_of_step = step_seed(seed, step)
            torch.manual_seed(seed_of_step)
            generator = torch.Generator().manual_seed(seed_of_step)
            with autocast(device):
                loss = loss_fn(net, step, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            ema_update.n = step  # updates averaged so far (AveragedModel.n_averaged, kept on the host)
            ema.update_parameters(model)
            pending.append(loss.detach())
            bar.update(1)

            completed = step + 1
            is_log = completed % log_every == 0 or completed == steps
            is_checkpoint = completed % checkpoint_every == 0 or completed == steps
            if not (is_log or is_checkpoint):
                continue
            # The one host sync (and, under DDP, the one loss all-reduce) per window.
            window = distributed.reduce_mean(torch.stack(pending).float()).cpu()
            pending.clear()
            finite = torch.isfinite(window)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                bad_step = completed - len(window) + bad
                kept = (
                    f"the last good checkpoint (step {last_checkpoint_step}) is kept at {checkpoint_path}"
                    if last_checkpoint_step is not None
                    else "no checkpoint had been written yet"
                )
                raise NumericalError(
                    f"{kind}: non-finite loss ({window[bad].item()}) at step {bad_step}; {kept}; "
                    f"try a lower lr or check the data"
                )
            losses.extend(window.tolist())
            if is_log:
                mean_loss = math.fsum(losses[logged_until:]) / len(losses[logged_until:])
                logged_until = len(losses)
                bar.set_postfix(loss=f"{mean_loss:.4g}")
                if on_log is not None and main:
                    on_log(completed, {"loss": mean_loss})
            if is_checkpoint:
                write_checkpoint(completed)
                last_checkpoint_step = completed
                if on_checkpoint is not None and main:
                    on_checkpoint(completed, ema.module)
    finally:
        bar.close()

    model.eval()
    ema.module.eval()
    return TrainResult(model=model, ema_model=ema.module, losses=losses, resumed_from_step=start)
