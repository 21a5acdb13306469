"""Lightning DataModules: unlabelled training clips and VOS evaluation sequences.

Both take explicit keyword arguments (the config layer maps onto them) and are DDP-ready:

- no DistributedSampler here: Lightning injects one (training: shuffled and reseeded per epoch);
- workers are persistent when `num_workers > 0` (no restart cost each epoch);
- memory is pinned when the trainer runs on CUDA (`pin_memory=None`): batches are copied to the GPU
  asynchronously;
- `VideoClipDataModule` gives the DataLoader a generator seeded with `seed` and a
  `worker_init_fn` that mixes (seed, global rank, worker id) into the clip sampler's and the
  augmentation's random state: workers and ranks see different clips, a fixed seed replays the
  epoch.

Skipped (unreadable) videos: each training batch carries `batch["skipped"]`, the paths its items
had to skip (see `dvos.data.clips`). The DataModule's `on_before_batch_transfer` hook, which runs
in the main process of each rank, feeds them to `skip_tracker` (distinct paths, one warning per
path); `skipped_videos` lists them, videos excluded at probe time included. Lightning calls that
hook only when the LightningModule does not override it, so `SkippedVideoReport` (a callback,
always called) feeds the same tracker too (it counts distinct paths: feeding twice is harmless) and
at every training epoch end gathers the per-rank lists across DDP ranks, logs the total once on
rank zero and logs `data/skipped_videos`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dvos.data.clips import (
    ShortVideoPolicy,
    SkippedVideoTracker,
    VideoClipDataset,
    collate_clips,
    seed_clip_worker,
)
from dvos.data.transforms import build_clip_transform
from dvos.data.vos import DatasetFormat, VOSSequenceDataset, collate_sequences, vos_sequences

log = logging.getLogger(__name__)


def _global_rank(trainer: pl.Trainer | None) -> int:
    if trainer is not None:
        return int(trainer.global_rank)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class VideoClipDataModule(pl.LightningDataModule):
    """Random clips from unlabelled videos (video files and/or frame folders under `root`).

    Batches: `{"frames": B × T × 3 × H × W float32 [0, 1], "indices": B × T int64, "video":
    [B paths], "skipped": [paths skipped while making the batch]}` with (H, W) = `crop_size`.

    Args:
        root: folder searched with `list_videos`, or a list of video paths.
        batch_size: clips per batch (per rank under DDP).
        num_workers: DataLoader worker processes (persistent when > 0).
        clip_len, max_gap, reverse_prob, short_videos, reference_gap: clip sampling (`ClipSampler`).
        crop_size: (H, W) of the random resized crop.
        scale, ratio, hflip_p, affine_p, photometric_p, per_frame_photometric, brightness,
            contrast, saturation, hue: augmentation (`build_clip_transform`).
        clips_per_video: clips per video and epoch.
        decord_threads: decoding threads per video reader (either backend).
        backend: the video decoder, auto | decord | pyav (`dvos.data.readers.open_video_file`).
        seed: base seed of clip sampling, augmentation and shuffling.
        pin_memory: DataLoader option; None: on when the trainer's device is CUDA.
        drop_last, prefetch_factor: DataLoader options.
        val_dataloader_fn: optional callable returning the validation DataLoader(s) (e.g. the
            `val_dataloader` of a `VOSEvalDataModule`); without it this DataModule has no
            validation data.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int = 8,
        num_workers: int = 2,
        clip_len: int = 4,
        max_gap: int = 4,
        reverse_prob: float = 0.0,
        short_videos: ShortVideoPolicy = "repeat",
        crop_size: tuple[int, int] = (256, 256),
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        affine_p: float = 0.0,
        photometric_p: float = 0.8,
        per_frame_photometric: bool = True,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        clips_per_video: int = 1,
        decord_threads: int = 1,
        seed: int = 0,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        prefetch_factor: int | None = None,
        val_dataloader_fn: Callable[[], Any] | None = None,
        reference_gap: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.root = root
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.clip_options = {
            "clip_len": clip_len,
            "max_gap": max_gap,
            "reference_gap": reference_gap,
            "reverse_prob": reverse_prob,
            "short_videos": short_videos,
            "clips_per_video": clips_per_video,
            "num_threads": decord_threads,
            "backend": backend,
            "seed": seed,
        }
        self.transform_options = {
            "crop_size": tuple(crop_size),
            "scale": tuple(scale),
            "ratio": tuple(ratio),
            "hflip_p": hflip_p,
            "affine_p": affine_p,
            "photometric_p": photometric_p,
            "per_frame_photometric": per_frame_photometric,
            "brightness": brightness,
            "contrast": contrast,
            "saturation": saturation,
            "hue": hue,
        }
        self.seed = int(seed)
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.prefetch_factor = prefetch_factor
        self.train_dataset: VideoClipDataset | None = None
        self.skip_tracker = SkippedVideoTracker()
        if val_dataloader_fn is not None:
            # Set on the instance only when given: Lightning runs validation only for a
            # DataModule whose `val_dataloader` is overridden.
            self.val_dataloader = val_dataloader_fn

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None or stage not in (None, "fit"):
            return
        rank = _global_rank(self.trainer)
        self.train_dataset = VideoClipDataset(
            self.root,
            transform=build_clip_transform(**self.transform_options, seed=self.seed),
            log_skips=rank == 0,  # every rank probes the same files: warn once, on rank zero
            **self.clip_options,
        )
        # Main-process stream (num_workers=0): distinct per rank; workers reseed themselves.
        self.train_dataset.reseed(rank)
        self.skip_tracker = SkippedVideoTracker(self.train_dataset.skipped_at_probe)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        rank = _global_rank(self.trainer)
        generator = torch.Generator()
        generator.manual_seed(self.seed + 1_000_003 * rank)
        options: dict[str, Any] = {}
        if self.num_workers > 0:
            options["persistent_workers"] = True
            if self.prefetch_factor is not None:
                options["prefetch_factor"] = self.prefetch_factor
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
            pin_memory=self._pin_memory(),
            drop_last=self.drop_last and len(self.train_dataset) >= self.batch_size,
            worker_init_fn=functools.partial(seed_clip_worker, rank=rank),
            generator=generator,
            **options,
        )

    def _pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.skip_tracker.update_from_batch(batch)
        return batch

    @property
    def skipped_videos(self) -> list[str]:
        """Distinct videos skipped so far on this rank (at probe time and while decoding)."""
        return self.skip_tracker.paths


