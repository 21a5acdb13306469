"""The data a config describes: the embedded synthetic set (built on first use) and the data modules
of the training clips and of the evaluation set, one place for `dvos train`, `pretrain`, `evaluate`
and the benchmark."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from dvos.data.datamodules import VideoClipDataModule, VOSEvalDataModule
from dvos.data.readers import list_videos
from dvos.data.real import ensure_davis_sample
from dvos.data.synth import ensure_synthetic
from dvos.utils.errors import ConfigError

log = logging.getLogger("dvos")  # progress lines of the commands, `dvos: ...`


def prepare_data(cfg: DictConfig) -> None:
    """Build what the data config asks for (cached: once): the repository's real val sequences
    decoded into a DAVIS tree, the embedded synthetic data set."""
    real = cfg.data.real
    if real.prepare:
        started = time.perf_counter()
        ensure_davis_sample(real.source, real.out, progress=lambda line: log.info("DAVIS-2016 sample: %s", line))
        log.info("DAVIS-2016 sample ready in %s (%.1f s)", real.out, time.perf_counter() - started)
    synth = cfg.data.synth
    if not synth.generate:
        return
    started = time.perf_counter()
    synthetic_root(cfg, progress=lambda line: log.info("synthetic data: %s", line))
    log.info("synthetic data ready in %s (%.1f s)", synth.out, time.perf_counter() - started)


def synthetic_root(cfg: DictConfig, *, progress=None) -> Path:
    """The embedded synthetic set `data.synth` describes, built if needed (`train/`, `val/`)."""
    synth = cfg.data.synth
    return Path(
        ensure_synthetic(
            synth.out,
            num_train=synth.num_train,
            num_val=synth.num_val,
            seed=synth.seed,
            size=(synth.height, synth.width),
            train_frames=synth.train_frames,
            val_frames=synth.val_frames,
            progress=progress,
        )
    )


def calibration_videos(
    cfg: DictConfig, path: str | os.PathLike | None = None, *, limit: int = 8
) -> tuple[list[Path], str]:
    """Videos to calibrate an int8 student on: those under `path` (files or frame folders), else the
    embedded synthetic training videos (built if needed); at most `limit`, spread evenly over the
    sorted list.

    Returns:
        (videos, one line saying where they come from).

    Raises:
        DataError: `path` missing or without videos.
    """
    if path is None:
        root, what = synthetic_root(cfg) / "train", "the embedded synthetic training videos"
    else:
        root, what = Path(path), str(path)
    videos = list_videos(root)
    if len(videos) > limit:
        videos = [videos[round(index * (len(videos) - 1) / max(1, limit - 1))] for index in range(limit)]
    return videos, f"{len(videos)} of {what}"


def build_clip_datamodule(cfg: DictConfig, *, val_dataloader_fn=None, **overrides) -> VideoClipDataModule:
    """Unlabelled training clips from `data.train_root` (validation from `val_dataloader_fn`);
    `overrides` replace `VideoClipDataModule` arguments taken from `cfg.data` (teacher pretraining
    uses its own clip length, crop and batch size)."""
    data = cfg.data
    options = dict(
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        clip_len=data.clip_len,
        max_gap=data.max_gap,
        reference_gap=data.reference_gap,
        reverse_prob=data.reverse_prob,
        crop_size=tuple(data.crop_size),
        scale=tuple(data.scale),
        hflip_p=data.hflip_p,
        photometric_p=data.photometric_p,
        per_frame_photometric=data.per_frame_photometric,
        clips_per_video=data.clips_per_video,
        decord_threads=data.decord_threads,
        backend=data.backend,
        pin_memory=data.pin_memory,
        seed=int(cfg.seed),
        val_dataloader_fn=val_dataloader_fn,
    )
    options.update(overrides)
    return VideoClipDataModule(require_train_root(cfg), **options)


def build_eval_datamodule(cfg: DictConfig) -> VOSEvalDataModule:
    """The VOS evaluation set at `data.root`."""
    data = cfg.data
    return VOSEvalDataModule(
        data.root,
        format=data.format,
        year=data.year,
        split=data.split,
        resolution=data.resolution,
        sequences=list(data.sequences) if data.sequences is not None else None,
    )


def require_train_root(cfg: DictConfig) -> str:
    """`data.train_root`, or a one-line error when a command that trains has none."""
    root = cfg.data.train_root
    if not root:
        raise ConfigError(
            "data.train_root is not set: give the unlabelled training videos, e.g. data.train_root=/data/videos"
        )
    return str(root)


def check_training_excludes_evaluation(train_root: str, evaluated: list[str]) -> None:
    """Refuse training videos that are sequences of the evaluation set.

    Training is label-free, but training on the frames of the sequences it is then scored on (e.g.
    `data.train_root` = DAVIS's JPEGImages/480p, which holds the val sequences too) is not the
    protocol of a semi-supervised VOS benchmark. A video is matched by its name: a video file's stem
    or a frame folder's name.
    """
    names = {path.stem if path.is_file() else path.name for path in list_videos(train_root)}
    overlap = sorted(names & set(evaluated))
    if overlap:
        shown = ", ".join(overlap[:5]) + (f" and {len(overlap) - 5} more" if len(overlap) > 5 else "")
        raise ConfigError(
            f"data.train_root={train_root} holds {len(overlap)} sequence(s) of the evaluation set ({shown}): "
            "point it at unlabelled videos outside the evaluation set (e.g. YouTube-VOS train frames)"
        )
