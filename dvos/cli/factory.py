"""Lightning objects from the config: logger, callbacks, Trainer (one place for every job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from dvos.config import environment_info, to_dict
from dvos.utils.runs import choose_wandb_mode


def build_logger(cfg: DictConfig, run_dir: Path, *, job_type: str) -> Any:
    """A `WandbLogger` writing into the run folder (offline without an API key), or False."""
    if not cfg.logger.enabled or cfg.logger.name == "none":
        return False
    mode = choose_wandb_mode(cfg.logger.mode)
    if mode == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    config = to_dict(cfg)
    config["environment"] = environment_info()
    return WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group,
        tags=list(cfg.logger.tags) or None,
        name=f"{run_dir.name}-{job_type}" if job_type != "distill" else run_dir.name,
        save_dir=str(run_dir),
        mode=mode,
        job_type=job_type,
        config=config,
    )


def build_callbacks(cfg: DictConfig, run_dir: Path, *, job_type: str) -> list[pl.Callback]:
    """The callbacks switched on in `cfg.callbacks` (conf/callbacks/)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from dvos.data.datamodules import SkippedVideoReport

    flags = cfg.callbacks
    callbacks: list[pl.Callback] = []
    if flags.checkpoint:
        checkpoints = run_dir / "checkpoints"
        if job_type == "distill":
            callbacks.append(
                ModelCheckpoint(
                    dirpath=checkpoints,
                    filename="best-step{step:06d}-jf{val/J&F:.4f}",
                    monitor="val/J&F",
                    mode="max",
                    save_last=True,
                    auto_insert_metric_name=False,
                )
            )
        else:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=0))
    if flags.lr_monitor and cfg.logger.enabled:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if flags.progress_bar:
        callbacks.append(RichProgressBar())
    if flags.skipped_videos:
        callbacks.append(SkippedVideoReport())
    if job_type == "distill":
        from dvos.callbacks.attention import AttentionPictures
        from dvos.callbacks.vos_results import VOSResults

        if flags.attention_pictures:
            callbacks.append(AttentionPictures(every_n_steps=flags.attention_every_n_steps))
        if flags.vos_results:
            callbacks.append(VOSResults(num_overlays=flags.num_overlays))
    return callbacks


def build_trainer(
    cfg: DictConfig, run_dir: Path, *, job_type: str = "distill", overrides: dict[str, Any] | None = None
) -> pl.Trainer:
    """A `lightning.Trainer` from `cfg.trainer`, logging and checkpointing into `run_dir`."""
    options = to_dict(cfg.trainer)
    options.update(overrides or {})
    if options.get("devices") == "auto" or options.get("devices") is None:
        options["devices"] = "auto"
    return pl.Trainer(
        default_root_dir=str(run_dir),
        logger=build_logger(cfg, run_dir, job_type=job_type),
        callbacks=build_callbacks(cfg, run_dir, job_type=job_type),
        enable_progress_bar=bool(cfg.callbacks.progress_bar),
        enable_checkpointing=bool(cfg.callbacks.checkpoint),
        enable_model_summary=False,
        **options,
    )