class SkippedVideoReport(pl.Callback):
    """Count unreadable videos during training and report the total at each epoch end.

    Feeds every training batch's `"skipped"` paths to the DataModule's `skip_tracker` (or its own
    when the DataModule has none), gathers the distinct paths of all DDP ranks at epoch end, warns
    on rank zero when there are any and logs `data/skipped_videos` (the distinct total).
    """

    def __init__(self) -> None:
        self._own_tracker = SkippedVideoTracker()
        self.total = 0

    def _tracker(self, trainer: pl.Trainer) -> SkippedVideoTracker:
        datamodule = getattr(trainer, "datamodule", None)
        tracker = getattr(datamodule, "skip_tracker", None)
        return tracker if isinstance(tracker, SkippedVideoTracker) else self._own_tracker

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._tracker(trainer).update_from_batch(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paths = set(self._tracker(trainer).paths)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(paths))
            paths = {path for rank_paths in gathered for path in rank_paths}
        self.total = len(paths)
        if trainer.is_global_zero and paths:
            listed = ", ".join(sorted(paths)[:5])
            more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
            log.warning("%d unreadable video(s) skipped so far: %s%s", len(paths), listed, more)
        if trainer.logger is not None:
            pl_module.log("data/skipped_videos", float(self.total), rank_zero_only=True)


class VOSEvalDataModule(pl.LightningDataModule):
    """VOS evaluation sequences (DAVIS or YouTube-VOS) as `VOSSequence` records, one per batch.

    `val_dataloader`, `test_dataloader` and `predict_dataloader` all yield the records of the same
    split; nothing is decoded by the loader (the inference engine loads frames lazily). Under DDP,
    Lightning's sampler splits the sequences across ranks.

    Args:
        root: the dataset folder.
        format: "davis" or "youtubevos".
        year: DAVIS 2016 (objects merged) or 2017.
        split: DAVIS ImageSets name (`val`, ...) or YouTube-VOS split (`valid`, ...).
        resolution: DAVIS resolution folder.
        sequences: optional subset of sequence names.
        num_workers: DataLoader workers (0 is right: items are records, not decoded data).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        format: DatasetFormat = "davis",
        year: int = 2017,
        split: str = "val",
        resolution: str = "480p",
        sequences: Sequence[str] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.root = root
        self.format = format
        self.year = year
        self.split = split
        self.resolution = resolution
        self.sequences = list(sequences) if sequences is not None else None
        self.num_workers = int(num_workers)
        self.dataset: VOSSequenceDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = VOSSequenceDataset(
                vos_sequences(
                    self.root,
                    format=self.format,
                    year=self.year,
                    split=self.split,
                    resolution=self.resolution,
                    sequences=self.sequences,
                )
            )

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        return DataLoader(
            self.dataset,
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_sequences,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
