"""The data a config describes: the embedded synthetic set (built on first use) and the data modules
of the training clips and of the evaluation set, one place for `dvos train`, `pretrain`, `evaluate`
and the benchmark."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from dvos.data.datamodules import VideoClipDataModule, VOSEvalDataModule
from dvos.data.synth import ensure_synthetic

log = logging.getLogger("dvos")  # progress lines of the commands, `dvos: ...`


def prepare_data(cfg: DictConfig) -> None:
    """Build the embedded synthetic data set when the data config asks for it (cached: once)."""
    synth = cfg.data.synth
    if not synth.generate:
        return
    started = time.perf_counter()
    ensure_synthetic(
        synth.out,
        num_train=synth.num_train,
        num_val=synth.num_val,
        seed=synth.seed,
        size=(synth.height, synth.width),
        train_frames=synth.train_frames,
        val_frames=synth.val_frames,
        progress=lambda line: log.info("synthetic data: %s", line),
    )
    log.info("synthetic data ready in %s (%.1f s)", synth.out, time.perf_counter() - started)


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
        seed=int(cfg.seed),
        val_dataloader_fn=val_dataloader_fn,
    )
    options.update(overrides)
    return VideoClipDataModule(data.train_root, **options)


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
