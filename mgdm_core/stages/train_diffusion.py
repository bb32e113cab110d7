"""Stage `train_diffusion`: the class-conditional diffusion model (learned variance, EMA, CFG dropout)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mgdm_core import distributed
from mgdm_core.config import Params, TrainDiffusionParams
from mgdm_core.data.loaders import to_model_tensor
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.losses import hybrid_loss
from mgdm_core.diffusion.sampling import PerImageNoise, ddpm_sample, initial_noise
from mgdm_core.diffusion.schedule import respace
from mgdm_core.data.loaders import from_model_tensor
from mgdm_core.layout import Layout
from mgdm_core.networks.unet import UNet
from mgdm_core.plots import class_grid
from mgdm_core.stages.common import (
    Prepared, diffusion_schedule, load_prepared, load_unet, log, seed_for, unet_config, write_metrics,
)
from mgdm_core.stages.training import TrainingRun, batch_sampler, final_loss, random_flip
from mgdm_core.tracking import Tracker
from mgdm_core.io import ensure_writable_dir, remove_stale_temps
from mgdm_core.errors import ConfigError
from mgdm_core.quality.by_step import balanced_labels, judge_sample, list_snapshots, unguided_sample
from mgdm_core.quality.features import features_and_probs, train_reference
from mgdm_core.quality.metrics import frechet_distance
from mgdm_core.training.auto_steps import StopRule, decide
from mgdm_core.training.checkpoint import load_checkpoint, save_checkpoint
from mgdm_core.training.loop import TrainResult

READS = ("seed", "generator_seed", "device", "diffusion", "train_diffusion")


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    hp = params.train_diffusion
    if hp.steps == "auto" and distributed.world_size() > 1:  # every rank would have to agree on the stop
        raise ConfigError("train_diffusion.steps: auto runs in one process; set launcher.kind: local or give a number")
    device = distributed.local_device(resolve_device(params.device))
    distributed.check_divisible(hp.batch_size, "train_diffusion.batch_size")
    data = load_prepared(layout)
    config = unet_config(params, data.image_size, data.channels, data.num_classes)
    schedule = diffusion_schedule(params)
    preview = respace(schedule, hp.preview_respacing)  # a bad value fails here, not after training
    torch.manual_seed(params.generator_seed_value)  # the initial weights
    model = UNet(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("UNet: %.2f M parameters, %s", n_params / 1e6, config.model_dump())

    x_all = to_model_tensor(data.images["train"]).to(device)
    labels = torch.as_tensor(data.labels["train"], dtype=torch.long)
    y_all = labels.to(device)
    sample_batch = batch_sampler(labels, hp.batch_size, hp.balanced)
    null_class = data.num_classes

    def loss_fn(net: torch.nn.Module, step: int, gen: torch.Generator) -> torch.Tensor:
        # Every draw is of the global batch (identical on every rank); under torchrun each rank
        # then keeps its slice, so the averaged gradient is the one-process gradient.
        idx = sample_batch(gen).to(device)
        x0 = x_all[idx]
        if hp.random_flip:
            x0 = random_flip(x0, gen)
        b = len(idx)
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        # Per-sample null-class dropout during training only (the original decided it once per
        # batch and kept it on while sampling).
        drop = (torch.rand(b, generator=gen) < hp.p_uncond).to(device)
        y = torch.where(drop, torch.full_like(y_all[idx], null_class), y_all[idx])
        x0, t, y, noise = (distributed.rank_slice(v) for v in (x0, t, y, noise))
        loss, _ = hybrid_loss(net, schedule, x0, t, y, noise, weighting=hp.mse_weighting)
        return loss.mean()

    training = TrainingRun(
        stage="train_diffusion",
        kind="unet",
        checkpoint_dir=layout.diffusion_dir,
        config={"model": config.model_dump(mode="json"), "train": hp.model_dump(mode="json", exclude=NOT_IN_CHECKPOINT),
                "diffusion": {"schedule": params.diffusion.schedule, "steps": params.diffusion.steps},
                "data": data.digest, "seed": params.generator_seed_value},
        tracker=tracker,
        layout=layout,
        snapshot_dir=layout.diffusion_snapshots_dir,
        snapshot_config=config.model_dump(mode="json"),
    )

    def train_to(steps: int) -> TrainResult:
        return training.train(model, loss_fn, steps=steps, lr=hp.lr, weight_decay=hp.weight_decay,
                              ema_decay=hp.ema_decay, grad_clip=hp.grad_clip, device=device, seed=params.generator_seed_value,
                              checkpoint_every=hp.checkpoint_every, log_every=hp.log_every)

    auto = None
    if hp.steps == "auto":
        result, auto = train_until_judged(train_to, training, params, data, layout, tracker, device)
    else:
        result = train_to(hp.steps)
    ema = result.ema_model.eval()
    if not distributed.is_main():  # rank 0 saves, samples, plots and logs
        return {}
    if auto is not None:  # the snapshot the rule chose is the model
        ema.load_state_dict(load_checkpoint(snapshot_path(layout, auto["chosen_step"]), kind="unet")[1]["model"])
    # models/ is shared with the other training stage: only our own file's stale temps.
    remove_stale_temps(layout.diffusion_model.parent, names=[layout.diffusion_model.name])
    save_checkpoint(layout.diffusion_model, kind="unet", config=config.model_dump(mode="json"),
                    state={"model": ema.state_dict()})

    # A quick look at what the EMA model draws: unguided ancestral sampling (`preview_respacing`,
    # 100 steps by default), 8 per class, fixed seeds. DDPM rather than DDIM: a deterministic DDIM
    # path drifts off the data for some seeds when the model is briefly trained, which would
    # misjudge the training itself.
    per_class = max(2, 16 // data.num_classes)  # 16 images in all (8 per class with two classes)
    y = torch.arange(data.num_classes).repeat_interleave(per_class).to(device)
    seeds = [params.generator_seed_value * 1_000_003 + 7919 * i for i in range(len(y))]
    x_T = initial_noise(seeds, (data.channels, data.image_size, data.image_size), device, torch.float32)
    with torch.no_grad():
        samples = ddpm_sample(ema, x_T, preview, y=y, noise=PerImageNoise(seeds, device))
    grid = layout.plot_file("train_diffusion_samples.png")
    class_grid(from_model_tensor(samples.cpu()), y.cpu().numpy(), data.class_names, grid, per_class,
               title=f"EMA samples after {hp.steps if auto is None else auto['chosen_step']} steps "
                     f"(unguided DDPM, {preview.num_timesteps} steps)")
    tracker.log_artifact(grid, "samples")
    # An MLflow model (pytorch flavour) with its architecture and training config; the .pt file
    # itself is a DVC output.
    tracker.log_model(ema, "diffusion", {"architecture": config.model_dump(mode="json"), **training.config})

    metrics = {"final_loss": final_loss(result), "steps": hp.steps, "resumed_from_step": result.resumed_from_step,
               "parameters_millions": n_params / 1e6}
    if auto is not None:
        metrics.update({"steps": auto["trained_steps"], "chosen_step": auto["chosen_step"], "auto": auto})
    tracker.log_metrics(metrics)
    write_metrics(layout, "train_diffusion", metrics)
    return metrics


# ---- steps: auto ---------------------------------------------------------------------------------

# Keys that do not shape the weights of a given step: a checkpoint made with other values resumes.
NOT_IN_CHECKPOINT = {"steps", "checkpoint_every", "log_every", "preview_respacing",
                     *(k for k in TrainDiffusionParams.model_fields if k.startswith("auto_"))}
# The reference classifier's recipe: the quality stage's defaults (quality.feature_network,
# batch_size, lr), so with the same epochs and seed it is the network `quality` judges with.
REFERENCE_NETWORK, REFERENCE_BATCH, REFERENCE_LR = "simple_cnn", 64, 1e-3
JUDGED = ("fd", "fd_ratio", "fidelity_auc", "fidelity_balanced_accuracy", "saturated_fraction")


def snapshot_path(layout: Layout, step: int) -> Path:
    return layout.diffusion_snapshots_dir / f"step_{step:07d}.pt"


def resumable_step(training: TrainingRun) -> int:
    """The step the checkpoint would resume from (0: none, or one of other parameters)."""
    if not training.checkpoint_path.exists():
        return 0
    config, state = load_checkpoint(training.checkpoint_path, kind=training.kind, map_location="cpu")
    return int(state["step"]) if config == training.config else 0


def next_chunk_end(completed: int, every: int, max_steps: int) -> int:
    """The next checkpoint (a multiple of `every`) after `completed`, at most `max_steps`."""
    return min(max_steps, (completed // every + 1) * every)


class SnapshotJudge:
    """The quality stage's by-step judge, built once per run: a reference classifier trained on the
    real training images, the real test features and the FD floor (real validation to real test);
    `judge(path)` draws a snapshot's unguided sample (fixed labels and seeds) and judges it."""

    def __init__(self, params: Params, data: Prepared, device: torch.device) -> None:
        hp = params.train_diffusion
        seed = params.seed * 1000  # the quality stage's (quality.seed 0)
        self.data, self.device = data, device
        self.reference = train_reference(
            network=REFERENCE_NETWORK, train=(data.images["train"], data.labels["train"]),
            val=(data.images["val"], data.labels["val"]), test=(data.images["test"], data.labels["test"]),
            num_classes=data.num_classes, epochs=hp.auto_reference_epochs, batch_size=REFERENCE_BATCH,
            lr=REFERENCE_LR, seed=seed, device=device)
        self.real_auc = self.reference.test_auc if math.isfinite(self.reference.test_auc) else None
        self.test_feats, _ = features_and_probs(self.reference.model, data.images["test"], device)
        val_feats, _ = features_and_probs(self.reference.model, data.images["val"], device)
        self.fd_floor = frechet_distance(val_feats, self.test_feats)
        self.schedule = respace(diffusion_schedule(params), hp.auto_respacing)
        self.labels = balanced_labels(hp.auto_samples, data.num_classes)
        self.seeds = [seed_for(seed, int(y), i) for i, y in enumerate(self.labels)]

    def judge(self, step: int, path: Path) -> dict[str, Any]:
        unet = load_unet(path, self.device, self.data)
        shape = (self.data.channels, self.data.image_size, self.data.image_size)
        images = unguided_sample(unet, self.schedule, self.labels, self.seeds, shape, self.device, REFERENCE_BATCH)
        return {"step": step, **judge_sample(images, self.labels, self.reference.model, self.test_feats,
                                              self.fd_floor, self.device)}


