"""Downstream classifiers for the evaluate stage, always trained from scratch (weights=None).

`resnet18` is the CIFAR-style ResNet-18 that MedMNIST reports at 28 px (He et al. 2016, sec.
4.2 stem): torchvision's `ResNet`/`BasicBlock` with a 3x3 stride-1 first convolution taking the
data's own channels and no max-pool, at native resolution (28 px -> 28/14/7/4 px feature maps).
It is the default for images of 32 px and below; at larger sizes its cost grows with the pixel
count (64 px: 4x), where `resnet18_imagenet` is the cheaper choice.

Every other network sees its input through one adapter, `InputAdapter`:

* grayscale is repeated to three channels (no per-architecture stem surgery). From scratch this
  loses nothing: a 3-channel conv on a repeated image is a 1-channel conv whose kernel is the sum
  of the three, and with Kaiming init (std ∝ 1/sqrt(fan_in)) that sum has exactly the std a
  1-channel kernel would get, so even the initial distribution is the same;
* images are bilinearly resized to `input_size_for(name, image_size)`: the torchvision networks
  downsample 32x, which collapses a 28 px image to a 1x1 map before the last stage, so they get
  at least `MIN_SIDE` px (a 2x2 final map); `simple_cnn` is built for small images and keeps them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from mgdm_core.errors import ConfigError

# Smallest side fed to a torchvision network: 32x downsampling leaves a 2x2 final feature map.
MIN_SIDE = 64

_TORCHVISION: dict[str, Callable[..., nn.Module]] = {
    "resnet18_imagenet": tvm.resnet18,  # torchvision's ImageNet stem (7x7 stride 2 + max-pool)
    "resnet50": tvm.resnet50,
    "vgg16_bn": tvm.vgg16_bn,
    "densenet121": tvm.densenet121,
    "mobilenet_v2": tvm.mobilenet_v2,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "efficientnet_b0": tvm.efficientnet_b0,
    "shufflenet_v2_x1_0": tvm.shufflenet_v2_x1_0,
    "squeezenet1_1": tvm.squeezenet1_1,
    "regnet_y_400mf": tvm.regnet_y_400mf,
}

NETWORKS: tuple[str, ...] = ("simple_cnn", "resnet18", *_TORCHVISION)
NATIVE: tuple[str, ...] = ("simple_cnn", "resnet18")  # built for small images: no resize, own channels


def _check_name(name: str) -> None:
    if name not in NETWORKS:
        raise ConfigError(f"evaluate network: unknown '{name}', expected one of {', '.join(NETWORKS)}")


def input_size_for(name: str, image_size: int) -> int:
    """Side length (px) the network `name` is fed for `image_size` px square images."""
    _check_name(name)
    if name in NATIVE:
        return image_size
    return max(image_size, MIN_SIDE)


def simple_cnn(num_classes: int) -> nn.Module:
    """Three conv-BN-ReLU blocks (32/64/128 channels, two 2x pools) and a linear head.

    About 0.1 M parameters: fast enough on CPU at 28 px for smoke tests and tiny profiles.
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def resnet18_cifar(in_channels: int, num_classes: int) -> nn.Module:
    """ResNet-18 for small images: [B, in_channels, H, W] -> [B, num_classes], feature maps at
    H, H/2, H/4, H/8 (ceil) in the four stages. About 11.2 M parameters.

    torchvision's ResNet with `conv1` replaced by a 3x3 stride-1 convolution (Kaiming-initialised
    as torchvision initialises its own) and `maxpool` by the identity.
    """
    net = tvm.ResNet(tvm.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


class InputAdapter(nn.Module):
    """Repeats grayscale to RGB and resizes to `size` px, then calls `net`: [B,C,H,W] -> [B,K]."""

    def __init__(self, net: nn.Module, in_channels: int, size: int) -> None:
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)  # a view: no copy
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)


def build_network(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised network `name` (see `NETWORKS`): `resnet18` as it is, every other
    one wrapped in `InputAdapter`.

    Initialisation draws from torch's global RNG: seed it (the caller's job) for reproducibility.
    """
    _check_name(name)
    if in_channels not in (1, 3):
        raise ConfigError(f"evaluate: images must have 1 or 3 channels, got {in_channels}")
    if num_classes < 2:
        raise ConfigError(f"evaluate: need at least 2 classes, got {num_classes}")
    if name == "resnet18":
        return resnet18_cifar(in_channels, num_classes)
    if name == "simple_cnn":
        net = simple_cnn(num_classes)
    else:
        net = _TORCHVISION[name](weights=None, num_classes=num_classes)
    return InputAdapter(net, in_channels, input_size_for(name, image_size))
