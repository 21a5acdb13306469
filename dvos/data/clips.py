"""Training clips from unlabelled videos: which frames to read, reading them, surviving bad files.

`ClipSampler` picks the frame indices of one clip. `VideoClipDataset` reads such clips from video
files or frame folders and never lets a bad file end an epoch:

- at construction every video is probed (opened, its frame count read); a file that fails is
  logged once with `logging.warning`, excluded, and listed in `skipped_at_probe`;
- a decode failure in `__getitem__` (damaged data further into a file) makes the dataset take the
  next usable video in order instead, and the item carries the failed path in `"skipped"`.

Counting skipped files with DataLoader workers: each worker holds its own copy of the dataset, so
state kept there never reaches the main process. The failure therefore travels *with the data*:
every item lists the paths it had to skip, `collate_clips` merges those lists per batch, and a
`SkippedVideoTracker` in the main process (fed by the DataModule / the `SkippedVideoReport`
callback, or by your own loop) keeps the set of distinct paths and warns once per new path.

Randomness: the dataset owns a `numpy.random.Generator` (clip sampling) that also drives the
albumentations transform. `seed_clip_worker` (the DataLoader's `worker_init_fn`) reseeds it per
worker from (seed, rank, worker id, torch's per-worker seed), so workers and DDP ranks draw
different clips while a fixed seed and a seeded DataLoader generator replay the same epoch.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dvos.data.readers import VIDEO_BACKENDS, list_videos, open_video
from dvos.data.transforms import clip_to_tensor
from dvos.utils.errors import DataError

log = logging.getLogger(__name__)

ShortVideoPolicy = Literal["repeat", "reject"]


class ClipSampler:
    """Choose the frame indices of a training clip.

    Consecutive frames are separated by independent random gaps in [1, g], where g = `max_gap`
    reduced to `(num_frames - 1) // (clip_len - 1)` when the video is too short for the full gap
    (so the clip always fits); the start is uniform over the positions where the clip fits. With
    probability `reverse_prob` the clip is played backwards. With `reference_gap` r, the gap between
    the clip's first frame (the reference, whose masks are propagated) and the next one is drawn from
    [1, r] instead (reduced so the clip fits), also when the clip is played backwards: long-range
    reads of the reference, as at test time, next to short steps between the target frames.

    Short videos (fewer frames than `clip_len`): with `short_videos="repeat"` (default) every frame
    is taken once, in order, and the last one is repeated to fill the clip (gaps of 0 at the end);
    with `"reject"` `sample` raises ValueError and `VideoClipDataset` excludes such videos.

    Args:
        clip_len: T, frames per clip (>= 1).
        max_gap: largest gap between consecutive frames (>= 1).
        reverse_prob: probability of reversing the clip, in [0, 1].
        short_videos: "repeat" or "reject" (see above).
        reference_gap: largest gap between the reference (first) frame and the next (>= 1); None:
            `max_gap`, like every other gap.
    """

    def __init__(
        self,
        clip_len: int,
        max_gap: int = 1,
        reverse_prob: float = 0.0,
        *,
        short_videos: ShortVideoPolicy = "repeat",
        reference_gap: int | None = None,
    ) -> None:
        if clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {clip_len}")
        if max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {max_gap}")
        if not 0.0 <= reverse_prob <= 1.0:
            raise ValueError(f"reverse_prob must be in [0, 1], got {reverse_prob}")
        if reference_gap is not None and reference_gap < 1:
            raise ValueError(f"reference_gap must be >= 1, got {reference_gap}")
        if short_videos not in ("repeat", "reject"):
            raise ValueError(f"short_videos must be 'repeat' or 'reject', got {short_videos!r}")
        self.clip_len = int(clip_len)
        self.max_gap = int(max_gap)
        self.reverse_prob = float(reverse_prob)
        self.short_videos = short_videos
        self.reference_gap = None if reference_gap is None else int(reference_gap)

    def accepts(self, num_frames: int) -> bool:
        """Whether a video of `num_frames` frames can give a clip under this policy."""
        return num_frames >= self.clip_len or (self.short_videos == "repeat" and num_frames >= 1)

    def sample(self, num_frames: int, rng: np.random.Generator) -> np.ndarray:
        """Frame indices of one clip: int64 array of length `clip_len`, each in [0, num_frames).

        Deterministic for a given `rng` state.

        Raises:
            ValueError: `num_frames` < 1, or < `clip_len` with `short_videos="reject"`.
        """
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame, got {num_frames}")
        length = self.clip_len
        offsets = None  # frame offsets from the clip's start, when sampled with gaps
        if num_frames < length:
            if self.short_videos == "reject":
                raise ValueError(f"video has {num_frames} frames, fewer than clip_len={length}")
            indices = np.minimum(np.arange(length), num_frames - 1)
        elif length == 1:
            indices = rng.integers(0, num_frames, size=1)
        else:
            largest_gap = min(self.max_gap, (num_frames - 1) // (length - 1))
            gaps = rng.integers(1, largest_gap + 1, size=length - 1)
            if self.reference_gap is not None:
                # the other gaps take at most (T − 2)/(T − 1) of the video: room ≥ 1 is left
                room = num_frames - 1 - int(gaps[1:].sum())
                gaps[0] = rng.integers(1, min(self.reference_gap, room) + 1)
            span = int(gaps.sum())
            start = int(rng.integers(0, num_frames - span))
            offsets = np.concatenate([[0], np.cumsum(gaps)])
            indices = start + offsets
        if self.reverse_prob > 0 and rng.random() < self.reverse_prob:
            if self.reference_gap is not None and offsets is not None:
                indices = indices[-1] - offsets  # backwards, the reference still first with its gap
            else:
                indices = indices[::-1]
        return np.ascontiguousarray(indices, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"ClipSampler(clip_len={self.clip_len}, max_gap={self.max_gap}, "
            f"reverse_prob={self.reverse_prob}, short_videos={self.short_videos!r}, "
            f"reference_gap={self.reference_gap})"
        )


class SkippedVideoTracker:
    """The distinct video paths skipped as unreadable, gathered in the main process.

    Feed it the `"skipped"` list of every batch (`update`); it warns once per new path.

    Args:
        known: paths already reported elsewhere (e.g. at probe time): counted, not warned again.
    """

    def __init__(self, known: Iterable[str] = ()) -> None:
        self._paths: set[str] = {str(path) for path in known}

    def update(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Add the skipped paths of a batch; returns the ones not seen before (each warned once)."""
        new = []
        for path in paths:
            path = str(path)
            if path not in self._paths:
                self._paths.add(path)
                new.append(path)
                log.warning("skipped unreadable video %s (decoding failed; another video was used)", path)
        return new

    def update_from_batch(self, batch: Any) -> list[str]:
        """`update` with `batch["skipped"]` when the batch is a dict that has it; else nothing."""
        if isinstance(batch, dict) and "skipped" in batch:
            return self.update(batch["skipped"])
        return []

    @property
    def paths(self) -> list[str]:
        """Sorted distinct skipped paths."""
        return sorted(self._paths)

    @property
    def count(self) -> int:
        """Number of distinct skipped paths."""
        return len(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"SkippedVideoTracker(count={self.count})"


def probe_video(path: str | os.PathLike, *, num_threads: int = 1, backend: str = "auto") -> int:
    """Open a video or frame folder and return its frame count (DataError when unusable)."""
    with open_video(path, num_threads=num_threads, backend=backend) as reader:
        return len(reader)


def _probe_all(paths: Sequence[Path], threads: int, backend: str) -> list[int | DataError]:
    """Frame count of every path, or the DataError that made it unusable; in the order of `paths`."""

    def probe(path: Path) -> int | DataError:
        try:
            return probe_video(path, backend=backend)
        except DataError as err:
            return err

    if threads <= 1 or len(paths) < 2:
        return [probe(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        return list(pool.map(probe, paths))


class VideoClipDataset(Dataset):
    """Random training clips from unlabelled videos (video files or frame folders).

    Item `i` is a clip of video `i // clips_per_video` (after bad videos are excluded):

    - `"frames"`: `T × 3 × H × W` float32 in [0, 1] (after `transform`; without a transform the
      videos' own size, so batching needs equal sizes);
    - `"video"`: path of the video the clip came from (str);
    - `"indices"`: `T` int64 frame indices read, in clip order;
    - `"skipped"`: paths that failed to decode while making this item (usually empty).

    Args:
        videos_or_root: a folder searched with `list_videos`, or a sequence of video paths.
        clip_len, max_gap, reverse_prob, short_videos, reference_gap: see `ClipSampler`.
        transform: a callable `(frames T×H×W×3 uint8, masks=None) -> (frames, masks)`, e.g. a
            `ClipTransform`; its random state is driven by this dataset (`set_random_state`).
        clips_per_video: items per video and epoch.
        num_threads: decoding threads per video reader.
        backend: the video decoder, auto | decord | pyav (`dvos.data.readers.open_video_file`).
        seed: base seed of clip sampling and augmentation.
        log_skips: warn about videos excluded at probe time (turn off on non-zero DDP ranks).
        probe_threads: threads opening the videos at construction (the decoders release the GIL; an
            open of a 480p mp4 takes ~8 ms, so thousands of videos are worth parallelising).

    Raises:
        DataError: no video found, or every video is unusable.
    """

    def __init__(
        self,
        videos_or_root: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        clip_len: int = 4,
        max_gap: int = 4,
        reverse_prob: float = 0.0,
        transform: Callable[..., Any] | None = None,
        clips_per_video: int = 1,
        num_threads: int = 1,
        seed: int = 0,
        short_videos: ShortVideoPolicy = "repeat",
        log_skips: bool = True,
        probe_threads: int = 4,
        reference_gap: int | None = None,
        backend: str = "auto",
    ) -> None:
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
        if backend not in VIDEO_BACKENDS:
            raise ValueError(f"video backend must be one of {', '.join(VIDEO_BACKENDS)}, got '{backend}'")
        if isinstance(videos_or_root, str | os.PathLike):
            candidates = list_videos(videos_or_root)
        else:
            candidates = [Path(path) for path in videos_or_root]
            if not candidates:
                raise DataError("no videos given to VideoClipDataset")
        self.sampler = ClipSampler(
            clip_len, max_gap, reverse_prob, short_videos=short_videos, reference_gap=reference_gap
        )
        self.transform = transform
        self.clips_per_video = int(clips_per_video)
        self.num_threads = int(num_threads)
        self.backend = backend
        self.seed = int(seed)

        self.videos: list[str] = []
        self.num_frames: list[int] = []
        self.skipped_at_probe: list[str] = []
        self.too_short: list[str] = []
        for path, count in zip(candidates, _probe_all(candidates, probe_threads, backend)):
            if isinstance(count, DataError):
                self.skipped_at_probe.append(str(path))
                if log_skips:
                    log.warning("skipping unreadable video: %s", count)
                continue
            if not self.sampler.accepts(count):
                self.too_short.append(str(path))
                if log_skips:
                    log.warning("skipping %s: %d frames, fewer than clip_len=%d", path, count, clip_len)
                continue
            self.videos.append(str(path))
            self.num_frames.append(count)
        if not self.videos:
            bad = self.skipped_at_probe + self.too_short
            raise DataError(
                f"no usable video among {len(candidates)}: {len(self.skipped_at_probe)} unreadable, "
                f"{len(self.too_short)} shorter than clip_len={clip_len} (first: "
                f"{', '.join(bad[:3])})"
            )
        self._failed: set[int] = set()  # videos that failed in __getitem__, in this process
        self._rng: np.random.Generator | None = None
        self.reseed()

    def __len__(self) -> int:
        return len(self.videos) * self.clips_per_video

    def reseed(self, *keys: int) -> None:
        """Reset the random state from (seed, *keys); the transform follows the same stream."""
        self._rng = np.random.default_rng([int(key) % 2**63 for key in (self.seed, *keys)])
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(self._rng)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        first = index // self.clips_per_video
        skipped: list[str] = []
        for offset in range(len(self.videos)):
            video = (first + offset) % len(self.videos)
            if video in self._failed:
                skipped.append(self.videos[video])
                continue
            try:
                item = self._read_clip(video)
            except DataError as err:
                self._failed.add(video)
                skipped.append(self.videos[video])
                # Logged at debug level here: the tracker in the main process warns once per file.
                log.debug("decode failure, using another video: %s", err)
                continue
            item["skipped"] = skipped
            return item
        raise DataError(
            f"every video failed to decode ({len(self.videos)} tried; first: {', '.join(self.videos[:3])})"
        )

    def _read_clip(self, video: int) -> dict[str, Any]:
        indices = self.sampler.sample(self.num_frames[video], self._rng)
        with open_video(self.videos[video], num_threads=self.num_threads, backend=self.backend) as reader:
            frames = reader.get_batch(indices)
        if self.transform is not None:
            frames, _ = self.transform(frames, None)
        return {
            "frames": clip_to_tensor(frames),
            "video": self.videos[video],
            "indices": torch.from_numpy(indices.copy()),
        }


def collate_clips(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack clip items: frames `B × T × 3 × H × W`, indices `B × T`, videos list, skipped paths.

    `"skipped"` is the sorted union of the items' skipped paths (what the tracker counts).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    sizes = {tuple(item["frames"].shape) for item in batch}
    if len(sizes) > 1:
        raise DataError(
            f"clips of different shapes in one batch {sorted(sizes)}: set a crop size in the "
            "transform (videos differ in size)"
        )
    return {
        "frames": torch.stack([item["frames"] for item in batch]),
        "indices": torch.stack([item["indices"] for item in batch]),
        "video": [item["video"] for item in batch],
        "skipped": sorted({path for item in batch for path in item.get("skipped", ())}),
    }


def seed_clip_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader `worker_init_fn`: a distinct, reproducible random stream per worker and rank.

    Mixes the dataset seed, the DDP rank, the worker id and torch's per-worker seed (which comes
    from the DataLoader's `generator`, so a seeded generator makes the epoch reproducible). Use
    `functools.partial(seed_clip_worker, rank=global_rank)` under DDP. Also seeds Python's and
    NumPy's global generators for any third-party code that uses them.
    """
    info = get_worker_info()
    if info is None:
        return
    worker_seed = info.seed % 2**32
    random.seed(worker_seed + 7919 * rank)
    np.random.seed((worker_seed + 7919 * rank) % 2**32)
    dataset = info.dataset
    while hasattr(dataset, "dataset") and not hasattr(dataset, "reseed"):  # torch Subset wrappers
        dataset = dataset.dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(rank, worker_id, info.seed)
