"""Pseudo-objects without labels: the reference frame's teacher features clustered into segments.

k-means of the features plus a small weight on position (and optionally on the frame's colours: a
weak teacher's features need that); the segment touching the image border most is the background
(id 0). With `components`, every connected piece of a segment is its own object
(docs/METHOD.md, "Pseudo-objects").

The k-means runs on the features' device for the whole batch at once (it sits inside every training
step); only the connected components (`split_components`, OpenCV) run on the CPU, per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvos.models.grid import cell_means, upsample_probabilities


def seeding_noise(num_points: int, k: int, restarts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of k-means++ seeding, from a CPU generator seeded with `seed`: for each
    restart, the first centre's index and one Exp(1) vector per further centre.

    A later centre is drawn with probability ∝ its squared distance d² to the nearest chosen one as
    argmax(d² / e), e ~ Exp(1) i.i.d. (the exponential race): what `torch.multinomial(d², 1)` does on
    the CPU with the same draws, so a run reproduces the per-sample CPU implementation's centres.
    Every sample of a batch uses the same draws (each sample used to get a generator of the same seed).

    Returns:
        (first R int64, noise R × (k − 1) × N float32), R = restarts, N = num_points (on the CPU).
    """
    generator = torch.Generator().manual_seed(int(seed))
    firsts, noise = [], []
    for _ in range(restarts):
        firsts.append(torch.randint(num_points, (1,), generator=generator))
        draws = [torch.empty(num_points).exponential_(generator=generator) for _ in range(k - 1)]
        noise.append(torch.stack(draws) if draws else torch.empty(0, num_points))
    return torch.cat(firsts), torch.stack(noise)


