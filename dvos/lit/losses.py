"""Training losses as pure functions: distillation (docs/METHOD.md, "Distillation losses") and CRW
pretraining (docs/METHOD.md, "Pre-training the teacher (contrastive random walk)").

All arithmetic runs in float32 with autocast disabled, whatever the inputs' dtype.

**Attention loss**: 1 − linear CKA (Kornblith et al. 2019) between the student's and the teacher's
attention maps, compared over their N query tokens (rows); the column counts may differ. With
column-centred X (N × P) and Y (N × Q):

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)

computed in the *feature form* (P × P, Q × Q, Q × P products, cost N·(P² + Q² + PQ)) or the
*Gram form* (N × N kernels K = XXᵀ, L = YYᵀ: ‖YᵀX‖²_F = ⟨K, L⟩, ‖XᵀX‖_F = ‖K‖_F, cost N²·(P + Q)),
whichever is cheaper for the shapes. Constant maps (no centred energy) give CKA = 0 with finite
gradients: each norm is sqrt(‖XᵀX‖²_F + (ρ·‖X‖²_F)²) with ρ = 1e-6 relative to the uncentred map,
which keeps the value exactly invariant to scaling while drowning float32 centring noise.

Student heads (B × heads × N × M): by default their maps are concatenated along the columns
(`heads="concat"`), i.e. the student's Gram kernel is the sum of the heads' kernels. Columns of
different offset groups are different sampling positions, so averaging maps column by column
(`"mean"`) mixes unrelated points unless there is one group; `"each"` is 1 − CKA per head, averaged,
which asks every head for the teacher's structure. Query grids must match: `match_query_grid`
(`match_sparse_query_grid` for a top-k map) area-averages the teacher's query rows onto the
student's grid: student cell (i, j) reads the teacher rows of the image pixels it covers, each
weighted by the area it shares with them (the plain mean of r × r rows at a stride ratio r when
both grids start at pixel 0; an offset and an extent when the student pads the image).

**Relation losses** (DIST, Huang et al. 2022, per pixel and per object): y = softmax(z/τ) over the
valid channels (background + objects; unused ids masked by a B × C validity mask, or detected from
the student's ABSENT logits),

    inter = mean over pixels p of 1 − Pearson(y_s[p, :], y_t[p, :])  (over the valid channels)
    intra = mean over valid (sample, channel) of 1 − Pearson(y_s[:, o], y_t[:, o])  (over pixels)

both multiplied by τ², as in DIST (each softmax derivative carries 1/τ). Pearson is exact (no
epsilon in its value); terms whose teacher series is (nearly) constant, std < 1e-4, carry no
relation and are left out of the means; a constant student series correlates 0 with a zero
gradient. The inter-object term leaves out the pixels of samples with fewer than three valid
channels (`INTER_MIN_CHANNELS`): with background + one object, y = (p, 1 − p), and the Pearson
correlation of two such pairs is ±1, with no gradient. `inter_skipped_share` counts those samples
(logged as `train/inter_skipped`), so a single-object batch is seen to get nothing from it. The
teacher's logits (stride 8) are turned into probabilities on their own grid and resampled
bilinearly onto the student's (`teacher_probabilities`); the student's logits are used at their
own resolution.

**Contrastive random walk** (Jabri, Owens, Efros 2020): `crw_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

CKAForm = Literal["auto", "feature", "gram"]
HeadReduction = Literal["concat", "mean", "each"]

ABSENT_THRESHOLD = -1e3  # a channel whose logits are all at or below this is an unused id (student: −1e4)
CKA_RELATIVE_FLOOR = 1e-6  # ρ: norms below ρ·‖X‖²_F count as a constant map
PEARSON_RELATIVE_STD = 1e-6  # a series whose std is below this share of its RMS is constant (float32 noise)
TEACHER_MIN_STD = 1e-4  # probabilities varying less than this carry no relation to imitate
INTER_MIN_CHANNELS = 3  # the Pearson of two distributions over two channels is ±1: no gradient
TINY = 1e-30
MASKED_LOGIT = torch.finfo(torch.float32).min  # finite: a row with no valid channel stays NaN-free
CRW_DROPPED = -1e9  # scaled affinity of a dropped edge (finite: a fully dropped row becomes uniform)
CRW_LOG_FLOOR = 1e-20  # return probabilities are floored before the log, as in CRW


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------
def cka_form(num_rows: int, cols_x: int, cols_y: int) -> Literal["feature", "gram"]:
    """The cheaper CKA form for N × P and N × Q maps: "gram" when N·(P + Q) < P² + Q² + PQ."""
    gram_cost = num_rows * (cols_x + cols_y)
    feature_cost = cols_x * cols_x + cols_y * cols_y + cols_x * cols_y
    return "gram" if gram_cost < feature_cost else "feature"


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, form: CKAForm = "auto") -> torch.Tensor:
    """Linear centred kernel alignment between two representations of the same N rows.

    Args:
        x: N × P, or B × N × P.
        y: N × Q, or B × N × Q (same N, any Q).
        form: "feature" (P × P products), "gram" (N × N kernels) or "auto" (`cka_form`).

    Returns:
        float32 scalar (or B) in [0, 1]; 1 when y = x·c·Q (c > 0, Q orthogonal) up to a column
        shift; 0 when either map is constant over the rows.
    """
    if x.ndim != y.ndim or x.ndim not in (2, 3) or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"linear_cka needs N × P / N × Q (or batched) maps, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    batched = x.ndim == 3
    if not batched:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    with _no_autocast(x):
        num_rows, cols_x, cols_y = x.shape[1], x.shape[2], y.shape[2]
        if form == "auto":
            form = cka_form(num_rows, cols_x, cols_y)
        if form not in ("feature", "gram"):
            raise ValueError(f"form must be auto, feature or gram, got {form!r}")
        x, y = _rescaled(x.float()), _rescaled(y.float())
        x_energy, y_energy = x.square().sum((1, 2)), y.square().sum((1, 2))  # ‖X‖²_F before centring
        x = x - x.mean(1, keepdim=True)
        y = y - y.mean(1, keepdim=True)
        if form == "gram":
            kernel_x, kernel_y = x @ x.mT, y @ y.mT  # B × N × N
            cross = (kernel_x * kernel_y).sum((1, 2))
            self_x, self_y = kernel_x.square().sum((1, 2)), kernel_y.square().sum((1, 2))
        else:
            cross = (y.mT @ x).square().sum((1, 2))
            self_x, self_y = (x.mT @ x).square().sum((1, 2)), (y.mT @ y).square().sum((1, 2))
        norm_x = (self_x + (CKA_RELATIVE_FLOOR * x_energy).square() + TINY).sqrt()
        norm_y = (self_y + (CKA_RELATIVE_FLOOR * y_energy).square() + TINY).sqrt()
        cka = cross / (norm_x * norm_y)
    return cka if batched else cka[0]


def _rescaled(x: torch.Tensor) -> torch.Tensor:
    """x / max|x| per batch element (a constant factor, detached): CKA is scale-invariant, and the
    fourth powers it sums then neither overflow nor underflow in float32."""
    scale = x.detach().abs().amax(dim=(1, 2), keepdim=True).clamp_min(TINY)
    return x / scale


def cell_overlaps(
    size: int,
    source_size: int,
    *,
    ratio: float,
    offset: float = 0.0,
    extent: float | None = None,
    start: float = 0.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Area weights from one 1-D cell grid onto another: output cell i covers source coordinates
    [r·i + o, r·(i + 1) + o) (in source cells, r = `ratio`, o = `offset`), clipped to [start, extent);
    source cell k covers [k, k + 1). W[i, k] = the length of their overlap / the length of cell i
    inside [0, extent), so each row is a convex combination (a row with no overlap stays 0).

    Args:
        size: output cells.
        source_size: source cells.
        ratio: source cells per output cell (2 for stride 16 over stride 8).
        offset: where output cell 0 starts, in source cells (−pad / source stride for a grid over a
            padded image, 0 when both grids start at the image's first pixel).
        extent: where the image ends, in source cells (None: `source_size`; clipped to it).
        start: where the image starts, in source cells (0; > 0 for a source grid over a padded image).

    Returns:
        size × source_size float32.
    """
    extent = float(source_size) if extent is None else min(float(extent), float(source_size))
    starts = torch.arange(size, dtype=torch.float64, device=device) * ratio + offset
    begin = max(0.0, float(start))
    low, high = starts.clamp(begin, extent), (starts + ratio).clamp(begin, extent)
    cells = torch.arange(source_size, dtype=torch.float64, device=device)
    overlap = (
        torch.minimum(high[:, None], cells[None] + 1) - torch.maximum(low[:, None], cells[None])
    ).clamp_min(0)
    total = overlap.sum(1, keepdim=True)
    return torch.where(total > 0, overlap / total.clamp_min(1e-12), overlap).float()


