"""Glue shared by the stages: loading prepared data and trained models, writing metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from mgdm_core.config import Params
from mgdm_core.data.loaders import to_model_tensor
from mgdm_core.device import sampling_channels_last
from mgdm_core.diffusion.schedule import Schedule, make_schedule
from mgdm_core.errors import CheckpointError, ConfigError, DataError
from mgdm_core.io import remove_stale_temps, write_json_atomic
from mgdm_core.layout import Layout
from mgdm_core.networks.classifier import ClassifierConfig, NoisyClassifier
from mgdm_core.networks.presets import attention_sizes, classifier_preset, unet_preset
from mgdm_core.networks.unet import UNet, UNetConfig
from mgdm_core.training.checkpoint import load_checkpoint

log = logging.getLogger("mgdm")

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Prepared:
    """The prepare stage's output: uint8 [N,H,W,C] images and int64 [N] labels per split."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    dataset: str
    digest: str  # of the training split, so a checkpoint knows which data it was trained on

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[3])


def load_prepared(layout: Layout) -> Prepared:
    if not layout.classes_file.is_file():
        raise DataError(f"{layout.classes_file}: prepared data not found; run `mgdm prepare` first")
    meta = json.loads(layout.classes_file.read_text())
    images, labels = {}, {}
    for split in SPLITS:
        path = layout.split_file(split)
        try:
            with np.load(path) as arrays:
                images[split], labels[split] = arrays["images"], arrays["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: prepared split unreadable ({exc}); rerun `mgdm prepare`") from None
    return Prepared(images, labels, tuple(meta["class_names"]), meta["dataset"], file_digest(layout.split_file("train")))


def dataset_name(params: Params) -> str:
    data = params.data
    if data.source == "phantom":
        return "phantom"
    if data.source == "medmnist":
        return str(data.flag)
    return Path(str(data.path)).stem or str(data.path)


def _resolved(values: dict, preset: dict) -> dict:
    """Fill `auto` (None) network sizes from the preset for the image size."""
    return {k: (preset[k] if v is None and k in preset else v) for k, v in values.items()}


def _build(section: str, config_cls, fields: dict, image_size: int):
    """Build a network config; a layout impossible at this image size is a ConfigError naming `section.key`."""
    try:
        return config_cls(**fields)
    except ConfigError as err:
        raise ConfigError(f"{section}.{err} (data.image_size {image_size})") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{section}.{key}: {first['msg']} (got {first.get('input')!r})") from None


def unet_config(params: Params, image_size: int, channels: int, num_classes: int) -> UNetConfig:
    """The UNet for this data; `diffusion.*` sizes left `auto` come from `networks.presets.unet_preset`."""
    d = params.diffusion
    sizes = _resolved({"width": d.width, "channel_mult": d.channel_mult}, unet_preset(image_size))
    sizes["attention_resolutions"] = attention_sizes(d.attention_resolutions, image_size, sizes["channel_mult"])
    return _build("diffusion", UNetConfig, dict(
        image_size=image_size,
        in_channels=channels,
        num_classes=num_classes,
        **sizes,
        num_res_blocks=d.num_res_blocks,
        num_heads=d.num_heads,
        num_head_channels=-1,
        dropout=d.dropout,
        scale_shift_norm=d.scale_shift_norm,
        resblock_updown=d.resblock_updown,
        learn_sigma=d.learn_sigma,
    ), image_size)


def classifier_config(params: Params, image_size: int, channels: int, num_classes: int) -> ClassifierConfig:
    """The noisy classifier for this data; `classifier.*` sizes left `auto` come from `classifier_preset`."""
    c = params.classifier
    sizes = _resolved({"width": c.width, "channel_mult": c.channel_mult}, classifier_preset(image_size))
    sizes["attention_resolutions"] = attention_sizes(c.attention_resolutions, image_size, sizes["channel_mult"])
    return _build("classifier", ClassifierConfig, dict(
        image_size=image_size,
        in_channels=channels,
        num_classes=num_classes,
        **sizes,
        depth=c.depth,
        num_head_channels=c.head_channels,
        pool=c.pool,
        scale_shift_norm=True,
        resblock_updown=True,
        dropout=c.dropout,
    ), image_size)


