"""`AttentionPictures`: where the student's deformable attention looks, next to the teacher's, in W&B.

Every `every_n_steps` optimizer steps (and at the first batch of a fit), global rank 0 runs the
LightningModule's `forward_clip` on the first clip of the current training batch (no gradients, the
module in eval mode for that call) and draws two pictures of the last frame t of the clip:

- `attention/pictures`, a grid with one row per query token (objects' centres in the student's
  prediction at t, largest first, then one background point):
  [query frame t, the query token's 16 × 16 cell boxed] | [reference frame 0 with the student's
  long-term sampling points] | [frame t−1 with the short-term sampling points] | [teacher's attention
  over frame 0] | [teacher's attention over frame t−1].
  A dot per sampling point and group (colour = group), radius and opacity ∝ the query's attention
  weight (mean over the group's heads), scaled to the panel's largest weight; the `max_points`
  heaviest dots are drawn, the heaviest on top. Teacher panels: the row the CKA compares with the
  student's read of that frame (`dvos.lit.distill.teacher_frame_targets`): the teacher's attention
  over that frame alone (its own top-k and softmax), averaged over the teacher query cells inside
  the student's query cell, a distribution (the caption's sum is 1) as the student's row is; as a
  heat map (nearest upsampling: each teacher cell stays visible) blended on the frame. A small
  cross marks the query's position on every memory panel; outlines show the reference objects
  (frame 0) and the student's prediction (frame t−1).
- `attention/offsets`: the offset field of group 0 as arrows from the reference grid points to the
  sampling points (long-term over frame 0, short-term over frame t−1), coloured by length in
  memory-map cells (turbo colour map, 0 … the picture's largest offset).

Coordinates: a stride-16 memory-map pixel p (pixel centre i at i, `dvos/models/deformable.py`) is
the image point 16·p + 7.5 − pad, pad the (left, top) padding the student adds to reach a multiple
of 16 (`pad_to_stride`), in image pixel-centre coordinates. That is "16·p + 8" in corner
coordinates.

Both pictures are always written to `<default_root_dir>/pictures/attention-step<NNNNNN>.png` and
`attention-offsets-step<NNNNNN>.png` and, when a `WandbLogger` is attached, logged as `wandb.Image`
under those keys (with `trainer/global_step`). A failure while drawing never stops training: it is
reported once as a `PictureWarning` (later ones at debug level).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from dvos.callbacks import render
from dvos.lit.distill import teacher_frame_targets
from dvos.models.layers import pad_to_stride

log = logging.getLogger(__name__)

STUDENT_STRIDE = 16  # pixels per cell of the student's propagation map (`student.FEATURE_STRIDE`)
COLUMNS = ("query", "student long-term", "student short-term", "teacher reference", "teacher previous")


class PictureWarning(UserWarning):
    """A callback could not draw or log a picture (training goes on)."""


class FailureReporter:
    """Warn about the first failure of a callback as a `PictureWarning`, log later ones at debug level."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.warned = False

    def report(self, what: str, err: BaseException) -> None:
        message = f"{self.name}: {what} failed ({type(err).__name__}: {err}); training goes on"
        if not self.warned:
            self.warned = True
            warnings.warn(
                message + " (further failures are logged at debug level)", PictureWarning, stacklevel=3
            )
        log.debug(message, exc_info=err)


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's `WandbLogger`s (none when it logs elsewhere or not at all)."""
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def pictures_dir(trainer: pl.Trainer) -> Path:
    """`<default_root_dir>/pictures`, where the callbacks write their PNG files."""
    return Path(trainer.default_root_dir) / "pictures"


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put `module` in eval mode and give every sub-module its own training flag back afterwards."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


# --------------------------------------------------------------------------------------------------
# Rendering (tensors → pictures), usable without a Trainer
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryPoint:
    """One query token of the student's stride-16 query map.

    Attributes:
        token: row-major index n in the query map (h × w of the padded frame), the attention's row.
        cell: (row i, column j) of the token.
        point: (x, y), the token's centre in image pixels (pixel-centre coordinates).
        label: what it was chosen for ("object 2", "background", "centre").
    """

    token: int
    cell: tuple[int, int]
    point: tuple[float, float]
    label: str


