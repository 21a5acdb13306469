"""The real default data the repository carries (`assets/davis2016`, README there for licence).

- `train/<video>.mp4`: the 30 DAVIS-2016 *train* videos, unlabelled, 428 × 240 H.264: read as they
  are by the training data module.
- `val/<sequence>.mp4` + `val/Annotations/<sequence>/<frame>.png`: the four annotated DAVIS-2016 val
  sequences of the DAVIS-2016 sample at 854 × 480 (frame-aligned with their palette-PNG annotations).

`ensure_davis_sample` decodes the val sequences once into a DAVIS tree (`JPEGImages/480p`,
`Annotations/480p`, `ImageSets/2016/val.txt`) that every evaluation reads; a record of what it was
built from makes later calls return at once, and the tree appears by an atomic rename.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dvos.data.readers import open_video
from dvos.utils.errors import DataError
from dvos.utils.io import ensure_writable_dir

RECORD_NAME = "dvos-davis-sample.json"
JPEG_QUALITY = 95


def _source_listing(source: Path) -> dict[str, list]:
    """What a build depends on: every val mp4 and annotation file, with its size."""
    val = source / "val"
    videos = sorted(val.glob("*.mp4"))
    if not videos:
        raise DataError(f"{val}: no <sequence>.mp4 (the repository's real validation sequences)")
    listing = {}
    for video in videos:
        masks = sorted((val / "Annotations" / video.stem).glob("*.png"))
        if not masks:
            raise DataError(f"{val / 'Annotations' / video.stem}: no annotation PNGs for {video.name}")
        listing[video.stem] = [video.stat().st_size, [(m.name, m.stat().st_size) for m in masks]]
    return listing


def _is_current(out: Path, listing: dict[str, list]) -> bool:
    try:
        record = json.loads((out / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return False
    return record.get("sources") == json.loads(json.dumps(listing))


def _decode_sequence(video: Path, masks: list[Path], frames_dir: Path, masks_dir: Path) -> int:
    """Decode `video` into JPEGs named like its annotations; copy the annotations. Returns frames."""
    with open_video(video) as reader:
        if len(reader) != len(masks):
            raise DataError(f"{video}: {len(reader)} frames but {len(masks)} annotations: not frame-aligned")
        frames = reader.get_batch(range(len(reader)))
    frames_dir.mkdir(parents=True)
    masks_dir.mkdir(parents=True)
    for frame, mask in zip(frames, masks):
        Image.fromarray(np.asarray(frame)).save(frames_dir / f"{mask.stem}.jpg", quality=JPEG_QUALITY)
        shutil.copyfile(mask, masks_dir / mask.name)
    return len(masks)


def ensure_davis_sample(
    source: str | os.PathLike, out: str | os.PathLike, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Decode the real val sequences of `source` into the DAVIS tree `out` unless it is current.

    Raises:
        DataError: `source` lacks its mp4s or annotations, a video and its annotations differ in
            length, or `out` exists and is not a tree built here.
    """
    source, out = Path(source), Path(os.path.abspath(out))
    listing = _source_listing(source)
    if _is_current(out, listing):
        return out
    if out.exists() and not (out / RECORD_NAME).is_file() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a DAVIS sample built by dvos (no {RECORD_NAME})")
    ensure_writable_dir(out.parent)
    build = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    try:
        for name in listing:
            masks = sorted((source / "val" / "Annotations" / name).glob("*.png"))
            count = _decode_sequence(
                source / "val" / f"{name}.mp4",
                masks,
                build / "JPEGImages" / "480p" / name,
                build / "Annotations" / "480p" / name,
            )
            if progress is not None:
                progress(f"{name}: {count} frames")
        split = build / "ImageSets" / "2016" / "val.txt"
        split.parent.mkdir(parents=True)
        split.write_text("".join(f"{name}\n" for name in listing))
        (build / RECORD_NAME).write_text(json.dumps({"source": str(source), "sources": listing}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(build, out)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out
