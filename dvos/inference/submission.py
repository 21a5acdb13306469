"""The YouTube-VOS submission archive: predictions packed the way the benchmark's server reads them.

The official layout is a zip holding `Annotations/<video>/<frame>.png` (palette PNGs of object
ids) for every frame that the split's `meta.json` lists for the video (the union of its objects'
`frames`; the server scores those frames). Our predictions folder holds one PNG per input frame
(`OUT/<video>/<frame>.png`), which may be more frames (a `valid_all_frames` copy of the JPEGs) than the
server wants: only the listed ones are packed. A listed frame without a prediction (no JPEG for it)
gets an all-background mask of the video's size, counted in the returned statistics.

The archive is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dvos.data.readers import natural_key
from dvos.utils.errors import DataError
from dvos.utils.io import atomic_path
from dvos.utils.masks import default_palette

SUBMISSION_ZIP = "submission.zip"


def listed_frames(meta_videos: dict[str, Any], video: str) -> list[str]:
    """The frames `meta.json` lists for `video` (union over its objects), in natural order."""
    objects = (meta_videos.get(video) or {}).get("objects", {}) or {}
    frames = {str(frame) for obj in objects.values() for frame in (obj or {}).get("frames", [])}
    return sorted(frames, key=natural_key)


def _blank_png(size: tuple[int, int], palette: list[int] | None) -> bytes:
    image = Image.fromarray(np.zeros(size, dtype=np.uint8), mode="P")
    image.putpalette(palette or default_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_youtubevos_submission(
    predictions: str | os.PathLike,
    sequences: Sequence[Any],
    meta_path: str | os.PathLike,
    out: str | os.PathLike,
) -> dict[str, int]:
    """Pack `predictions/<video>/<frame>.png` into the zip `out` in the official layout.

    Args:
        predictions: the folder the engine wrote (one sub-folder per video).
        sequences: the `VOSSequence` records that were segmented (names, frame names, size, palette).
        meta_path: the split's `meta.json`.
        out: the zip to write.

    Returns:
        `{"videos": n, "frames": packed PNGs, "blank": listed frames without a prediction}`.

    Raises:
        DataError: unreadable meta.json.
    """
    predictions, meta_path = Path(predictions), Path(meta_path)
    try:
        videos = json.loads(meta_path.read_text())["videos"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: cannot read the YouTube-VOS meta.json ({type(err).__name__})") from err
    stats = {"videos": 0, "frames": 0, "blank": 0}
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for sequence in sequences:
            frames = listed_frames(videos, sequence.name) or list(sequence.frame_names)
            blank = None
            for frame in frames:
                name = f"Annotations/{sequence.name}/{frame}.png"
                source = predictions / sequence.name / f"{frame}.png"
                if source.is_file():
                    archive.write(source, name)
                else:
                    blank = blank or _blank_png(tuple(sequence.size), sequence.palette)
                    archive.writestr(name, blank)
                    stats["blank"] += 1
                stats["frames"] += 1
            stats["videos"] += 1
    return stats
