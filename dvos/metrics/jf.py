"""Per-frame J (region similarity) and F (boundary accuracy) and their per-object statistics.

Every formula here reproduces the official davis2017-evaluation toolkit bit for bit (see
docs/DESIGN.md, "J&F"): J = |G ∩ P| / |G ∪ P| with J = 1 when both masks are empty; F is the F-measure
of boundary pixels matched within a disk of radius ceil(0.008 · ‖(H, W)‖) pixels, using the
toolkit's one-sided `seg2bmap` boundary. Only the speed differs, by two exact equivalences: F is
computed on a crop around the two masks of each frame (see `_crop_box`), not on the full frame, and
the disk dilation is a union of rectangle dilations (see `disk_rectangles`).
"""

from __future__ import annotations

import functools
import math
import warnings

import cv2
import numpy as np

DEFAULT_BOUND_TH = 0.008
DECAY_BINS = 4


@functools.lru_cache(maxsize=16)
def _disk_cached(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    footprint = (x * x + y * y <= radius * radius).astype(np.uint8)
    footprint.setflags(write=False)
    return footprint


def disk(radius: int) -> np.ndarray:
    """The disk footprint {(x, y) ∈ [-r, r]² : x² + y² ≤ r²}.

    Returns:
        `(2r + 1) × (2r + 1)` uint8 array of 0/1 (read-only; shared between calls).
    """
    radius = int(radius)
    if radius < 0:
        raise ValueError(f"disk radius must be >= 0, got {radius}")
    return _disk_cached(radius)


@functools.lru_cache(maxsize=16)
def disk_rectangles(radius: int) -> tuple[np.ndarray, ...]:
    """Centred rectangles whose union is `disk(radius)`, as uint8 footprints of ones.

    One per distinct half-width w of the disk's rows: `(2h + 1) × (2w + 1)`, h the largest row
    offset whose row is at least w wide. Dilation distributes over a union of footprints, so
    dilating with each rectangle (OpenCV's fast separable case) and OR-ing the results is exactly
    the dilation with the disk, about 1.5× faster for r = 8.
    """
    footprint = disk(radius)
    half_widths = (footprint.sum(axis=1)[radius:].astype(int) - 1) // 2  # row offsets 0..r
    rectangles = []
    for half_width in sorted(set(half_widths.tolist()), reverse=True):
        half_height = max(offset for offset, width in enumerate(half_widths) if width >= half_width)
        rectangle = np.ones((2 * half_height + 1, 2 * half_width + 1), dtype=np.uint8)
        rectangle.setflags(write=False)
        rectangles.append(rectangle)
    return tuple(rectangles)


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of an `H × W` bool mask with `disk(radius)`; pixels outside the image do
    not count (OpenCV's default border for dilation). Returns `H × W` bool."""
    source = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    rectangles = disk_rectangles(radius)
    dilated = cv2.dilate(source, rectangles[0])
    for rectangle in rectangles[1:]:
        np.bitwise_or(dilated, cv2.dilate(source, rectangle), out=dilated)
    return dilated.view(bool)


def boundary_radius(height: int, width: int, bound_th: float = DEFAULT_BOUND_TH) -> int:
    """Matching tolerance in pixels: `bound_th` itself when >= 1, else ceil(bound_th · ‖(H, W)‖₂).

    At 480 × 854 this is 8 pixels.
    """
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(height, width)))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The toolkit's `seg2bmap` boundary of a binary mask (one-sided: it marks a pixel whose right,
    lower or lower-right neighbour differs from it).

    With e, s, se = the mask shifted left, up and up-left (zeros shifted in):
    b = (m ^ e) | (m ^ s) | (m ^ se); on the last row b = m ^ e, on the last column b = m ^ s, and
    the bottom-right pixel is 0.

    Args:
        mask: `H × W` or `T × H × W` array, non-zero = foreground (the last two axes are the image).

    Returns:
        bool array of the same shape.
    """
    seg = np.asarray(mask).astype(bool, copy=False)
    if seg.ndim < 2:
        raise ValueError(f"mask must be H × W or T × H × W, got shape {seg.shape}")
    boundary = np.zeros(seg.shape, dtype=bool)
    if seg.shape[-1] == 0 or seg.shape[-2] == 0:
        return boundary
    inner = seg[..., :-1, :-1]
    # Interior pixels: any difference with the right, lower or lower-right neighbour.
    boundary[..., :-1, :-1] = (
        (inner ^ seg[..., :-1, 1:]) | (inner ^ seg[..., 1:, :-1]) | (inner ^ seg[..., 1:, 1:])
    )
    # Last row: only the right neighbour exists; last column: only the lower one.
    boundary[..., -1, :-1] = seg[..., -1, :-1] ^ seg[..., -1, 1:]
    boundary[..., :-1, -1] = seg[..., :-1, -1] ^ seg[..., 1:, -1]
    boundary[..., -1, -1] = False
    return boundary


def _as_bool_stack(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name} must be H × W or T × H × W, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = _as_bool_stack(gt, "gt")
    pred = _as_bool_stack(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
    return gt, pred


def _jaccard(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """J from pixel counts (float64), 1 where the union is empty."""
    with np.errstate(divide="ignore", invalid="ignore"):
        values = intersection / union
    return np.where(union == 0, 1.0, values)


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """J: intersection over union of two binary masks, 1 when both are empty.

    Args:
        gt: ground truth, `H × W` or `T × H × W` (non-zero = object).
        pred: prediction, same shape.

    Returns:
        float64 array: shape `()` for one frame, `(T,)` for a stack.
    """
    gt, pred = _check_pair(gt, pred)
    intersection = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    return np.asarray(_jaccard(np.asarray(intersection), np.asarray(union)), dtype=np.float64)


def _f_measure(n_pred: int, n_gt: int, pred_matched: int, gt_matched: int) -> float:
    """F from boundary pixel counts, with the toolkit's conventions for empty boundaries."""
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = pred_matched / float(n_pred)
        recall = gt_matched / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _crop_box(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int] | None:
    """The crop (y0, y1, x0, x1) of one frame for the F computation, None when both masks are empty.

    It is the box of gt | pred extended by 1 pixel up/left (the one-sided boundary can lie just
    outside the mask there) and by 2 down/right (so that the crop's last row and column are empty,
    as the full frame's are beyond the masks, and `boundary_map`'s edge rules give the full frame's
    answer), clipped to the frame. Every boundary pixel of both masks lies inside it, so dilating
    the crop gives the full-frame dilation at every pixel that is counted.

    Args:
        rows: `(H,)` bool, rows holding a pixel of gt | pred; cols: `(W,)` likewise.
    """
    row_ids = np.flatnonzero(rows)
    if row_ids.size == 0:
        return None
    col_ids = np.flatnonzero(cols)
    return (
        max(int(row_ids[0]) - 1, 0),
        min(int(row_ids[-1]) + 2, rows.shape[0]),
        max(int(col_ids[0]) - 1, 0),
        min(int(col_ids[-1]) + 2, cols.shape[0]),
    )


