"""Overlay videos: frames with their predicted masks blended in, as H.264 mp4 (PyAV, libx264).

Each object is tinted with its palette colour (alpha 0.5) and outlined with a one-pixel boundary in
full colour; background (0) and void (255) pixels are left as they are. libx264 with yuv420p needs
even sizes: an odd height or width is padded by one pixel (the last row / column repeated). The file
is written under a temporary name and renamed into place (`dvos.utils.io.atomic_path`).
Frames stream through: memory is one frame, whatever the video's length.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

from dvos.utils.errors import DataError
from dvos.utils.io import atomic_path
from dvos.utils.masks import VOID_ID, default_palette

ALPHA = 0.5


def palette_colours(palette: list[int] | None) -> np.ndarray:
    """256 × 3 uint8 colours from a flat RGB palette (padded with the DAVIS palette; None: DAVIS)."""
    colours = np.asarray(default_palette(), dtype=np.uint8).reshape(256, 3)
    if palette is not None:
        given = np.asarray(list(palette)[: 256 * 3], dtype=np.uint8)
        given = given[: len(given) // 3 * 3].reshape(-1, 3)
        colours[: len(given)] = given
    return colours


def mask_boundaries(mask: np.ndarray) -> np.ndarray:
    """`H × W` bool: pixels whose right or lower neighbour (or left / upper) has another id."""
    edges = np.zeros(mask.shape, dtype=bool)
    horizontal = mask[:, 1:] != mask[:, :-1]
    vertical = mask[1:, :] != mask[:-1, :]
    edges[:, 1:] |= horizontal
    edges[:, :-1] |= horizontal
    edges[1:, :] |= vertical
    edges[:-1, :] |= vertical
    return edges


def blend_mask(
    frame: np.ndarray, mask: np.ndarray, colours: np.ndarray, *, alpha: float = ALPHA
) -> np.ndarray:
    """One overlay frame.

    Args:
        frame: `H × W × 3` uint8 RGB.
        mask: `H × W` uint8 ids.
        colours: 256 × 3 uint8 (`palette_colours`).

    Returns:
        `H × W × 3` uint8: objects tinted (alpha) and outlined (object-side boundary pixels in full colour).
    """
    if frame.shape[:2] != mask.shape:
        raise DataError(
            f"overlay: mask {mask.shape[0]}×{mask.shape[1]} does not match frame {frame.shape[0]}×{frame.shape[1]}"
        )
    objects = (mask != 0) & (mask != VOID_ID)
    tint = colours[mask].astype(np.float32)
    out = frame.astype(np.float32)
    out[objects] = (1.0 - alpha) * out[objects] + alpha * tint[objects]
    outline = mask_boundaries(mask) & objects
    out[outline] = tint[outline]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad an odd height / width by one pixel (repeat the last row / column): yuv420p needs even sizes."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def write_overlay_video(
    path: str | os.PathLike,
    frames_iter: Iterable[np.ndarray],
    masks_iter: Iterable[np.ndarray],
    palette: list[int] | None,
    fps: float,
    *,
    crf: int = 20,
) -> int:
    """Write frames with their masks blended in as an H.264 mp4 (libx264, yuv420p), atomically.

    Args:
        path: the .mp4 to write.
        frames_iter: `H × W × 3` uint8 RGB frames.
        masks_iter: `H × W` uint8 id masks, one per frame (the shorter iterable ends the video).
        palette: flat RGB palette of the masks (None: DAVIS palette).
        fps: frame rate of the video.
        crf: x264 quality (lower is better).

    Returns:
        the number of frames written.
    """
    import av  # PyAV: imported here, only overlay users pay for it

    if not fps or fps <= 0:
        raise DataError(f"overlay: frame rate must be > 0, got {fps}")
    colours = palette_colours(palette)
    rate = Fraction(fps).limit_denominator(1001)
    count = 0
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = None
        for frame, mask in zip(frames_iter, masks_iter):
            picture = _even(blend_mask(np.asarray(frame), np.asarray(mask), colours))
            if stream is None:
                stream = container.add_stream("libx264", rate=rate)
                stream.height, stream.width = picture.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(int(crf)), "preset": "veryfast"}
            elif picture.shape[:2] != (stream.height, stream.width):
                raise DataError(f"overlay: frame {count} has another size than the first frame")
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is None:
            raise DataError(f"overlay {Path(path)}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return count
