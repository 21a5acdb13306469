"""Palette (indexed) PNG masks: the DAVIS / YouTube-VOS annotation format.

A mask is an `H × W` uint8 array of object ids: 0 = background, 1..K = objects, 255 = void.
Predictions are written with the palette of the first input mask so that they look like the
annotations in any viewer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dvos.utils.errors import DataError
from dvos.utils.io import atomic_path

VOID_ID = 255


def default_palette() -> list[int]:
    """The DAVIS palette: the PASCAL VOC colour map (256 × RGB, flat list of 768 ints)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def read_mask(
    path: str | os.PathLike, *, allow_gray: bool = True, convert_rgb: bool = False
) -> tuple[np.ndarray, list[int] | None]:
    """Read an id mask from a palette PNG.

    Args:
        path: the PNG file.
        allow_gray: also accept single-channel 8-bit ('L') images, read as ids.
        convert_rgb: accept an RGB(A) image whose colours are all DAVIS palette colours (a palette
            mask saved as RGB by an image editor): each colour becomes its palette index. Any other
            colour is an error naming it. Off by default: ground truth and predictions must be ids.

    Returns:
        (mask, palette): `mask` is `H × W` uint8; `palette` the flat RGB list (None for 'L'; the
        DAVIS palette for a converted RGB image).

    Raises:
        DataError: missing or unreadable file, or an RGB/other mode image that holds colours,
            not ids (with `convert_rgb`: a colour that is not in the DAVIS palette).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                palette = image.getpalette()
                mask = np.array(image, dtype=np.uint8)
            elif mode in ("L", "1") and allow_gray:
                palette = None
                mask = np.array(image.convert("L"), dtype=np.uint8)
            elif mode in ("RGB", "RGBA") and convert_rgb:
                palette = default_palette()
                mask = palette_colours_to_ids(np.array(image.convert("RGB")), palette, path)
            else:
                raise DataError(
                    f"{path}: mask has mode {mode!r}; expected an indexed (palette, mode 'P') PNG of object ids"
                )
    except FileNotFoundError as err:
        raise DataError(f"{path}: mask file not found") from err
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for damaged files
        raise DataError(f"{path}: cannot read mask ({type(err).__name__}: {err})") from err
    return mask, palette


def palette_colours_to_ids(rgb: np.ndarray, palette: list[int], path: str | os.PathLike) -> np.ndarray:
    """`H × W × 3` uint8 colours → `H × W` uint8 palette indices (the first index of each colour).

    Raises:
        DataError: a colour that is not in the palette, named with one pixel where it occurs.
    """
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours = np.asarray(palette[:768], dtype=np.int32).reshape(-1, 3)
    palette_codes = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    known, first_index = np.unique(palette_codes, return_index=True)
    position = np.clip(np.searchsorted(known, codes), 0, len(known) - 1)
    found = known[position] == codes
    if not found.all():
        y, x = (int(v[0]) for v in np.nonzero(~found))
        colour = tuple(int(c) for c in rgb[y, x])
        raise DataError(
            f"{path}: RGB mask has colour {colour} at pixel (x={x}, y={y}), which is not a DAVIS palette "
            "colour; save the mask as an indexed (palette, mode 'P') PNG of object ids"
        )
    return first_index[position].astype(np.uint8)


def write_mask(path: str | os.PathLike, mask: np.ndarray, palette: list[int] | None = None) -> None:
    """Write an `H × W` id mask as a palette PNG, atomically (temporary name, then rename)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H × W, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask ids must be in 0..255, got {mask.min()}..{mask.max()}")
        mask = mask.astype(np.uint8)
    image = Image.fromarray(mask, mode="P")
    image.putpalette(palette if palette is not None else default_palette())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
