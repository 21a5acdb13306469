"""The student's decoder (docs/METHOD.md, "Decoder"): an FPN from the propagated stride-16 map and
the encoder's stride-8 and stride-4 maps to per-object logits at stride 4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.layers import ConvGroupNormReLU


class FPNDecoder(nn.Module):
    """Propagated stride-16 map + stride-8 and stride-4 encoder skips → stride-4 logits.

    Args:
        in_channels: channels of the propagated map (2d).
        skip_channels: (C4, C8) of the stride-4 and stride-8 encoder maps.
        num_outputs: max_objects + 1.
        hidden: width at stride 16 (halved at strides 8 and 4).
    """

    def __init__(
        self, in_channels: int, skip_channels: Sequence[int], num_outputs: int, *, hidden: int = 256
    ) -> None:
        super().__init__()
        half = hidden // 2
        self.input_proj = ConvGroupNormReLU(in_channels, hidden, 1)
        self.conv16 = ConvGroupNormReLU(hidden, hidden, 3)
        self.skip8 = nn.Conv2d(skip_channels[1], hidden, 1)
        self.conv8 = ConvGroupNormReLU(hidden, half, 3)
        self.skip4 = nn.Conv2d(skip_channels[0], half, 1)
        self.conv4 = ConvGroupNormReLU(half, half, 3)
        self.head = nn.Conv2d(half, num_outputs, 1)

    def forward(self, propagated: torch.Tensor, stride8: torch.Tensor, stride4: torch.Tensor) -> torch.Tensor:
        """propagated: B × 2d × h × w, stride8: B × C8 × 2h × 2w, stride4: B × C4 × 4h × 4w → B × K+1 × 4h × 4w."""
        x = self.conv16(self.input_proj(propagated))
        x = F.interpolate(x, size=stride8.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv8(x + self.skip8(stride8))
        x = F.interpolate(x, size=stride4.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv4(x + self.skip4(stride4))
        return self.head(x)