def kmeans_plus_plus(points: torch.Tensor, first: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding of S point clouds at once: S × N × D points → S × k × D centres.

    Args:
        points: S × N × D.
        first: S int64, the first centre of each cloud.
        noise: S × (k − 1) × N positive draws (`seeding_noise`); centre i + 1 is the point of the
            largest d² / noise[:, i] (index 0 when every d² is 0: fewer distinct points than k, any
            point repeats a centre).
    """
    clouds = torch.arange(points.shape[0], device=points.device)
    centre = points[clouds, first]
    centres = [centre]
    nearest = squared_distances_to(points, centre)
    for index in range(noise.shape[1]):
        centre = points[clouds, (nearest / noise[:, index]).argmax(1)]
        centres.append(centre)
        nearest = torch.minimum(nearest, squared_distances_to(points, centre))
    return torch.stack(centres, 1)


# On a CPU, element-wise work over every cloud at once allocates S × N × D temporaries that are slower
# to touch than the arithmetic; blocks of clouds of at most this many elements stay in the cache.
CPU_BLOCK_ELEMENTS = 1 << 20


def squared_distances_to(points: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Σ (p − c)² of each point to its cloud's centre: S × N × D, S × D → S × N (blocks of clouds on a CPU)."""
    count = points.shape[0]
    step = count if points.device.type != "cpu" else max(1, CPU_BLOCK_ELEMENTS // points[0].numel())
    return torch.cat(
        [((points[i : i + step] - centre[i : i + step, None]) ** 2).sum(-1) for i in range(0, count, step)]
    )


def distance_operand(points: torch.Tensor) -> torch.Tensor:
    """S × N × (D + 2): [−2p, ‖p‖², 1], the points' side of `distances` (made once per clustering)."""
    norm = points.pow(2).sum(-1, keepdim=True)
    return torch.cat([points.mul(-2), norm, torch.ones_like(norm)], -1)


def distances(operand: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Euclidean distances S × N × k from the points (`distance_operand`) to S × k × D centres,
    computed as `torch.cdist` computes them for one cloud (‖p‖² + ‖c‖² − 2 p·c in one product,
    clamped at 0): its batched form runs several times slower on CPUs than a loop over the clouds."""
    norm = centres.pow(2).sum(-1, keepdim=True)
    right = torch.cat([centres, torch.ones_like(norm), norm], -1)
    return (operand @ right.transpose(1, 2)).clamp_min_(0).sqrt_()


def lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on S clouds at once (an empty cluster keeps its centre).

    Args:
        points: S × N × D.
        centres: S × k × D.

    Returns:
        (assignment S × N int64, inertia S = Σ squared distances to the assigned centres).
    """
    k = centres.shape[1]
    operand = distance_operand(points)
    for _ in range(iterations):
        assignment = distances(operand, centres).argmin(-1)
        # Sums and counts per cluster as one batched product (a scatter over S × N × D is slow on CPUs).
        members = torch.nn.functional.one_hot(assignment, k).to(points.dtype)  # S × N × k
        sums = members.transpose(1, 2) @ points
        counts = members.sum(1)[..., None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    final = distances(operand, centres)
    assignment = final.argmin(-1)
    inertia = (final.gather(-1, assignment[..., None]) ** 2).sum((1, 2))
    return assignment, inertia


def order_segments(segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Relabel segment maps (h × w, or B × h × w each on its own): the background first (id 0), then
    by decreasing area.

    The background is the segment holding the most cells of the map's outer ring (border), ties
    broken by the larger area (then the lower id). The other segments get ids 1, 2, ... by
    decreasing area (ties by their old id), so empty segments take the last ids and never appear.
    """
    single = segments.dim() == 2
    maps = segments[None] if single else segments
    batch, height, width = maps.shape
    flat = maps.reshape(batch, -1)
    ones = torch.ones_like(flat)
    areas = torch.zeros(batch, num_segments, dtype=torch.long, device=maps.device).scatter_add_(1, flat, ones)
    if height > 1:
        ring = torch.cat([maps[:, 0], maps[:, -1], maps[:, 1:-1, 0], maps[:, 1:-1, -1]], 1)
    else:
        ring = flat
    border = torch.zeros_like(areas).scatter_add_(1, ring, torch.ones_like(ring))
    background = torch.argmax(border * (flat.shape[1] + 1) + areas, dim=1)
    # Order: the background first, then decreasing area; a stable sort keeps the lower id first on ties.
    key = (-areas).scatter(1, background[:, None], -(flat.shape[1] + 1))
    order = torch.sort(key, dim=1, stable=True).indices
    ranks = torch.arange(num_segments, device=maps.device).expand(batch, -1)
    mapping = torch.empty_like(order).scatter_(1, order, ranks)
    out = mapping.gather(1, flat).view(batch, height, width)
    return out[0] if single else out


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
    seeding with draws from a CPU generator seeded with `seed` (`seeding_noise`), `restarts` runs of
    `iterations` Lloyd steps, the lowest inertia kept (the first on ties); then `order_segments`
    (background = most border cells = id 0).

    Runs on the device of `features`, every sample and restart at once (torch ops, no host loop
    over samples): the same segments on any device up to ties in float rounding.

    Args:
        features: B × C × h × w.
        num_segments: k, segments including the background (k ≥ 1).
        colours: B × 3 × h × w (needed when colour_weight > 0).

    Returns:
        B × h × w int64 ids in 0..k−1 (on the device of `features`).
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be ≥ 1, got {num_segments}")
    batch, _, height, width = features.shape
    k = min(int(num_segments), height * width)
    if colour_weight < 0 or feature_weight < 0 or position_weight < 0:
        raise ValueError(
            f"clustering weights must be ≥ 0, got feature {feature_weight}, colour {colour_weight}, "
            f"position {position_weight}"
        )
    # Zero-weight parts add nothing to any distance: left out (the CPU recipe clusters colours only).
    parts = []
    if feature_weight > 0:
        parts.append(F.normalize(features.detach().float(), dim=1) * float(feature_weight))
    if colour_weight > 0:
        if colours is None or colours.shape[-2:] != features.shape[-2:]:
            raise ValueError("colour_weight > 0 needs colours B × 3 × h × w on the features' grid")
        parts.append(float(colour_weight) * colours.detach().float().to(features.device))
    ys, xs = torch.meshgrid(
        torch.arange(height, device=features.device),
        torch.arange(width, device=features.device),
        indexing="ij",
    )
    position = torch.stack([ys, xs]).float()[None] / max(max(height, width) - 1, 1)
    parts.append(float(position_weight) * position.expand(batch, -1, -1, -1))
    points = torch.cat(parts, 1).flatten(2).transpose(1, 2).contiguous()  # B × N × D, D contiguous
    # Every restart of every sample at once: S = B · R clouds, restart r of sample b at b · R + r.
    restarts = max(1, int(restarts))
    first, noise = seeding_noise(height * width, k, restarts, seed)
    clouds = points.repeat_interleave(restarts, dim=0)
    first = first.to(features.device).repeat(batch)
    noise = noise.to(features.device).repeat(batch, 1, 1)
    assignment, inertia = lloyd(clouds, kmeans_plus_plus(clouds, first, noise), iterations)
    best = inertia.view(batch, restarts).argmin(1)  # the first of equal inertias, as one at a time
    chosen = assignment.view(batch, restarts, -1)[torch.arange(batch, device=features.device), best]
    return order_segments(chosen.view(batch, height, width), k)


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
