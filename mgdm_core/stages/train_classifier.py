"""Stage `train_classifier`: the noise-aware classifier p(y | x_t, t) used for both guidances."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from mgdm_core import distributed
from mgdm_core.config import Params
from mgdm_core.data.loaders import to_model_tensor
from mgdm_core.device import resolve_device
from mgdm_core.diffusion.losses import q_sample
from mgdm_core.diffusion.schedule import Schedule
from mgdm_core.layout import Layout
from mgdm_core.networks.classifier import NoisyClassifier
from mgdm_core.stages.common import classifier_config, diffusion_schedule, load_prepared, log, write_metrics
from mgdm_core.stages.training import TrainingRun, batch_sampler, final_loss, random_crop, random_flip
from mgdm_core.tracking import Tracker
from mgdm_core.io import remove_stale_temps
from mgdm_core.training.checkpoint import save_checkpoint

READS = ("seed", "generator_seed", "device", "diffusion.schedule", "diffusion.steps", "classifier", "train_classifier")


@torch.no_grad()
def accuracy_by_noise_level(
    classifier: torch.nn.Module, schedule: Schedule, images: torch.Tensor, labels: np.ndarray, buckets: int, seed: int
) -> dict[str, float]:
    """Balanced accuracy on clean images and per equal-width bucket of diffusion time t."""
    gen = torch.Generator().manual_seed(seed)
    device = images.device
    result = {}
    edges = np.linspace(0, schedule.num_timesteps, buckets + 1).astype(int)
    for name, lo, hi in [("clean", 0, 1)] + [(f"t{edges[k]}-{edges[k + 1] - 1}", edges[k], edges[k + 1]) for k in range(buckets)]:
        t = torch.randint(int(lo), int(hi), (len(images),), generator=gen).to(device)
        noise = torch.randn(images.shape, generator=gen).to(device)
        x_t = images if name == "clean" else q_sample(schedule, images, t, noise)
        tt = torch.tensor(schedule.timesteps, device=device)[t]
        preds = []
        for start in range(0, len(images), 256):
            preds.append(classifier(x_t[start : start + 256], tt[start : start + 256]).argmax(1).cpu())
        result[name] = float(balanced_accuracy_score(labels, torch.cat(preds).numpy()))
    return result


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    hp = params.train_classifier
    device = distributed.local_device(resolve_device(params.device))
    distributed.check_divisible(hp.batch_size, "train_classifier.batch_size")
    data = load_prepared(layout)
    config = classifier_config(params, data.image_size, data.channels, data.num_classes)
    schedule = diffusion_schedule(params)
    torch.manual_seed(params.generator_seed_value + 1)
    model = NoisyClassifier(config).to(device)

    x_all = to_model_tensor(data.images["train"]).to(device)
    labels = torch.as_tensor(data.labels["train"], dtype=torch.long)
    y_all = labels.to(device)
    sample_batch = batch_sampler(labels, hp.batch_size, hp.balanced)
    timesteps = torch.tensor(schedule.timesteps, device=device)

    def loss_fn(net: torch.nn.Module, step: int, gen: torch.Generator) -> torch.Tensor:
        # Every draw is of the global batch (identical on every rank); under torchrun each rank
        # then keeps its slice, so the averaged gradient is the one-process gradient.
        idx = sample_batch(gen).to(device)
        x0 = x_all[idx]
        if hp.random_crop_min_frac is not None:
            x0 = random_crop(x0, gen, hp.random_crop_min_frac)
        if hp.random_flip:
            x0 = random_flip(x0, gen)
        if hp.noised:
            t = torch.randint(0, schedule.num_timesteps, (len(idx),), generator=gen).to(device)
            x_t = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=gen).to(device))
        else:
            t, x_t = torch.zeros(len(idx), dtype=torch.long, device=device), x0
        x_t, t, y = (distributed.rank_slice(v) for v in (x_t, t, y_all[idx]))
        return F.cross_entropy(net(x_t, timesteps[t]), y)

    training = TrainingRun(
        stage="train_classifier",
        kind="classifier",
        checkpoint_dir=layout.classifier_dir,
        config={"model": config.model_dump(mode="json"),
                "train": hp.model_dump(mode="json", exclude={"steps", "checkpoint_every", "log_every", "eval_buckets"}),
                "diffusion": {"schedule": params.diffusion.schedule, "steps": params.diffusion.steps},
                "data": data.digest, "seed": params.generator_seed_value},
        tracker=tracker,
        layout=layout,
    )
    result = training.train(model, loss_fn, steps=hp.steps, lr=hp.lr, weight_decay=hp.weight_decay,
                            ema_decay=hp.ema_decay, grad_clip=hp.grad_clip, device=device, seed=params.generator_seed_value + 1,
                            checkpoint_every=hp.checkpoint_every, log_every=hp.log_every)
    ema = result.ema_model.eval()
    if not distributed.is_main():  # rank 0 saves, evaluates and logs
        return {}
    # models/ is shared with the other training stage: only our own file's stale temps.
    remove_stale_temps(layout.classifier_model.parent, names=[layout.classifier_model.name])
    save_checkpoint(layout.classifier_model, kind="classifier", config=config.model_dump(mode="json"),
                    state={"model": ema.state_dict()})

    val_x = to_model_tensor(data.images["val"]).to(device)
    accuracy = accuracy_by_noise_level(ema, schedule, val_x, data.labels["val"], hp.eval_buckets, params.generator_seed_value)
    chance = 1.0 / data.num_classes
    # Guidance acts at every t; a classifier near chance at moderate noise guides nowhere useful
    # (guided-diffusion#80). The noisiest bucket is expected to be near chance.
    weak = [name for name, acc in list(accuracy.items())[:-1] if acc < chance + 0.05]
    if weak:
        log.warning("train_classifier: validation balanced accuracy is near chance (%.2f) at %s: "
                    "guidance there will be weak; consider more train_classifier.steps", chance, ", ".join(weak))
    metrics = {"final_loss": final_loss(result), "steps": hp.steps, "resumed_from_step": result.resumed_from_step,
               "parameters_millions": sum(p.numel() for p in ema.parameters()) / 1e6,
               **{f"val_balanced_accuracy_{k}": v for k, v in accuracy.items()}}
    tracker.log_metrics(metrics)
    # An MLflow model (pytorch flavour) with its architecture and training config; the .pt file
    # itself is a DVC output.
    tracker.log_model(ema, "classifier", {"architecture": config.model_dump(mode="json"), **training.config})
    write_metrics(layout, "train_classifier", metrics)
    log.info("classifier validation balanced accuracy by noise level: %s", {k: round(v, 3) for k, v in accuracy.items()})
    return metrics
