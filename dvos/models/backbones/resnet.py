"""ResNet encoder of stride 8 for the label-propagation teacher (CRW's modified ResNet-18).

The suite trains this encoder itself, without labels, by contrastive random walk (Jabri et al.
2020); a randomly initialised one is the "random-conv features" baseline of label propagation.
As in CRW, the stages after the one that reaches the output stride keep stride 1 (no dilation),
so the last map keeps the stride-8 resolution that label propagation needs.

Layout (defaults: stem 64, widths 64/128/256, depths 2/2/2, about 2.8 M parameters):

    conv1, bn1, ReLU, max-pool     7×7 conv stride 2 → stem_width, 3×3 max-pool stride 2   stride 4
    layer1                         `depths[0]` BasicBlocks → widths[0]                     stride 4
    layer2                         `depths[1]` BasicBlocks → widths[1] (first stride 2)    stride 8
    layer3 ...                     `depths[i]` BasicBlocks → widths[i] (stride 1)          stride 8

A BasicBlock is conv3×3-BN-ReLU-conv3×3-BN plus a shortcut (1×1 conv + BN when the shape
changes), then ReLU. Parameter names follow torchvision's `resnet18` (`conv1`, `bn1`, `layerN.M.
{conv1,bn1,conv2,bn2,downsample.0,downsample.1}`), so the stem and layer1–3 of a ResNet-18 state
dict load as they are (`strict=False` for its `layer4` and `fc`).

Sizes: every strided layer pads so that a side of n pixels becomes ceil(n / 2); the output is
B × widths[-1] × ceil(H/8) × ceil(W/8) for any H × W. Feature cell (i, j) is taken to stand for the
image pixels [8i, 8i + 8) × [8j, 8j + 8) (the convention of `dvos.models.teacher`).

Input: B × 3 × H × W RGB float in [0, 1]; the ImageNet mean/std standardisation happens inside.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dvos.models.backbones.mobilenet_v2 import imagenet_normalize

STEM_STRIDE = 4  # 7×7 conv stride 2, then 3×3 max-pool stride 2


class BasicBlock(nn.Module):
    """ResNet-18's residual block: two 3×3 convs with BatchNorm, a projection shortcut if needed."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B × C_in × H × W → B × C_out × ceil(H/stride) × ceil(W/stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


def stage_strides(num_stages: int, output_stride: int) -> list[int]:
    """Stride of each stage's first block: 2 until the output stride is reached, then 1.

    Stage 0 always keeps stride 1 (the stem's max-pool already halved the map), as in ResNet.
    """
    strides, current = [], STEM_STRIDE
    for index in range(num_stages):
        stride = 2 if index > 0 and current < output_stride else 1
        current *= stride
        strides.append(stride)
    if current != output_stride:
        raise ValueError(f"{num_stages} stage(s) cannot reach output stride {output_stride}")
    return strides


class ResNetEncoder(nn.Module):
    """ResNet-18-style encoder of output stride 8 (CRW's teacher encoder).

    Attributes:
        stride: output stride (pixels per feature cell), 8 by default.
        out_channels: channels of the output map, `widths[-1]`.
    """

    def __init__(
        self,
        *,
        widths: Sequence[int] = (64, 128, 256),
        depths: Sequence[int] = (2, 2, 2),
        stem_width: int = 64,
        output_stride: int = 8,
    ) -> None:
        """
        Args:
            widths: output channels of each stage.
            depths: BasicBlocks per stage (same length as `widths`).
            stem_width: channels of the 7×7 stem conv.
            output_stride: 4, 8, 16, ...; needs log2(output_stride / 4) + 1 stages at least.
        """
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if not widths or len(widths) != len(depths) or min(depths) < 1 or min(widths) < 1:
            raise ValueError(
                f"widths {widths} and depths {depths} must be non-empty, positive and of equal length"
            )
        self.widths, self.depths = tuple(widths), tuple(depths)
        self.stem_width = int(stem_width)
        self.stride = int(output_stride)
        self.out_channels = widths[-1]

        self.conv1 = nn.Conv2d(3, self.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = self.stem_width
        for index, (width, depth, stride) in enumerate(
            zip(widths, depths, stage_strides(len(widths), self.stride)), start=1
        ):
            blocks = [BasicBlock(in_channels, width, stride=stride)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        self.reset_parameters()

    @property
    def layers(self) -> list[nn.Sequential]:
        """The stages `layer1`, `layer2`, ... in order."""
        return [getattr(self, f"layer{index}") for index in range(1, len(self.widths) + 1)]

    @property
    def config(self) -> dict:
        """The constructor arguments, to rebuild the same architecture."""
        return {
            "widths": self.widths,
            "depths": self.depths,
            "stem_width": self.stem_width,
            "output_stride": self.stride,
        }

    def reset_parameters(self) -> None:
        """He (fan-out) init of the convs, BatchNorm γ = 1 and β = 0 (torchvision's ResNet init).

        The last BN of a block is not zero-initialised: a random encoder is a useful baseline
        ("random-conv features") only if its residual branches do something.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W RGB in [0, 1] → features B × out_channels × ceil(H/8) × ceil(W/8)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(imagenet_normalize(image)))))
        for layer in self.layers:
            x = layer(x)
        return x

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """Widths, depths and stem width read from the shapes of a ResNetEncoder state dict.

        Args:
            state_dict: keys as `ResNetEncoder.state_dict()` names them (no prefix).

        Returns:
            constructor keyword arguments (the output stride is not stored; 8 is assumed).

        Raises:
            KeyError: the dict has no `conv1.weight` or no `layer1.0.conv1.weight`.
        """
        stem_width = int(state_dict["conv1.weight"].shape[0])
        widths, depths = [], []
        index = 1
        while f"layer{index}.0.conv1.weight" in state_dict:
            widths.append(int(state_dict[f"layer{index}.0.conv1.weight"].shape[0]))
            depth = 0
            while f"layer{index}.{depth}.conv1.weight" in state_dict:
                depth += 1
            depths.append(depth)
            index += 1
        if not widths:
            raise KeyError("layer1.0.conv1.weight")
        return {"widths": tuple(widths), "depths": tuple(depths), "stem_width": stem_width}
