"""The reference classifier: trained on real images only; its penultimate activations are the
feature space of the quality measures (no download needed, unlike Inception features).

`evaluation.train.train_and_test` returns metrics and probabilities but not the model, so this
module has its own short loop with the same recipe (AdamW, per-step cosine learning rate,
best-validation-AUC state kept) around `evaluation.networks.build_network`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mgdm_core.errors import ConfigError
from mgdm_core.evaluation.metrics import auc
from mgdm_core.evaluation.networks import build_network

_BATCH = 256


@dataclass
class ReferenceClassifier:
    """A trained network in eval mode plus the facts the report records about it."""

    model: nn.Module
    network: str
    epochs: int
    seed: int
    best_epoch: int  # 0-based
    val_auc: float
    test_auc: float


def _to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [B,H,W,C] -> float [B,C,H,W] in [-1, 1] (the scaling `evaluate` trains with)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def penultimate_layer(model: nn.Module) -> nn.Module:
    """The classification head whose input is the penultimate representation.

    The last `nn.Linear` for `simple_cnn` and the torchvision networks; squeezenet has no linear
    head, so there it is the last (1x1) convolution and its input gets global-average pooled.
    """
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"quality: cannot find the classification head of {type(model).__name__}")
    return convs[-1]


@torch.inference_mode()
def features_and_probs(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = _BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features float32 [N,D] and softmax probabilities float32 [N,K] of uint8 images [N,H,W,C]."""
    captured: list[torch.Tensor] = []

    def grab(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        captured.append((x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1)).float().cpu())

    model.eval()
    handle = penultimate_layer(model).register_forward_pre_hook(grab)
    probs = []
    try:
        for start in range(0, len(images), batch_size):
            probs.append(model(_to_input(images[start : start + batch_size], device)).float().softmax(1).cpu())
    finally:
        handle.remove()
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(captured).numpy(), torch.cat(probs).numpy()


def train_reference(
    *,
    network: str,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    weight_decay: float = 1e-4,
) -> ReferenceClassifier:
    """Train `network` from scratch on real (images uint8 [N,H,W,C], labels int64 [N]) training
    data, keep the best-validation-AUC epoch, and score it on the real test split.

    Seeded inside `torch.random.fork_rng`, so it is repeatable on CPU and leaves the caller's RNG alone.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"quality: need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    images, labels = train
    height, channels = images.shape[1], images.shape[3]
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = build_network(network, channels, num_classes, height).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        # Drop the ragged last batch: a batch of one breaks BatchNorm.
        steps = max(1, len(images) // batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps)
        target = torch.from_numpy(labels.astype(np.int64)).to(device)
        best_state, best_epoch, best_auc = None, -1, -np.inf
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(images))
            for step in range(steps):
                idx = order[step * batch_size : (step + 1) * batch_size]
                loss = F.cross_entropy(model(_to_input(images[idx.numpy()], device)), target[idx.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            val_auc = auc(val[1], features_and_probs(model, val[0], device)[1])
            if best_state is None or val_auc > best_auc:  # strict: the earliest epoch wins ties
                best_state, best_epoch, best_auc = copy.deepcopy(model.state_dict()), epoch, val_auc
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    test_auc = auc(test[1], features_and_probs(model, test[0], device)[1])
    return ReferenceClassifier(model, network, epochs, seed, best_epoch, float(best_auc), float(test_auc))