def train_until_judged(
    train_to: Callable[[int], TrainResult], training: TrainingRun, params: Params, data: Prepared, layout: Layout,
    tracker: Tracker, device: torch.device,
) -> tuple[TrainResult, dict[str, Any]]:
    """Train in chunks of `checkpoint_every` steps, judge the EMA snapshot at each chunk's end and
    stop by the rule (`training.auto_steps`) or at `auto_max_steps`. A killed run resumes from its
    checkpoint: the snapshots it left are judged again (the same sample and reference classifier).
    Returns the last chunk's result (its losses: every chunk's) and the record of the choice."""
    hp = params.train_diffusion
    rule = StopRule(patience=hp.auto_patience, min_improvement=hp.auto_min_improvement,
                    fidelity_tolerance=hp.auto_fidelity_tolerance, rise_stop=hp.auto_rise_stop)
    judge = SnapshotJudge(params, data, device)
    log.info("train_diffusion: steps auto; reference %s test AUC %.3f, FD floor %.3g; %s", REFERENCE_NETWORK,
             judge.reference.test_auc, judge.fd_floor, rule.describe(judge.real_auc))
    curve: list[dict[str, Any]] = []

    def judge_step(step: int) -> None:
        row = judge.judge(step, snapshot_path(layout, step))
        curve.append(row)
        tracker.log_metrics({f"auto.{k}": row[k] for k in JUDGED if row[k] is not None}, step=step)
        log.info("train_diffusion auto: step %d FD/floor %s, fidelity AUC %s", step, row["fd_ratio"], row["fidelity_auc"])

    completed = resumable_step(training)
    completed = completed if completed <= hp.auto_max_steps else 0  # past the maximum: train() starts over
    results = [train_to(completed)] if completed else []
    if completed and not snapshot_path(layout, completed).is_file():  # killed between checkpoint and snapshot
        ensure_writable_dir(layout.diffusion_snapshots_dir)
        save_checkpoint(snapshot_path(layout, completed), kind="unet", config=training.snapshot_config,
                        state={"model": results[0].ema_model.state_dict()})
    for step, _ in list_snapshots(layout.diffusion_snapshots_dir):
        if step <= completed:
            judge_step(step)
    decision = decide(curve, judge.real_auc, rule)
    while not decision.stop and completed < hp.auto_max_steps:
        completed = next_chunk_end(completed, hp.checkpoint_every, hp.auto_max_steps)
        results.append(train_to(completed))
        judge_step(completed)
        decision = decide(curve, judge.real_auc, rule)
    result = replace(results[-1], losses=[x for r in results for x in r.losses],
                     resumed_from_step=results[0].resumed_from_step)
    record = {
        "rule": rule.describe(judge.real_auc), "stopped_by": "rule" if decision.stop else "auto_max_steps",
        "reason": decision.reason, "chosen_step": decision.chosen_step, "trained_steps": completed,
        "real_fidelity_auc": judge.real_auc, "fd_floor": judge.fd_floor,
        "reference": {"network": REFERENCE_NETWORK, "epochs": hp.auto_reference_epochs,
                      "best_epoch": judge.reference.best_epoch, "val_auc": judge.reference.val_auc},
        "curve": curve,
    }
    tracker.log_metrics({"auto.chosen_step": decision.chosen_step, "auto.trained_steps": completed})
    tracker.set_tags({"auto.rule": record["rule"], "auto.stopped_by": f"{record['stopped_by']}: {decision.reason}"})
    log.info("train_diffusion auto: stopped at step %d (%s: %s); keeping step %d", completed, record["stopped_by"],
             decision.reason, decision.chosen_step)
    return result, record
