"""Building blocks shared by the diffusion UNet and the noisy classifier.

The block structure follows openai/guided-diffusion (`unet.py`) so that parameter counts match
the original MGDM release: GroupNorm residual blocks conditioned on a timestep embedding
(optionally FiLM-style scale-shift), multi-head self-attention over the flattened feature map,
and stride-2 down/up-sampling. Unlike the original, every resampling takes odd sizes: down-sampling
rounds up (7 -> 4) and up-sampling goes to an explicit target size (4 -> 7).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgdm_core.errors import ConfigError

MAX_NORM_GROUPS = 32  # guided-diffusion's GroupNorm32
MIN_CHANNELS_PER_GROUP = 4


def norm_groups(channels: int) -> int:
    """GroupNorm groups for a layer of `channels`: the most groups (at most 32) of >= 4 channels each.

    guided-diffusion always uses 32 groups and assumes >= 128 channels (4 per group). At the
    narrow widths a CPU can train (32-64 channels), 32 groups hold 1-2 channels each, which is
    nearly instance norm; keeping >= 4 channels per group normalises over comparable statistics
    at every width, and gives exactly the original's 32 groups from 128 channels up.
    """
    for groups in range(min(MAX_NORM_GROUPS, channels // MIN_CHANNELS_PER_GROUP), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def downsampled_size(size: int) -> int:
    """Feature-map side after one stride-2 down-sampling: ceil(size / 2), for conv and pooling alike."""
    return (size + 1) // 2


def level_sizes(image_size: int, levels: int) -> list[int]:
    """Feature-map side at each of `levels` resolutions (28, 3 -> [28, 14, 7]); ConfigError if unreachable."""
    sizes = [image_size]
    for _ in range(levels - 1):
        if sizes[-1] < 2:
            raise ConfigError(
                f"channel_mult: {levels} levels need {levels - 1} halvings of image_size {image_size}, "
                f"but the feature map is already {sizes[-1]}x{sizes[-1]} after {len(sizes) - 1}; use fewer levels"
            )
        sizes.append(downsampled_size(sizes[-1]))
    return sizes


def check_layout(
    *,
    image_size: int,
    width: int,
    channel_mult: tuple[int, ...],
    attention_resolutions: tuple[int, ...],
    num_heads: int,
    num_head_channels: int,
) -> list[int]:
    """Validate an encoder layout shared by the UNet and the classifier; returns the level sizes.

    Checks that every level is reachable, that each
    attention resolution is one of the level sizes (in pixels), and that attention heads divide the
    channels where attention runs (including the middle block at the coarsest level).
    """
    if not channel_mult:
        raise ConfigError("channel_mult: needs at least one level")
    sizes = level_sizes(image_size, len(channel_mult))
    unreachable = sorted(set(attention_resolutions) - set(sizes), reverse=True)
    if unreachable:
        raise ConfigError(
            f"attention_resolutions: {unreachable} are not feature-map sizes of this network "
            f"(image_size {image_size} gives {sizes} pixels per level); set attention_resolutions to some of "
            f"{sizes}, or to coarsest / auto (the coarsest level / the two coarsest of any image size; with "
            f"channel_mult: auto the levels follow the image size too)"
        )
    attention_channels = [width * mult for mult, size in zip(channel_mult, sizes) if size in attention_resolutions]
    for channels in [*attention_channels, width * channel_mult[-1]]:
        try:
            heads_for(channels, num_heads, num_head_channels)
        except ValueError as err:
            raise ConfigError(f"num_heads / num_head_channels: {err}") from None
    return sizes


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in "Attention is all you need".

    t: [B] timesteps; returns [B, dim] = [cos(t * f_i), sin(t * f_i)] with geometric frequencies
    f_i = max_period^(-i / half). An odd `dim` gets one zero column so the width is exact.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def is_channels_last(x: Tensor) -> bool:
    """True when x [B, C, H, W] is stored NHWC (and not also NCHW-contiguous, as it is when C == 1 or H == W == 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm(channels: int) -> "Float32GroupNorm":
    """GroupNorm with `norm_groups(channels)` groups, computed in float32 even under autocast (as the original's GroupNorm32)."""
    return Float32GroupNorm(norm_groups(channels), channels)


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm with statistics in fp32 (bf16 variance over small feature maps is too coarse), and
    an optional FiLM scale-shift folded in: `normalize(x, scale, shift)` = norm(x) * (1 + scale) + shift.

    NCHW input takes PyTorch's GroupNorm kernel. NHWC (channels_last) input, which the UNet uses
    for inference on CPU because oneDNN's forward convolutions run 1.16-1.84x faster on it, takes a
    composite instead: PyTorch's channels_last GroupNorm kernel is about 5x slower than its NCHW one
    at 4 channels per group. It reduces per-channel means over H, W (fast in NHWC), centres on the
    group mean before squaring (the two-pass variance: a large mean does not cancel), and applies
    the whole normalisation, affine and scale-shift as one per-channel `x * a + b`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)

    def normalize(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        """norm(x) [* (1 + scale) + shift]; x [B, C, H, W] (or [B, C, L] in NCHW), scale/shift [B, C, 1, 1]."""
        if not is_channels_last(x):
            h = super().forward(x.float()).type(x.dtype)
            return h if scale is None else h * (1 + scale) + shift
        batch, channels = x.shape[:2]
        groups, per_group = self.num_groups, channels // self.num_groups
        xf = x.float()
        group_mean = xf.mean(dim=(2, 3)).view(batch, groups, per_group).mean(dim=2, keepdim=True)
        centred = xf - group_mean.expand(batch, groups, per_group).reshape(batch, channels, 1, 1)
        group_var = centred.square().mean(dim=(2, 3)).view(batch, groups, per_group).mean(dim=2, keepdim=True)
        gain = (torch.rsqrt(group_var + self.eps) * self.weight.view(groups, per_group)).view(batch, channels)
        bias = self.bias.expand(batch, channels)
        if scale is not None:
            scale, shift = scale.float().view(batch, channels), shift.float().view(batch, channels)
            gain, bias = gain * (1 + scale), bias * (1 + scale) + shift
        return torch.addcmul(bias[:, :, None, None], centred, gain[:, :, None, None]).type(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so a residual branch starts as the identity (guided-diffusion's trick)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class Downsample(nn.Module):
    """Halve the spatial size (rounding up): a stride-2 3x3 conv, or 2x2 average pooling when `use_conv` is False.

    x: [B, C, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)].
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pooling Downsample cannot change the channel count")
            # ceil_mode keeps the pooled size equal to the strided conv's on odd inputs.
            self.op = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour up-sampling to an explicit size, then an optional 3x3 conv.

    x: [B, C, h, w] -> [B, C_out, *size]; `size` is the matching skip connection's size, which is
    2h or 2h - 1 (odd sizes round up on the way down).
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding, optionally re-sampling (guided-diffusion's ResBlock).

    h = conv(SiLU(norm(x))); h += Linear(emb) (or h = norm(h) * (1 + scale) + shift when
    `scale_shift_norm`); h = zero-init conv(dropout(SiLU(...))); out = skip(x) + h.
    x: [B, C_in, H, W], emb: [B, E] -> [B, C_out, H', W'] with H' = H, ceil(H/2) (down) or `size` (up).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        scale_shift_norm: bool = False,
        down: bool = False,
        up: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        out_channels = out_channels or channels
        self.scale_shift_norm = scale_shift_norm
        self.down = down
        self.up = up
        self.in_norm_act = nn.Sequential(group_norm(channels), nn.SiLU())
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        # Re-sampling happens between the norm and the conv, on both branches (no parameters).
        if down:
            self.resample_h: nn.Module | None = Downsample(channels, use_conv=False)
            self.resample_x: nn.Module | None = Downsample(channels, use_conv=False)
        elif up:
            self.resample_h = Upsample(channels, use_conv=False)
            self.resample_x = Upsample(channels, use_conv=False)
        else:
            self.resample_h = self.resample_x = None
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift_norm else out_channels)
        )
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(p=dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip: nn.Module = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        h = self.in_norm_act(x)
        if self.down:
            h, x = self.resample_h(h), self.resample_x(x)
        elif self.up:
            if size is None:
                raise ValueError("an up-sampling ResBlock needs the target size")
            h, x = self.resample_h(h, size), self.resample_x(x, size)
        h = self.in_conv(h)
        emb_out = self.emb_proj(emb).type(h.dtype)[:, :, None, None]
        if self.scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm.normalize(h, scale, shift)
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_layers(h)


def heads_for(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of attention heads: `channels // num_head_channels`, or `num_heads` when that is -1."""
    if num_head_channels == -1:
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"{channels} channels do not split into heads of {num_head_channels} channels")
    return channels // num_head_channels


def multi_head_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Scaled dot-product attention over tokens.

    qkv: [B, 3 * C, T] (q, k, v stacked along channels) -> [B, C, T].
    """
    batch, width, tokens = qkv.shape
    head_channels = width // (3 * num_heads)
    # [B, 3C, T] -> 3 x [B, heads, T, head_channels], the layout SDPA expects. Made contiguous:
    # SDPA's fused CPU kernel (flash attention) needs a unit-stride last dimension and otherwise
    # falls back to the unfused math path, 2-3x slower at 14x14 tokens, forward and backward.
    q, k, v = qkv.reshape(batch, 3, num_heads, head_channels, tokens).permute(1, 0, 2, 4, 3).contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.permute(0, 1, 3, 2).reshape(batch, num_heads * head_channels, tokens)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all H*W positions: x + proj(attn(qkv(norm(x)))).

    x: [B, C, H, W] -> [B, C, H, W]; the output projection is zero-initialised.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        if is_channels_last(x):
            return self._forward_nhwc(x)
        tokens = x.reshape(batch, channels, height * width)
        h = multi_head_attention(self.qkv(self.norm(tokens)), self.num_heads)
        return (tokens + self.proj_out(h)).reshape(batch, channels, height, width)

    def _forward_nhwc(self, x: Tensor) -> Tensor:
        """The same block on channels_last x: NHWC memory is already [B, H*W, C] tokens, so the
        1x1 convolutions run as linear layers on it and nothing is transposed back to NCHW."""
        batch, channels, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view, no copy
        normed = self.norm(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        qkv = F.linear(normed, self.qkv.weight.squeeze(-1), self.qkv.bias)
        # Channel order (q|k|v, head, head channel) as the NCHW path; the head channels stay unit-stride for SDPA.
        q, k, v = qkv.view(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, height * width, channels)
        out = tokens + F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return out.view(batch, height, width, channels).permute(0, 3, 1, 2)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions (guided-diffusion's pool).

    x: [B, C, H, W] -> pooled [B, C] (`pool`), then `proj` maps it to [B, out_channels].
    """

    def __init__(self, spatial_size: int, channels: int, num_heads: int, out_channels: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.spatial_size = spatial_size
        # One learnt position per pixel plus one for the mean token in front.
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial_size**2 + 1) / channels**0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Linear(channels, out_channels)

    def pool(self, x: Tensor) -> Tensor:
        """x: [B, C, S, S] -> [B, C]: the attention output of the mean token."""
        batch, channels, height, width = x.shape
        if height != self.spatial_size or width != self.spatial_size:
            raise ValueError(
                f"AttentionPool2d built for {self.spatial_size}x{self.spatial_size} maps, got {height}x{width}"
            )
        tokens = x.reshape(batch, channels, height * width)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        # Only the mean token's output is used; the original projects all tokens and keeps token 0.
        return multi_head_attention(self.qkv(tokens), self.num_heads)[:, :, 0]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(x))


class EmbedSequential(nn.ModuleList):
    """A sequence of blocks; residual blocks get the embedding, up-sampling blocks the target size.

    x: [B, C, H, W], emb: [B, E], size: the output size for an up-sampling block (else unused).
    """

    def forward(self, x: Tensor, emb: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, size)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def build_encoder(
    *,
    in_channels: int,
    width: int,
    channel_mult: tuple[int, ...],
    blocks_per_level: int,
    sizes: list[int],
    attention_resolutions: tuple[int, ...],
    resblock_updown: bool,
    res_block,
    attention,
) -> tuple[nn.ModuleList, list[int], int]:
    """The down-sampling half shared by the UNet and the noise-aware classifier (guided-diffusion's
    input blocks): a stem conv, then per level `blocks_per_level` residual blocks (with attention at
    the listed feature-map sizes) and a down-sampling block between levels.

    Returns the blocks, the channels after each block (the UNet's skip connections) and the final
    channel count. `res_block(cin, cout, down=...)` and `attention(c)` build the parts.
    """
    channels = width * channel_mult[0]
    blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(in_channels, channels, 3, padding=1)])])
    skip_channels = [channels]
    last_level = len(channel_mult) - 1
    for level, mult in enumerate(channel_mult):
        for _ in range(blocks_per_level):
            layers: list[nn.Module] = [res_block(channels, width * mult)]
            channels = width * mult
            if sizes[level] in attention_resolutions:
                layers.append(attention(channels))
            blocks.append(EmbedSequential(layers))
            skip_channels.append(channels)
        if level != last_level:
            down = res_block(channels, channels, down=True) if resblock_updown else Downsample(channels, True)
            blocks.append(EmbedSequential([down]))
            skip_channels.append(channels)
    return blocks, skip_channels, channels
