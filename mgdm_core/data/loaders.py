"""Array conversions between stored images and model inputs, and class-balanced sample weights."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# ITU-R BT.601 luma, the weights PIL's "L" conversion uses, so both paths agree.
_LUMA = np.array([0.299, 0.587, 0.114])


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize one uint8 image [H, W, C] (C in {1, 3}) to [height, width, C].

    Area averaging (PIL BOX) when shrinking avoids aliasing speckle into moire; bicubic when
    enlarging. Returns the input unchanged when the size already matches.
    """
    if image.shape[:2] == (height, width):
        return image
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    resized = np.asarray(pil.resize((width, height), resample=resample), dtype=np.uint8)
    return resized[:, :, None] if resized.ndim == 2 else resized


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N, H, W, channels]: RGB to gray by luma, gray to RGB by repetition."""
    current = images.shape[-1]
    if current == channels:
        return images
    if current == 3 and channels == 1:
        gray = images.astype(np.float64) @ _LUMA
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
    if current == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    raise ValueError(f"cannot convert {current} channels to {channels}; expected 1 or 3")


def resize_and_convert(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 [N, image_size, image_size, channels].

    Non-square inputs are stretched to the square (MedMNIST does the same). Converting to
    gray first and to RGB last keeps the resizing work on the fewest channels.
    """
    if channels == 1:
        images = convert_channels(images, 1)
    resized = np.empty((len(images), image_size, image_size, images.shape[-1]), dtype=np.uint8)
    for i, image in enumerate(images):
        resized[i] = resize_image(image, image_size, image_size)
    return convert_channels(resized, channels)


def to_model_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] in 0..255 -> float32 [N, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).contiguous()


def from_model_tensor(x: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] (nominally [-1, 1]) -> uint8 [N, H, W, C], clamped and rounded."""
    scaled = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights float64 [N] for `torch.utils.data.WeightedRandomSampler`.

    Weight of sample i is N / (K * count[labels[i]]) over the K classes present, so every
    class carries the same total weight and the mean weight is 1.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"class_weights expects non-empty labels [N], got shape {labels.shape}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return len(labels) / (len(counts) * counts[inverse].astype(np.float64))
