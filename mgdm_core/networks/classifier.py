"""Noise-aware classifier p(y | x_t, t) (guided-diffusion's EncoderUNetModel structure).

The UNet's input blocks and middle block, conditioned on the timestep only, then a pooling head:
attention pooling (the mean token attends over all positions, with learnt positional embeddings)
or global mean pooling, and a linear map to K logits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from mgdm_core.errors import ConfigError
from mgdm_core.networks.blocks import (
    build_encoder,
    AttentionBlock,
    AttentionPool2d,
    EmbedSequential,
    ResBlock,
    check_layout,
    group_norm,
    heads_for,
    level_sizes,
    timestep_embedding,
    zero_init,
)

# guided-diffusion's classifier sets num_heads=1 and always names channels per head; -1 is not offered.
_CLASSIFIER_NUM_HEADS = 1


class ClassifierConfig(BaseModel):
    """Architecture of the noisy classifier; `attention_resolutions` are feature-map sides in pixels."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(gt=0)
    in_channels: int = Field(gt=0)
    num_classes: int = Field(gt=1)
    width: int = Field(gt=0)
    depth: int = Field(gt=0, description="residual blocks per level")
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_head_channels: int = Field(gt=0)
    pool: Literal["attention", "mean"]
    scale_shift_norm: bool
    resblock_updown: bool
    dropout: float = Field(ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_layout(self) -> ClassifierConfig:
        if any(mult <= 0 for mult in self.channel_mult):
            raise ConfigError(f"channel_mult: multipliers must be positive, got {self.channel_mult}")
        check_layout(
            image_size=self.image_size,
            width=self.width,
            channel_mult=self.channel_mult,
            attention_resolutions=self.attention_resolutions,
            num_heads=_CLASSIFIER_NUM_HEADS,
            num_head_channels=self.num_head_channels,
        )
        return self

    @property
    def feature_channels(self) -> int:
        """Width D of the penultimate features (the coarsest level's channels)."""
        return self.width * self.channel_mult[-1]


class NoisyClassifier(nn.Module):
    """(x_t [B, C, H, W], t [B] int64) -> logits [B, K]; `features` gives the pooled [B, D] before the last layer."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        emb_channels = 4 * width
        self.time_embed = nn.Sequential(nn.Linear(width, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        def res_block(channels: int, out_channels: int, *, down: bool = False) -> ResBlock:
            return ResBlock(
                channels,
                emb_channels,
                config.dropout,
                out_channels=out_channels,
                scale_shift_norm=config.scale_shift_norm,
                down=down,
            )

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, heads_for(channels, _CLASSIFIER_NUM_HEADS, config.num_head_channels))

        sizes = level_sizes(config.image_size, len(config.channel_mult))
        self.input_blocks, _, channels = build_encoder(
            in_channels=config.in_channels, width=width, channel_mult=config.channel_mult,
            blocks_per_level=config.depth, sizes=sizes, attention_resolutions=config.attention_resolutions,
            resblock_updown=config.resblock_updown, res_block=res_block, attention=attention,
        )
        self.middle_block = EmbedSequential([res_block(channels, channels), attention(channels), res_block(channels, channels)])

        self.out_norm_act = nn.Sequential(group_norm(channels), nn.SiLU())
        if config.pool == "attention":
            self.attention_pool: AttentionPool2d | None = AttentionPool2d(
                sizes[-1], channels, heads_for(channels, _CLASSIFIER_NUM_HEADS, config.num_head_channels), config.num_classes
            )
            self.mean_head: nn.Linear | None = None
        else:
            self.attention_pool = None
            # Zero-initialised as in the original: the classifier starts at uniform predictions.
            self.mean_head = zero_init(nn.Linear(channels, config.num_classes))

    def features(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Penultimate features: x_t [B, C, H, W], t [B] -> pooled [B, D] (D = `config.feature_channels`)."""
        config = self.config
        if x_t.shape[1:] != (config.in_channels, config.image_size, config.image_size):
            raise ValueError(
                f"NoisyClassifier built for [B, {config.in_channels}, {config.image_size}, {config.image_size}], "
                f"got {list(x_t.shape)}"
            )
        emb = self.time_embed(timestep_embedding(t, config.width))
        h = x_t
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.out_norm_act(self.middle_block(h, emb))
        if self.attention_pool is not None:
            return self.attention_pool.pool(h)
        return h.mean(dim=(2, 3))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t: [B, C, H, W], t: [B] int64 -> logits [B, K]."""
        pooled = self.features(x_t, t)
        head = self.attention_pool.proj if self.attention_pool is not None else self.mean_head
        return head(pooled)
