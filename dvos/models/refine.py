"""Edge-aware refinement of soft masks: a joint bilateral filter guided by the image.

Pseudo-objects and the teacher's masks live on a stride-8 grid; upsampled bilinearly their edges
are smooth curves that ignore the image. `bilateral_refine` moves them onto the image's colour
edges: every pixel's probabilities become the average of its neighbours' within `radius`, each
weighted by exp(−|Δposition|² / 2σ_s²) · exp(−|Δcolour|² / 2σ_c²) (positions in pixels, colours
RGB in [0, 1]), repeated `iterations` times. Across a colour edge the weights vanish, so a
boundary that sits a few pixels off an edge is pulled onto it; inside a uniform region it only
smooths. Used for the distillation's reference objects and hard targets
(`distill.refine_iterations`, docs/DESIGN.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def bilateral_refine(
    probabilities: torch.Tensor,
    image: torch.Tensor,
    *,
    radius: int = 4,
    sigma_space: float = 3.0,
    sigma_colour: float = 0.1,
    iterations: int = 2,
) -> torch.Tensor:
    """Joint bilateral filtering of per-pixel probabilities guided by an image.

    Args:
        probabilities: B × L × H × W (channels summing to 1, e.g. one-hot masks).
        image: B × 3 × H × W in [0, 1].
        radius: half-size of the square window in pixels.
        sigma_space, sigma_colour: widths of the spatial and colour Gaussians.
        iterations: filter passes (0 returns the input).

    Returns:
        B × L × H × W float32, channels still summing to 1.
    """
    if probabilities.shape[0] != image.shape[0] or probabilities.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and image {tuple(image.shape)} need the same B, H, W"
        )
    if radius < 1 or iterations < 0 or sigma_space <= 0 or sigma_colour <= 0:
        raise ValueError("bilateral_refine needs radius ≥ 1, iterations ≥ 0 and positive sigmas")
    out = probabilities.float()
    if iterations == 0:
        return out
    height, width = image.shape[-2:]
    guide = F.pad(image.float(), (radius,) * 4, mode="replicate")
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    weights = []
    for dy, dx in offsets:
        shifted = guide[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]
        colour = ((shifted - image.float()) ** 2).sum(1, keepdim=True)
        space = (dy * dy + dx * dx) / (2 * sigma_space**2)
        weights.append(torch.exp(-colour / (2 * sigma_colour**2) - space))
    total = torch.stack(weights).sum(0)
    for _ in range(iterations):
        padded = F.pad(out, (radius,) * 4, mode="replicate")
        accumulated = torch.zeros_like(out)
        for weight, (dy, dx) in zip(weights, offsets):
            accumulated += (
                weight * padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]
            )
        out = accumulated / total
    return out
