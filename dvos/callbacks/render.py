"""Drawing helpers for the pictures the callbacks log: pure numpy / OpenCV, no plotting library.

Conventions:

- images are RGB `H × W × 3` uint8 (what PIL and `wandb.Image` expect); OpenCV draws whatever three
  channels it is given, and the one place it produces BGR (`cv2.applyColorMap`) is flipped here;
- points are (x, y) in the image's pixel coordinates with pixel i's centre at i (dvos's convention,
  `dvos/models/deformable.py`); sub-pixel positions are kept by drawing with OpenCV's `shift`;
- colours are RGB tuples of ints in 0..255; palettes are the flat 768-int lists of
  `dvos.utils.masks.default_palette`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dvos.utils.io import atomic_path
from dvos.utils.masks import default_palette

SHIFT = 4  # OpenCV drawing with 4 fractional bits: points are placed to 1/16 px
FONT = cv2.FONT_HERSHEY_SIMPLEX
TITLE_HEIGHT = 18  # pixels of the title bar above each tiled panel
GAP = 4  # pixels between tiled panels and around them
BACKGROUND = (24, 24, 24)
TEXT_COLOR = (235, 235, 235)
# Distinct, bright colours for sampling-point groups (not the DAVIS palette: ids and groups differ).
GROUP_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),
    (64, 220, 255),
    (255, 220, 0),
    (255, 64, 255),
    (64, 255, 64),
    (255, 150, 0),
    (120, 120, 255),
    (255, 255, 255),
)
COLORMAP = getattr(cv2, "COLORMAP_TURBO", cv2.COLORMAP_JET)  # for values along lines (offset lengths)
HEAT_COLORMAP = getattr(cv2, "COLORMAP_INFERNO", cv2.COLORMAP_HOT)  # heat maps: high values are bright
LINE_LEVELS = (26, 230)  # the part of COLORMAP used for lines: its dark ends vanish on dimmed frames


# --------------------------------------------------------------------------------------------------
# Id masks
# --------------------------------------------------------------------------------------------------
def palette_array(palette: Sequence[int] | None = None) -> np.ndarray:
    """A flat RGB palette (768 ints; shorter ones are padded with black) → 256 × 3 uint8 (default DAVIS)."""
    flat = np.zeros(768, dtype=np.uint8)
    values = np.asarray(default_palette() if palette is None else palette, dtype=np.int64)[:768]
    flat[: values.size] = np.clip(values, 0, 255)
    return flat.reshape(256, 3)


def colorize_ids(ids: np.ndarray, palette: Sequence[int] | None = None) -> np.ndarray:
    """Colour an id mask with a palette.

    Args:
        ids: H × W integer ids in 0..255.
        palette: flat RGB list (default: the DAVIS palette).

    Returns:
        H × W × 3 uint8 RGB.
    """
    return palette_array(palette)[np.asarray(ids).astype(np.uint8)]


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """(1 − α)·image + α·overlay, rounded.

    Args:
        image, overlay: H × W × 3 uint8.
        alpha: a scalar in [0, 1] or an H × W map of per-pixel opacities.

    Returns:
        H × W × 3 uint8.
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * overlay.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def overlay_ids(
    image: np.ndarray, ids: np.ndarray, *, alpha: float = 0.5, palette: Sequence[int] | None = None
) -> np.ndarray:
    """Tint the pixels of objects (ids > 0) with their palette colour; background stays as it is.

    Args:
        image: H × W × 3 uint8 RGB.
        ids: H × W integer ids (0 background, 255 void is tinted with the palette's colour 255).
        alpha: opacity of the colours on object pixels.

    Returns:
        H × W × 3 uint8.
    """
    ids = np.asarray(ids)
    return blend(image, colorize_ids(ids, palette), (ids > 0).astype(np.float32) * alpha)


