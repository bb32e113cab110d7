"""Network sizes per image size, in the spirit of guided-diffusion's per-resolution defaults.

guided-diffusion picks `channel_mult` by resolution (64 px: 1,2,3,4; 128 px: 1,1,2,3,4; 256 px:
1,1,2,2,4,4) with attention at 32, 16 and 8 px and 192-256 base channels. mgdm keeps those level
structures, adds three levels for 28 and 32 px (guided-diffusion#74: its table has no entry for
them), puts attention at the two coarsest levels, and uses narrower bases so that the small
medical sets it targets train in hours rather than days. `diffusion.*` / `classifier.*` keys set
to `auto` (or null) take the value from here; explicit values always win.
"""

from __future__ import annotations

from typing import TypedDict

from mgdm_core.networks.blocks import level_sizes


class Preset(TypedDict):
    width: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]


def preset_channel_mult(image_size: int) -> tuple[int, ...]:
    """Per-level channel multipliers: 28/32 px three levels, 64 px four, 128 px five, larger six."""
    if image_size <= 32:
        return (1, 2, 2)
    if image_size <= 64:
        return (1, 2, 3, 4)
    if image_size <= 128:
        return (1, 1, 2, 3, 4)
    return (1, 1, 2, 2, 4, 4)


def preset_attention_resolutions(image_size: int, channel_mult: tuple[int, ...]) -> tuple[int, ...]:
    """Attention at the two coarsest levels (28 -> 14, 7; 32 -> 16, 8; 64 and 128 -> 16, 8)."""
    return tuple(level_sizes(image_size, len(channel_mult))[-2:])


def attention_sizes(choice: tuple[int, ...] | str | None, image_size: int, channel_mult: tuple[int, ...]) -> tuple[int, ...]:
    """`attention_resolutions` as pixel sizes: None (`auto`) the preset's two coarsest levels,
    `coarsest` the coarsest level alone, explicit sizes as given."""
    if choice is None:
        return preset_attention_resolutions(image_size, channel_mult)
    if choice == "coarsest":
        return tuple(level_sizes(image_size, len(channel_mult))[-1:])
    return tuple(choice)


def unet_preset(image_size: int) -> Preset:
    """The diffusion UNet: width 64 up to 32 px, 96 at 64 px, 128 above (guided-diffusion: 192-256)."""
    mult = preset_channel_mult(image_size)
    width = 64 if image_size <= 32 else 96 if image_size <= 64 else 128
    return {"width": width, "channel_mult": mult, "attention_resolutions": preset_attention_resolutions(image_size, mult)}


def classifier_preset(image_size: int) -> Preset:
    """The noisy classifier: the UNet's levels at a narrower width (32 up to 32 px, 64 above; guided-diffusion: 128)."""
    mult = preset_channel_mult(image_size)
    width = 32 if image_size <= 32 else 64
    return {"width": width, "channel_mult": mult, "attention_resolutions": preset_attention_resolutions(image_size, mult)}
