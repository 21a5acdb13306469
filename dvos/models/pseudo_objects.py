"""Pseudo-objects without labels: the reference frame's teacher features clustered into segments.

k-means of the features plus a small weight on position (and optionally on the frame's colours: a
weak teacher's features need that); the segment touching the image border most is the background
(id 0). With `components`, every connected piece of a segment is its own object
(docs/METHOD.md, "Pseudo-objects").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvos.models.grid import cell_means, upsample_probabilities


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: N × D points → k × D centres (CPU, reproducible with `generator`)."""
    first = torch.randint(points.shape[0], (1,), generator=generator)
    centres = [points[first[0]]]
    nearest = ((points - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        if float(nearest.sum()) <= 0:  # fewer distinct points than k: repeat one
            choice = torch.randint(points.shape[0], (1,), generator=generator)
        else:
            choice = torch.multinomial(nearest, 1, generator=generator)
        centres.append(points[choice[0]])
        nearest = torch.minimum(nearest, ((points - centres[-1]) ** 2).sum(1))
    return torch.stack(centres)


def _lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations: returns (assignment N int64, inertia = Σ squared distances)."""
    k = centres.shape[0]
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty: keep
    distances = torch.cdist(points, centres)
    assignment = distances.argmin(1)
    return assignment, float((distances.gather(1, assignment[:, None]) ** 2).sum())


def order_segments(segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Relabel an h × w segment map: the background first (id 0), then by decreasing area.

    The background is the segment holding the most cells of the map's outer ring (border), ties
    broken by the larger area. The other segments get ids 1, 2, ... by decreasing area (ties by
    their old id), so empty segments take the last ids and never appear.
    """
    height, width = segments.shape
    flat = segments.reshape(-1)
    areas = torch.bincount(flat, minlength=num_segments)
    ring = (
        torch.cat([segments[0], segments[-1], segments[1:-1, 0], segments[1:-1, -1]]) if height > 1 else flat
    )
    border = torch.bincount(ring.reshape(-1), minlength=num_segments)
    background = int(torch.argmax(border * (flat.numel() + 1) + areas))
    others = sorted((s for s in range(num_segments) if s != background), key=lambda s: (-int(areas[s]), s))
    mapping = torch.empty(num_segments, dtype=torch.long)
    mapping[background] = 0
    for new_id, old_id in enumerate(others, start=1):
        mapping[old_id] = new_id
    return mapping.to(segments.device)[segments]


def split_components(
    segments: torch.Tensor,
    num_segments: int,
    *,
    min_cells: int = 4,
    max_share: float = 0.25,
    min_width: int = 1,
    colours: torch.Tensor | None = None,
    min_contrast: float = 0.0,
) -> torch.Tensor:
    """Pseudo-objects as connected pieces: B × h × w segment ids (0 = background) → B × h × w ids
    where every 4-connected component of a non-background segment with at least `min_cells` cells,
    at most `max_share` of the map and a `min_width` × `min_width` block of its own cells somewhere
    is its own object, numbered 1, 2, ... by decreasing area, at most `num_segments` − 1 of them;
    the other cells (specks, thin pieces such as one stripe of a striped texture, pieces as large
    as a background, pieces past the count) become background.

    With `colours` (B × 3 × h × w, e.g. `cell_colours`) and `min_contrast` > 0, a piece must also
    differ from its surroundings: the distance between its mean colour and the mean colour of the
    cells within two cells around it at least `min_contrast` (a k-means segment that only the
    position term cut out of a uniform texture is no object).

    A k-means segment is often several separate regions of one colour or texture (two objects
    alike, an object and a patch of background); as objects they would be asked to move as one.
    """
    import cv2
    import numpy as np

    if min_width < 1:
        raise ValueError(f"min_width must be >= 1, got {min_width}")
    segment_maps = segments.cpu().numpy()
    out = np.zeros_like(segment_maps)
    block = np.ones((min_width, min_width), np.uint8)
    ring_kernel = np.ones((5, 5), np.uint8)
    colour_maps = None
    if min_contrast > 0:
        if colours is None:
            raise ValueError("min_contrast > 0 needs the cells' colours")
        colour_maps = colours.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    for index, ids in enumerate(segment_maps):
        pieces = []
        for segment in np.unique(ids):
            if segment == 0:
                continue
            count, labels, stats, _ = cv2.connectedComponentsWithStats(
                (ids == segment).astype(np.uint8), connectivity=4
            )
            for label in range(1, count):
                area = int(stats[label, cv2.CC_STAT_AREA])
                if not min_cells <= area <= max_share * ids.size:
                    continue
                piece = labels == label
                cells = piece.astype(np.uint8)
                # a w × w block of the piece survives erosion by it (outside the map counts as not
                # the piece, so the border does not widen a thin piece)
                if (
                    min_width > 1
                    and not cv2.erode(cells, block, borderType=cv2.BORDER_CONSTANT, borderValue=0).any()
                ):
                    continue
                if colour_maps is not None:
                    ring = cv2.dilate(cells, ring_kernel).astype(bool) & ~piece
                    if ring.any():
                        inside = colour_maps[index][piece].mean(0)
                        around = colour_maps[index][ring].mean(0)
                        if float(np.linalg.norm(inside - around)) < min_contrast:
                            continue
                pieces.append((-area, int(segment), label, piece))
        pieces.sort(key=lambda piece: piece[:3])
        for new_id, (_, _, _, mask) in enumerate(pieces[: num_segments - 1], start=1):
            out[index][mask] = new_id
    return torch.from_numpy(out).to(segments.device)


def cell_colours(image: torch.Tensor, token_shape: tuple[int, int], stride: int) -> torch.Tensor:
    """The colour of each feature cell's neighbourhood, centred per image: B × 3 × H × W in [0, 1]
    → B × 3 × h × w.

    The mean colour of each cell (`cell_means`), then a 3 × 3-cell box blur (replicated borders),
    so that a fine texture (stripes, checks) averages to one colour, minus the image's mean colour.
    """
    colours = cell_means(image, token_shape, stride)
    colours = F.avg_pool2d(F.pad(colours, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return colours - colours.mean(dim=(2, 3), keepdim=True)


def kmeans_segments(
    features: torch.Tensor,
    num_segments: int,
    *,
    position_weight: float = 0.3,
    colours: torch.Tensor | None = None,
    colour_weight: float = 0.0,
    feature_weight: float = 1.0,
    iterations: int = 10,
    restarts: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """Cluster each feature map into `num_segments` compact segments (k-means, deterministic).

    Points are `feature_weight` · the L2-normalised features (distance between two points ≤ 2),
    concatenated with `colour_weight` · `colours` (e.g. `cell_colours`, RGB in [0, 1] centred) and
    `position_weight` · (y, x) / (max(h, w) − 1), so that a segment prefers compact regions. k-means++
    seeding from a CPU generator seeded with `seed`, `restarts` runs of `iterations` Lloyd steps,
    the lowest inertia kept; then `order_segments` (background = most border cells = id 0).

    Args:
        features: B × C × h × w.
        num_segments: k, segments including the background (k ≥ 1).
        colours: B × 3 × h × w (needed when colour_weight > 0).

    Returns:
        B × h × w int64 ids in 0..k−1 (on the device of `features`).
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be ≥ 1, got {num_segments}")
    batch, channels, height, width = features.shape
    k = min(int(num_segments), height * width)
    if colour_weight < 0 or feature_weight < 0 or position_weight < 0:
        raise ValueError(
            f"clustering weights must be ≥ 0, got feature {feature_weight}, colour {colour_weight}, "
            f"position {position_weight}"
        )
    points = F.normalize(features.detach().float().cpu(), dim=1) * float(feature_weight)
    if colour_weight > 0:
        if colours is None or colours.shape[-2:] != features.shape[-2:]:
            raise ValueError("colour_weight > 0 needs colours B × 3 × h × w on the features' grid")
        points = torch.cat([points, float(colour_weight) * colours.detach().float().cpu()], 1)
    channels = points.shape[1]
    points = points.permute(0, 2, 3, 1).reshape(batch, -1, channels)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    position = torch.stack([ys, xs], -1).reshape(-1, 2).float() / max(max(height, width) - 1, 1)
    out = []
    for index in range(batch):
        cloud = torch.cat([points[index], position_weight * position], 1)
        generator = torch.Generator().manual_seed(int(seed))
        best: tuple[torch.Tensor, float] | None = None
        for _ in range(max(1, restarts)):
            assignment, inertia = _lloyd(cloud, _kmeans_plus_plus(cloud, k, generator), iterations)
            if best is None or inertia < best[1]:
                best = (assignment, inertia)
        out.append(order_segments(best[0].view(height, width), k))
    return torch.stack(out).to(features.device)


@torch.no_grad()
def cluster_reference(
    features: torch.Tensor,
    k: int,
    *,
    stride: int,
    image_size: tuple[int, int] | None = None,
    position_weight: float = 0.3,
    image: torch.Tensor | None = None,
    colour_weight: float = 0.0,
    feature_weight: float = 1.0,
    components: bool = False,
    min_width: int = 1,
    min_contrast: float = 0.0,
    iterations: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-objects without labels: k-means segments of the reference frame's features
    (optionally with its colours).

    See `kmeans_segments` (`feature_weight` · features + `colour_weight` · `cell_colours` +
    `position_weight` · position, deterministic seed) and `order_segments`: the segment with
    the most cells on the map's border is the background (id 0, ties → larger area), the
    others are 1..k−1 by decreasing area.

    Args:
        features: B × C × h × w (e.g. the teacher's `encode(reference_frame)`).
        k: segments, background included.
        stride: pixels per feature cell, s.
        image_size: (H, W) of the image-resolution ids; default (h·s, w·s).
        image: B × 3 × H × W in [0, 1], the reference frame (needed when colour_weight > 0).
        components: make every connected piece of a segment its own object (`split_components`).
        min_width: with `components`, pieces without a min_width × min_width block of cells are
            background (`split_components`).
        min_contrast: with `components`, pieces whose colour differs from their surroundings'
            by less are background (`split_components`; needs `image`).

    Returns:
        ids at feature resolution B × h × w and at image resolution B × H × W (int64; the
        image ids are the argmax of the bilinearly upsampled one-hot segments).
    """
    colours = None
    contrast = components and min_contrast > 0  # the pieces are compared with their surroundings
    if colour_weight > 0 or contrast:
        if image is None:
            what = "colour_weight > 0" if colour_weight > 0 else "min_contrast > 0"
            raise ValueError(f"{what} needs the reference image")
        colours = cell_colours(image.to(features.device), tuple(features.shape[-2:]), stride)
    ids = kmeans_segments(
        features,
        k,
        position_weight=position_weight,
        colours=colours,
        colour_weight=colour_weight,
        feature_weight=feature_weight,
        iterations=iterations,
        seed=seed,
    )
    if components:
        ids = split_components(ids, k, min_width=min_width, colours=colours, min_contrast=min_contrast)
    size = image_size or (features.shape[-2] * stride, features.shape[-1] * stride)
    one_hot = F.one_hot(ids, k).permute(0, 3, 1, 2).float()
    return ids, upsample_probabilities(one_hot, size, stride).argmax(1)