def _boundary_f(gt: np.ndarray, pred: np.ndarray, radius: int) -> float:
    """F of one frame's (cropped) `h × w` bool masks, with the matching radius of the full frame."""
    gt_boundary = boundary_map(gt)
    pred_boundary = boundary_map(pred)
    n_gt = int(np.count_nonzero(gt_boundary))
    n_pred = int(np.count_nonzero(pred_boundary))
    if n_gt == 0 or n_pred == 0:  # nothing to match: the conventions for empty boundaries decide
        return _f_measure(n_pred, n_gt, 0, 0)
    gt_dilated = dilate_disk(gt_boundary, radius)
    pred_dilated = dilate_disk(pred_boundary, radius)
    pred_matched = int(np.count_nonzero(pred_boundary & gt_dilated))
    gt_matched = int(np.count_nonzero(gt_boundary & pred_dilated))
    return _f_measure(n_pred, n_gt, pred_matched, gt_matched)


def _score_frames(
    gt: np.ndarray, pred: np.ndarray, bound_th: float, *, with_region: bool
) -> tuple[np.ndarray | None, np.ndarray]:
    """J (optional) and F of each frame of `T × H × W` bool stacks, each frame on its own crop."""
    n_frames, height, width = gt.shape
    radius = boundary_radius(height, width, bound_th)
    rows = gt.any(axis=2) | pred.any(axis=2)
    cols = gt.any(axis=1) | pred.any(axis=1)
    region = np.ones(n_frames, dtype=np.float64) if with_region else None
    boundary = np.ones(n_frames, dtype=np.float64)  # both masks empty: J = F = 1
    for t in range(n_frames):
        box = _crop_box(rows[t], cols[t])
        if box is None:
            continue
        y0, y1, x0, x1 = box
        gt_crop, pred_crop = gt[t, y0:y1, x0:x1], pred[t, y0:y1, x0:x1]
        if with_region:
            # The crop holds every foreground pixel of both masks, so the counts are the frame's.
            intersection = np.count_nonzero(gt_crop & pred_crop)
            union = np.count_nonzero(gt_crop | pred_crop)
            region[t] = intersection / union
        boundary[t] = _boundary_f(gt_crop, pred_crop, radius)
    return region, boundary


