"""Classification metrics following the MedMNIST contract, computed with scikit-learn.

* AUC: binary from the probability of label 1 (`roc_auc_score(y, probs[:, 1])`); multi-class the
  macro average of one-vs-rest AUCs.
* Predictions: binary `probs[:, 1] > 0.5` (the MedMNIST threshold, exact rather than argmax,
  which differs on ties); multi-class argmax.

`metric_batch` evaluates the same scalar metrics on many resampled prediction sets at once, for
the bootstrap in `stats.py`, where ~10^4 scikit-learn calls per comparison would take minutes.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from mgdm_core.errors import ConfigError, DataError

# The scalar metrics compared against the baseline, in report order.
COMPARED_METRICS: tuple[str, ...] = ("auc", "accuracy", "balanced_accuracy", "f1_macro")


def check_inputs(y_true: np.ndarray, probs: np.ndarray) -> None:
    """Shapes agree, labels index the K columns of `probs`, and every class occurs (AUC needs it)."""
    if probs.ndim != 2 or probs.shape[1] < 2 or probs.shape[0] != len(y_true):
        raise DataError(f"metrics: probs must be [N, K>=2] with N={len(y_true)}, got {list(probs.shape)}")
    k = probs.shape[1]
    present = np.unique(y_true)
    if present.min() < 0 or present.max() >= k:
        raise DataError(f"metrics: labels must lie in [0, {k}), got {present.tolist()}")
    if len(present) != k:
        raise DataError(f"metrics: every class must occur in y_true for AUC; found {present.tolist()} of {k}")


def predict(probs: np.ndarray) -> np.ndarray:
    """Predicted labels [..., N] from probs [..., N, K]: threshold 0.5 on label 1 if K == 2, else argmax."""
    if probs.shape[-1] == 2:
        return (probs[..., 1] > 0.5).astype(np.int64)
    return probs.argmax(axis=-1)


def auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """MedMNIST AUC: binary from probs[:, 1], multi-class macro one-vs-rest."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=np.arange(probs.shape[1])))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | list[list[int]]]:
    """auc, accuracy, balanced_accuracy, f1_macro, recall_<k> per class and confusion_matrix.

    y_true: int [N]; probs: float [N, K] (rows sum to 1). confusion_matrix[i][j] counts true i
    predicted j.
    """
    check_inputs(y_true, probs)
    labels = np.arange(probs.shape[1])
    pred = predict(probs)
    recalls = recall_score(y_true, pred, labels=labels, average=None, zero_division=0)
    return {
        "auc": auc(y_true, probs),
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "f1_macro": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        **{f"recall_{k}": float(r) for k, r in zip(labels, recalls)},
        "confusion_matrix": confusion_matrix(y_true, pred, labels=labels).tolist(),
    }


def _auc_batch(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUC per row of probs [B, N, K]: the Mann-Whitney U of positives over negatives / (n1 n0)
    equals the ROC AUC with ties counted half, as `roc_auc_score` does."""
    k = probs.shape[-1]
    classes = [1] if k == 2 else range(k)
    per_class = []
    for c in classes:
        pos, neg = y_true == c, y_true != c
        u = mannwhitneyu(probs[:, pos, c], probs[:, neg, c], axis=1, method="asymptotic").statistic
        per_class.append(u / (pos.sum() * neg.sum()))
    return np.mean(per_class, axis=0)


def _confusion_batch(y_true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Confusion matrices [B, K, K] (true, predicted) for predictions [B, N] of fixed labels [N]."""
    b = pred.shape[0]
    flat = (np.arange(b)[:, None] * k + y_true[None, :]) * k + pred
    return np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k)


def metric_batch(name: str, y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Metric `name` (one of COMPARED_METRICS) for each of B prediction sets probs [B, N, K]
    against the same labels y_true [N]; equals the scikit-learn values (tests check it)."""
    if name == "auc":
        return _auc_batch(y_true, probs)
    cm = _confusion_batch(y_true, predict(probs), probs.shape[-1])
    tp = np.diagonal(cm, axis1=1, axis2=2)
    if name == "accuracy":
        return tp.sum(axis=1) / len(y_true)
    if name == "balanced_accuracy":
        return (tp / cm.sum(axis=2)).mean(axis=1)  # every class occurs, so no empty row
    if name == "f1_macro":
        denom = cm.sum(axis=1) + cm.sum(axis=2)  # 2tp + fp + fn
        return np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=denom > 0).mean(axis=1)
    raise ConfigError(f"metrics: no batched metric '{name}', expected one of {', '.join(COMPARED_METRICS)}")
