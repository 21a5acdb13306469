"""The teacher's feature grid and the image's pixels: cell (i, j) of a stride-s grid stands for
pixels [s·i, s·i + s) × [s·j, s·j + s). Averaging an image-size map over each cell, and bringing a
grid map back to image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cell_means(maps: torch.Tensor, token_shape: tuple[int, int], stride: int) -> torch.Tensor:
    """B × C × H × W → B × C × h × w float32: the mean of each feature cell's pixels. Cell (i, j)
    covers pixels [s·i, s·i + s) × [s·j, s·j + s) clipped to the image; pixels past the grid are
    dropped, cells past the image average the pixels they have."""
    maps = maps.float()
    height, width = token_shape[0] * stride, token_shape[1] * stride
    maps = maps[..., :height, :width]
    pad = (0, width - maps.shape[-1], 0, height - maps.shape[-2])
    sums = F.avg_pool2d(F.pad(maps, pad), stride)
    counts = F.avg_pool2d(F.pad(torch.ones_like(maps[:, :1]), pad), stride)
    return sums / counts.clamp_min(1e-12)


def upsample_probabilities(probabilities: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Feature-grid probabilities B × L × h × w → image size B × L × H × W (bilinear).

    Cell (i, j) stands for pixels [s·i, s·i + s) × [s·j, s·j + s): the map is interpolated to
    (h·s, w·s) with `align_corners=False`, then cropped to H × W, or padded by replicating its
    last row / column (an encoder that drops the remainder pixels, as a ViT does).
    """
    height, width = int(size[0]), int(size[1])
    grid_h, grid_w = probabilities.shape[-2] * stride, probabilities.shape[-1] * stride
    out = F.interpolate(probabilities.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    out = out[..., :height, :width]
    if out.shape[-2:] != (height, width):
        out = F.pad(out, (0, width - out.shape[-1], 0, height - out.shape[-2]), mode="replicate")
    return out
