"""VOS evaluation datasets (DAVIS 2016/2017, YouTube-VOS) as lightweight per-sequence records.

A `VOSSequence` holds names and paths, the object ids, the frame at which each object first
appears and the palette of the first mask; frames and masks are read only when asked
(`load_frame(t)`, `load_mask(t)`), so an inference engine can walk a long sequence frame by frame
with bounded memory. Building the records reads one mask and one image header per sequence.

Layouts (docs/DESIGN.md, "Data"; docs/data.md):

- DAVIS: `ROOT/JPEGImages/<res>/<seq>/*.jpg`, `ROOT/Annotations/<res>/<seq>/*.png`,
  `ROOT/ImageSets/<year>/<split>.txt`. Objects are the ids of the first mask (255 = void is not
  an object). Year 2016 merges every object into id 1 (void stays 255).
- YouTube-VOS: `ROOT/<split>/{JPEGImages,Annotations}/<video>/`, `ROOT/<split>/meta.json`.
  Objects may first appear after frame 0; the valid split annotates only first appearances, and
  annotated frames may be a subset of the JPEG frames.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from dvos.data.readers import image_size, list_frame_files, natural_key, read_image
from dvos.utils.errors import DataError
from dvos.utils.masks import VOID_ID, read_mask

DatasetFormat = Literal["davis", "youtubevos"]


@dataclass
class VOSSequence:
    """One annotated sequence; frames and masks are loaded lazily.

    Attributes:
        name: sequence name (folder name).
        frame_paths: the T frame files, in order.
        frame_names: their stems (`00000`, ...): predictions are written under these names.
        mask_paths: one entry per frame: the annotation PNG, or None when that frame has none.
        object_ids: the objects to segment, ascending (1..K for DAVIS).
        first_frame: object id → index of the frame where it first appears (its reference mask
            is `load_mask(first_frame[id]) == id`).
        palette: flat RGB palette of the first mask (None for a greyscale mask).
        size: (H, W) of the frames.
        merge_objects: DAVIS-2016 mode: every id in 1..254 is read as 1.
        has_full_gt: every frame has a mask (dense ground truth to score against).
    """

    name: str
    frame_paths: list[Path]
    frame_names: list[str]
    mask_paths: list[Path | None]
    object_ids: list[int]
    first_frame: dict[int, int]
    palette: list[int] | None
    size: tuple[int, int]
    merge_objects: bool = False
    has_full_gt: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame_paths)

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    @property
    def annotated_frames(self) -> list[int]:
        """Indices of the frames that have a mask."""
        return [index for index, path in enumerate(self.mask_paths) if path is not None]

    def objects_starting_at(self, index: int) -> list[int]:
        """Object ids whose first appearance is frame `index` (their reference masks are there)."""
        return [obj for obj in self.object_ids if self.first_frame[obj] == index]

    def load_frame(self, index: int) -> np.ndarray:
        """Frame `index` as RGB uint8 `H × W × 3`."""
        frame = read_image(self.frame_paths[index])
        if frame.shape[:2] != tuple(self.size):
            raise DataError(
                f"{self.frame_paths[index]}: frame size {frame.shape[0]}×{frame.shape[1]} differs from "
                f"the sequence's {self.size[0]}×{self.size[1]}"
            )
        return frame

    def load_mask(self, index: int) -> np.ndarray | None:
        """Mask of frame `index` as uint8 ids `H × W` (merged to 1 in 2016 mode); None if absent."""
        path = self.mask_paths[index]
        if path is None:
            return None
        mask, _ = read_mask(path)
        if mask.shape != tuple(self.size):
            raise DataError(
                f"{path}: mask size {mask.shape[0]}×{mask.shape[1]} differs from the frames' "
                f"{self.size[0]}×{self.size[1]}"
            )
        if self.merge_objects:
            mask = _merge_objects(mask)
        return mask

    def reference_mask(self, object_id: int) -> np.ndarray:
        """Boolean `H × W` mask of `object_id` in the frame where it first appears."""
        mask = self.load_mask(self.first_frame[object_id])
        if mask is None:  # guarded at construction; kept for hand-made records
            raise DataError(f"{self.name}: no mask for object {object_id}'s first frame")
        return mask == object_id


def _merge_objects(mask: np.ndarray) -> np.ndarray:
    """DAVIS-2016 mode: every object id becomes 1; background 0 and void 255 stay."""
    merged = np.where((mask > 0) & (mask != VOID_ID), 1, mask)
    return merged.astype(np.uint8)


def _object_ids(mask: np.ndarray) -> list[int]:
    return [int(value) for value in np.unique(mask) if value != 0 and value != VOID_ID]


def _check_sequence_filter(available: Sequence[str], wanted: Sequence[str] | None, where: str) -> list[str]:
    if wanted is None:
        return list(available)
    if isinstance(wanted, str):
        wanted = [wanted]
    known = set(available)
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise DataError(
            f"{where}: unknown sequence(s) {', '.join(unknown)} (available: "
            f"{', '.join(list(available)[:5])}{', ...' if len(available) > 5 else ''})"
        )
    return list(dict.fromkeys(wanted))


def _read_split_file(path: Path) -> list[str]:
    """Sequence names of an ImageSets file: one name per line, or DAVIS-2016's frame-path pairs."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found (ImageSets/<year>/<split>.txt)")
    names: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        # The original DAVIS-2016 release lists "/JPEGImages/480p/<seq>/00000.jpg /Annotations/...".
        names.append(Path(token).parent.name if "/" in token else token)
    names = list(dict.fromkeys(names))
    if not names:
        raise DataError(f"{path}: split file lists no sequences")
    return names


