"""Seeded ultrasound-like breast phantoms: a small, learnable stand-in for BreastMNIST.

Each image is a B-mode-like scan (depth runs down the rows): layered tissue with depth
attenuation and partial gain compensation, one hypoechoic lesion, multiplicative speckle.
The classes differ mainly in the lesion margin, as in BI-RADS:

* ``benign``: oval, circumscribed (smooth, low-order shape only), sometimes mild posterior
  enhancement;
* ``malignant``: irregular, spiculated margin (high-order harmonics whose amplitude is a
  sizable fraction of the radius), often a posterior acoustic shadow;
* ``cyst``: round, anechoic, sharp margin, strong posterior enhancement;
* seven more (``fibroadenoma``, ``lipoma``, ``abscess``, ...; see `CLASS_SPECS`) for
  multi-class runs of up to 10 classes.

Position, size, orientation, echogenicity, attenuation and speckle strength are drawn from
ranges shared (or overlapping) across classes, so simple intensity statistics separate the
classes only partly while the margin shape does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mgdm_core.errors import ConfigError

Range = tuple[float, float]


@dataclass(frozen=True)
class LesionSpec:
    """Per-class ranges (uniform) of the lesion parameters; lengths are fractions of the image."""

    name: str
    radius: Range  # mean radius
    aspect: Range  # width / height before rotation; > 1 is "wider than tall" (parallel to skin)
    echo: Range  # lesion brightness relative to the surrounding tissue
    lobulation: Range  # total amplitude of harmonics 2..3, as a fraction of the radius
    spiculation: Range  # total amplitude of harmonics 5..9, as a fraction of the radius
    margin_blur: Range  # width of the soft edge
    posterior: Range  # < 0: acoustic shadow, > 0: enhancement (relative change below the lesion)
    posterior_prob: float  # probability that the posterior feature is present at all


CLASS_SPECS: tuple[LesionSpec, ...] = (
    LesionSpec("benign", radius=(0.12, 0.22), aspect=(1.0, 1.6), echo=(0.2, 0.6),
               lobulation=(0.0, 0.12), spiculation=(0.0, 0.04), margin_blur=(0.010, 0.030),
               posterior=(0.0, 0.3), posterior_prob=0.3),
    LesionSpec("malignant", radius=(0.11, 0.20), aspect=(0.75, 1.3), echo=(0.15, 0.5),
               lobulation=(0.0, 0.15), spiculation=(0.22, 0.45), margin_blur=(0.015, 0.040),
               posterior=(-0.55, -0.2), posterior_prob=0.6),
    LesionSpec("cyst", radius=(0.10, 0.18), aspect=(0.9, 1.2), echo=(0.02, 0.12),
               lobulation=(0.0, 0.05), spiculation=(0.0, 0.02), margin_blur=(0.008, 0.018),
               posterior=(0.3, 0.7), posterior_prob=0.9),
    # Further classes, for multi-class runs (2 to 10 classes): each differs from the others in
    # at least one of margin shape, echogenicity, size or posterior feature.
    LesionSpec("fibroadenoma", radius=(0.15, 0.25), aspect=(1.4, 2.0), echo=(0.35, 0.65),
               lobulation=(0.15, 0.30), spiculation=(0.0, 0.03), margin_blur=(0.010, 0.025),
               posterior=(0.0, 0.2), posterior_prob=0.3),
    LesionSpec("lipoma", radius=(0.14, 0.24), aspect=(1.3, 2.0), echo=(0.85, 1.2),
               lobulation=(0.0, 0.08), spiculation=(0.0, 0.03), margin_blur=(0.020, 0.045),
               posterior=(0.0, 0.1), posterior_prob=0.1),
    LesionSpec("abscess", radius=(0.13, 0.22), aspect=(0.8, 1.3), echo=(0.25, 0.45),
               lobulation=(0.10, 0.25), spiculation=(0.05, 0.12), margin_blur=(0.040, 0.070),
               posterior=(0.2, 0.5), posterior_prob=0.7),
    LesionSpec("microlesion", radius=(0.05, 0.09), aspect=(0.9, 1.3), echo=(0.1, 0.4),
               lobulation=(0.0, 0.08), spiculation=(0.0, 0.06), margin_blur=(0.008, 0.020),
               posterior=(-0.3, 0.0), posterior_prob=0.3),
    LesionSpec("hematoma", radius=(0.16, 0.26), aspect=(1.6, 2.4), echo=(0.45, 0.75),
               lobulation=(0.0, 0.06), spiculation=(0.0, 0.03), margin_blur=(0.030, 0.060),
               posterior=(0.0, 0.0), posterior_prob=0.0),
    LesionSpec("papilloma", radius=(0.09, 0.15), aspect=(1.0, 1.4), echo=(0.03, 0.10),
               lobulation=(0.25, 0.40), spiculation=(0.0, 0.03), margin_blur=(0.008, 0.018),
               posterior=(0.2, 0.5), posterior_prob=0.8),
    LesionSpec("carcinoma_shadow", radius=(0.12, 0.20), aspect=(0.6, 0.9), echo=(0.05, 0.25),
               lobulation=(0.05, 0.15), spiculation=(0.12, 0.25), margin_blur=(0.020, 0.045),
               posterior=(-0.8, -0.5), posterior_prob=1.0),
)
CLASS_NAMES: tuple[str, ...] = tuple(spec.name for spec in CLASS_SPECS)

_LOBULATION_ORDERS = (2, 3)
_SPICULATION_ORDERS = (5, 6, 7, 8, 9)


def phantom_class_names(num_classes: int) -> tuple[str, ...]:
    """The first `num_classes` phantom class names, in label order."""
    _check_num_classes(num_classes)
    return CLASS_NAMES[:num_classes]


def generate_phantom(
    counts: Sequence[int], image_size: int, channels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Generate `counts[k]` phantoms of class k, shuffled, deterministic in `seed`.

    Returns (images uint8 [N, H, W, C] with H = W = image_size and C = channels,
    labels int64 [N]) with N = sum(counts). With C = 3 each scan gets a colour cast of its own
    (a per-image gain per channel, as from differently calibrated colour scanners, drawn from a
    generator of its own so the grey images do not change); the classes do not differ in colour.
    """
    _check_args(counts, image_size, channels)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int64), counts))
    params = _draw_lesions(labels, rng)
    y, x = _pixel_grid(image_size)
    inside, posterior_mask = _lesion_masks(params, y, x)
    tissue = _tissue(len(labels), y, x, rng)
    lesion = tissue * params["echo"][:, None, None]
    image = tissue * (1.0 - inside) + lesion * inside
    image *= 1.0 + params["posterior"][:, None, None] * posterior_mask * (1.0 - inside)
    image *= _depth_gain(len(labels), y, rng)
    image *= _speckle(image.shape, rng)
    if channels == 3:
        cast = np.random.default_rng([seed, 3]).uniform(0.75, 1.15, (len(labels), 1, 1, 3)).astype(np.float32)
        return np.clip(np.rint(image[..., None] * cast * 255.0), 0, 255).astype(np.uint8), labels
    gray = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return gray[..., None], labels


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= len(CLASS_SPECS):
        raise ConfigError(
            f"data.phantom_counts: got {num_classes} classes, the phantom defines 1 to "
            f"{len(CLASS_SPECS)} ({', '.join(CLASS_NAMES)})"
        )