def draw_outlines(
    image: np.ndarray,
    ids: np.ndarray,
    *,
    color: tuple[int, int, int] | None = None,
    thickness: int = 1,
    palette: Sequence[int] | None = None,
) -> np.ndarray:
    """Draw the outline of every object (ids 1..254) of an id mask.

    Args:
        image: H × W × 3 uint8 RGB (not modified).
        ids: H × W integer ids, same size.
        color: one colour for every outline; None: each object's palette colour.
        thickness: line width in pixels.

    Returns:
        H × W × 3 uint8, a copy with the outlines.
    """
    out = np.ascontiguousarray(image).copy()
    ids = np.asarray(ids)
    colors = palette_array(palette)
    for value in np.unique(ids):
        if value == 0 or value == 255:
            continue
        contours, _ = cv2.findContours((ids == value).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        line = tuple(int(c) for c in (colors[int(value)] if color is None else color))
        cv2.drawContours(out, contours, -1, line, thickness, lineType=cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------------------------------
# Points, arrows, heat maps
# --------------------------------------------------------------------------------------------------
def _fixed(value: float) -> int:
    return int(round(float(value) * (1 << SHIFT)))


def draw_dots(
    image: np.ndarray,
    points: np.ndarray,
    colors: Sequence[tuple[int, int, int]] | np.ndarray,
    *,
    radii: np.ndarray | Sequence[float] | float = 3.0,
    opacities: np.ndarray | Sequence[float] | float = 1.0,
    outline: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Filled discs, each with its own colour, radius and opacity, drawn in the given order.

    Args:
        image: H × W × 3 uint8 RGB (not modified).
        points: N × 2 centres (x, y) in pixels (pixel centre i at i); points outside are clipped away.
        colors: N × 3 RGB (or one colour repeated).
        radii: N radii in pixels (≥ 0.5 drawn), or one for all.
        opacities: N opacities in [0, 1], or one for all.
        outline: optional colour of a 1-px ring around each disc (drawn with the disc's opacity).

    Returns:
        H × W × 3 uint8, a copy with the dots. Draw the most important dots last: they end on top.
    """
    out = np.ascontiguousarray(image).copy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    count = len(points)
    colors = np.broadcast_to(np.asarray(colors, dtype=np.int64).reshape(-1, 3), (count, 3))
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64).reshape(-1), (count,))
    opacities = np.broadcast_to(np.clip(np.asarray(opacities, dtype=np.float64), 0, 1).reshape(-1), (count,))
    height, width = out.shape[:2]
    for (x, y), color, radius, opacity in zip(points, colors, radii, opacities):
        if not (np.isfinite(x) and np.isfinite(y)) or opacity <= 0:
            continue
        reach = int(np.ceil(radius)) + 2
        x0, x1 = max(0, int(np.floor(x)) - reach), min(width, int(np.ceil(x)) + reach + 1)
        y0, y1 = max(0, int(np.floor(y)) - reach), min(height, int(np.ceil(y)) + reach + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        patch = out[y0:y1, x0:x1]
        drawn = patch.copy()
        centre = (_fixed(x - x0), _fixed(y - y0))
        size = max(1, _fixed(max(radius, 0.5)))
        cv2.circle(drawn, centre, size, tuple(int(c) for c in color), -1, cv2.LINE_AA, SHIFT)
        if outline is not None:
            cv2.circle(drawn, centre, size, outline, 1, cv2.LINE_AA, SHIFT)
        out[y0:y1, x0:x1] = blend(patch, drawn, float(opacity))
    return out


def draw_marker(
    image: np.ndarray,
    point: tuple[float, float],
    *,
    color: tuple[int, int, int] = (255, 255, 255),
    size: float = 8.0,
    box: float | None = None,
) -> np.ndarray:
    """A cross with a dark halo at `point` (x, y), and optionally a square of side `box` around it.

    Returns:
        a copy of `image` (H × W × 3 uint8) with the marker.
    """
    out = np.ascontiguousarray(image).copy()
    x, y = point
    for line_color, width in (((0, 0, 0), 3), (color, 1)):
        cv2.line(
            out,
            (_fixed(x - size), _fixed(y)),
            (_fixed(x + size), _fixed(y)),
            line_color,
            width,
            cv2.LINE_AA,
            SHIFT,
        )
        cv2.line(
            out,
            (_fixed(x), _fixed(y - size)),
            (_fixed(x), _fixed(y + size)),
            line_color,
            width,
            cv2.LINE_AA,
            SHIFT,
        )
        if box is not None:
            half = box / 2
            top_left, bottom_right = (
                (_fixed(x - half), _fixed(y - half)),
                (_fixed(x + half), _fixed(y + half)),
            )
            cv2.rectangle(out, top_left, bottom_right, line_color, width, cv2.LINE_AA, SHIFT)
    return out


def colormap_colors(
    values: np.ndarray,
    *,
    vmin: float = 0.0,
    vmax: float | None = None,
    levels: tuple[int, int] = (0, 255),
    colormap: int = COLORMAP,
) -> np.ndarray:
    """Scalars → RGB colours of a colour map (default turbo where OpenCV has it, else jet).

    Args:
        values: N values; vmin / vmax map to levels[0] / levels[1] of the colour map (vmax default:
            the largest value; a constant input maps to the low end).
        levels: the part of the 0..255 colour map used (e.g. `LINE_LEVELS`).
        colormap: an OpenCV colour map.

    Returns:
        N × 3 uint8 RGB.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    low, high = levels
    scaled = _levels(values, vmin, vmax).astype(np.float64) / 255
    indices = np.rint(low + (high - low) * scaled).astype(np.uint8)
    if indices.size == 0:  # OpenCV dies of SIGFPE (no exception) on an empty input
        return np.zeros((0, 3), np.uint8)
    bgr = cv2.applyColorMap(indices.reshape(-1, 1), colormap).reshape(-1, 3)
    return bgr[:, ::-1].copy()


def _levels(values: np.ndarray, vmin: float, vmax: float | None) -> np.ndarray:
    top = float(np.nanmax(values)) if vmax is None and values.size else (vmax or 0.0)
    span = top - vmin
    scaled = (values - vmin) / span if span > 0 else np.zeros_like(values)
    return np.clip(np.rint(np.nan_to_num(scaled) * 255), 0, 255).astype(np.uint8)


def draw_arrows(
    image: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    colors: Sequence[tuple[int, int, int]] | np.ndarray,
    *,
    thickness: int = 1,
    tip: float = 4.0,
    start_radius: float = 1.5,
) -> np.ndarray:
    """Arrows from `starts` to `ends`, each with a small dot at its start (so zero-length ones show).

    Args:
        image: H × W × 3 uint8 RGB (not modified).
        starts, ends: N × 2 (x, y) pixels.
        colors: N × 3 RGB (or one colour).
        thickness: line width in pixels.
        tip: arrow-head length in pixels (OpenCV takes it relative to the arrow's length).
        start_radius: radius of the start dot in pixels (0: none).

    Returns:
        H × W × 3 uint8, a copy with the arrows.
    """
    out = np.ascontiguousarray(image).copy()
    starts = np.asarray(starts, dtype=np.float64).reshape(-1, 2)
    ends = np.asarray(ends, dtype=np.float64).reshape(-1, 2)
    colors = np.broadcast_to(np.asarray(colors, dtype=np.int64).reshape(-1, 3), (len(starts), 3))
    for start, end, color in zip(starts, ends, colors):
        line = tuple(int(c) for c in color)
        p0 = (_fixed(start[0]), _fixed(start[1]))
        if start_radius > 0:
            cv2.circle(out, p0, _fixed(start_radius), line, -1, cv2.LINE_AA, SHIFT)
        length = float(np.hypot(*(end - start)))
        if length < 0.5:
            continue
        p1 = (_fixed(end[0]), _fixed(end[1]))
        cv2.arrowedLine(out, p0, p1, line, thickness, cv2.LINE_AA, SHIFT, min(0.5, tip / length))
    return out


def heatmap(
    values: np.ndarray,
    *,
    size: tuple[int, int] | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    interpolation: int = cv2.INTER_NEAREST,
) -> np.ndarray:
    """A scalar map as colours (`cv2.applyColorMap` with `HEAT_COLORMAP`: inferno, high = bright).

    Args:
        values: h × w floats.
        size: (H, W) to resize to (default: h × w); nearest keeps grid cells visible.
        vmin, vmax: values mapped to the ends of the colour map (vmax default: the map's maximum).

    Returns:
        H × W × 3 uint8 RGB.
    """
    values = np.asarray(values, dtype=np.float64)
    levels = _levels(values, vmin, vmax)
    if size is not None and levels.shape != tuple(size):
        levels = cv2.resize(levels, (int(size[1]), int(size[0])), interpolation=interpolation)
    if levels.size == 0:  # OpenCV dies of SIGFPE (no exception) on an empty input
        return np.zeros((*levels.shape, 3), np.uint8)
    return cv2.applyColorMap(levels, HEAT_COLORMAP)[..., ::-1].copy()


def draw_rings(
    image: np.ndarray,
    points: np.ndarray,
    colors: Sequence[tuple[int, int, int]] | np.ndarray,
    *,
    radius: float = 6.0,
    halo: tuple[int, int, int] | None = (0, 0, 0),
) -> np.ndarray:
    """1-px circles (over a 3-px dark halo) around points, to find small marks on a large picture.

    Args:
        image: H × W × 3 uint8 RGB (not modified).
        points: N × 2 centres (x, y) in pixels.
        colors: N × 3 RGB (or one colour).
        radius: ring radius in pixels.
        halo: colour of the halo under each ring (None: no halo).

    Returns:
        H × W × 3 uint8, a copy with the rings.
    """
    out = np.ascontiguousarray(image).copy()
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    colors = np.broadcast_to(np.asarray(colors, dtype=np.int64).reshape(-1, 3), (len(points), 3))
    for (x, y), color in zip(points, colors):
        centre, size = (_fixed(x), _fixed(y)), _fixed(radius)
        if halo is not None:
            cv2.circle(out, centre, size, halo, 3, cv2.LINE_AA, SHIFT)
        cv2.circle(out, centre, size, tuple(int(c) for c in color), 1, cv2.LINE_AA, SHIFT)
    return out


def blend_heatmap(
    image: np.ndarray,
    values: np.ndarray,
    *,
    vmax: float | None = None,
    max_alpha: float = 0.75,
    gamma: float = 0.5,
) -> np.ndarray:
    """Lay a heat map over an image, opaque where the values are high and clear where they are 0.

    Args:
        image: H × W × 3 uint8 RGB.
        values: H × W non-negative floats (already at the image's size).
        vmax: the value drawn fully (default: the map's maximum).
        max_alpha: opacity at vmax; opacity = max_alpha · (value / vmax)^gamma (gamma < 1 lifts weak
            values, useful for sparse top-k attention).

    Returns:
        H × W × 3 uint8.
    """
    values = np.asarray(values, dtype=np.float64)
    top = float(values.max()) if vmax is None else float(vmax)
    norm = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    return blend(image, heatmap(values, vmax=top if top > 0 else None), max_alpha * norm**gamma)


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------
def resize_image(image: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize an H × W (× C) image to size (height, width): area when shrinking, linear when growing."""
    height, width = int(size[0]), int(size[1])
    if image.shape[:2] == (height, width):
        return image.copy()
    if nearest:
        interpolation = cv2.INTER_NEAREST
    elif height < image.shape[0] or width < image.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def fit_text(text: str, width: int, *, scale: float = 0.42, thickness: int = 1) -> str:
    """`text`, cut and ended with '…'-like '..' so that it fits `width` pixels at this font scale."""
    if cv2.getTextSize(text, FONT, scale, thickness)[0][0] <= width:
        return text
    while text and cv2.getTextSize(text + "..", FONT, scale, thickness)[0][0] > width:
        text = text[:-1]
    return text + ".."


def title_bar(text: str, width: int, *, height: int = TITLE_HEIGHT, scale: float = 0.42) -> np.ndarray:
    """A dark `height × width × 3` bar with `text` (ASCII; cut to fit) in light letters."""
    bar = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    text = fit_text(text, width - 6, scale=scale)
    baseline = (height + cv2.getTextSize("Ag", FONT, scale, 1)[0][1]) // 2
    cv2.putText(bar, text, (3, baseline), FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    return bar


def tile(
    panels: Sequence[Sequence[np.ndarray | None]],
    titles: Sequence[Sequence[str]] | None = None,
    *,
    header: str | None = None,
    gap: int = GAP,
    title_height: int = TITLE_HEIGHT,
) -> np.ndarray:
    """Arrange panels in a grid, each under its title bar.

    Every cell is as large as the largest panel (smaller ones sit at its top-left; None leaves the
    cell empty). Layout, in pixels: cell (r, c) starts at x = gap + c·(W_cell + gap),
    y = header + gap + r·(title_height + H_cell + gap); its panel starts `title_height` lower.

    Args:
        panels: rows of H × W × 3 uint8 RGB panels.
        titles: same layout of strings (default: no text, bars still drawn).
        header: an optional line above the grid (a bar of `title_height` across the whole width).

    Returns:
        (header + gap + rows·(title_height + H_cell + gap)) × (gap + cols·(W_cell + gap)) × 3 uint8.
    """
    rows = len(panels)
    cols = max((len(row) for row in panels), default=0)
    present = [p for row in panels for p in row if p is not None]
    cell_h = max((p.shape[0] for p in present), default=1)
    cell_w = max((p.shape[1] for p in present), default=1)
    width = gap + cols * (cell_w + gap)
    top = title_height if header is not None else 0
    height = top + gap + rows * (title_height + cell_h + gap)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    if header is not None:
        canvas[:title_height] = title_bar(header, width, height=title_height)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            x = gap + c * (cell_w + gap)
            y = top + gap + r * (title_height + cell_h + gap)
            text = titles[r][c] if titles is not None and c < len(titles[r]) else ""
            canvas[y : y + title_height, x : x + cell_w] = title_bar(text, cell_w, height=title_height)
            if panel is not None:
                canvas[y + title_height : y + title_height + panel.shape[0], x : x + panel.shape[1]] = panel
    return canvas


def panel_origin(
    row: int,
    col: int,
    cell_size: tuple[int, int],
    *,
    header: bool = False,
    gap: int = GAP,
    title_height: int = TITLE_HEIGHT,
) -> tuple[int, int]:
    """(x, y) of the top-left pixel of panel (row, col) in a `tile` grid of cells `cell_size` (H, W)."""
    top = title_height if header else 0
    return (
        gap + col * (cell_size[1] + gap),
        top + gap + row * (title_height + cell_size[0] + gap) + title_height,
    )


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an H × W × 3 uint8 RGB picture as PNG atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return path