def _annotation_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in list_frame_files(folder) if path.suffix.lower() == ".png"}


def _frame_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: sequence frame folder not found")
    files = list_frame_files(folder)
    if not files:
        raise DataError(f"{folder}: sequence has no frames (no .jpg/.png files)")
    return files


def _check_mask_matches_frames(mask: np.ndarray, mask_path: Path, frame_path: Path) -> tuple[int, int]:
    size = image_size(frame_path)
    if mask.shape != size:
        raise DataError(
            f"{mask_path}: mask size {mask.shape[0]}×{mask.shape[1]} differs from frame "
            f"{frame_path.name} ({size[0]}×{size[1]})"
        )
    return size


def davis_sequences(
    root: str | os.PathLike,
    *,
    year: int = 2017,
    split: str = "val",
    resolution: str = "480p",
    sequences: Sequence[str] | None = None,
) -> list[VOSSequence]:
    """Records of a DAVIS split.

    Args:
        root: the DAVIS folder (holding JPEGImages, Annotations, ImageSets).
        year: 2016 (objects merged to one) or 2017 (multi-object).
        split: the ImageSets file name (`train`, `val`, `test-dev`, ...).
        resolution: `480p` or `Full-Resolution`.
        sequences: optional subset of the split's sequence names, in this order.

    Raises:
        DataError: missing root, split file, sequence folder or first mask; a sequence with no
            frames; a first mask whose size differs from the frames; an unknown name in `sequences`.
    """
    root = Path(root)
    if year not in (2016, 2017):
        raise DataError(f"DAVIS year must be 2016 or 2017, got {year!r}")
    if not root.is_dir():
        raise DataError(f"{root}: DAVIS root folder not found")
    split_file = root / "ImageSets" / str(year) / f"{split}.txt"
    names = _check_sequence_filter(_read_split_file(split_file), sequences, str(split_file))
    records = []
    for name in names:
        frame_paths = _frame_files(root / "JPEGImages" / resolution / name)
        annotations = _annotation_files(root / "Annotations" / resolution / name)
        first_name = frame_paths[0].stem
        if first_name not in annotations:
            raise DataError(
                f"{root / 'Annotations' / resolution / name}: no first-frame mask {first_name}.png"
            )
        first_mask, palette = read_mask(annotations[first_name])
        size = _check_mask_matches_frames(first_mask, annotations[first_name], frame_paths[0])
        if year == 2016:
            first_mask = _merge_objects(first_mask)
        object_ids = _object_ids(first_mask)
        mask_paths = [annotations.get(path.stem) for path in frame_paths]
        records.append(
            VOSSequence(
                name=name,
                frame_paths=frame_paths,
                frame_names=[path.stem for path in frame_paths],
                mask_paths=mask_paths,
                object_ids=object_ids,
                first_frame=dict.fromkeys(object_ids, 0),
                palette=palette,
                size=size,
                merge_objects=year == 2016,
                has_full_gt=all(path is not None for path in mask_paths),
                meta={"dataset": "davis", "year": year, "split": split, "resolution": resolution},
            )
        )
    return records


