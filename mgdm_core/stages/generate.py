"""Stage `generate` (MGDM stage 1): in-distribution images per class, guided or not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mgdm_core import distributed, progress
from mgdm_core.config import Params
from mgdm_core.data.loaders import from_model_tensor
from mgdm_core.device import autocast, resolve_device
from mgdm_core.diffusion.guidance import cfg_model, classifier_guidance
from mgdm_core.diffusion.sampling import PerImageNoise, ddim_sample, ddpm_sample, dpmpp_2m_sample, initial_noise
from mgdm_core.diffusion.schedule import respace
from mgdm_core.errors import ConfigError
from mgdm_core.io import read_image, write_manifest, write_png
from mgdm_core.layout import Layout
from mgdm_core.plots import class_grid
from mgdm_core.stages.common import (
    claim_output_dir, classifier_scores, diffusion_schedule, file_digest, load_classifier, load_prepared,
    load_unet, log, seed_for, write_metrics,
)
from mgdm_core.tracking import Tracker

READS = ("seed", "generator_seed", "device", "diffusion.schedule", "diffusion.steps", "generate")


@dataclass(frozen=True)
class Job:
    path: Path
    label: int
    seed: int


def counts_per_class(params: Params, train_labels: np.ndarray, num_classes: int) -> list[int]:
    g = params.generate
    if g.mode == "balance":
        # Fill every class up to the largest one: the minority gets the most synthetic images.
        have = np.bincount(train_labels, minlength=num_classes)
        return [int(have.max() - n) for n in have]
    if len(g.counts) != num_classes:
        raise ConfigError(f"generate.counts: expected {num_classes} numbers (one per class), got {len(g.counts)}")
    return list(g.counts)


def sample_batches(
    unet, classifier, jobs: list[Job], params: Params, device: torch.device, num_classes: int, image_shape: tuple
):
    """Yield (jobs, uint8 images) batch by batch; each image's noise comes from its own seed."""
    g = params.generate
    schedule = respace(diffusion_schedule(params), g.respacing)
    model, guidance = unet, None
    if g.guidance == "cfg":
        model = cfg_model(unet, g.scale, null_class=num_classes)
    elif g.guidance == "classifier":
        guidance = classifier_guidance(classifier)
    steps = len(schedule.timesteps)
    batches = -(-len(jobs) // g.batch_size)
    bar = tqdm(total=batches * steps, desc=f"generate ({len(jobs)} images)", unit="step",
               disable=not distributed.is_main())
    for start in range(0, len(jobs), g.batch_size):
        batch = jobs[start : start + g.batch_size]
        seeds = [j.seed for j in batch]
        y = torch.tensor([j.label for j in batch], device=device)
        x_T = initial_noise(seeds, image_shape, device, torch.float32)
        noise = PerImageNoise(seeds, device)
        def step_done(_info) -> None:
            bar.update(1)
            progress.report("generate", bar.n, bar.total)

        scale = g.scale if g.guidance == "classifier" else 0.0
        with autocast(device):
            if g.sampler == "ddim":
                x0 = ddim_sample(model, x_T, schedule, y=y, guidance=guidance, scale=scale, eta=g.eta,
                                 noise=noise if g.eta > 0 else None, callback=step_done)
            elif g.sampler == "dpmpp_2m":
                x0 = dpmpp_2m_sample(model, x_T, schedule, y=y, guidance=guidance, scale=scale, callback=step_done)
            else:
                x0 = ddpm_sample(model, x_T, schedule, y=y, guidance=guidance, scale=scale, noise=noise,
                                 callback=step_done)
        yield batch, from_model_tensor(x0.float().cpu())
    bar.close()


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    g = params.generate
    device = distributed.local_device(resolve_device(params.device))
    data = load_prepared(layout)
    counts = counts_per_class(params, data.labels["train"], data.num_classes)
    out = layout.stage1_dir
    # Load the models first: a missing or mismatched checkpoint is a one-line CheckpointError,
    # raised before the fingerprint reads them and before any output is touched.
    unet = load_unet(layout.diffusion_model, device, data)
    classifier = load_classifier(layout.classifier_model, device, data)
    fingerprint = {"generate": g.model_dump(mode="json"), "seed": params.generator_seed_value,
                   "diffusion": file_digest(layout.diffusion_model), "classifier": file_digest(layout.classifier_model)}
    # Under torchrun rank 0 claims (or clears) the directory before any rank looks into it.
    resumed = claim_output_dir(out, fingerprint) if distributed.is_main() else True
    distributed.barrier()

    jobs = [
        Job(out / name / f"{name}_{i:05d}.png", label, seed_for(params.generator_seed_value, label, i))
        for label, (name, n) in enumerate(zip(data.class_names, counts))
        for i in range(n)
    ]
    # This rank's images (all of them in one process); only their owner writes them.
    mine = distributed.shard(jobs)
    todo = [j for j in mine if not j.path.exists()]
    if resumed and len(todo) < len(mine):
        log.info("generate: resuming, %d of %d images already written", len(mine) - len(todo), len(mine))
    shape = (data.channels, data.image_size, data.image_size)
    for batch, images in sample_batches(unet, classifier, todo, params, device, data.num_classes, shape):
        for job, image in zip(batch, images):
            write_png(job.path, image)
    distributed.barrier()
    if not distributed.is_main():  # rank 0 writes the manifest, plots and metrics
        return {}

    images = np.stack([read_image(j.path) for j in jobs]) if jobs else np.zeros((0, *shape[1:], shape[0]), np.uint8)
    labels = np.array([j.label for j in jobs], dtype=np.int64)
    probs, confidence, entropy = classifier_scores(classifier, images, device)
    rows = [
        {"file": str(j.path.relative_to(out)), "class": data.class_names[j.label], "label": j.label, "source": "",
         "guidance": g.guidance, "scale": g.scale, "seed": j.seed,
         "confidence": f"{confidence[k]:.6f}", "entropy": f"{entropy[k]:.6f}",
         "sampler": g.sampler, "respacing": g.respacing}
        for k, j in enumerate(jobs)
    ]
    manifest = out / "manifest.csv"
    write_manifest(manifest, rows)

    grid = layout.plot_file("generate_samples.png")
    class_grid(images, labels, data.class_names, grid,
               title=f"stage 1: {g.guidance} guidance, scale {g.scale}, {g.sampler} {g.respacing}")
    metrics: dict[str, float] = {"images": len(jobs)}
    for k, name in enumerate(data.class_names):
        metrics[f"images_class{k}"] = counts[k]
    if len(jobs):
        metrics["mean_confidence"] = float(confidence.mean())
        metrics["mean_entropy"] = float(entropy.mean())
        metrics["intended_class_rate"] = float((probs.argmax(1) == labels).mean())
    tracker.log_metrics(metrics)
    tracker.log_artifact(manifest, "stage1")
    tracker.log_artifact(grid, "samples")
    write_metrics(layout, "generate", metrics)
    log.info("generate: %d images in %s; %s", len(jobs), layout.relative(out), metrics)
    return metrics
