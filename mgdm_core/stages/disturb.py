"""Stage `disturb` (MGDM stage 2): DDIM-invert stage-1 images, decode with uncertainty guidance.

Inversion is shared by every measure: latents are computed once, checked by an unguided
round trip (DDIB's inversion error, ddib#9) on `disturb.round_trip_images` of them, then decoded
once per measure.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from mgdm_core import distributed, progress
from mgdm_core.config import DecodeSetting, DisturbParams, Params
from mgdm_core.data.loaders import from_model_tensor, to_model_tensor
from mgdm_core.device import autocast, resolve_device
from mgdm_core.diffusion.guidance import classifier_guidance, uncertainty_guidance
from mgdm_core.diffusion.sampling import ddim_invert, ddim_sample
from mgdm_core.diffusion.schedule import Schedule, respace
from mgdm_core.errors import ConfigError, DataError
from mgdm_core.io import read_image, read_manifest, write_manifest, write_png
from mgdm_core.layout import Layout
from mgdm_core.plots import histograms, paired_grid
from mgdm_core.stages.common import (
    claim_output_dir, classifier_scores, diffusion_schedule, file_digest, load_classifier, load_prepared,
    load_unet, log, write_metrics,
)
from mgdm_core.tracking import Tracker

T = TypeVar("T")

READS = ("seed", "generator_seed", "device", "diffusion.schedule", "diffusion.steps", "disturb")


def target_labels(labels: np.ndarray, class_map: dict[int, int], num_classes: int) -> np.ndarray:
    for source, target in class_map.items():
        if not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ConfigError(f"disturb.class_map: {source} -> {target} is outside the classes 0..{num_classes - 1}")
    return np.array([class_map.get(int(y), int(y)) for y in labels], dtype=np.int64)


def remove_other_measures(layout: Layout, measures: tuple[str, ...]) -> list[str]:
    """Remove stage-2 sets (and their pair plots) of measures `disturb.measure` no longer names.

    DVC deletes a stage's outputs before rerunning it; under the CLI and Prefect a dropped measure's
    folder would otherwise stay behind, images of an older stage 1 that nothing reads any more.
    Returns the measures removed.
    """
    removed = []
    if layout.stage2_dir.is_dir():
        for folder in sorted(p for p in layout.stage2_dir.iterdir() if p.is_dir() and p.name not in measures):
            shutil.rmtree(folder)
            layout.plot_file(f"disturb_{folder.name}_pairs.png").unlink(missing_ok=True)
            removed.append(folder.name)
    if removed:
        log.info("disturb: removed stage-2 sets no longer in disturb.measure: %s", ", ".join(removed))
    return removed


def _batched(fn, x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not distributed.is_main()):
        out.append(fn(x[start : start + batch_size], y[start : start + batch_size]))
        progress.report(f"disturb: {desc}", min(start + batch_size, len(x)), len(x))
    return torch.cat(out) if out else x


def round_trip_indices(total: int, checked: int | None) -> np.ndarray:
    """Positions (sorted) of the `total` images the round trip checks: all of them when `checked` is
    None or at least `total`, else `checked` evenly spread from the first to the last, so that every
    class of a class-ordered manifest is in the sample and the choice is the same on every run."""
    if checked is None or checked >= total:
        return np.arange(total, dtype=np.int64)
    return np.unique(np.linspace(0, total - 1, checked).round().astype(np.int64))


def round_trip_warning(error_mean: float, d: DisturbParams, chosen: DecodeSetting | None = None) -> str | None:
    """The warning the stage logs when the checked images' mean round-trip error exceeds
    `d.round_trip_tolerance`, naming the keys that shrink it; None when it does not (or it is null).
    `chosen`: the setting the error was measured at (default: `d`'s own respacing and refinement)."""
    tolerance = d.round_trip_tolerance
    if tolerance is None or not np.isfinite(error_mean) or error_mean <= tolerance:
        return None
    chosen = chosen or d.decode_settings[-1]
    fix = ("no entry of disturb.auto_candidates passed, so the last was used; append a costlier one "
           "(more steps, e.g. ddim100 with inversion_refine 2)" if d.is_auto else
           "raise disturb.inversion_refine or the respacing's steps, or set disturb.respacing: auto")
    return (f"disturb: round-trip error {error_mean:.4f} exceeds disturb.round_trip_tolerance {tolerance:g} "
            f"(respacing {chosen.respacing}, inversion_refine {chosen.inversion_refine}): the stage-2 images carry "
            f"reconstruction error besides the guidance; {fix} "
            "(docs/results/breastmnist_time_to_quality.md, \"Stage 2\")")


def first_within_tolerance(settings: Sequence[T], round_trip_error: Callable[[T], float],
                           tolerance: float | None) -> tuple[int, list[float]]:
    """Position of the first of `settings` whose `round_trip_error` is at most `tolerance` (the first
    when tolerance is None, the last when none passes) and the errors of the settings tried, in order:
    settings after the one chosen are never tried."""
    if not settings:
        raise ValueError("no decode setting to try")
    errors: list[float] = []
    for k, setting in enumerate(settings):
        errors.append(round_trip_error(setting))
        if tolerance is None or errors[-1] <= tolerance:
            return k, errors
    return len(settings) - 1, errors


def invert_with_round_trip(unet, x0: torch.Tensor, y: torch.Tensor, schedule: Schedule,
                           d: DisturbParams, check: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents x_T of images x0 [B,C,H,W] on [-1, 1] (DDIM inversion, `d.inversion_refine`) and the
    unguided decode, clamped to [-1, 1], of the latents at positions `check` (all when None), both
    float32: the stage's inversion [B,C,H,W] and its check [len(check),C,H,W]."""
    idx = torch.arange(len(x0), device=x0.device) if check is None else torch.as_tensor(check, device=x0.device)
    with autocast(x0.device):
        latents = _batched(lambda x, y: ddim_invert(unet, x, schedule, y=y, refine=d.inversion_refine), x0, y, d.batch_size, "invert")
        # The round trip decodes with exactly the step the inversion inverts (unclipped unless
        # disturb.clip_denoised), so its error measures the inversion, not a clipping mismatch.
        recon = _batched(lambda x, y: ddim_sample(unet, x, schedule, y=y, clip_denoised=d.clip_denoised).clamp(-1, 1),
                         latents[idx], y[idx], d.batch_size, "round trip")
    return latents.float(), recon.float()


def decode_guided(unet, classifier, latents: torch.Tensor, y: torch.Tensor, schedule: Schedule, measure: str,
                  d: DisturbParams) -> torch.Tensor:
    """Stage-2 images float32 [B,C,H,W] on [-1, 1]: `latents` decoded by DDIM under `measure`'s
    guidance at `d.scale` (`classifier`: classifier guidance toward the labels y)."""
    guidance = classifier_guidance(classifier) if measure == "classifier" else uncertainty_guidance(classifier, measure)
    with autocast(latents.device):
        decoded = _batched(
            lambda x, y: ddim_sample(unet, x, schedule, y=y, guidance=guidance, scale=d.scale,
                                     clip_denoised=d.clip_denoised).clamp(-1, 1),
            latents, y, d.batch_size, f"decode ({measure})",
        )
    return decoded.float()


def run(params: Params, layout: Layout, tracker: Tracker) -> dict[str, float]:
    d = params.disturb
    device = distributed.local_device(resolve_device(params.device))
    main = distributed.is_main()
    data = load_prepared(layout)
    stage1_manifest = layout.stage1_dir / "manifest.csv"
    if not stage1_manifest.is_file():
        raise DataError(f"{stage1_manifest}: stage-1 manifest not found; run `mgdm generate` first")
    rows = read_manifest(stage1_manifest)
    source_images = np.stack([read_image(layout.stage1_dir / r["file"]) for r in rows]) if rows else None
    if source_images is None:
        raise DataError(f"{stage1_manifest}: no stage-1 images to disturb")
    source_labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    targets = target_labels(source_labels, d.class_map, data.num_classes)

    unet = load_unet(layout.diffusion_model, device, data)
    classifier = load_classifier(layout.classifier_model, device, data)
    # This rank's images (all in one process): it inverts and decodes exactly these.
    mine = np.array(distributed.shard(range(len(rows))), dtype=np.int64)
    x0 = to_model_tensor(source_images[mine]).to(device)
    y_src = torch.as_tensor(source_labels[mine], device=device)
    y_tgt = torch.as_tensor(targets[mine], device=device)

    # This rank's positions (in `mine`) of the images the round trip checks; NaN for the others.
    checked = np.flatnonzero(np.isin(mine, round_trip_indices(len(rows), d.round_trip_images)))
    rest = np.setdiff1d(np.arange(len(mine)), checked)
    checked_t, rest_t = (torch.as_tensor(p, device=device, dtype=torch.long) for p in (checked, rest))
    full_schedule = diffusion_schedule(params)
    trials: dict[DecodeSetting, tuple[Schedule, DisturbParams, torch.Tensor, np.ndarray]] = {}

    def checked_round_trip(setting: DecodeSetting) -> float:
        # Invert the checked images at `setting` and decode them unguided: their latents are kept,
        # so the setting chosen costs no more than a fixed one would.
        schedule = respace(full_schedule, setting.respacing)
        at = d.model_copy(update={"respacing": setting.respacing, "inversion_refine": setting.inversion_refine})
        latents, recon = invert_with_round_trip(unet, x0[checked_t], y_src[checked_t], schedule, at)
        errors = (recon - x0[checked_t]).abs().flatten(1).mean(1).cpu().numpy()  # mean |error| on [-1, 1]
        trials[setting] = (schedule, at, latents, errors)
        total = distributed.reduce_mean(torch.tensor([errors.sum(), len(errors)], dtype=torch.float64, device=device)).cpu()
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    chosen_at, tried = first_within_tolerance(d.decode_settings, checked_round_trip,
                                              d.round_trip_tolerance if d.is_auto else None)
    chosen = d.decode_settings[chosen_at]
    schedule, chosen_d, checked_latents, checked_errors = trials[chosen]
    if d.is_auto and main:
        log.info("disturb: respacing auto chose %s / inversion_refine %d (tried: %s)", chosen.respacing,
                 chosen.inversion_refine, ", ".join(f"{s.respacing} / {s.inversion_refine}: {e:.4f}"
                                                    for s, e in zip(d.decode_settings, tried)))
    rest_latents, _ = invert_with_round_trip(unet, x0[rest_t], y_src[rest_t], schedule, chosen_d, check=np.array([], dtype=np.int64))
    latents = torch.empty((len(mine), *x0.shape[1:]), dtype=torch.float32, device=device)
    latents[checked_t] = checked_latents
    latents[rest_t] = rest_latents
    roundtrip = np.full(len(mine), np.nan)
    roundtrip[checked] = checked_errors
    latent_mean = latents.flatten(1).mean(1).cpu().numpy()
    latent_std = latents.flatten(1).std(1).cpu().numpy()
    # Per-image values of every rank, in manifest order (the identity in one process).
    roundtrip, latent_mean, latent_std = (distributed.assemble(v, len(rows)) for v in (roundtrip, latent_mean, latent_std))
    _, src_conf, src_entropy = classifier_scores(classifier, source_images, device)
    _, real_conf, real_entropy = classifier_scores(classifier, data.images["train"], device)

    metrics: dict[str, float] = {
        "images": len(rows),
        "decode_steps": len(schedule.timesteps),
        "inversion_refine": chosen.inversion_refine,
        "decode_settings_tried": len(tried),
        "roundtrip_images": int(np.isfinite(roundtrip).sum()),
        "roundtrip_error_mean": float(np.nanmean(roundtrip)),
        "roundtrip_error_max": float(np.nanmax(roundtrip)),
        "latent_mean_mean": float(latent_mean.mean()),
        "latent_std_mean": float(latent_std.mean()),
        "stage1_mean_entropy": float(src_entropy.mean()),
    }
    if d.is_auto:  # each setting tried, so a user sees how near the tolerance the cheaper ones came
        metrics.update({f"auto_roundtrip_error_{s.respacing}_refine{s.inversion_refine}": e
                        for s, e in zip(d.decode_settings, tried)})
    warning = round_trip_warning(metrics["roundtrip_error_mean"], d, chosen)
    if warning and main:
        log.warning(warning)
    entropy_sets = {"real train": real_entropy, "stage 1": src_entropy}
    if main:
        remove_other_measures(layout, d.measures)
    for measure in d.measures:
        out = layout.stage2_measure_dir(measure)
        # With a fixed respacing the tolerance only decides a warning: changing it must not redo the decodes.
        fingerprint = {"disturb": d.model_dump(mode="json", exclude={"round_trip_tolerance"}), "measure": measure, "seed": params.generator_seed_value,
                       "stage1": file_digest(stage1_manifest), "diffusion": file_digest(layout.diffusion_model),
                       "classifier": file_digest(layout.classifier_model)}
        if d.is_auto:  # the images depend on the setting chosen, which the tolerance can change
            fingerprint["decode"] = chosen.model_dump(mode="json")
        else:
            fingerprint["disturb"].pop("auto_candidates")  # unused: changing them must not redo the decodes
        if main:
            claim_output_dir(out, fingerprint)
        distributed.barrier()
        paths = [out / data.class_names[t] / Path(r["file"]).name for r, t in zip(rows, targets)]
        # Positions in `mine` whose image is missing; only this rank writes them.
        todo = np.array([not paths[k].exists() for k in mine], dtype=bool)
        if todo.any():
            idx = torch.as_tensor(np.flatnonzero(todo), device=device)
            decoded = decode_guided(unet, classifier, latents[idx], y_tgt[idx], schedule, measure, d)
            for k, image in zip(idx.tolist(), from_model_tensor(decoded.cpu())):
                write_png(paths[mine[k]], image)
        distributed.barrier()
        if not main:  # rank 0 writes the manifest, plots and metrics
            continue
        images = np.stack([read_image(p) for p in paths])
        probs, confidence, entropy = classifier_scores(classifier, images, device)
        write_manifest(out / "manifest.csv", [
            {"file": str(p.relative_to(out)), "class": data.class_names[t], "label": int(t),
             "source": f"stage1/{r['file']}", "guidance": measure, "scale": d.scale, "seed": r["seed"],
             "confidence": f"{confidence[k]:.6f}", "entropy": f"{entropy[k]:.6f}",
             "source_entropy": f"{src_entropy[k]:.6f}", "roundtrip_error": f"{roundtrip[k]:.6f}" if np.isfinite(roundtrip[k]) else "",
             "latent_mean": f"{latent_mean[k]:.6f}", "latent_std": f"{latent_std[k]:.6f}"}
            for k, (p, r, t) in enumerate(zip(paths, rows, targets))
        ])
        # The paper's claim, image by image: stage 2 raises the classifier's uncertainty.
        metrics[f"{measure}_mean_entropy"] = float(entropy.mean())
        metrics[f"{measure}_entropy_increase"] = float((entropy - src_entropy).mean())
        metrics[f"{measure}_entropy_increased_rate"] = float((entropy > src_entropy).mean())
        metrics[f"{measure}_target_class_rate"] = float((probs.argmax(1) == targets).mean())
        entropy_sets[f"stage 2 ({measure})"] = entropy
        gallery = layout.plot_file(f"disturb_{measure}_pairs.png")
        shown = np.concatenate([np.flatnonzero(source_labels == c)[:4] for c in range(data.num_classes)])
        paired_grid(source_images[shown], images[shown], gallery, [data.class_names[t] for t in targets[shown]],
                    title=f"stage 1 (top) vs stage 2 (bottom): {measure}, scale {d.scale}")
        tracker.log_artifact(out / "manifest.csv", f"stage2/{measure}")
        tracker.log_artifact(gallery, "samples")

    if not main:
        return {}
    hist = layout.plot_file("disturb_entropy.png")
    histograms(entropy_sets, hist, "classifier predictive entropy (t = 0)", "entropy (nats)")
    tracker.log_artifact(hist, "plots")
    tracker.log_metrics(metrics)
    write_metrics(layout, "disturb", metrics)
    log.info("disturb: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics
