"""Class-conditional diffusion UNet (guided-diffusion's UNetModel structure, any reachable image size).

Input blocks descend through `channel_mult` levels (each: `num_res_blocks` residual blocks,
attention where the feature map's side is in `attention_resolutions`, then a down-sampling block);
a middle block res-attn-res; output blocks ascend with `num_res_blocks + 1` residual blocks per
level, each concatenating one skip connection. The class embedding has one extra row, the null
class used for classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from mgdm_core.errors import ConfigError
from mgdm_core.networks.presets import preset_attention_resolutions, preset_channel_mult, unet_preset
from mgdm_core.networks.blocks import (
    build_encoder,
    AttentionBlock,
    EmbedSequential,
    ResBlock,
    Upsample,
    check_layout,
    group_norm,
    heads_for,
    level_sizes,
    timestep_embedding,
    zero_init,
)


class UNetConfig(BaseModel):
    """Architecture of the diffusion UNet; `attention_resolutions` are feature-map sides in pixels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    num_classes: int = Field(gt=0, description="real classes; the embedding adds the null class")
    width: int = Field(gt=0, description="channels at the first level (guided-diffusion's model_channels)")
    channel_mult: tuple[int, ...]
    num_res_blocks: int = Field(gt=0)
    attention_resolutions: tuple[int, ...]
    num_heads: int = Field(gt=0)
    num_head_channels: int = Field(description="channels per head; -1 uses num_heads heads")
    dropout: float = Field(ge=0.0, lt=1.0)
    scale_shift_norm: bool
    resblock_updown: bool
    learn_sigma: bool

    @model_validator(mode="after")
    def _check_layout(self) -> UNetConfig:
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ConfigError(f"num_head_channels: must be -1 or positive, got {self.num_head_channels}")
        if any(mult <= 0 for mult in self.channel_mult):
            raise ConfigError(f"channel_mult: multipliers must be positive, got {self.channel_mult}")
        check_layout(
            image_size=self.image_size,
            width=self.width,
            channel_mult=self.channel_mult,
            attention_resolutions=self.attention_resolutions,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
        )
        return self

    @property
    def null_class(self) -> int:
        """Class index meaning "no class" (classifier-free guidance's unconditional pass)."""
        return self.num_classes

    @property
    def out_channels(self) -> int:
        """eps (C channels), plus the variance interpolation v (C more) when `learn_sigma`."""
        return self.in_channels * (2 if self.learn_sigma else 1)


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """Per-level channel multipliers by image size (`presets.preset_channel_mult`)."""
    return preset_channel_mult(image_size)


def default_attention_resolutions(image_size: int, channel_mult: tuple[int, ...]) -> tuple[int, ...]:
    """Attention at the two coarsest levels (28 -> (14, 7), 32 -> (16, 8), 64 -> (16, 8))."""
    return preset_attention_resolutions(image_size, channel_mult)


def default_unet_config(image_size: int, in_channels: int, num_classes: int, **overrides: Any) -> UNetConfig:
    """A UNetConfig with levels and attention derived from the image size; `overrides` replace any field.

    Raises ConfigError naming the key when an override is unknown or invalid.
    """
    channel_mult = tuple(overrides.get("channel_mult", default_channel_mult(image_size)))
    fields: dict[str, Any] = {
        "image_size": image_size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "width": unet_preset(image_size)["width"],
        "channel_mult": channel_mult,
        "num_res_blocks": 2,
        "attention_resolutions": default_attention_resolutions(image_size, channel_mult),
        "num_heads": 4,
        "num_head_channels": -1,
        # Small medical sets overfit quickly; improved-diffusion used 0.1-0.3 on CIFAR-10.
        "dropout": 0.1,
        "scale_shift_norm": True,
        "resblock_updown": True,
        "learn_sigma": True,
    }
    try:
        return UNetConfig(**{**fields, **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "unet"
        raise ConfigError(f"{key}: {first['msg']}") from None


class UNet(nn.Module):
    """eps (and variance) prediction network: (x [B,C,H,W], t [B] long, y [B] long | None) -> [B, C or 2C, H, W].

    `y=None` is the null class for the whole batch; per-sample null labels use index `config.null_class`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        emb_channels = 4 * width
        self.time_embed = nn.Sequential(nn.Linear(width, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.label_embed = nn.Embedding(config.num_classes + 1, emb_channels)

        def res_block(channels: int, out_channels: int, *, down: bool = False, up: bool = False) -> ResBlock:
            return ResBlock(
                channels,
                emb_channels,
                config.dropout,
                out_channels=out_channels,
                scale_shift_norm=config.scale_shift_norm,
                down=down,
                up=up,
            )

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, heads_for(channels, config.num_heads, config.num_head_channels))

        sizes = level_sizes(config.image_size, len(config.channel_mult))
        self.input_blocks, skip_channels, channels = build_encoder(
            in_channels=config.in_channels, width=width, channel_mult=config.channel_mult,
            blocks_per_level=config.num_res_blocks, sizes=sizes, attention_resolutions=config.attention_resolutions,
            resblock_updown=config.resblock_updown, res_block=res_block, attention=attention,
        )

        self.middle_block = EmbedSequential([res_block(channels, channels), attention(channels), res_block(channels, channels)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), width * mult)]
                channels = width * mult
                if sizes[level] in config.attention_resolutions:
                    layers.append(attention(channels))
                if level and index == config.num_res_blocks:
                    up = res_block(channels, channels, up=True) if config.resblock_updown else Upsample(channels, True)
                    layers.append(up)
                self.output_blocks.append(EmbedSequential(layers))

        self.out = nn.Sequential(
            group_norm(channels), nn.SiLU(), zero_init(nn.Conv2d(channels, config.out_channels, 3, padding=1))
        )
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "UNet":
        """Run on channels_last (NHWC) activations and weights; inputs and outputs stay [B, C, H, W] NCHW.

        The same function to float tolerance (the blocks take NHWC-friendly paths, see
        `Float32GroupNorm` and `AttentionBlock`). On CPU, oneDNN's forward convolutions run 1.16-1.84x
        faster on NHWC, which makes a forward 1.1-1.15x faster at the reference configuration; training
        stays NCHW (forward + backward convolutions gain 0.87-1.17x, and a training step measured slower).
        """
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] noisy images, t: [B] int64 timesteps, y: [B] int64 labels or None (null class)."""
        config = self.config
        if x.shape[1:] != (config.in_channels, config.image_size, config.image_size):
            raise ValueError(
                f"UNet built for [B, {config.in_channels}, {config.image_size}, {config.image_size}], "
                f"got {list(x.shape)}"
            )
        if y is None:
            y = torch.full((x.shape[0],), config.null_class, dtype=torch.long, device=x.device)
        emb = self.time_embed(timestep_embedding(t, config.width)) + self.label_embed(y)

        h = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # An up-sampling block must land exactly on the next skip's size (odd sizes round up going down).
            target = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, target)
        out = self.out(h)
        return out.contiguous() if self.channels_last else out
