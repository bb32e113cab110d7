"""Distribution distances between feature sets and per-image nearest-neighbour distances.

All functions take float feature matrices [N, D] (rows are images) and return plain floats or
NumPy arrays, so they work on classifier features and on flattened pixels alike.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.metrics import pairwise_distances_chunked
from sklearn.metrics.pairwise import polynomial_kernel
from sklearn.neighbors import NearestNeighbors


def _check(a: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or len(a) < min_rows:
        raise ValueError(f"{name}: need a matrix [N >= {min_rows}, D], got shape {a.shape}")
    return a


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite [D,D] matrix, negative eigenvalues clipped."""
    values, vectors = scipy.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to a [N,D] and b [M,D] (N, M >= 2).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2). The trace term is computed as
    tr((S_a^1/2 S_b S_a^1/2)^1/2), which is the same number (similar matrices) but is the root of
    a symmetric PSD matrix: `scipy.linalg.sqrtm(S_a @ S_b)` on the rank-deficient covariances of
    small sets (N < D) returns complex parts and NaNs, the symmetric form stays real and finite.
    """
    a, b = _check(a, "frechet_distance a", 2), _check(b, "frechet_distance b", 2)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(scipy.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Bińkowski et al. 2018)."""
    gamma = 1.0 / x.shape[1]
    k_xx = polynomial_kernel(x, x, degree=3, gamma=gamma, coef0=1.0)
    k_yy = polynomial_kernel(y, y, degree=3, gamma=gamma, coef0=1.0)
    k_xy = polynomial_kernel(x, y, degree=3, gamma=gamma, coef0=1.0)
    m, n = len(x), len(y)
    # Diagonals dropped: k(x, x) is not an independent pair, keeping it biases the estimate upwards.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, *, subsets: int = 50, subset_size: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID between a [N,D] and b [M,D]: mean and standard error of unbiased MMD^2 over random subsets.

    Each subset draws min(subset_size, N, M) rows of each set without replacement. The standard
    error is std / sqrt(subsets); subsets of a small set overlap, so it is somewhat optimistic.
    Can be slightly negative (it is unbiased): values within a few standard errors of 0 mean
    "indistinguishable at this sample size". Pass disjoint sets: rows present in both (a set
    against itself) enter the cross term as k(x, x) and push the estimate below zero.
    """
    a, b = _check(a, "kid a", 2), _check(b, "kid b", 2)
    size = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = np.array([
        _mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(max(1, subsets))
    ])
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def knn_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance [N] from every row of points [N,D] to its k-th nearest other row (the manifold ball)."""
    points = _check(points, "knn_radii", k + 1)
    # k + 1 neighbours because each point is its own nearest neighbour at distance 0.
    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return distances[:, k]


def _inside_manifold(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """bool [Q]: does each query lie in at least one ball B(support_i, radii_i)?"""
    inside = [
        (chunk <= radii[None, :]).any(axis=1)
        for chunk in pairwise_distances_chunked(queries, support)  # bounded memory for large sets
    ]
    return np.concatenate(inside) if inside else np.zeros(0, dtype=bool)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [M,D] against real [N,D].

    Precision: fraction of fake samples inside the real k-NN manifold (fidelity); recall: fraction
    of real samples inside the fake k-NN manifold (diversity). Both sets need more than k rows.
    """
    real, fake = _check(real, "precision_recall real", k + 1), _check(fake, "precision_recall fake", k + 1)
    precision = _inside_manifold(fake, real, knn_radii(real, k)).mean()
    recall = _inside_manifold(real, fake, knn_radii(fake, k)).mean()
    return float(precision), float(recall)


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance [Q] and index [Q] of each query row's nearest reference row."""
    queries, reference = _check(queries, "nearest_neighbours queries", 0), _check(reference, "nearest_neighbours reference", 1)
    if not len(queries):
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    distances, indices = NearestNeighbors(n_neighbors=1).fit(reference).kneighbors(queries)
    return distances[:, 0], indices[:, 0].astype(np.int64)


def pixel_vectors(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,C] -> float32 [N, H*W*C] scaled by 1/(255 sqrt(HWC)).

    With this scaling a Euclidean distance is the RMS pixel difference on the [0, 1] scale,
    comparable across image sizes.
    """
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / (255.0 * np.sqrt(flat.shape[1], dtype=np.float32))


def predictive_scores(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image boundary scores from probabilities [N,K]: entropy (nats), margin (top-1 minus
    top-2 probability), max probability and the predicted class, each [N]."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = np.sort(p, axis=1)[:, -2:]
    return {
        "entropy": -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1),
        "margin": top2[:, 1] - top2[:, 0],
        "max_prob": top2[:, 1],
        "predicted": p.argmax(axis=1).astype(np.int64),
    }


def memorisation_threshold(reference_distances: np.ndarray, percentile: float) -> float:
    """The `percentile`-th percentile of held-out real images' nearest-training distances.

    A synthetic image nearer to the training set than that is closer than all but `percentile` %
    of genuinely new real images: a copy candidate.
    """
    if not len(reference_distances):
        raise ValueError("memorisation_threshold: no reference distances")
    return float(np.percentile(reference_distances, percentile))
