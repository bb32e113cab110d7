"""Independent judges of a synthetic set: never the guiding classifier, always networks trained on
real images (class fidelity) or tested on them (CAS), plus pixel saturation and floor ratios.

* class fidelity: the reference classifier (trained on real training images only) on the
  synthetic images, scored against their intended labels with the MedMNIST contract
  (`evaluation.metrics`: binary AUC from the probability of label 1, macro one-vs-rest for more
  classes; predictions at threshold 0.5 for two classes, argmax otherwise);
* CAS, the classification accuracy score (Ravuri & Vinyals 2019): a network trained on the
  synthetic images only and tested on the real test set, with the evaluate stage's own training
  code (`evaluation.train.train_and_test`: real validation set for epoch selection);
* saturated pixels: the fraction of pixel values at either end of the range;
* ratios to the noise floor, the same distance between two real held-out splits.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from mgdm_core.evaluation.metrics import auc, predict
from mgdm_core.evaluation.train import EvalData, train_and_test

# uint8 values counted as saturated: <= 1 or >= 254, i.e. <= 1/255 or >= 254/255 on [0, 1]
# (within one grey level of the ends, so a clamped value that rounding moved by one still counts).
SATURATED_LOW = 1
SATURATED_HIGH = 254


def saturated_fraction(images: np.ndarray) -> float | None:
    """Fraction of pixel values (all pixels and channels) of uint8 images [N,H,W,C] that are
    <= SATURATED_LOW or >= SATURATED_HIGH; None for an empty set."""
    if images.size == 0:
        return None
    return float(((images <= SATURATED_LOW) | (images >= SATURATED_HIGH)).mean())


def floor_ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is undefined or the floor is not positive (KID, being
    unbiased, can be <= 0 for two real splits: there is no scale to divide by)."""
    if value is None or floor is None or not math.isfinite(value) or not math.isfinite(floor) or floor <= 0:
        return None
    return float(value / floor)


def class_fidelity(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None | list[float | None]]:
    """The reference classifier's probabilities probs [N,K] judged against intended labels [N].

    `auc` (None unless every class occurs), `balanced_accuracy` (mean recall over the classes
    present, scikit-learn) and `recall` [K]: the fraction of each intended class predicted as
    that class (None for a class without images; its mismatch rate is 1 - recall).
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = probs.shape[1] if probs.ndim == 2 else 0
    out: dict[str, float | None | list[float | None]] = {"auc": None, "balanced_accuracy": None, "recall": [None] * k}
    if not len(labels):
        return out
    predicted = predict(probs)
    if len(np.unique(labels)) == k:
        out["auc"] = auc(labels, probs)
    with warnings.catch_warnings():  # predictions of a class absent from the intended labels warn
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, predicted))
    out["recall"] = [float((predicted[labels == c] == c).mean()) if (labels == c).any() else None for c in range(k)]
    return out


def classification_accuracy_score(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    network: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> dict[str, float | None | list[float | None]]:
    """Train `network` on (train_images uint8 [N,H,W,C], train_labels [N]) alone, select its epoch
    on the real validation set and test it on the real test set: `auc`, `balanced_accuracy`,
    `recall` [K] per real test class and `best_epoch`.

    Passing the real training images gives the reference row the synthetic rows are read against.
    """
    if len(train_labels) < 2:  # BatchNorm cannot train on a single image
        return {"auc": None, "balanced_accuracy": None, "recall": [None] * num_classes, "best_epoch": None}
    data = EvalData(
        train_images=train_images, train_labels=np.asarray(train_labels, dtype=np.int64),
        val_images=val[0], val_labels=val[1], test_images=test[0], test_labels=test[1], num_classes=num_classes,
    )
    result = train_and_test(network=network, data=data, augment=False, epochs=epochs, batch_size=batch_size,
                            lr=lr, seed=seed, device=device)
    metrics = result.metrics
    return {"auc": float(metrics["auc"]), "balanced_accuracy": float(metrics["balanced_accuracy"]),
            "recall": [float(metrics[f"recall_{c}"]) for c in range(num_classes)], "best_epoch": result.best_epoch}