def _check_args(counts: Sequence[int], image_size: int, channels: int) -> None:
    _check_num_classes(len(counts))
    if any(int(c) != c or c < 0 for c in counts) or sum(counts) == 0:
        raise ConfigError(
            f"data.phantom_counts: expected non-negative integers with a positive sum, got {list(counts)}"
        )
    if image_size < 8:
        raise ConfigError(f"data.image_size: expected at least 8 pixels, got {image_size}")
    if channels not in (1, 3):
        raise ConfigError(f"data.channels: expected 1 or 3, got {channels}")


def _draw_lesions(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw every per-image lesion parameter as a float32 [N] (or [N, K]) array."""
    n = len(labels)

    def per_class(field: str) -> np.ndarray:
        lo = np.array([getattr(s, field)[0] for s in CLASS_SPECS])[labels]
        hi = np.array([getattr(s, field)[1] for s in CLASS_SPECS])[labels]
        return rng.uniform(lo, hi).astype(np.float32)

    fields = ("radius", "aspect", "echo", "lobulation", "spiculation", "margin_blur", "posterior")
    params = {f: per_class(f) for f in fields}
    prob = np.array([s.posterior_prob for s in CLASS_SPECS])[labels]
    params["posterior"] *= rng.random(n) < prob
    params["cy"] = rng.uniform(0.35, 0.6, n).astype(np.float32)  # shallow enough to leave room below
    params["cx"] = rng.uniform(0.32, 0.68, n).astype(np.float32)
    params["angle"] = rng.uniform(-0.5, 0.5, n).astype(np.float32)  # radians: lesions lie roughly along the skin
    params["lobe_amp"] = _split_amplitude(params["lobulation"], len(_LOBULATION_ORDERS), rng)
    params["spic_amp"] = _split_amplitude(params["spiculation"], len(_SPICULATION_ORDERS), rng)
    params["lobe_phase"] = rng.uniform(0, 2 * np.pi, (n, len(_LOBULATION_ORDERS))).astype(np.float32)
    params["spic_phase"] = rng.uniform(0, 2 * np.pi, (n, len(_SPICULATION_ORDERS))).astype(np.float32)
    return params


def _split_amplitude(total: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Split each total amplitude [N] over k harmonics at random (Dirichlet weights) -> [N, k]."""
    weights = rng.dirichlet(np.ones(k), size=len(total)).astype(np.float32)
    return total[:, None] * weights


def _pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: y (depth) [1, H, 1] and x (lateral) [1, 1, W]."""
    centres = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    return centres[None, :, None], centres[None, None, :]


def _lesion_masks(params: dict[str, np.ndarray], y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Soft lesion mask and posterior-region mask, both float32 [N, H, W] in [0, 1].

    The margin is r(phi) = radius * (1 + sum_k a_k cos(k phi + psi_k)) in the lesion's own
    (rotated, aspect-scaled) frame; the mask is a logistic step of width `margin_blur`.
    """
    p = {k: v[:, None, None] for k, v in params.items() if v.ndim == 1}
    dx, dy = x - p["cx"], y - p["cy"]
    cos_a, sin_a = np.cos(p["angle"]), np.sin(p["angle"])
    u = (dx * cos_a + dy * sin_a) / np.sqrt(p["aspect"])  # along the long axis
    v = (-dx * sin_a + dy * cos_a) * np.sqrt(p["aspect"])
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    shape = np.ones_like(rho)
    harmonics = ((_LOBULATION_ORDERS, "lobe_amp", "lobe_phase"), (_SPICULATION_ORDERS, "spic_amp", "spic_phase"))
    for orders, amp_key, phase_key in harmonics:
        for j, order in enumerate(orders):
            amp = params[amp_key][:, j, None, None]
            phase = params[phase_key][:, j, None, None]
            shape += amp * np.cos(order * phi + phase)
    inside = _sigmoid((p["radius"] * shape - rho) / p["margin_blur"])
    # The posterior feature spans the lesion's lateral extent and starts at its centre depth.
    half_width = p["radius"] * np.sqrt(p["aspect"])
    lateral = _sigmoid((half_width - np.abs(dx)) / 0.03)
    below = _sigmoid(dy / 0.03)
    return inside, lateral * below


def _tissue(n: int, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background echogenicity [N, H, W]: a brighter skin/fibroglandular band plus low-frequency texture."""
    base = rng.uniform(0.45, 0.7, (n, 1, 1)).astype(np.float32)
    skin_depth = rng.uniform(0.05, 0.15, (n, 1, 1)).astype(np.float32)
    skin = 0.35 * np.exp(-(((y - skin_depth) / 0.04) ** 2))
    texture = np.zeros((n, y.shape[1], x.shape[2]), dtype=np.float32)
    for _ in range(3):  # a few random plane waves give smooth, non-repeating texture
        fy, fx = rng.uniform(1.0, 4.0, (2, n, 1, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        texture += np.cos(2 * np.pi * (fy * y + rng.choice([-1, 1], (n, 1, 1)) * fx * x) + phase)
    return base * (1.0 + skin + 0.06 * texture)


def _depth_gain(n: int, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Attenuation exp(-alpha * depth) partly undone by time-gain compensation -> [N, H, 1]."""
    alpha = rng.uniform(0.8, 2.0, (n, 1, 1)).astype(np.float32)
    tgc = rng.uniform(0.4, 1.0, (n, 1, 1)).astype(np.float32)
    return np.exp(-alpha * y) * (1.0 + tgc * alpha * y)


def _speckle(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Multiplicative unit-mean speckle [N, H, W]: Rayleigh amplitude, laterally correlated.

    Averaging two laterally adjacent samples mimics the wider lateral than axial resolution;
    a per-image strength blends it with 1 so the noise level varies between scans.
    """
    rayleigh = rng.rayleigh(1.0 / np.sqrt(np.pi / 2.0), shape).astype(np.float32)
    rayleigh = 0.5 * (rayleigh + np.roll(rayleigh, 1, axis=2))
    strength = rng.uniform(0.3, 0.7, (shape[0], 1, 1)).astype(np.float32)
    return 1.0 + strength * (rayleigh - 1.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
