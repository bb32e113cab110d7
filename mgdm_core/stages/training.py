"""What the two training stages share: batch sampling, resumable runs, loss curves."""

from __future__ import annotations

import csv
import math
import shutil
import io as _io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mgdm_core import distributed, progress
from mgdm_core.io import atomic_write, ensure_writable_dir, remove_stale_temps, write_json_atomic
from mgdm_core.layout import Layout
from mgdm_core.plots import curve
from mgdm_core.stages.common import log
from mgdm_core.tracking import Tracker
from mgdm_core.training.checkpoint import load_checkpoint, save_checkpoint
from mgdm_core.training.loop import TrainResult, balanced_batch_indices, train_loop

CHECKPOINT = "checkpoint.pt"
CURVE = "curve.json"


def batch_sampler(labels: torch.Tensor, batch_size: int, balanced: bool) -> Callable[[torch.Generator], torch.Tensor]:
    """Batch indices drawn from the step's generator, so every step is reproducible on resume."""

    def sample(gen: torch.Generator) -> torch.Tensor:
        return balanced_batch_indices(labels, batch_size, gen, balanced)

    return sample


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flip of half the batch (the original's --random_flip)."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def random_crop(x: torch.Tensor, gen: torch.Generator, min_frac: float) -> torch.Tensor:
    """Each image [B, C, S, S] enlarged to its own random side in [S, ceil(S / min_frac)] (bicubic,
    clamped to [-1, 1] as the original's uint8 is) and cropped back to S x S at a random place:
    the original classifier's random_crop_arr, so a crop keeps between min_frac and all of each side."""
    size = x.shape[-1]
    sides = torch.randint(size, math.ceil(size / min_frac) + 1, (len(x),), generator=gen).tolist()
    corners = torch.rand(len(x), 2, generator=gen).tolist()
    crops = []
    for image, side, (u, v) in zip(x, sides, corners):
        top, left = int(u * (side - size + 1)), int(v * (side - size + 1))
        enlarged = F.interpolate(image[None], size=(side, side), mode="bicubic", align_corners=False)
        crops.append(enlarged[0, :, top : top + size, left : left + size].clamp(-1.0, 1.0))
    return torch.stack(crops)


@dataclass
class TrainingRun:
    """One training stage's resumable run: checkpoint directory, loss curve, tracking."""

    stage: str
    kind: str
    checkpoint_dir: Path
    config: dict
    tracker: Tracker
    layout: Layout
    # When set, the EMA weights are also kept at every checkpoint as `step_{completed:07d}.pt` in
    # this directory (with `snapshot_config` as their model config, loadable like the final model).
    snapshot_dir: Path | None = None
    snapshot_config: dict | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / CHECKPOINT

    def _discard_stale(self, steps: int) -> None:
        """A checkpoint from other parameters (or trained past `steps`) cannot be resumed: start over.

        Steps are left out of the compared config on purpose: raising `steps` continues training.
        """
        if not self.checkpoint_path.exists():
            return
        config, state = load_checkpoint(self.checkpoint_path, kind=self.kind, map_location="cpu")
        reason = None
        if config != self.config:
            changed = sorted(k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k))
            reason = f"its parameters differ ({', '.join(changed)})"
        elif int(state["step"]) > steps:
            reason = f"it is at step {int(state['step'])}, past the requested {steps}"
        if reason:
            log.warning("%s: discarding %s because %s; training from scratch", self.stage, self.checkpoint_path, reason)
            self.checkpoint_path.unlink()
            (self.checkpoint_dir / CURVE).unlink(missing_ok=True)
            if self.snapshot_dir is not None:
                shutil.rmtree(self.snapshot_dir, ignore_errors=True)

    def train(self, model: torch.nn.Module, loss_fn, *, steps: int, log_every: int, **loop_args) -> TrainResult:
        """Train (resuming when possible). Under torchrun, rank 0 alone touches the checkpoint
        directory, the curve and the plots; the other ranks wait for its clean-up, then train."""
        main = distributed.is_main()
        if main:
            ensure_writable_dir(self.checkpoint_dir)
            # Temp files of a checkpoint or snapshot write that was killed (this directory, snapshots
            # included, is this stage's own).
            remove_stale_temps(self.checkpoint_dir, recursive=True)
            self._discard_stale(steps)
        distributed.barrier()
        curve_path = self.checkpoint_dir / CURVE
        points: dict[int, dict[str, float]] = (
            {int(k): v for k, v in json.loads(curve_path.read_text()).items()} if curve_path.exists() else {}
        )

        def on_log(step: int, values: dict[str, float]) -> None:
            points[step] = values
            self.tracker.log_metrics(values, step=step)
            write_json_atomic(curve_path, points)
            progress.report(self.stage, step, steps)

        if self.snapshot_dir is not None:
            loop_args["on_checkpoint"] = self._save_snapshot
        result = train_loop(
            model=model, loss_fn=loss_fn, steps=steps, checkpoint_path=self.checkpoint_path,
            config=self.config, kind=self.kind, on_log=on_log, log_every=log_every, **loop_args,
        )
        if main:
            if result.resumed_from_step:
                self.tracker.set_tags({"resumed_from_step": result.resumed_from_step})
            self._write_curve(points)
        return result

    def _save_snapshot(self, completed: int, ema_model: torch.nn.Module) -> None:
        assert self.snapshot_dir is not None
        ensure_writable_dir(self.snapshot_dir)
        save_checkpoint(self.snapshot_dir / f"step_{completed:07d}.pt", kind=self.kind,
                        config=self.snapshot_config or self.config, state={"model": ema_model.state_dict()})

    def _write_curve(self, points: dict[int, dict[str, float]]) -> None:
        steps = sorted(points)
        keys = sorted({k for p in points.values() for k in p})
        buffer = _io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", *keys])
        for s in steps:
            writer.writerow([s, *(points[s].get(k, "") for k in keys)])
        csv_path = self.layout.plot_file(f"{self.stage}.csv")
        ensure_writable_dir(csv_path.parent)
        with atomic_write(csv_path) as tmp:
            Path(tmp).write_text(buffer.getvalue())
        png = self.layout.plot_file(f"{self.stage}_curve.png")
        series = {k: [points[s][k] for s in steps if k in points[s]] for k in keys}
        curve(steps, series, png, title=f"{self.stage} loss", ylabel="value")
        self.tracker.log_artifact(png, "curves")


def final_loss(result: TrainResult, window: int = 50) -> float:
    """Mean loss over the last `window` steps of this call (NaN when it trained no step: resumed at the end)."""
    tail = result.losses[-window:]
    return float(sum(tail) / len(tail)) if tail else float("nan")
