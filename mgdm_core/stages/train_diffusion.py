"""Stage `train_diffusion`: the class-conditional diffusion model (learned variance, EMA, CFG dropout)."""

from __future__ import annotations

import torch

from mgdm_core import distributed
from mgdm_core.config import Params
from mgdm_core.data.loaders import to_model_tensor
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.losses import hybrid_loss
from mgdm_core.diffusion.sampling import PerImageNoise, ddpm_sample, initial_noise
from mgdm_core.diffusion.schedule import respace
from mgdm_core.data.loaders import from_model_tensor
from mgdm_core.layout import Layout
from mgdm_core.networks.unet import UNet
from mgdm_core.plots import class_grid
from mgdm_core.stages.common import diffusion_schedule, load_prepared, log, unet_config, write_metrics
from mgdm_core.stages.training import TrainingRun, batch_sampler, final_loss, random_flip
from mgdm_core.tracking import Tracker
from mgdm_core.io import remove_stale_temps
from mgdm_core.training.checkpoint import save_checkpoint

READS = ("seed", "device", "diffusion", "train_diffusion")


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    hp = params.train_diffusion
    device = distributed.local_device(resolve_device(params.device))
    distributed.check_divisible(hp.batch_size, "train_diffusion.batch_size")
    data = load_prepared(layout)
    config = unet_config(params, data.image_size, data.channels, data.num_classes)
    schedule = diffusion_schedule(params)
    preview = respace(schedule, hp.preview_respacing)  # a bad value fails here, not after training
    torch.manual_seed(params.seed)  # the initial weights
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
        config={"model": config.model_dump(mode="json"), "train": hp.model_dump(mode="json", exclude={"steps", "checkpoint_every", "log_every", "preview_respacing"}),
                "diffusion": {"schedule": params.diffusion.schedule, "steps": params.diffusion.steps},
                "data": data.digest, "seed": params.seed},
        tracker=tracker,
        layout=layout,
        snapshot_dir=layout.diffusion_snapshots_dir,
        snapshot_config=config.model_dump(mode="json"),
    )
    result = training.train(model, loss_fn, steps=hp.steps, lr=hp.lr, weight_decay=hp.weight_decay,
                            ema_decay=hp.ema_decay, device=device, seed=params.seed,
                            checkpoint_every=hp.checkpoint_every, log_every=hp.log_every)
    ema = result.ema_model.eval()
    if not distributed.is_main():  # rank 0 saves, samples, plots and logs
        return {}
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
    seeds = [params.seed * 1_000_003 + 7919 * i for i in range(len(y))]
    x_T = initial_noise(seeds, (data.channels, data.image_size, data.image_size), device, torch.float32)
    with torch.no_grad():
        samples = ddpm_sample(ema, x_T, preview, y=y, noise=PerImageNoise(seeds, device))
    grid = layout.plot_file("train_diffusion_samples.png")
    class_grid(from_model_tensor(samples.cpu()), y.cpu().numpy(), data.class_names, grid, per_class,
               title=f"EMA samples after {hp.steps} steps (unguided DDPM, {preview.num_timesteps} steps)")
    tracker.log_artifact(grid, "samples")
    # An MLflow model (pytorch flavour) with its architecture and training config; the .pt file
    # itself is a DVC output.
    tracker.log_model(ema, "diffusion", {"architecture": config.model_dump(mode="json"), **training.config})

    metrics = {"final_loss": final_loss(result), "steps": hp.steps, "resumed_from_step": result.resumed_from_step,
               "parameters_millions": n_params / 1e6}
    tracker.log_metrics(metrics)
    write_metrics(layout, "train_diffusion", metrics)
    return metrics