@dataclass
class AttentionRendering:
    """The two pictures of one clip and how they are laid out.

    Attributes:
        grid: the attention grid, H_g × W_g × 3 uint8 RGB (rows = queries, columns = `COLUMNS`).
        offsets: the offset-field picture, H_o × W_o × 3 uint8 RGB (long-term | short-term, group 0).
        queries: the query tokens, one per grid row.
        query_frame: t, the frame of the clip the queries belong to.
        panel_size: (height, width) of one grid panel in pixels.
        scale: grid panel pixels per image pixel.
        offsets_panel_size: (height, width) of one panel of the offsets picture.
        offsets_scale: offsets-picture pixels per image pixel.
        pad: (left, right, top, bottom) pixels the student padded the frames by.
    """

    grid: np.ndarray
    offsets: np.ndarray
    queries: list[QueryPoint]
    query_frame: int
    panel_size: tuple[int, int]
    scale: float
    offsets_panel_size: tuple[int, int]
    offsets_scale: float
    pad: tuple[int, int, int, int]

    def grid_point(self, row: int, col: int, point: tuple[float, float]) -> tuple[float, float]:
        """Image point (x, y) → its position (x, y) in the grid picture, on panel (row, col)."""
        x0, y0 = render.panel_origin(row, col, self.panel_size, header=True)
        return x0 + to_panel(point[0], self.scale), y0 + to_panel(point[1], self.scale)

    def offsets_point(self, col: int, point: tuple[float, float]) -> tuple[float, float]:
        """Image point (x, y) → its position (x, y) in the offsets picture, on panel `col`."""
        x0, y0 = render.panel_origin(0, col, self.offsets_panel_size, header=True)
        return x0 + to_panel(point[0], self.offsets_scale), y0 + to_panel(point[1], self.offsets_scale)


def to_panel(coordinate: np.ndarray | float, scale: float) -> np.ndarray | float:
    """Image pixel-centre coordinate → coordinate in an image resized by `scale` (same convention)."""
    return (coordinate + 0.5) * scale - 0.5


def student_padding(image_size: tuple[int, int]) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The student's padding of an H × W frame and the size of its query map.

    Returns:
        (pad, (h, w)): pad = (left, right, top, bottom) pixels (`pad_to_stride`), h × w = the padded
        frame / 16.
    """
    height, width = image_size
    _, pad = pad_to_stride(torch.zeros(1, 1, height, width), STUDENT_STRIDE)
    return pad, ((height + pad[2] + pad[3]) // STUDENT_STRIDE, (width + pad[0] + pad[1]) // STUDENT_STRIDE)


def memory_to_image(points_px: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Stride-16 memory-map pixels (x, y) → image pixels (x, y): 16·p + 7.5 − (left, top).

    Args:
        points_px: ... × 2, e.g. `DeformableAttentionAux.positions_px` or `reference_px`.
    """
    shift = np.array([pad[0], pad[2]], dtype=np.float64)
    return np.asarray(points_px, dtype=np.float64) * STUDENT_STRIDE + (STUDENT_STRIDE - 1) / 2 - shift


def token_query(
    cell: tuple[int, int], grid: tuple[int, int], pad: tuple[int, int, int, int], label: str
) -> QueryPoint:
    """The `QueryPoint` of query-map cell (i, j) (clamped to the grid)."""
    i = int(min(max(cell[0], 0), grid[0] - 1))
    j = int(min(max(cell[1], 0), grid[1] - 1))
    x, y = memory_to_image(np.array([j, i]), pad)
    return QueryPoint(i * grid[1] + j, (i, j), (float(x), float(y)), label)