def youtubevos_sequences(
    root: str | os.PathLike,
    *,
    split: str = "valid",
    sequences: Sequence[str] | None = None,
) -> list[VOSSequence]:
    """Records of a YouTube-VOS split.

    Args:
        root: the YouTube-VOS folder (holding `<split>/JPEGImages`, `<split>/Annotations`,
            `<split>/meta.json`).
        split: `train`, `valid` or `test`.
        sequences: optional subset of video names, in this order.

    Raises:
        DataError: missing root, split folder or meta.json; a video without frames; an object
            whose first frame has no JPEG or no mask; mask/frame size mismatch; unknown names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: YouTube-VOS root folder not found")
    split_dir = root / split
    meta_path = split_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: YouTube-VOS meta.json not found")
    try:
        videos = json.loads(meta_path.read_text())["videos"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: not a YouTube-VOS meta.json ({type(err).__name__}: {err})") from err
    names = _check_sequence_filter(sorted(videos, key=natural_key), sequences, str(meta_path))
    records = []
    for name in names:
        frame_paths = _frame_files(split_dir / "JPEGImages" / name)
        frame_names = [path.stem for path in frame_paths]
        position = {frame: index for index, frame in enumerate(frame_names)}
        annotation_dir = split_dir / "Annotations" / name
        annotations = _annotation_files(annotation_dir)
        first_frame: dict[int, int] = {}
        for key, obj in sorted(videos[name].get("objects", {}).items(), key=lambda item: int(item[0])):
            object_id = int(key)
            frames = sorted(obj.get("frames", []), key=natural_key)
            if not frames:
                continue  # an object listed without frames cannot be tracked
            if frames[0] not in position:
                raise DataError(
                    f"{meta_path}: object {object_id} of {name} first appears in frame {frames[0]}, "
                    f"which is not in {split_dir / 'JPEGImages' / name}"
                )
            if frames[0] not in annotations:
                raise DataError(
                    f"{annotation_dir}: no mask {frames[0]}.png for object {object_id}'s first frame"
                )
            first_frame[object_id] = position[frames[0]]
        mask_paths = [annotations.get(frame) for frame in frame_names]
        annotated = [index for index, path in enumerate(mask_paths) if path is not None]
        palette, size = None, image_size(frame_paths[0])
        if annotated:
            first = annotated[0]
            mask, palette = read_mask(mask_paths[first])
            size = _check_mask_matches_frames(mask, mask_paths[first], frame_paths[first])
        records.append(
            VOSSequence(
                name=name,
                frame_paths=frame_paths,
                frame_names=frame_names,
                mask_paths=mask_paths,
                object_ids=sorted(first_frame),
                first_frame=first_frame,
                palette=palette,
                size=size,
                merge_objects=False,
                has_full_gt=len(annotated) == len(frame_paths),
                meta={"dataset": "youtubevos", "split": split},
            )
        )
    return records


def vos_sequences(
    root: str | os.PathLike,
    *,
    format: DatasetFormat = "davis",
    year: int = 2017,
    split: str = "val",
    resolution: str = "480p",
    sequences: Sequence[str] | None = None,
) -> list[VOSSequence]:
    """Records of a DAVIS (`format="davis"`) or YouTube-VOS (`"youtubevos"`) split."""
    if format == "davis":
        return davis_sequences(root, year=year, split=split, resolution=resolution, sequences=sequences)
    if format == "youtubevos":
        return youtubevos_sequences(root, split=split, sequences=sequences)
    raise DataError(f"unknown VOS dataset format {format!r} (expected 'davis' or 'youtubevos')")


class VOSSequenceDataset(Dataset):
    """A torch Dataset whose items are `VOSSequence` records (nothing is decoded here)."""

    def __init__(self, sequences: Sequence[VOSSequence]) -> None:
        self.sequences = list(sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> VOSSequence:
        return self.sequences[index]

    @property
    def names(self) -> list[str]:
        return [sequence.name for sequence in self.sequences]


def collate_sequences(batch: list[VOSSequence]) -> VOSSequence:
    """Collate for batch size 1: the record itself, unchanged (no tensors, no stacking)."""
    if len(batch) != 1:
        raise ValueError(f"VOS sequences are evaluated one at a time (batch_size=1), got {len(batch)}")
    return batch[0]


def load_sequence(sequence: VOSSequence) -> dict[str, Any]:
    """Load a whole sequence into memory, for small evaluations and tests.

    Returns:
        `{"frames": T × H × W × 3 uint8, "gt": T × H × W uint8 or None (only with full ground
        truth), "first_masks": {frame index: H × W uint8 mask} for the frames where objects first
        appear, "name": str}`.
    """
    frames = np.stack([sequence.load_frame(index) for index in range(len(sequence))])
    gt = None
    if sequence.has_full_gt:
        gt = np.stack([sequence.load_mask(index) for index in range(len(sequence))])
    starts = sorted(set(sequence.first_frame.values()))
    first_masks = {index: sequence.load_mask(index) for index in starts}
    return {"frames": frames, "gt": gt, "first_masks": first_masks, "name": sequence.name}
