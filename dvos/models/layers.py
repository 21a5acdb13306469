"""Small layers shared by the student's parts: channel LayerNorm, sine position embedding, padding.

Everything here is plain PyTorch with no data-dependent Python control flow, so it traces for
TorchScript/ONNX export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of a map (the ConvNeXt/DAT "channels" LayerNorm).

    Args:
        channels: C.
        eps: added to the variance.
    """

    def __init__(self, channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B × C × H × W → B × C × H × W, each pixel's C values normalised then scaled."""
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def sine_position_embedding(
    height: int,
    width: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DETR's 2-D sine position embedding over a normalised grid (scale 2π, so any size maps to [0, 2π]).

    The first dim/2 channels encode y, the last dim/2 encode x; each half alternates sin and cos over
    dim/4 frequencies temperature^(-2k/(dim/2)).

    Args:
        height, width: size h × w of the map.
        dim: channels; a multiple of 4.

    Returns:
        1 × dim × h × w.
    """
    if dim % 4 != 0:
        raise ValueError(f"the sine position embedding needs dim divisible by 4, got {dim}")
    half = dim // 2
    eps = 1e-6
    # Cell centres 1..h, normalised so the last one is 2π (DETR's normalize=True).
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps) * (2 * math.pi)
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps) * (2 * math.pi)
    exponent = 2 * (torch.arange(half, device=device, dtype=torch.float32) // 2) / half
    inv_freq = temperature ** (-exponent)  # half
    y_angles = y[:, None] * inv_freq[None, :]  # h × half
    x_angles = x[:, None] * inv_freq[None, :]  # w × half
    y_embed = torch.stack((y_angles[:, 0::2].sin(), y_angles[:, 1::2].cos()), dim=2).flatten(1)
    x_embed = torch.stack((x_angles[:, 0::2].sin(), x_angles[:, 1::2].cos()), dim=2).flatten(1)
    y_map = y_embed.t()[:, :, None].expand(half, height, width)
    x_map = x_embed.t()[:, None, :].expand(half, height, width)
    return torch.cat((y_map, x_map), dim=0)[None].to(dtype)


class ConvGroupNormReLU(nn.Sequential):
    """Conv (no bias) → GroupNorm → ReLU; GroupNorm keeps train and eval identical for any batch size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, groups: int = 8) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(math.gcd(groups, out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


def pad_to_stride(
    x: torch.Tensor, stride: int = 16, *, mode: str = "replicate"
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims up to multiples of `stride`, split evenly (the odd pixel goes right/bottom).

    Args:
        x: B × C × H × W.
        stride: the size multiple wanted.
        mode: "replicate" or "constant" (zeros).

    Returns:
        (padded B × C × H' × W', pad) with pad = (left, right, top, bottom) in pixels, `F.pad`'s order;
        `unpad(padded, pad)` gives `x` back.
    """
    height, width = x.shape[-2:]
    pad_h = (stride - height % stride) % stride
    pad_w = (stride - width % stride) % stride
    pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    if pad_h == 0 and pad_w == 0:
        return x, pad
    return F.pad(x, pad, mode=mode), pad


def unpad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Crop what `pad_to_stride` added: x: ... × H' × W' → ... × (H' − top − bottom) × (W' − left − right)."""
    left, right, top, bottom = pad
    height, width = x.shape[-2:]
    return x[..., top : height - bottom, left : width - right]