def choose_queries(
    prediction: np.ndarray, num_queries: int, pad: tuple[int, int, int, int], grid: tuple[int, int]
) -> list[QueryPoint]:
    """Deterministic query tokens: objects' centres (largest object first), one background point, fillers.

    An object's point is its pixel nearest to its centroid (inside the object even when it is not
    convex); the background point is the background pixel farthest from every object (distance
    transform). With fewer objects than `num_queries − 1`, the image centre and evenly spread cells
    fill the rows; a token is never used twice.

    Args:
        prediction: H × W ids (the student's argmax at the query frame).
        num_queries: tokens wanted.
        pad: the student's padding (`student_padding`).
        grid: (h, w) of the student's query map.

    Returns:
        min(num_queries, h·w) `QueryPoint`s.
    """
    prediction = np.asarray(prediction)
    height, width = prediction.shape

    def cell_of(x: float, y: float) -> tuple[int, int]:
        return (int((y + pad[2]) // STUDENT_STRIDE), int((x + pad[0]) // STUDENT_STRIDE))

    objects = []
    for value in np.unique(prediction):
        if value == 0:
            continue
        ys, xs = np.nonzero(prediction == value)
        nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        objects.append((-len(xs), int(value), cell_of(xs[nearest], ys[nearest])))
    objects.sort()
    candidates = [token_query(cell, grid, pad, f"object {value}") for _, value, cell in objects]
    background = (prediction == 0).astype(np.uint8)
    if background.any():
        if background.all():
            y, x = (height - 1) / 2, (width - 1) / 2
        else:
            distance = cv2.distanceTransform(background, cv2.DIST_L2, 3)
            y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        candidates.insert(
            min(len(candidates), max(1, num_queries - 1)), token_query(cell_of(x, y), grid, pad, "background")
        )
    candidates.append(token_query(cell_of((width - 1) / 2, (height - 1) / 2), grid, pad, "centre"))
    for i, j in zip(
        np.linspace(0, grid[0] - 1, 5).round().astype(int), np.linspace(0, grid[1] - 1, 5).round().astype(int)
    ):
        candidates.append(token_query((i, j), grid, pad, "grid"))
    for i in range(grid[0]):
        candidates += [token_query((i, j), grid, pad, "grid") for j in range(grid[1])]
    chosen: list[QueryPoint] = []
    for query in candidates:
        if len(chosen) == num_queries:
            break
        if all(query.token != other.token for other in chosen):
            chosen.append(query)
    return chosen


def frames_to_images(frames: torch.Tensor) -> np.ndarray:
    """T × 3 × H × W floats in [0, 1] → T × H × W × 3 uint8 RGB."""
    images = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def group_weights(attention: torch.Tensor, token: int, num_groups: int) -> np.ndarray:
    """One query's attention, averaged over the heads of each group.

    Args:
        attention: heads × N × M of one sample.
        token: the query row n.
        num_groups: G (heads/G consecutive heads per group).

    Returns:
        G × M float64 (each row sums to 1).
    """
    row = attention[:, token, :].detach().double()
    return row.reshape(num_groups, -1, row.shape[-1]).mean(1).cpu().numpy()


def teacher_target_rows(
    attention: Any,
    frame_index: int,
    image_size: tuple[int, int],
    stride: int,
    sample: int,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    first: bool = False,
) -> torch.Tensor | None:
    """The CKA targets of one clip for the student's read of frame `frame_index`.

    Args:
        attention: a `TeacherAttention` with per-frame maps.
        frame_index: the memory frame (0, or t − 1).
        image_size: (H, W) of the clip's frames.
        stride: pixels per teacher cell.
        sample: the batch element.
        origin, first: as `teacher_frame_targets` (a deformable teacher's padded grid; its long-term read).

    Returns:
        N_s × h_t·w_t (one row per student query token, each summing to 1), or None when the
        teacher's context does not hold the frame.
    """
    one = dataclasses.replace(
        attention,
        indices=attention.indices[sample : sample + 1],
        weights=attention.weights[sample : sample + 1],
        frame_indices=attention.frame_indices[sample : sample + 1],
        frame_weights=attention.frame_weights[sample : sample + 1],
    )
    targets = teacher_frame_targets(one, frame_index, image_size, stride, origin=origin, first=first)
    return None if targets is None else targets[0].detach()


def cells_to_image(
    values: np.ndarray, stride: int, image_size: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """h × w cell values → H × W: cell (i, j) fills pixels [o + s·i, o + s·i + s) (the same in x; o =
    `origin`, the image pixel where the grid starts, ≤ 0); edges replicated."""
    full = np.repeat(np.repeat(values, stride, axis=0), stride, axis=1)
    height, width = image_size
    top, left = max(0, round(-origin[0])), max(0, round(-origin[1]))
    full = full[top : top + height, left : left + width]
    return np.pad(full, ((0, height - full.shape[0]), (0, width - full.shape[1])), mode="edge")


def _dot_layer(
    panel: np.ndarray,
    weights: np.ndarray,
    points: np.ndarray,
    *,
    max_points: int | None,
    cell: float,
) -> tuple[np.ndarray, float]:
    """Draw G × M weighted points (panel coordinates G × M × 2) on a panel; returns (panel, max weight)."""
    groups, count = weights.shape
    flat_weights = weights.reshape(-1)
    flat_points = points.reshape(-1, 2)
    colors = np.repeat(
        np.array([render.GROUP_COLORS[g % len(render.GROUP_COLORS)] for g in range(groups)]), count, 0
    )
    order = np.argsort(flat_weights, kind="stable")  # heaviest last: on top
    if max_points is not None:
        order = order[-max_points:]
    top = float(flat_weights.max()) if flat_weights.size else 0.0
    norm = flat_weights[order] / top if top > 0 else np.zeros(len(order))
    largest = min(max(3.0, 0.45 * cell), 12.0)
    panel = render.draw_dots(
        panel,
        flat_points[order],
        colors[order],
        radii=1.0 + (largest - 1.0) * np.sqrt(norm),
        opacities=0.25 + 0.75 * norm,
    )
    return panel, top


def render_attention(
    frames: torch.Tensor,
    outputs: Any,
    *,
    sample: int = 0,
    num_queries: int = 3,
    max_points: int | None = 128,
    max_width: int = 1600,
    teacher_previous: bool = True,
    header: str = "",
) -> AttentionRendering:
    """Draw the attention grid and the offset field of the last frame of one clip.

    Args:
        frames: T × 3 × H × W in [0, 1], the clip given to `forward_clip` (T ≥ 2).
        outputs: its `ClipOutputs` (`reference_ids`, `student_logits`, `student_aux`,
            `teacher_attention`, `teacher_token_shape`, `teacher_stride`), computed with
            return_attention=True.
        sample: which batch element of `outputs` the frames are.
        num_queries: grid rows.
        max_points: dots drawn per panel (the heaviest; None: all G·M).
        max_width: the pictures' width limit in pixels (panels are scaled to fit).
        teacher_previous: add the fifth column (teacher's attention over frame t−1).
        header: text put before the picture's own header line.

    Returns:
        `AttentionRendering`.
    """
    images = frames_to_images(frames)
    num_frames, height, width = images.shape[:3]
    if num_frames < 2:
        raise ValueError(f"need a clip of at least 2 frames, got {num_frames}")
    t = num_frames - 1
    aux = outputs.student_aux[t - 1]
    if aux is None:
        raise ValueError("the clip outputs carry no attention (call forward_clip with return_attention=True)")
    long_term, short_term = aux["long_term"], aux["short_term"]
    pad, grid = student_padding((height, width))
    num_queries_tokens = long_term.attention.shape[2]
    if num_queries_tokens != grid[0] * grid[1]:
        raise ValueError(
            f"attention has {num_queries_tokens} query tokens, the {grid} query map {grid[0] * grid[1]}"
        )
    num_groups = long_term.positions_px.shape[1]
    num_heads = long_term.attention.shape[1]

    prediction = outputs.student_logits[t - 1][sample].argmax(0).cpu().numpy().astype(np.uint8)
    previous_ids = (
        outputs.student_logits[t - 2][sample].argmax(0).cpu().numpy().astype(np.uint8)
        if t >= 2
        else outputs.reference_ids[sample].cpu().numpy().astype(np.uint8)
    )
    reference_ids = outputs.reference_ids[sample].cpu().numpy().astype(np.uint8)
    queries = choose_queries(prediction, num_queries, pad, grid)

    columns = 5 if teacher_previous else 4
    panel_w = max(32, (max_width - (columns + 1) * render.GAP) // columns)
    scale = panel_w / width
    panel_h = max(1, round(height * scale))
    panel_size = (panel_h, panel_w)
    cell = STUDENT_STRIDE * scale

    def base(index: int, ids: np.ndarray | None = None, alpha: float = 0.0) -> np.ndarray:
        image = images[index]
        if ids is not None and alpha > 0:
            image = render.overlay_ids(image, ids, alpha=alpha)
        panel = render.resize_image(image, panel_size)
        if ids is not None:
            outline_ids = render.resize_image(ids, panel_size, nearest=True)
            panel = render.draw_outlines(panel, outline_ids, thickness=1)
        return panel

    query_base = base(t, prediction, 0.35)
    reference_base = base(0, reference_ids)
    previous_base = base(t - 1, previous_ids)
    reference_dim = render.blend(reference_base, np.zeros_like(reference_base), 0.25)
    previous_dim = render.blend(previous_base, np.zeros_like(previous_base), 0.25)
    long_points = to_panel(memory_to_image(long_term.positions_px[sample].detach().cpu().numpy(), pad), scale)
    short_points = to_panel(
        memory_to_image(short_term.positions_px[sample].detach().cpu().numpy(), pad), scale
    )
    teacher_stride = int(outputs.teacher_stride)
    teacher_shape = tuple(outputs.teacher_token_shape)
    teacher_origin = tuple(getattr(outputs, "teacher_origin", (0.0, 0.0)))
    teacher_attention = outputs.teacher_attention[t]
    teacher_columns = [("reference", 0, reference_base)]
    if teacher_previous:
        teacher_columns.append(("previous", t - 1, previous_base))
    teacher_targets = {
        columns_name: None
        if teacher_attention is None
        else teacher_target_rows(
            teacher_attention,
            frame_index,
            (height, width),
            teacher_stride,
            sample,
            origin=teacher_origin,
            first=columns_name == "reference",
        )
        for columns_name, frame_index, _ in teacher_columns
    }

    rows, titles = [], []
    for number, query in enumerate(queries):
        qx, qy = (to_panel(query.point[0], scale), to_panel(query.point[1], scale))
        marker = {"color": (255, 255, 255), "size": max(4.0, 0.3 * cell)}
        row = [render.draw_marker(query_base, (qx, qy), box=cell, **marker)]
        row_titles = [f"q{number} {query.label}, cell r{query.cell[0]} c{query.cell[1]}, f{t}"]
        for branch, name, frame_index, panel_base, points in (
            (long_term, "long-term", 0, reference_dim, long_points),
            (short_term, "short-term", t - 1, previous_dim, short_points),
        ):
            weights = group_weights(branch.attention[sample], query.token, num_groups)
            panel = render.draw_marker(panel_base, (qx, qy), **marker)
            panel, top = _dot_layer(panel, weights, points, max_points=max_points, cell=cell)
            row.append(panel)
            row_titles.append(f"student {name} f{frame_index} max w {top:.3f}")
        for columns_name, frame_index, panel_base in teacher_columns:
            targets = teacher_targets[columns_name]
            if targets is None:
                row.append(None)
                row_titles.append(f"teacher {columns_name}: none")
                continue
            values = targets[query.token].double().reshape(teacher_shape).cpu().numpy()
            full = render.resize_image(
                cells_to_image(values, teacher_stride, (height, width), teacher_origin),
                panel_size,
                nearest=True,
            )
            panel = render.blend_heatmap(panel_base, full)
            # The row holds a few top-k cells per teacher row under the student cell, a few pixels
            # each on a large frame: ring the heavier ones (the heat map shows the rest).
            threshold = 0.3 * values.max() if values.max() > 0 else np.inf
            strong_i, strong_j = np.nonzero(values >= threshold)
            centres = np.stack([strong_j, strong_i], -1) * teacher_stride + np.array(teacher_origin[::-1])
            centres = to_panel(centres + (teacher_stride - 1) / 2, scale)
            ring_colors = render.heatmap(values[strong_i, strong_j][None], vmax=values.max())[0]
            panel = render.draw_rings(
                panel, centres, ring_colors, radius=max(5.0, 0.75 * teacher_stride * scale)
            )
            panel = render.draw_marker(panel, (qx, qy), **marker)
            row.append(panel)
            row_titles.append(
                f"teacher {columns_name} f{frame_index} sum {values.sum():.2f} max {values.max():.3f}"
            )
        rows.append(row)
        titles.append(row_titles)
    points_per_group = long_term.positions_px.shape[2]
    grid_header = (
        f"{header}query frame t={t}: {num_groups} groups x {num_heads // num_groups} heads, "
        f"{points_per_group} points/group; dot size+opacity ~ weight (panel max); colour = group"
    )
    picture = render.tile(rows, titles, header=grid_header)

    # Offset field of group 0: reference grid point → sampling point, coloured by length in cells.
    offsets_w = max(32, min(3 * width, (max_width - 3 * render.GAP) // 2))
    offsets_scale = offsets_w / width
    offsets_size = (max(1, round(height * offsets_scale)), offsets_w)
    lengths = [
        np.linalg.norm(branch.offsets[sample, 0].detach().double().cpu().numpy(), axis=-1)
        for branch in (long_term, short_term)
    ]
    longest = max(float(length.max()) if length.size else 0.0 for length in lengths)
    panels, panel_titles = [], []
    for branch, name, frame_index, length in (
        (long_term, "long-term", 0, lengths[0]),
        (short_term, "short-term", t - 1, lengths[1]),
    ):
        background = render.resize_image(images[frame_index], offsets_size)
        background = render.blend(background, np.zeros_like(background), 0.35)
        starts = to_panel(memory_to_image(branch.reference_px.detach().cpu().numpy(), pad), offsets_scale)
        ends = to_panel(
            memory_to_image(branch.positions_px[sample, 0].detach().cpu().numpy(), pad), offsets_scale
        )
        colors = render.colormap_colors(
            length, vmin=0.0, vmax=longest if longest > 0 else 1.0, levels=render.LINE_LEVELS
        )
        panels.append(
            render.draw_arrows(
                background,
                starts,
                ends,
                colors,
                thickness=2 if offsets_scale >= 1.5 else 1,
                tip=max(3.0, 0.25 * STUDENT_STRIDE * offsets_scale),
            )
        )
        panel_titles.append(f"{name} offsets g0 over f{frame_index}: max {float(length.max()):.2f} cells")
    offsets_picture = render.tile(
        [panels],
        [panel_titles],
        header=f"{header}offsets (query frame t={t}), colour 0..{longest:.2f} cells (turbo)",
    )
    return AttentionRendering(
        grid=picture,
        offsets=offsets_picture,
        queries=queries,
        query_frame=t,
        panel_size=panel_size,
        scale=scale,
        offsets_panel_size=offsets_size,
        offsets_scale=offsets_scale,
        pad=pad,
    )


# --------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------
def _accepts_keyword(function: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class AttentionPictures(pl.Callback):
    """Draw the student's and the teacher's attention of a training clip now and then (see the module).

    Args:
        every_n_steps: draw when `trainer.global_step` is a multiple of it (and at the first batch).
        num_queries: query tokens, one grid row each.
        max_points: dots drawn per panel, the heaviest (None: every sampled point of every group).
        enabled: False turns the callback into a no-op (for configs).
        max_width: the pictures' width limit in pixels.
        teacher_previous: show the teacher's attention over the previous frame too (5th column).

    Logged (rank 0, `WandbLogger`): `attention/pictures`, `attention/offsets` (`wandb.Image`, at
    `trainer/global_step`). Written: `<default_root_dir>/pictures/attention-step<NNNNNN>.png` and
    `attention-offsets-step<NNNNNN>.png`. `last_paths` and `last_rendering` hold the files and the
    pictures of the latest call.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        num_queries: int = 3,
        max_points: int | None = 128,
        enabled: bool = True,
        *,
        max_width: int = 1600,
        teacher_previous: bool = True,
    ) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        if int(num_queries) < 1:
            raise ValueError(f"num_queries must be ≥ 1, got {num_queries}")
        if max_points is not None and int(max_points) < 1:
            raise ValueError(f"max_points must be ≥ 1 or None, got {max_points}")
        self.every_n_steps = int(every_n_steps)
        self.num_queries = int(num_queries)
        self.max_points = None if max_points is None else int(max_points)
        self.enabled = bool(enabled)
        self.max_width = int(max_width)
        self.teacher_previous = bool(teacher_previous)
        self.last_paths: list[Path] = []
        self.last_rendering: AttentionRendering | None = None
        self._last_step: int | None = None
        self._failures = FailureReporter(type(self).__name__)

    def due(self, step: int) -> bool:
        """Whether to draw at this global step: the first call, then every `every_n_steps` (once per step)."""
        if self._last_step is None:
            return True
        return step != self._last_step and step % self.every_n_steps == 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        step = int(trainer.global_step)
        if not self.due(step):
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        try:
            self.draw(trainer, pl_module, batch)
        except Exception as err:  # a picture must never stop training
            self._failures.report(f"attention pictures at step {step}", err)

    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> AttentionRendering:
        """Run `forward_clip` on the batch's first clip, render, save the PNGs and log them to W&B."""
        if not isinstance(batch, Mapping) or "frames" not in batch:
            raise TypeError("the training batch has no 'frames' entry")
        frames = batch["frames"][:1].detach()
        kwargs: dict[str, Any] = {"return_attention": True}
        # Frame 0's annotation only, as the training step reads it (`reference_ids` or `masks[:, 0]`).
        batch_annotation = getattr(pl_module, "batch_annotation", None)
        annotation = batch_annotation(batch) if callable(batch_annotation) else batch.get("reference_ids")
        if isinstance(annotation, torch.Tensor) and _accepts_keyword(pl_module.forward_clip, "annotation"):
            kwargs["annotation"] = annotation[:1]
        with eval_mode(pl_module), torch.no_grad():
            outputs = pl_module.forward_clip(frames, **kwargs)
        step = int(trainer.global_step)
        rendering = render_attention(
            frames[0],
            outputs,
            num_queries=self.num_queries,
            max_points=self.max_points,
            max_width=self.max_width,
            teacher_previous=self.teacher_previous,
            header=f"step {step}, ",
        )
        folder = pictures_dir(trainer)
        self.last_rendering = rendering
        self.last_paths = [
            render.save_png(folder / f"attention-step{step:06d}.png", rendering.grid),
            render.save_png(folder / f"attention-offsets-step{step:06d}.png", rendering.offsets),
        ]
        loggers = wandb_loggers(trainer)
        if loggers:
            import wandb

            caption = f"step {step}, query frame t={rendering.query_frame}: " + ", ".join(
                f"q{n} {q.label}" for n, q in enumerate(rendering.queries)
            )
            for logger in loggers:
                logger.log_metrics(
                    {
                        "attention/pictures": wandb.Image(rendering.grid, caption=caption),
                        "attention/offsets": wandb.Image(rendering.offsets, caption=f"step {step}, group 0"),
                    },
                    step=step,
                )
        return rendering
