"""Train and test one evaluation unit: (network, condition, seed) -> test metrics and probabilities.

MedMNIST v2's protocol (Yang et al. 2023): Adam at lr 1e-3 (no weight decay), the learning rate
multiplied by 0.1 after 50% and 75% of the epochs (`lr_milestones`); after each epoch the model
is scored on the real validation set and the state with the best validation AUC is kept (the
earliest on ties) and tested on the real test set. Synthetic images only ever enter training.

All randomness (initialisation, batch order, augmentation, synthetic subset) derives from `seed`;
torch's global RNG is seeded inside `torch.random.fork_rng`, so the caller's RNG state is left
untouched and CPU runs are bit-for-bit repeatable. That global RNG is per process, not per
thread: units trained concurrently in threads share it (initialisation, augmentation, dropout),
so only one unit per process at a time (or one process per unit) is reproducible.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from mgdm_core.conditions import AUGMENTS
from mgdm_core.device import autocast
from mgdm_core.errors import ConfigError, DataError, NumericalError
from mgdm_core.evaluation.metrics import auc, classification_metrics
from mgdm_core.evaluation.networks import build_network

log = logging.getLogger(__name__)

_EVAL_BATCH = 512


@dataclass(frozen=True)
class EvalData:
    """Images uint8 [N,H,W,C] and int64 labels [N] per split; synthetic images are optional.

    Validation and test must be real images: model selection and the reported numbers never see
    synthetic data.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    synthetic_images: np.ndarray | None = None
    synthetic_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        shape = self.train_images.shape[1:]
        for split in ("train", "val", "test", "synthetic"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images is None and labels is None and split == "synthetic":
                continue
            if images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4:
                raise DataError(f"evaluate: {split} needs uint8 images [N,H,W,C] and labels")
            if images.shape[1:] != shape or len(images) != len(labels):
                raise DataError(
                    f"evaluate: {split} images {list(images.shape)} / labels {len(labels)} do not match "
                    f"the training images [N, {', '.join(map(str, shape))}]"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise DataError(f"evaluate: {split} labels must lie in [0, {self.num_classes})")
            if split in ("val", "test") and len(np.unique(labels)) != self.num_classes:
                raise DataError(f"evaluate: every class must occur in {split} (AUC needs it)")


@dataclass(frozen=True)
class UnitResult:
    """The outcome of one unit: test metrics of the best-validation state, its test probabilities."""

    metrics: dict[str, float | list[list[int]]]
    test_probs: np.ndarray  # float32 [N_test, K]
    test_labels: np.ndarray  # int64 [N_test]
    best_epoch: int  # 0-based
    val_auc_history: list[float] = field(default_factory=list)
    n_synthetic: int = 0  # synthetic images added to the real training set
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the best-validation state


def mix_synthetic(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    syn_images: np.ndarray,
    syn_labels: np.ndarray,
    ratio: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Real training set plus `round(ratio * len(real))` synthetic images, drawn without replacement.

    The draw is stratified to the real training set's class proportions (largest-remainder
    quotas), so adding synthetic data does not also re-balance the classes, which would by itself
    move threshold metrics and confound the comparison. A class with fewer synthetic images than
    its quota contributes all it has; the total then falls short rather than shifting the mix.
    """
    if ratio < 0:
        raise ConfigError(f"evaluate synthetic_ratio: must be >= 0, got {ratio}")
    n_add = round(ratio * len(real_labels))
    classes, counts = np.unique(real_labels, return_counts=True)
    exact = n_add * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact)[: n_add - quota.sum()]] += 1  # largest remainders first
    rng = np.random.default_rng(seed)
    chosen = []
    for c, q in zip(classes, quota):
        pool = np.flatnonzero(syn_labels == c)
        if len(pool) < q:
            log.warning("evaluate: class %d has %d synthetic images, %d requested; using all", c, len(pool), q)
        chosen.append(rng.choice(pool, size=min(q, len(pool)), replace=False))
    idx = np.sort(np.concatenate(chosen))
    return np.concatenate([real_images, syn_images[idx]]), np.concatenate([real_labels, syn_labels[idx]])


def classic_augmentation() -> v2.Transform:
    """Random horizontal flip and a small affine (±10°, ±10% shift, 0.9-1.1 scale) on [C,H,W].

    No vertical flip: in ultrasound the transducer is at the top, so up-down is not a symmetry.
    """
    affine = v2.RandomAffine(
        degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=v2.InterpolationMode.BILINEAR
    )
    return v2.Compose([v2.RandomHorizontalFlip(), affine])


@dataclass(frozen=True)
class Augmentation:
    """A training-only augmentation policy in its two possible parts.

    `per_image` maps one uint8 [C,H,W] image to another, before the float conversion (the
    auto-augment policies need uint8; the affine's zero fill stays black, not mid-grey).
    `batch` maps (float x [B,C,H,W], int64 labels [B]) to (x, soft labels float [B,K]) after it
    (MixUp and CutMix pair each image with its neighbour in the shuffled batch).
    Every random draw is from torch's global RNG, which `train_and_test` seeds per unit.
    """

    per_image: v2.Transform | None = None
    batch: v2.Transform | None = None


def augmentation(name: str | None, num_classes: int) -> Augmentation:
    """The policy a condition's `+<augment>` names (None: no augmentation), torchvision's
    implementations at their published defaults:

    - classic: `classic_augmentation` (horizontal flip, small affine).
    - trivialaugment: horizontal flip, then TrivialAugmentWide (Müller & Hutter 2021): one of 14
      operations per image at a uniformly drawn strength over its "wide" range (identity; shear
      up to 0.99; shift up to 32 px; rotation up to ±135°; brightness, colour, contrast, sharpness
      ×0.01-1.99; posterize to 2-8 bits; solarize; autocontrast; equalize).
    - randaugment: horizontal flip, then RandAugment (Cubuk et al. 2020) at N = 2 operations per
      image from the same list, magnitude 9 of 30 (rotation ±9°, shear 0.09, shift 13.6% of the
      side, brightness/colour/contrast/sharpness ×(1 ± 0.27), posterize to 7 bits).
    - mixup: MixUp (Zhang et al. 2018), alpha = 1: each image blended with its batch neighbour by
      lambda ~ Beta(1, 1), the labels alike.
    - cutmix: CutMix (Yun et al. 2019), alpha = 1: a box of area 1 - lambda pasted from the
      neighbour, the labels mixed by the pasted area.

    The horizontal flips are the only flips: in ultrasound the transducer is at the top. The
    auto-augment policies' rotations are theirs (TrivialAugmentWide's reach ±135°); colour
    operations leave a one-channel image one channel.
    """
    flip = v2.RandomHorizontalFlip()
    per_image = {
        "classic": classic_augmentation,
        "trivialaugment": lambda: v2.Compose([flip, v2.TrivialAugmentWide()]),
        "randaugment": lambda: v2.Compose([flip, v2.RandAugment(num_ops=2, magnitude=9)]),
    }
    batch = {
        "mixup": lambda: v2.MixUp(alpha=1.0, num_classes=num_classes),
        "cutmix": lambda: v2.CutMix(alpha=1.0, num_classes=num_classes),
    }
    if name is None:
        return Augmentation()
    if name in per_image:
        return Augmentation(per_image=per_image[name]())
    if name in batch:
        return Augmentation(batch=batch[name]())
    raise ConfigError(f"evaluate: unknown augmentation '{name}' (valid: {', '.join(AUGMENTS)})")


def lr_milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate drops 10x: 50% and 75% of `epochs`, rounded down
    (100 -> [50, 75], 30 -> [15, 22]); duplicates and 0 are dropped, so a short run never drops
    twice at once or before its first epoch."""
    return sorted({m for m in (epochs // 2, (3 * epochs) // 4) if m > 0})


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,C] array -> contiguous uint8 tensor [N,C,H,W] (kept uint8: 4x less memory)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float [B,C,H,W] in [-1, 1] on `device`."""
    return images.to(device, non_blocking=True).float() / 127.5 - 1.0


def predict_probs(model: nn.Module, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """Softmax probabilities float32 [N, K] for uint8 images [N,C,H,W], in eval mode."""
    model.eval()
    out = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(images), _EVAL_BATCH):
            logits = model(_to_model_input(images[start : start + _EVAL_BATCH], device))
            out.append(logits.float().softmax(dim=1).cpu())
    return torch.cat(out).numpy()


def _train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    augment: Augmentation,
    batch_size: int,
    device: torch.device,
) -> float:
    """One pass over a fresh permutation, dropping the ragged last batch (a batch of one breaks
    BatchNorm); returns the mean training loss (against soft labels under MixUp/CutMix).
    """
    model.train()
    order = torch.randperm(len(images))
    steps = max(1, len(images) // batch_size)
    total = 0.0
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        batch = images[idx]
        if augment.per_image is not None:
            # per image: a v2 transform called on a batch would draw one set of parameters for all
            batch = torch.stack([augment.per_image(img) for img in batch])
        x, target = _to_model_input(batch, device), labels[idx].to(device)
        if augment.batch is not None:
            x, target = augment.batch(x, target)  # target: soft labels [B, K]
        with autocast(device):
            loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
    if not math.isfinite(total):
        raise NumericalError(f"evaluate: non-finite training loss ({total})")
    return total / steps


def train_and_test(
    *,
    network: str,
    data: EvalData,
    augment: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    synthetic_ratio: float = 1.0,
    weight_decay: float = 0.0,
    progress: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> UnitResult:
    """Train `network` from scratch on the real training set (plus `synthetic_ratio` x its size
    of synthetic images when `data` holds them; see `mix_synthetic`), its training batches (real
    and synthetic alike) augmented by the policy `augment` names (see `augmentation`; None or
    False: none); select the epoch by validation AUC and test it. Adam (L2 `weight_decay`, none
    in MedMNIST's protocol) with the step schedule of `lr_milestones`.

    `on_epoch` receives {"epoch", "train_loss", "val_auc", "lr"} after every epoch (a hook for
    experiment tracking).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"evaluate: need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    train_images, train_labels = data.train_images, data.train_labels
    if data.synthetic_images is not None:
        train_images, train_labels = mix_synthetic(
            train_images, train_labels, data.synthetic_images, data.synthetic_labels, synthetic_ratio, seed
        )
    images = _to_nchw(train_images)
    labels = torch.from_numpy(train_labels.astype(np.int64))
    val_images = _to_nchw(data.val_images)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        model = build_network(network, images.shape[1], data.num_classes, images.shape[2]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=lr_milestones(epochs), gamma=0.1)
        transform = augmentation(augment or None, data.num_classes)
        history: list[float] = []
        best_state, best_epoch = None, -1
        for epoch in tqdm(range(epochs), desc=f"{network} seed {seed}", disable=not progress, leave=False):
            lr_now = scheduler.get_last_lr()[0]
            loss = _train_epoch(
                model,
                images,
                labels,
                optimizer=optimizer,
                augment=transform,
                batch_size=batch_size,
                device=device,
            )
            scheduler.step()
            history.append(auc(data.val_labels, predict_probs(model, val_images, device)))
            if history[-1] > max(history[:-1], default=-np.inf):
                best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "train_loss": loss, "val_auc": history[-1], "lr": lr_now})
    model.load_state_dict(best_state)
    test_probs = predict_probs(model, _to_nchw(data.test_images), device)
    return UnitResult(
        metrics=classification_metrics(data.test_labels, test_probs),
        test_probs=test_probs,
        test_labels=data.test_labels.astype(np.int64),
        best_epoch=best_epoch,
        val_auc_history=history,
        n_synthetic=len(train_labels) - len(data.train_labels),
        model=model.eval(),
    )
