"""MobileNet-V2 (Sandler et al. 2018): the ImageNet classifier and the student's stride-16 encoder.

Both forms share torchvision's `mobilenet_v2` parameter names and shapes, so torchvision's ImageNet
file (`mobilenet_v2-b0353104.pth`) loads into `MobileNetV2()` with `strict=True`, and into
`MobileNetV2Encoder` without its head (see `dvos.models.backbones.weights`).

Layout (width multiplier 1.0, channels rounded to multiples of 8, BatchNorm eps 1e-5 momentum 0.1):

    features.0        3×3 conv stride 2 → 32, BN, ReLU6                          stride 2
    features.1        inverted residual t=1 → 16                                 stride 2
    features.2-3      t=6 → 24  (first block stride 2)                           stride 4
    features.4-6      t=6 → 32  (first block stride 2)                           stride 8
    features.7-10     t=6 → 64  (first block stride 2)                           stride 16
    features.11-13    t=6 → 96                                                   stride 16
    features.14-16    t=6 → 160 (first block stride 2)                           stride 32
    features.17       t=6 → 320                                                  stride 32
    features.18       1×1 conv → 1280, BN, ReLU6 (classifier form only)
    classifier        Dropout(0.2), Linear(1280, num_classes) (classifier form only)

Output stride 16 (the encoder): the first block of every stage that would bring the stride past the
target keeps stride 1 and its dilation (1 for `features.14`); every later 3×3 depthwise conv is
dilated by the stride that was skipped (2 for `features.15-17`). Every layer then samples the same
input pixels as in the stride-32 network: the stride-16 map at (2i, 2j) equals the stride-32 map at
(i, j) exactly (DeepLab's atrous rule).

Padding: every 3×3 conv pads by its dilation, so a stride-2 layer maps a side of n pixels to
ceil(n / 2), and a feature of stride s has size ceil(H / s) × ceil(W / s) for any input size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# ImageNet statistics of torchvision's (and DINO's) preprocessing, RGB order, for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (t, c, n, s): expansion factor, output channels, blocks, stride of the first block.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

# Blocks after which the encoder returns its features: stride 4 (24 ch), 8 (32 ch), 16 (320 ch).
ENCODER_TAPS = (3, 6, 17)


def imagenet_normalize(image: torch.Tensor) -> torch.Tensor:
    """Standardise an RGB image with the ImageNet mean and std.

    Args:
        image: B × 3 × H × W float in [0, 1] (RGB).

    Returns:
        B × 3 × H × W, (image - mean) / std; the memory format of `image` is kept.
    """
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of `divisor`, never below 90 % of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU6; parameters named `0.*` (conv) and `1.*` (BN)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1×1, t·C_in) → depthwise 3×3 → linear projection (1×1), residual when shapes allow.

    Parameter names follow torchvision: for t = 1 `conv.0` (depthwise ConvBNReLU6), `conv.1`
    (projection conv), `conv.2` (BN); for t > 1 `conv.0` (expand), `conv.1` (depthwise), `conv.2`
    (projection conv), `conv.3` (BN).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, expansion: int, dilation: int = 1
    ) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B × C_in × H × W → B × C_out × H/stride × W/stride (ceil)."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


def build_features(*, output_stride: int = 32, include_last_conv: bool = True) -> nn.Sequential:
    """The `features` stack: stem, 17 inverted residual blocks and (optionally) the 1×1 conv to 1280.

    Args:
        output_stride: 8, 16 or 32; strides beyond it become dilations (see the module docstring).
        include_last_conv: append `features.18` (1×1 conv → 1280, BN, ReLU6), the classifier's.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    channels = make_divisible(STEM_CHANNELS)
    layers: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
    current_stride, dilation = 2, 1
    for expansion, stage_channels, blocks, stage_stride in INVERTED_RESIDUAL_SETTING:
        out_channels = make_divisible(stage_channels)
        first_dilation = dilation
        if current_stride * stage_stride > output_stride:
            # Keep the resolution; the stride this stage skipped becomes dilation for what follows.
            first_stride, dilation = 1, dilation * stage_stride
        else:
            first_stride, current_stride = stage_stride, current_stride * stage_stride
        for index in range(blocks):
            layers.append(
                InvertedResidual(
                    channels,
                    out_channels,
                    stride=first_stride if index == 0 else 1,
                    expansion=expansion,
                    dilation=first_dilation if index == 0 else dilation,
                )
            )
            channels = out_channels
    if include_last_conv:
        layers.append(ConvBNReLU6(channels, make_divisible(LAST_CHANNELS), kernel_size=1))
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan-out) convs, unit BN, N(0, 0.01) linear."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)


class MobileNetV2(nn.Module):
    """The ImageNet classifier, parameter-for-parameter torchvision's `mobilenet_v2`.

    Like torchvision's, it expects ImageNet-normalised input (`imagenet_normalize`), not [0, 1].

    Args:
        num_classes: size of the last linear layer (1000 for ImageNet).
        output_stride: 32 (the classifier as published), 16 or 8 (dilated, same parameters).
        dropout: dropout before the last linear layer.
    """

    def __init__(self, num_classes: int = 1000, *, output_stride: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = build_features(output_stride=output_stride, include_last_conv=True)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(make_divisible(LAST_CHANNELS), num_classes)
        )
        init_weights(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W, ImageNet-normalised → class logits B × num_classes."""
        x = self.features(image)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


class MobileNetV2Features(NamedTuple):
    """The encoder's multi-scale features (sizes: ceil(H / s) × ceil(W / s))."""

    stride4: torch.Tensor  # B × 24 × H/4 × W/4, after features.3
    stride8: torch.Tensor  # B × 32 × H/8 × W/8, after features.6
    stride16: torch.Tensor  # B × 320 × H/16 × W/16, after features.17


class MobileNetV2Encoder(nn.Module):
    """The student's image encoder: MobileNet-V2 `features.0-17` at output stride 16.

    Parameter names are torchvision's (`features.0` ... `features.17`); the classifier's head
    (`features.18`, `classifier`) is absent and skipped when ImageNet weights are loaded
    (`load_imagenet_mobilenet_v2`). Input is an RGB image in [0, 1], standardised inside with the
    ImageNet mean and std (the statistics of the ImageNet weights). Works with channels_last
    tensors and modules (`.to(memory_format=torch.channels_last)`): every op keeps the format.

    Attributes:
        out_channels: (24, 32, 320), the channels of `stride4`, `stride8`, `stride16`.
        strides: the strides of those three maps, (4, 8, 16) at the default output stride.
    """

    out_channels = (24, 32, 320)

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__()
        self.output_stride = output_stride
        self.features = build_features(output_stride=output_stride, include_last_conv=False)
        self.strides = (4, min(8, output_stride), output_stride)
        init_weights(self)

    def forward(self, image: torch.Tensor) -> MobileNetV2Features:
        """Encode a batch of frames.

        Args:
            image: B × 3 × H × W float RGB in [0, 1] (any H, W).

        Returns:
            `MobileNetV2Features(stride4, stride8, stride16)`: B × 24 × ⌈H/4⌉ × ⌈W/4⌉,
            B × 32 × ⌈H/8⌉ × ⌈W/8⌉, B × 320 × ⌈H/16⌉ × ⌈W/16⌉.
        """
        x = imagenet_normalize(image)
        taps = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in ENCODER_TAPS:
                taps.append(x)
        return MobileNetV2Features(*taps)
