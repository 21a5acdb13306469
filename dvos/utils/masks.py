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


def read_mask(path: str | os.PathLike, *, allow_gray: bool = True) -> tuple[np.ndarray, list[int] | None]:
    """Read an id mask from a palette PNG.

    Args:
        path: the PNG file.
        allow_gray: also accept single-channel 8-bit ('L') images, read as ids.

    Returns:
        (mask, palette): `mask` is `H × W` uint8; `palette` the flat RGB list (None for 'L').

    Raises:
        DataError: missing or unreadable file, or an RGB/other mode image that holds colours,
            not ids.
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
