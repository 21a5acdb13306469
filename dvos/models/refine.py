"""Edge-aware refinement of soft masks: a joint bilateral filter guided by the image.

Pseudo-objects and the teacher's masks live on a stride-8 grid; upsampled bilinearly their edges
are smooth curves that ignore the image. `bilateral_refine` moves them onto the image's colour
edges: every pixel's probabilities become the average of its neighbours' within `radius`, each
weighted by exp(−|Δposition|² / 2σ_s²) · exp(−|Δcolour|² / 2σ_c²) (positions in pixels, colours
RGB in [0, 1]), repeated `iterations` times. Across a colour edge the weights vanish, so a
boundary that sits a few pixels off an edge is pulled onto it; inside a uniform region it only
smooths. Used for the distillation's reference objects and hard targets
(`distill.refine_iterations`) and, as `EdgeRefinement`, on the student's output at inference
(`eval.refine_*`: the mask it returns and the one it keeps as short-term memory;
docs/METHOD.md, "Inference").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# The per-offset weights are kept between passes while they fit in this many bytes (a 480p frame
# with 169 neighbours: 277 MB); larger frames recompute them every pass (the same values, several
# times slower, memory bounded by one offset's map).
WEIGHT_CACHE_BYTES = 512 * 2**20


@torch.no_grad()
def bilateral_refine(
    probabilities: torch.Tensor,
    image: torch.Tensor,
    *,
    radius: int = 4,
    sigma_space: float = 3.0,
    sigma_colour: float = 0.1,
    iterations: int = 2,
    dilation: int = 1,
) -> torch.Tensor:
    """Joint bilateral filtering of per-pixel probabilities guided by an image.

    Args:
        probabilities: B × L × H × W (channels summing to 1, e.g. one-hot masks).
        image: B × 3 × H × W in [0, 1].
        radius: half-size of the square window in pixels.
        sigma_space, sigma_colour: widths of the spatial and colour Gaussians.
        iterations: filter passes (0 returns the input).
        dilation: read every `dilation`-th pixel of the window (offsets −radius..radius in steps of
            `dilation`): (2⌊radius/dilation⌋ + 1)² neighbours instead of (2·radius + 1)², for the
            same spatial reach at a fraction of the cost.

    Returns:
        B × L × H × W float32, channels still summing to 1.
    """
    if probabilities.shape[0] != image.shape[0] or probabilities.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and image {tuple(image.shape)} need the same B, H, W"
        )
    if radius < 1 or iterations < 0 or sigma_space <= 0 or sigma_colour <= 0 or not 1 <= dilation <= radius:
        raise ValueError(
            "bilateral_refine needs radius ≥ 1, iterations ≥ 0, 1 ≤ dilation ≤ radius and positive sigmas"
        )
    out = probabilities.float()
    if iterations == 0:
        return out
    height, width = image.shape[-2:]
    centre = image.float()
    guide = F.pad(centre, (radius,) * 4, mode="replicate")
    taps = [dilation * k for k in range(-(radius // dilation), radius // dilation + 1)]
    offsets = [(dy, dx) for dy in taps for dx in taps]

    def window(tensor: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        return tensor[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]

    def weight(dy: int, dx: int) -> torch.Tensor:
        colour = ((window(guide, dy, dx) - centre) ** 2).sum(1, keepdim=True)
        return torch.exp(-colour / (2 * sigma_colour**2) - (dy * dy + dx * dx) / (2 * sigma_space**2))

    cached = len(offsets) * centre[:, :1].numel() * 4 <= WEIGHT_CACHE_BYTES
    weights = [weight(dy, dx) for dy, dx in offsets] if cached else None
    total = torch.zeros_like(centre[:, :1])
    for index, (dy, dx) in enumerate(offsets):
        total += weights[index] if cached else weight(dy, dx)
    for _ in range(iterations):
        padded = F.pad(out, (radius,) * 4, mode="replicate")
        accumulated = torch.zeros_like(out)
        for index, (dy, dx) in enumerate(offsets):
            accumulated.addcmul_(weights[index] if cached else weight(dy, dx), window(padded, dy, dx))
        out = accumulated / total
    return out


@dataclass(frozen=True)
class EdgeRefinement:
    """`bilateral_refine` with fixed settings, for a model's output at inference (`eval.refine_*`).

    Attributes:
        iterations: filter passes; 0 turns the refinement off.
        radius, dilation, sigma_space, sigma_colour: see `bilateral_refine` (pixels of the frame it
            runs on, colours in [0, 1]).
    """

    iterations: int = 0
    radius: int = 12
    dilation: int = 3
    sigma_space: float = 8.0
    sigma_colour: float = 0.1

    def __post_init__(self) -> None:
        problem = self.problem(dataclasses.asdict(self))
        if problem is not None:
            raise ValueError(f"refine {problem}")

    @staticmethod
    def problem(settings: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str | None:
        """What is wrong with a set of settings (the fields' values by field name) in one phrase,
        e.g. "radius must be ≥ 1, got 0", each setting called `names[field]` (its config key) or
        its field name; None when nothing is."""
        name = {field: field for field in settings} | dict(names or {})
        for field, least in (("iterations", 0), ("radius", 1), ("dilation", 1)):
            if int(settings[field]) < least:
                return f"{name[field]} must be ≥ {least}, got {settings[field]}"
        if int(settings["dilation"]) > int(settings["radius"]):
            return f"{name['dilation']} must be ≤ {name['radius']} = {settings['radius']}, got {settings['dilation']}"
        for field in ("sigma_space", "sigma_colour"):
            if not float(settings[field]) > 0:
                return f"{name[field]} must be > 0, got {settings[field]}"
        return None

    @property
    def enabled(self) -> bool:
        return int(self.iterations) > 0

    def __call__(self, probabilities: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """B × L × H × W probabilities, B × 3 × H × W image in [0, 1] → refined float32 probabilities."""
        return bilateral_refine(
            probabilities,
            image,
            radius=int(self.radius),
            sigma_space=float(self.sigma_space),
            sigma_colour=float(self.sigma_colour),
            iterations=int(self.iterations),
            dilation=int(self.dilation),
        )