def boundary_accuracy(gt: np.ndarray, pred: np.ndarray, *, bound_th: float = DEFAULT_BOUND_TH) -> np.ndarray:
    """F: boundary F-measure of a prediction against the ground truth.

    precision = share of the prediction's boundary pixels within `boundary_radius(H, W, bound_th)`
    pixels (disk) of a ground-truth boundary pixel; recall the other way round. Empty boundaries:
    prediction empty, gt not → (P, R) = (1, 0); gt empty, prediction not → (0, 1); both → (1, 1).
    F = 2PR / (P + R), 0 when P + R = 0.

    Args:
        gt: ground truth, `H × W` or `T × H × W` (non-zero = object).
        pred: prediction, same shape.
        bound_th: tolerance as a fraction of the image diagonal (< 1) or in pixels (>= 1).

    Returns:
        float64 array: shape `()` for one frame, `(T,)` for a stack.
    """
    gt, pred = _check_pair(gt, pred)
    if gt.ndim == 2:
        return _score_frames(gt[None], pred[None], bound_th, with_region=False)[1][0]
    return _score_frames(gt, pred, bound_th, with_region=False)[1]


def region_and_boundary(
    gt: np.ndarray, pred: np.ndarray, *, bound_th: float = DEFAULT_BOUND_TH
) -> tuple[np.ndarray, np.ndarray]:
    """J and F of one object over a clip, in one pass over shared per-frame crops.

    Args:
        gt: ground truth, `T × H × W` bool.
        pred: prediction, `T × H × W` bool.

    Returns:
        (J, F): two float64 arrays of shape `(T,)`.
    """
    gt, pred = _check_pair(gt, pred)
    if gt.ndim != 3:
        raise ValueError(f"expected T × H × W stacks, got shape {gt.shape}")
    region, boundary = _score_frames(gt, pred, bound_th, with_region=True)
    return region, boundary


def decay_bin_edges(n_values: int, n_bins: int = DECAY_BINS) -> np.ndarray:
    """Integer start indices of the decay bins (and the last index): round(linspace(1, N, 5)) − 1.

    The toolkit casts these to uint8, which wraps for N > 256; we keep them as integers.
    """
    return (np.round(np.linspace(1, n_values, n_bins + 1) + 1e-10) - 1).astype(np.int64)


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, recall and decay of one object's per-frame J (or F) values.

    mean = nanmean(v); recall = share of frames with v > 0.5; decay = nanmean of the first of four
    bins minus nanmean of the last, bins[i] = v[ids[i] : ids[i + 1] + 1] with
    ids = `decay_bin_edges(N)` (neighbouring bins share their edge frame, as in the toolkit).

    Args:
        values: `(N,)` per-frame values.

    Returns:
        (mean, recall, decay) as Python floats (NaN for N = 0).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # empty / all-NaN slices → NaN
        mean = np.nanmean(values)
        recall = np.nanmean(values > 0.5)
        edges = decay_bin_edges(len(values))
        bins = [values[edges[i] : edges[i + 1] + 1] for i in range(DECAY_BINS)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[-1])
    return float(mean), float(recall), float(decay)