def diffusion_schedule(params: Params) -> Schedule:
    return make_schedule(params.diffusion.schedule, params.diffusion.steps)


def _check_fits(path: Path, kind: str, config: dict, data: "Prepared | None") -> None:
    """A model trained on other data (image size, channels, classes) cannot run on this data: say so."""
    if data is None:
        return
    expected = {"image_size": data.image_size, "in_channels": data.channels, "num_classes": data.num_classes}
    differ = [f"{k}: checkpoint {config.get(k)!r} != prepared data {v!r}" for k, v in expected.items() if config.get(k) != v]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} holds a {kind} for other data ({'; '.join(differ)}); "
            f"retrain it (`mgdm train_{'diffusion' if kind == 'unet' else 'classifier'}`)"
        )


def _load_model(path: Path, kind: str, build, config_cls, device: torch.device, data: "Prepared | None"):
    config, state = load_checkpoint(path, kind=kind, map_location=device)
    _check_fits(path, kind, config, data)
    try:
        model = build(config_cls(**config)).to(device)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as err:  # config and weights disagree
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: its {kind} config and weights do not match ({reason})") from None
    return model.eval().requires_grad_(False)


def load_unet(path: Path, device: torch.device, data: "Prepared | None" = None) -> UNet:
    """The EMA UNet at `path`, for sampling (channels_last where `sampling_channels_last` says so); with
    `data`, refuse one trained for another image size, channels or classes."""
    return _load_model(path, "unet", UNet, UNetConfig, device, data).use_channels_last(sampling_channels_last(device))


def load_classifier(path: Path, device: torch.device, data: "Prepared | None" = None) -> NoisyClassifier:
    """The classifier at `path`; with `data`, refuse one trained for another image size, channels or classes."""
    return _load_model(path, "classifier", NoisyClassifier, ClassifierConfig, device, data)


@torch.no_grad()
def classifier_scores(
    classifier: NoisyClassifier, images: np.ndarray, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classifier at t=0 on uint8 images: probabilities [N,K], confidence [N], entropy [N]."""
    probs = []
    for start in range(0, len(images), batch_size):
        x = to_model_tensor(images[start : start + batch_size]).to(device)
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        probs.append(torch.softmax(classifier(x, t).float(), dim=1).cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 1))
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1)
    return p, p.max(axis=1) if len(p) else np.zeros(0), entropy


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def write_metrics(layout: Layout, stage: str, metrics: dict) -> None:
    write_json_atomic(layout.metrics_file(stage), metrics)


FINGERPRINT = ".fingerprint.json"


def claim_output_dir(directory: Path, fingerprint: dict) -> bool:
    """Make `directory` hold outputs of exactly these inputs; True when earlier work can be kept.

    Files are written atomically, so whatever a killed run left behind is complete and a rerun
    with the same fingerprint only fills in what is missing. Outputs of other inputs are removed
    (DVC does this itself before a stage runs; the CLI and Prefect front doors rely on this).
    """
    marker = directory / FINGERPRINT
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        # A SIGKILLed writer can leave a hidden temp file behind (never a half-written target);
        # drop those so the directory's contents (and DVC's hash of it) match an uninterrupted run.
        stale = remove_stale_temps(directory, recursive=True)
        if stale:
            log.info("%s: removed %d temporary file(s) left by an interrupted run", directory, len(stale))
        return True
    if directory.exists():
        log.info("%s holds outputs of other inputs: clearing it", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, fingerprint)
    return False


def seed_for(base_seed: int, label: int, index: int) -> int:
    """The seed of one synthetic image: fixed by (run seed, class, index), independent of batching."""
    return (base_seed * 1_000_003 + label * 100_003 + index) % (2**63 - 1)