def _grid_weights(
    teacher_hw: tuple[int, int],
    student_hw: tuple[int, int],
    ratio: float | None,
    offset: tuple[float, float],
    extent: tuple[float, float] | None,
    device: torch.device,
    start: tuple[float, float] = (0.0, 0.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_y h_s × h_t, W_x w_s × w_t) of `cell_overlaps` for `match_query_grid`."""
    if ratio is None:
        ratio_y, ratio_x = _infer_ratio(tuple(teacher_hw), tuple(student_hw))
    else:
        ratio_y = ratio_x = float(ratio)
    extent = (None, None) if extent is None else extent
    return tuple(
        cell_overlaps(n_s, n_t, ratio=r, offset=float(o), extent=e, start=float(b), device=device)
        for n_s, n_t, r, o, e, b in zip(student_hw, teacher_hw, (ratio_y, ratio_x), offset, extent, start)
    )


def match_query_grid(
    teacher_attention: torch.Tensor,
    teacher_hw: tuple[int, int],
    student_hw: tuple[int, int],
    *,
    ratio: float | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    extent: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Area-average the teacher's query rows onto the student's query grid.

    Student cell (i, j) gets the mean of the teacher rows weighted by the image area each teacher
    cell shares with it (`cell_overlaps` per axis; at an integer ratio r over unpadded grids, the
    plain mean of its r × r teacher rows). Rows that were distributions stay distributions.

    Args:
        teacher_attention: B × N_t × M_t, N_t = h_t·w_t query tokens in row-major order.
        teacher_hw: (h_t, w_t).
        student_hw: (h_s, w_s).
        ratio: student stride / teacher stride (2 for stride 16 vs 8); None infers an integer
            ratio from the grid sizes (`resample_grid`).
        offset: (y, x) where the student grid starts, in teacher cells: −pad / teacher stride when
            the student pads the image before its encoder (`pad_to_stride`) and the teacher does not.
        extent: (y, x) the image's size in teacher cells (None: the whole teacher grid); student
            cells read only the teacher rows of the image's pixels.

    Returns:
        B × h_s·w_s × M_t float32.
    """
    batch, tokens, columns = teacher_attention.shape
    if tokens != teacher_hw[0] * teacher_hw[1]:
        raise ValueError(
            f"teacher attention has {tokens} query rows, grid {teacher_hw} has {teacher_hw[0] * teacher_hw[1]}"
        )
    aligned = tuple(offset) == (0.0, 0.0) and extent is None and ratio in (None, 1.0)
    if tuple(teacher_hw) == tuple(student_hw) and aligned:
        return teacher_attention.float()
    weight_y, weight_x = _grid_weights(
        teacher_hw, student_hw, ratio, offset, extent, teacher_attention.device
    )
    with _no_autocast(teacher_attention):
        maps = teacher_attention.float().reshape(batch, *teacher_hw, columns)
        out = torch.einsum("ia,jc,nacm->nijm", weight_y, weight_x, maps)
    return out.reshape(batch, -1, columns)


def match_sparse_query_grid(
    indices: torch.Tensor,
    weights: torch.Tensor,
    columns: int,
    teacher_hw: tuple[int, int],
    student_hw: tuple[int, int],
    *,
    ratio: float | None = None,
    offset: tuple[float, float] = (0.0, 0.0),
    extent: tuple[float, float] | None = None,
    start: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """`match_query_grid` of a sparse top-k map, never building the teacher's dense B × N_t × M_t.

    Args:
        indices: B × N_t × k int64 column of each entry (N_t = h_t·w_t rows, row-major).
        weights: B × N_t × k float weight of each entry (0 for unused entries).
        columns: M_t, the dense map's column count.
        teacher_hw, student_hw, ratio, offset, extent: as `match_query_grid`.
        start: (y, x) where the image starts in teacher cells (> 0 for a teacher grid over a padded
            image): student cells read only the teacher rows of the image's pixels.

    Returns:
        B × h_s·w_s × M_t float32, equal to `match_query_grid` of the dense map.
    """
    batch, tokens, k = indices.shape
    if tokens != teacher_hw[0] * teacher_hw[1]:
        raise ValueError(
            f"teacher attention has {tokens} query rows, grid {teacher_hw} has {teacher_hw[0] * teacher_hw[1]}"
        )
    weight_y, weight_x = _grid_weights(teacher_hw, student_hw, ratio, offset, extent, indices.device, start)
    # each teacher row (a, b) feeds the student rows (i, j) with W_y[i, a]·W_x[j, b] > 0: a few each
    reach_y = max(1, int((weight_y > 0).sum(0).max()))
    reach_x = max(1, int((weight_x > 0).sum(0).max()))
    share_y, row_y = weight_y.topk(reach_y, dim=0)  # reach_y × h_t
    share_x, row_x = weight_x.topk(reach_x, dim=0)  # reach_x × w_t
    share = share_y[:, None, :, None] * share_x[None, :, None, :]  # reach_y × reach_x × h_t × w_t
    student_row = row_y[:, None, :, None] * student_hw[1] + row_x[None, :, None, :]
    share, student_row = share.reshape(-1, tokens), student_row.reshape(-1, tokens)  # P × N_t
    flat = (student_row[None, :, :, None] * columns + indices[:, None]).reshape(batch, -1)
    values = (share[None, :, :, None] * weights.float()[:, None]).reshape(batch, -1)
    out = torch.zeros(batch, student_hw[0] * student_hw[1] * columns, device=indices.device)
    return out.scatter_add_(1, flat, values).view(batch, -1, columns)


def resample_grid(maps: torch.Tensor, size: tuple[int, int], *, ratio: float | None = None) -> torch.Tensor:
    """Bilinear resampling of a map on one cell grid onto another grid over the same image.

    Output cell i reads source coordinate (i + 0.5)·r − 0.5 (cell centres, `align_corners=False`),
    clamped to the source grid (border replication), with r = source cells per output cell:
    e.g. r = 1/8 takes a stride-8 map to pixels, r = 2 a stride-8 map to stride 16. This is
    `F.interpolate(..., align_corners=False)` with the given scale, also when a grid's last cell is
    partial (ceil-sized grids) or missing (a ViT drops the remainder pixels).

    Args:
        maps: B × C × h × w.
        size: (H, W) of the output grid.
        ratio: r; None: an integer stride ratio k when both grids are ⌈·/k⌉ or ⌊·/k⌋ of each other
            (the usual case), otherwise the size ratio h/H, w/W.

    Returns:
        B × C × H × W float32.
    """
    height, width = int(size[0]), int(size[1])
    source_h, source_w = maps.shape[-2], maps.shape[-1]
    if ratio is None:
        ratio_y, ratio_x = _infer_ratio((source_h, source_w), (height, width))
    else:
        ratio_y = ratio_x = float(ratio)
    with _no_autocast(maps):
        maps = maps.float()
        if (source_h, source_w) == (height, width) and ratio_y == ratio_x == 1.0:
            return maps
        ys = (torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5) * ratio_y
        xs = (torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5) * ratio_x
        # normalised coordinate of source position u (in cells): 2(u + 0.5)/h − 1 with u = (i + 0.5)r − 0.5
        grid_y = (2 * ys / source_h - 1).view(height, 1).expand(height, width)
        grid_x = (2 * xs / source_w - 1).view(1, width).expand(height, width)
        grid = torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0).expand(maps.shape[0], -1, -1, -1)
        return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _infer_ratio(source_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[float, float]:
    """Source cells per target cell, (r_y, r_x): an integer stride ratio k when the finer grid
    divides into the coarser one by ⌈·/k⌉ (or ⌊·/k⌋) on both axes, powers of two first, then the k
    nearest the size ratio; otherwise the size ratio itself."""
    (sh, sw), (th, tw) = source_hw, target_hw
    downsampling = sh * sw >= th * tw
    fine, coarse = (source_hw, target_hw) if downsampling else (target_hw, source_hw)
    ratios = [f / max(1, c) for f, c in zip(fine, coarse)]
    candidates = range(max(1, math.floor(min(ratios))), math.ceil(max(ratios)) + 2)

    def fits(k: int) -> bool:
        return all(c in (-(-f // k), f // k) for f, c in zip(fine, coarse))

    def preference(k: int) -> tuple[bool, float]:
        return (k & (k - 1) != 0, abs(k - sum(ratios) / 2))

    for k in sorted(candidates, key=preference):
        if fits(k):
            return (float(k), float(k)) if downsampling else (1.0 / k, 1.0 / k)
    return sh / th, sw / tw


def cka_loss(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    *,
    heads: HeadReduction = "concat",
    form: CKAForm = "auto",
) -> torch.Tensor:
    """1 − linear CKA between student and teacher attention maps, averaged over the batch.

    Args:
        student_attention: B × heads × N × M (or B × N × M), the deformable attention over M
            sampled points.
        teacher_attention: B × N × M_t over the teacher's memory tokens (same N query tokens,
            in the same order: resize with `match_query_grid` first).
        heads: "concat" (the heads' maps side by side, N × heads·M), "mean" (the maps averaged),
            or "each" (1 − CKA per head, averaged).
        form: see `linear_cka`.

    Returns:
        float32 scalar in [0, 1].
    """
    if student_attention.ndim == 3:
        student_attention = student_attention.unsqueeze(1)
    batch, num_heads, tokens, points = student_attention.shape
    if teacher_attention.shape[:2] != (batch, tokens):
        raise ValueError(
            f"query tokens differ: student {tuple(student_attention.shape)} vs teacher {tuple(teacher_attention.shape)}"
            " (resize the teacher's with match_query_grid)"
        )
    if heads == "concat":
        student = student_attention.permute(0, 2, 1, 3).reshape(batch, tokens, num_heads * points)
    elif heads == "mean":
        student = student_attention.mean(1)
    elif heads == "each":
        student = student_attention.reshape(batch * num_heads, tokens, points)
        teacher_attention = teacher_attention.repeat_interleave(num_heads, dim=0)
    else:
        raise ValueError(f"heads must be concat, mean or each, got {heads!r}")
    return (1.0 - linear_cka(student, teacher_attention, form=form)).mean()


# --------------------------------------------------------------------------------------------------
# Relation losses on per-object logits
# --------------------------------------------------------------------------------------------------
def valid_channels(*logits: torch.Tensor, threshold: float = ABSENT_THRESHOLD) -> torch.Tensor:
    """B × C bool: channels that are not ABSENT (some logit above `threshold`) in every given map.

    Args:
        logits: tensors B × C × ... (spatial sizes may differ).
    """
    valid = None
    for z in logits:
        present = z.detach().flatten(2).amax(-1) > threshold
        valid = present if valid is None else valid & present
    return valid


def objects_to_valid(
    num_objects: torch.Tensor | int, num_channels: int, batch: int, device=None
) -> torch.Tensor:
    """B × C bool validity from object counts: ids 0..num_objects[b] are valid."""
    counts = torch.as_tensor(num_objects, device=device).reshape(-1, 1).expand(batch, 1)
    return torch.arange(num_channels, device=counts.device)[None, :] <= counts


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor, *, tau: float = 1.0) -> torch.Tensor:
    """softmax(z/τ) over the valid channels (dim 1), exactly 0 on the others.

    Args:
        logits: B × C × H × W.
        valid: B × C bool.

    Returns:
        B × C × H × W float32 (a sample without valid channels gets a uniform map, never NaN).
    """
    with _no_autocast(logits):
        scaled = logits.float() / tau
        scaled = scaled.masked_fill(~valid[:, :, None, None], MASKED_LOGIT)
        return torch.softmax(scaled, dim=1) * valid[:, :, None, None]


def pearson(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    dim: int,
    mask: torch.Tensor | None = None,
    min_std: float = 0.0,
) -> torch.Tensor:
    """Pearson correlation of a and b along `dim`, over the entries where `mask` is True.

    Exact (no epsilon in the value) wherever both series vary; a *degenerate* series (`spread`
    False: standard deviation at most `min_std`, or at most 1e-6 of its RMS, which is float32
    centring noise) correlates 0 with a zero gradient. Invariant to positive scaling and shifting
    of either series (for `min_std` = 0).

    Args:
        a, b: same shape.
        dim: the dimension the correlation runs over (it is reduced).
        mask: bool, broadcastable to a's shape; None = every entry.
        min_std: absolute standard deviation below which a series counts as constant.

    Returns:
        float32, a's shape without `dim`.
    """
    correlation, _, _ = _pearson_terms(a, b, dim=dim, mask=mask, min_std_a=min_std, min_std_b=min_std)
    return correlation


def _pearson_terms(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    dim: int,
    mask: torch.Tensor | None,
    min_std_a: float = 0.0,
    min_std_b: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(correlation, a varies, b varies), each a's shape without `dim` (see `pearson`)."""
    with _no_autocast(a):
        a, b = a.float(), b.float()
        if mask is None:
            mask = torch.ones((), dtype=torch.bool, device=a.device)
        weight = mask.to(torch.float32).expand_as(a)
        count = weight.sum(dim, keepdim=True).clamp_min(1.0)

        def centred(series: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            series = series * weight
            deviation = (series - series.sum(dim, keepdim=True) / count) * weight
            energy = deviation.square().sum(dim)
            floor = (PEARSON_RELATIVE_STD**2) * series.square().sum(dim) + min_std**2 * count.squeeze(dim)
            varies = energy > floor + TINY
            return deviation, energy, varies

        a_dev, a_energy, a_varies = centred(a, min_std_a)
        b_dev, b_energy, b_varies = centred(b, min_std_b)
        defined = a_varies & b_varies
        # Degenerate series get a dummy denominator of 1 (and a 0 numerator weight): no NaN, no gradient.
        denominator = torch.where(defined, a_energy * b_energy, torch.ones_like(a_energy)).sqrt()
        correlation = torch.where(defined, (a_dev * b_dev).sum(dim) / denominator, torch.zeros_like(a_energy))
        return correlation, a_varies, b_varies


def teacher_probabilities(
    teacher_logits: torch.Tensor,
    size: tuple[int, int],
    valid: torch.Tensor,
    *,
    tau: float = 1.0,
    ratio: float | None = None,
) -> torch.Tensor:
    """The teacher's softmax(z/τ) on its own grid, resampled bilinearly to the student's size.

    Args:
        teacher_logits: B × C × h_t × w_t (stride 8).
        size: the student's (H, W) (stride 4, or the image size).
        valid: B × C bool.
        ratio: teacher cells per student cell (student stride / teacher stride, 1/2 for stride 4
            vs 8); None infers it (`resample_grid`).

    Returns:
        B × C × H × W float32; convex combinations of the teacher's probabilities, so every pixel
        still sums to 1 over the valid channels.
    """
    probabilities = masked_softmax(teacher_logits, valid, tau=tau)
    if tuple(probabilities.shape[-2:]) == tuple(size):
        return probabilities
    return resample_grid(probabilities, size, ratio=ratio)


def _relation_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None,
    tau: float,
    ratio: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits need the same B × C"
        )
    if valid is None:
        valid = valid_channels(student_logits, teacher_logits)
    valid = valid.to(device=student_logits.device, dtype=torch.bool)
    student = masked_softmax(student_logits, valid, tau=tau)
    teacher = teacher_probabilities(teacher_logits, student.shape[-2:], valid, tau=tau, ratio=ratio)
    return student, teacher, valid


def _zero_like_graph(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 zero that keeps `tensor` in the autograd graph (nothing to learn from this batch)."""
    return tensor.float().sum() * 0.0


def _masked_mean(values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `used`; 0 (still in the graph) when nothing is used. No host sync."""
    used = used.to(values.dtype)
    return (values * used).sum() / used.sum().clamp_min(1.0)


def inter_object_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 1.0,
    valid: torch.Tensor | None = None,
    ratio: float | None = None,
) -> torch.Tensor:
    """τ² · mean over pixels of 1 − Pearson(y_s[p, :], y_t[p, :]) across the valid channels.

    Args:
        student_logits: B × C × H × W.
        teacher_logits: B × C × h × w (resampled to H × W as probabilities when smaller).
        tau: softmax temperature τ.
        valid: B × C bool (None: channels not ABSENT in either map).
        ratio: see `teacher_probabilities`.

    Returns:
        float32 scalar. Left out of the mean (0 if nothing is left): samples with fewer than
        `INTER_MIN_CHANNELS` (3) valid channels (`inter_skipped_share`), and pixels where the
        teacher's probabilities vary by less than 1e-4 (std) across the valid channels (no relation
        to imitate).
    """
    student, teacher, valid = _relation_inputs(student_logits, teacher_logits, valid, tau, ratio)
    correlation, _, teacher_varies = _pearson_terms(
        student, teacher, dim=1, mask=valid[:, :, None, None], min_std_b=TEACHER_MIN_STD
    )  # B × H × W
    used = teacher_varies & (valid.sum(1) >= INTER_MIN_CHANNELS)[:, None, None]
    return tau**2 * _masked_mean(1.0 - correlation, used)


def inter_skipped_share(valid: torch.Tensor) -> torch.Tensor:
    """The share of samples the inter-object term leaves out: B × C bool valid channels → float32
    scalar in [0, 1], the share with fewer than `INTER_MIN_CHANNELS` valid channels."""
    return (valid.sum(1) < INTER_MIN_CHANNELS).float().mean()


def intra_object_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tau: float = 1.0,
    valid: torch.Tensor | None = None,
    ratio: float | None = None,
) -> torch.Tensor:
    """τ² · mean over valid (sample, channel) of 1 − Pearson(y_s[:, o], y_t[:, o]) across pixels.

    The background channel counts as an object. Arguments as `inter_object_loss`.

    Returns:
        float32 scalar. Left out of the mean (0 if nothing is left): channels whose teacher map
        varies by less than 1e-4 (std) across pixels, e.g. an object the teacher has lost.
    """
    student, teacher, valid = _relation_inputs(student_logits, teacher_logits, valid, tau, ratio)
    correlation, _, teacher_varies = _pearson_terms(
        student.flatten(2), teacher.flatten(2), dim=2, mask=None, min_std_b=TEACHER_MIN_STD
    )  # B × C
    used = valid & teacher_varies
    return tau**2 * _masked_mean(1.0 - correlation, used)


def bootstrapped_ce(
    logits: torch.Tensor, target: torch.Tensor, *, hard_ratio: float = 1.0, usable: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy averaged over each sample's hardest pixels (AOT's bootstrapped CE).

    Args:
        logits: B × C × H × W (masked ids already at a very negative logit).
        target: B × H × W ids.
        hard_ratio: share of each sample's pixels kept, those with the largest loss (1: plain CE).
        usable: B bool, samples that count (None: all).

    Returns:
        float32 scalar: the mean over the kept pixels of the usable samples.
    """
    if not 0.0 < hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio must be in (0, 1], got {hard_ratio}")
    loss = F.cross_entropy(logits.float(), target.long(), reduction="none").flatten(1)  # B × HW
    if hard_ratio < 1.0:
        keep = max(1, math.ceil(hard_ratio * loss.shape[1]))
        loss = loss.topk(keep, dim=1, sorted=False).values
    if usable is None:
        usable = torch.ones(loss.shape[0], dtype=torch.bool, device=loss.device)
    return _masked_mean(loss, usable[:, None].expand_as(loss))


def soft_jaccard_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """1 − soft IoU between the softmax and the one-hot target, per id, averaged over the valid ids
    of each sample (background included), as AOT's segmentation loss; an id absent from both the
    target and the prediction scores IoU 1 (smoothing 1 in the numerator and the denominator).

    Args:
        logits: B × C × H × W.
        target: B × H × W ids in [0, C).
        valid: B × C bool ids that count (None: all).

    Returns:
        float32 scalar.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probabilities.dtype)
    intersection = (probabilities * one_hot).sum((2, 3))
    union = (probabilities + one_hot).sum((2, 3)) - intersection
    loss = 1.0 - (intersection + 1.0) / (union + 1.0)  # B × C
    if valid is None:
        valid = torch.ones_like(loss, dtype=torch.bool)
    return _masked_mean(loss, valid.to(loss.device))


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    hard_ratio: float = 1.0,
    jaccard_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bootstrapped CE, soft Jaccard) of B × C × H × W logits to B × H × W ids: masked ids
    (`valid` False, B × C) leave the softmax and can never be a target; samples without a valid id
    do not count. The Jaccard term is computed (for logging) even when its weight is 0, without a
    graph then."""
    with _no_autocast(logits):
        if valid is None:
            valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        valid = valid.to(device=logits.device, dtype=torch.bool)
        usable = valid.any(1)
        masked = logits.float().masked_fill(~valid[:, :, None, None], MASKED_LOGIT)
        target = target.to(logits.device).long()
        ce = bootstrapped_ce(masked, target, hard_ratio=hard_ratio, usable=usable)
        with torch.set_grad_enabled(torch.is_grad_enabled() and jaccard_weight != 0.0):
            jaccard = soft_jaccard_loss(masked, target, valid & usable[:, None])
    return ce, jaccard


def pseudo_label_ce(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    ratio: float | None = None,
    target: torch.Tensor | None = None,
    hard_ratio: float = 1.0,
    jaccard_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cross-entropy, soft Jaccard) of the student to the teacher's hard pseudo-mask (argmax over
    valid ids), see `segmentation_loss`.

    The teacher's probabilities (τ = 1) are resampled to the student's size before the argmax, as
    the teacher's own image-size prediction does; masked ids are excluded from the student's
    softmax and can never be a target.

    Args:
        student_logits: B × C × H × W.
        teacher_logits: B × C × h × w.
        valid: B × C bool (None: channels not ABSENT in either map).
        target: B × H × W ids to use instead of that argmax (e.g. edge-refined, `bilateral_refine`).
        hard_ratio: the CE averages each sample's hardest pixels only (`bootstrapped_ce`; 1: all).
        jaccard_weight: 0 computes the Jaccard term without a graph (logging only).

    Returns:
        (ce, jaccard) float32 scalars, over the samples with a valid channel.
    """
    with _no_autocast(student_logits):
        if valid is None:
            valid = valid_channels(student_logits, teacher_logits)
        valid = valid.to(device=student_logits.device, dtype=torch.bool)
        if target is None:
            with torch.no_grad():
                target = teacher_probabilities(
                    teacher_logits, student_logits.shape[-2:], valid, ratio=ratio
                ).argmax(1)
        return segmentation_loss(
            student_logits, target, valid, hard_ratio=hard_ratio, jaccard_weight=jaccard_weight
        )


# --------------------------------------------------------------------------------------------------
# The distillation objective
# --------------------------------------------------------------------------------------------------
class DistillationLoss(nn.Module):
    """λ_att·L_att + λ_inter·L_inter + λ_intra·L_intra + λ_ce·L_ce + λ_jaccard·L_jaccard
    (docs/METHOD.md, "Distillation losses"; the last two to the teacher's hard pseudo-mask, `pseudo_label_ce`).

    Terms with λ = 0 are still computed for logging (without gradients). The parts are returned
    unweighted and detached: `{"att", "inter", "intra", "ce", "jaccard"}`.

    Args:
        lambda_att, lambda_inter, lambda_intra, lambda_ce, lambda_jaccard: weights.
        tau: temperature of the relation losses.
        ce_hard_ratio: the CE averages each sample's hardest pixels only (`bootstrapped_ce`; 1: all).
        heads: how the student's attention heads enter the CKA (see `cka_loss`).
    """

    def __init__(
        self,
        *,
        lambda_att: float = 1.0,
        lambda_inter: float = 1.0,
        lambda_intra: float = 1.0,
        lambda_ce: float = 0.0,
        lambda_jaccard: float = 0.0,
        tau: float = 1.0,
        ce_hard_ratio: float = 1.0,
        heads: HeadReduction = "concat",
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < ce_hard_ratio <= 1.0:
            raise ValueError(f"ce_hard_ratio must be in (0, 1], got {ce_hard_ratio}")
        self.weights = {
            "att": float(lambda_att),
            "inter": float(lambda_inter),
            "intra": float(lambda_intra),
            "ce": float(lambda_ce),
            "jaccard": float(lambda_jaccard),
        }
        self.tau = float(tau)
        self.ce_hard_ratio = float(ce_hard_ratio)
        self.heads = heads

    def extra_repr(self) -> str:
        weights = ", ".join(f"lambda_{name}={value}" for name, value in self.weights.items())
        return f"{weights}, tau={self.tau}, ce_hard_ratio={self.ce_hard_ratio}, heads={self.heads}"

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        num_objects: torch.Tensor | int | None = None,
        attention_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
        student_query_shape: tuple[int, int] | None = None,
        teacher_query_shape: tuple[int, int] | None = None,
        logit_ratio: float | None = None,
        query_ratio: float | None = None,
        query_offset: tuple[float, float] = (0.0, 0.0),
        query_extent: tuple[float, float] | None = None,
        ce_target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and its parts for one target frame.

        Args:
            student_logits: B × C × H × W (stride 4 or image size).
            teacher_logits: B × C × h_t × w_t (stride 8).
            valid: B × C bool valid ids; else from `num_objects` (ids 0..n valid); else the ids
                that are not ABSENT in either map.
            attention_pairs: (student B × heads × N_s × M, teacher B × N_t × M_t) pairs; the
                attention loss is the mean of `cka_loss` over them (0 without pairs).
            student_query_shape, teacher_query_shape: (h, w) query grids; the teacher's rows are
                resampled (`match_query_grid`) when they differ.
            logit_ratio: teacher cells per student logit cell (see `teacher_probabilities`).
            query_ratio: student query stride / teacher query stride (see `match_query_grid`).
            query_offset, query_extent: the student grid's start and the image's size, in teacher
                cells (see `match_query_grid`).
            ce_target: B × H × W ids for the CE instead of the teacher's argmax (`pseudo_label_ce`).

        Returns:
            (total float32 scalar, {"att", "inter", "intra", "ce", "jaccard"} detached float32 scalars).
        """
        if valid is None and num_objects is not None:
            valid = objects_to_valid(
                num_objects, student_logits.shape[1], student_logits.shape[0], device=student_logits.device
            )
        parts: dict[str, torch.Tensor] = {}
        for name in ("att", "inter", "intra"):
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.weights[name] != 0.0):
                if name == "att":
                    parts[name] = self._attention_loss(
                        student_logits,
                        attention_pairs,
                        student_query_shape,
                        teacher_query_shape,
                        dict(ratio=query_ratio, offset=query_offset, extent=query_extent),
                    )
                elif name == "inter":
                    parts[name] = inter_object_loss(
                        student_logits, teacher_logits, tau=self.tau, valid=valid, ratio=logit_ratio
                    )
                else:
                    parts[name] = intra_object_loss(
                        student_logits, teacher_logits, tau=self.tau, valid=valid, ratio=logit_ratio
                    )
        # CE and Jaccard share the teacher's hard mask; each keeps a graph only when weighted
        segmenting = self.weights["ce"] != 0.0 or self.weights["jaccard"] != 0.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and segmenting):
            ce, parts["jaccard"] = pseudo_label_ce(
                student_logits,
                teacher_logits,
                valid,
                ratio=logit_ratio,
                target=ce_target,
                hard_ratio=self.ce_hard_ratio,
                jaccard_weight=self.weights["jaccard"],
            )
        parts["ce"] = ce if self.weights["ce"] != 0.0 else ce.detach()
        total = sum(self.weights[name] * parts[name] for name in parts if self.weights[name] != 0.0)
        if not isinstance(total, torch.Tensor):  # every weight is 0
            total = _zero_like_graph(student_logits)
        return total, {name: value.detach() for name, value in parts.items()}

    def _attention_loss(
        self,
        student_logits: torch.Tensor,
        attention_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        student_query_shape: tuple[int, int] | None,
        teacher_query_shape: tuple[int, int] | None,
        grid: dict,
    ) -> torch.Tensor:
        if not attention_pairs:
            return student_logits.new_zeros((), dtype=torch.float32)
        losses = []
        for student_attention, teacher_attention in attention_pairs:
            tokens = student_attention.shape[-2]
            if teacher_attention.shape[1] != tokens:
                if student_query_shape is None or teacher_query_shape is None:
                    raise ValueError(
                        f"student ({tokens}) and teacher ({teacher_attention.shape[1]}) query tokens differ:"
                        " pass student_query_shape and teacher_query_shape"
                    )
                teacher_attention = match_query_grid(
                    teacher_attention, teacher_query_shape, student_query_shape, **grid
                )
            losses.append(cka_loss(student_attention, teacher_attention, heads=self.heads))
        return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------------
# Contrastive random walk
# --------------------------------------------------------------------------------------------------
def crw_transitions(
    features: torch.Tensor,
    *,
    temperature: float = 0.07,
    edge_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stochastic transition matrices between neighbouring frames of a clip.

    Nodes are the h·w feature cells of each frame, L2-normalised over channels. For frames t and
    t + 1 the affinity is S_t = F_t F_{t+1}ᵀ / τ; forward A_t = softmax_rows(S_t) (t → t+1),
    backward Ā_t = softmax_rows(S_tᵀ) (t+1 → t). Edge dropout: each affinity of each matrix is
    dropped (its softmax weight becomes 0, the rest renormalise) with probability `edge_dropout`,
    independently for the forward and the backward matrix, as in CRW.

    Args:
        features: B × T × C × h × w.
        temperature: τ.
        edge_dropout: drop probability (pass 0 when not training).
        generator: random source of the dropout (on the features' device).

    Returns:
        (forward, backward): T − 1 tensors B × N × N each (N = h·w, rows sum to 1), float32.
    """
    if features.ndim != 5 or features.shape[1] < 2:
        raise ValueError(f"features must be B × T × C × h × w with T >= 2, got {tuple(features.shape)}")
    if not 0.0 <= edge_dropout < 1.0:
        raise ValueError(f"edge_dropout must be in [0, 1), got {edge_dropout}")
    with _no_autocast(features):
        nodes = F.normalize(features.float().flatten(3), dim=2).transpose(2, 3)  # B × T × N × C
        affinity = nodes[:, :-1] @ nodes[:, 1:].mT / temperature  # B × (T−1) × N × N

        def stochastic(scores: torch.Tensor) -> torch.Tensor:
            if edge_dropout > 0:
                dropped = torch.rand(scores.shape, generator=generator, device=scores.device) < edge_dropout
                scores = scores.masked_fill(dropped, CRW_DROPPED)
            return torch.softmax(scores, dim=-1)

        forward = stochastic(affinity)
        backward = stochastic(affinity.mT)
    return list(forward.unbind(1)), list(backward.unbind(1))


def palindrome_walk_loss(
    forward: Sequence[torch.Tensor], backward: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cycle-consistency loss of the palindrome walks 0 → k → 0, k = 1..T−1, averaged over k.

    The walk of length 2k is W_k = A_0 ⋯ A_{k−1} Ā_{k−1} ⋯ Ā_0 (B × N × N); its target is the
    identity (return to the start node): loss_k = mean over batch and nodes of −log W_k[i, i]
    (floored at 1e-20), accuracy_k = share of rows whose argmax is i.

    Args:
        forward: T − 1 tensors B × N × N, A_t (frame t → t+1), rows summing to 1.
        backward: T − 1 tensors B × N × N, Ā_t (frame t+1 → t).

    Returns:
        (loss, return accuracy), float32 scalars, both means over the T − 1 cycle lengths.
    """
    if len(forward) != len(backward) or not forward:
        raise ValueError("forward and backward need the same, non-zero number of transitions")
    nodes = forward[0].shape[-1]
    target = torch.arange(nodes, device=forward[0].device)
    losses, accuracies = [], []
    outbound = inbound = None
    for step, (ahead, back) in enumerate(zip(forward, backward)):
        outbound = ahead if step == 0 else outbound @ ahead  # A_0 ⋯ A_k
        inbound = back if step == 0 else back @ inbound  # Ā_k ⋯ Ā_0
        walk = outbound @ inbound
        returned = walk.diagonal(dim1=-2, dim2=-1)  # B × N
        losses.append(-returned.clamp_min(CRW_LOG_FLOOR).log().mean())
        accuracies.append((walk.argmax(-1) == target).float().mean())
    return torch.stack(losses).mean(), torch.stack(accuracies).mean()


def crw_loss(
    features: torch.Tensor,
    *,
    temperature: float = 0.07,
    edge_dropout: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive random walk loss of a clip's features (Jabri, Owens, Efros, NeurIPS 2020).

    `crw_transitions` then `palindrome_walk_loss`: every palindrome 0 → k → 0 (k = 1..T−1, walk
    lengths 2..2(T−1)) should bring each node back to itself.

    Args:
        features: B × T × C × h × w (the nodes of frame t are its h·w cells).
        temperature: τ of the transition softmax.
        edge_dropout: share of affinities dropped before the softmax (0 when not training).
        generator: random source of the dropout.

    Returns:
        (loss, return accuracy): float32 scalars; a perfect walk has loss 0 and accuracy 1, a
        uniform one loss log N.
    """
    forward, backward = crw_transitions(
        features, temperature=temperature, edge_dropout=edge_dropout, generator=generator
    )
    return palindrome_walk_loss(forward, backward)
