"""Lightning objects from the config: logger, callbacks, Trainer (one place for every job).

Resuming (`dvos train ckpt_path=last`): `last.ckpt` is written every `callbacks.checkpoint_every_n_steps`
optimizer steps and at the end (atomically: a killed run never leaves a truncated one), and the W&B
run id is kept in `<run folder>/wandb-id.txt`, so the resumed job continues the same W&B run.

W&B (docs/DESIGN.md, "W&B"): one run per job, in the group named after the run folder
(`logger.group` overrides it; an online sweep's trials share the sweep's id, an offline sweep's the
sweep folder's name), named `<run folder>` (distillation) or `<run folder>-pretrain`, with
`job_type` pretrain | distill (`dvos evaluate`: evaluate, `<run folder>-evaluate`, in the group of
its checkpoint's run folder), tagged with the experiment and the data, the resolved config logged
once (nested). Inside a `wandb agent`, wandb gives every run of the process the agent's id (an
explicit id is ignored), so there only the distillation is a W&B run: a trial's teacher
pretraining logs to its run folder and output, not to W&B.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from dvos.config import environment_info, to_dict
from dvos.utils.io import atomic_write
from dvos.utils.runs import choose_wandb_mode, wandb_init_mode

WANDB_ID_FILE = "wandb-id.txt"


def wandb_run_id(run_dir: Path, *, resume: bool) -> str:
    """The W&B run id for a job writing into `run_dir`.

    Inside a `wandb agent` (`$WANDB_SWEEP_ID`): the agent's `$WANDB_RUN_ID`, the only id wandb uses
    there. Resuming: the id stored in `<run_dir>/wandb-id.txt` (the same W&B run continues).
    Otherwise, or when no id was stored: a new id. Stored there by global rank 0 (other DDP ranks log
    nothing); `finish_wandb` writes the id the run really had.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    agent_id = os.environ.get("WANDB_RUN_ID") if in_wandb_agent() else None
    if agent_id:
        run_id = agent_id
    elif resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    else:
        # W&B's own form (8 lowercase letters and digits); its generator is not public API.
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    record_wandb_id(run_dir, run_id)
    return run_id


def record_wandb_id(run_dir: Path, run_id: str) -> None:
    """Write `<run_dir>/wandb-id.txt` (global rank 0 only; unchanged when it already holds the id)."""
    from lightning.pytorch.utilities import rank_zero_only

    path = Path(run_dir) / WANDB_ID_FILE
    if rank_zero_only.rank != 0 or (path.is_file() and path.read_text().strip() == run_id):
        return
    with atomic_write(path) as handle:
        handle.write(run_id + "\n")


def in_wandb_agent() -> bool:
    """True in a process started by `wandb agent` (it sets `$WANDB_SWEEP_ID` and `$WANDB_RUN_ID`)."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def wandb_tags(cfg: DictConfig) -> list[str]:
    """`logger.tags`, then the experiment's name and the data's name (each once)."""
    tags = [str(tag) for tag in cfg.logger.tags]
    tags += [str(value) for value in (cfg.experiment, cfg.data.name) if value]
    return list(dict.fromkeys(tags))


def build_logger(cfg: DictConfig, run_dir: Path, *, job_type: str, resume: bool = False) -> Any:
    """A `WandbLogger` writing into `run_dir` (offline without any W&B credentials), or False.

    `run_dir`: the job's folder (`<run folder>/pretrain` for the teacher pretraining); the group and
    the name come from the run folder (`cfg.run_dir`). `resume`: continue the W&B run whose id
    `run_dir` holds (`wandb_run_id`).
    """
    if not cfg.logger.enabled or cfg.logger.name == "none":
        return False
    if choose_wandb_mode(cfg.logger.mode) == "disabled":
        return False
    if in_wandb_agent() and job_type != "distill":
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"inside a wandb agent: the {job_type} job logs to {run_dir}, not to a W&B run")
        return False
    from lightning.pytorch.loggers import WandbLogger

    run_folder = Path(cfg.run_dir or run_dir)
    group = cfg.logger.group or (os.environ.get("WANDB_SWEEP_ID") if in_wandb_agent() else None)
    config = to_dict(cfg)
    config["environment"] = environment_info()
    return WandbLogger(
        id=wandb_run_id(run_dir, resume=resume),
        resume="allow",
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=group or run_folder.name,
        tags=wandb_tags(cfg) or None,
        name=run_folder.name if job_type == "distill" else f"{run_folder.name}-{job_type}",
        save_dir=str(run_dir),
        mode=wandb_init_mode(cfg.logger.mode),
        job_type=job_type,
        config=config,
    )


def finish_wandb(trainer: Any) -> None:
    """Close the W&B run a trainer's logger opened (one process, one run at a time in wandb), after
    writing the id it really had into its folder's `wandb-id.txt`."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            if trainer.is_global_zero and logger.save_dir:
                record_wandb_id(Path(logger.save_dir), str(logger.experiment.id))
            logger.experiment.finish()


def build_callbacks(cfg: DictConfig, run_dir: Path, *, job_type: str) -> list[pl.Callback]:
    """The callbacks switched on in `cfg.callbacks` (conf/callbacks/)."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar

    from dvos.callbacks.checkpoints import LastCheckpoint
    from dvos.callbacks.progress import LogProgress, output_is_terminal
    from dvos.data.datamodules import SkippedVideoReport

    flags = cfg.callbacks
    callbacks: list[pl.Callback] = []
    if flags.checkpoint:
        checkpoints = run_dir / "checkpoints"
        if job_type == "distill":
            # First in the list: `trainer.checkpoint_callback` (the best model) is this one.
            callbacks.append(
                ModelCheckpoint(
                    dirpath=checkpoints,
                    filename="best-step{step:06d}-jf{val/J&F:.4f}",
                    monitor="val/J&F",
                    mode="max",
                    save_last=False,
                    auto_insert_metric_name=False,
                )
            )
        callbacks.append(LastCheckpoint(checkpoints, every_n_train_steps=flags.checkpoint_every_n_steps))
    if flags.lr_monitor and cfg.logger.enabled:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if flags.progress_bar and output_is_terminal():
        callbacks.append(RichProgressBar())
    elif flags.progress_every_n_steps > 0 and not output_is_terminal():  # redirected: plain lines
        callbacks.append(LogProgress(flags.progress_every_n_steps, label=job_type))
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


def resolve_precision(precision: Any, accelerator: Any) -> Any:
    """`trainer.precision=auto`: bf16-mixed on a GPU that supports it, 16-mixed on other GPUs,
    32-true elsewhere (a CPU emulates bf16 slowly; the CPU result stays bit for bit fp32)."""
    if str(precision) != "auto":
        return precision
    import torch

    on_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    if not on_gpu or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def time_budget(max_time: Any) -> Any:
    """`trainer.max_time` as `Timer` takes it (YAML reads 1:00:00 as 3600 seconds)."""
    import datetime

    if isinstance(max_time, int) and not isinstance(max_time, bool):
        return datetime.timedelta(seconds=max_time)
    return max_time


def trainer_options(cfg: DictConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`cfg.trainer` (and `overrides`) as `lightning.Trainer` keyword arguments."""
    options = to_dict(cfg.trainer)
    options.update(overrides or {})
    if options.get("devices") == "auto" or options.get("devices") is None:
        options["devices"] = "auto"
    options["precision"] = resolve_precision(options.get("precision", "auto"), options.get("accelerator"))
    return options


def _trainer(**kwargs: Any) -> pl.Trainer:
    """`pl.Trainer(**kwargs)`; what Lightning refuses (no GPU for accelerator=gpu, an unknown
    strategy, more devices than the machine has, ...) as a one-line ConfigError."""
    from dvos.utils.errors import ConfigError

    try:
        return pl.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"trainer: {lines[0] if lines else type(err).__name__}") from err


def check_trainer(cfg: DictConfig) -> None:
    """Build, and drop, a bare Trainer from `cfg.trainer`: what only Lightning knows (this
    machine's devices, strategies, precision support) fails before any run folder or data."""
    import warnings

    import torch

    from dvos.utils.errors import ConfigError

    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: this machine has no CUDA GPU (use trainer.accelerator=cpu or auto)"
        )
    options = trainer_options(cfg)
    options.pop("max_time", None)
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options.update(logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False)
            options.setdefault("enable_model_summary", False)
            _trainer(**options)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    job_type: str = "distill",
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
) -> pl.Trainer:
    """A `lightning.Trainer` from `cfg.trainer`, logging and checkpointing into `run_dir`.

    `resume`: the job continues a run from its checkpoint (the same W&B run is continued).
    Distillation stops cleanly on SIGTERM / SIGINT (`StopOnSignal`) and at `trainer.max_time`
    (`ProcessTimer`: this process's training time); teacher pretraining ignores `max_time` (it
    cannot be resumed, and a teacher cut short would fill the cache).
    """
    from lightning.pytorch.callbacks import ProgressBar

    from dvos.callbacks.checkpoints import AtomicCheckpointIO, LastCheckpoint
    from dvos.callbacks.stopping import ProcessTimer, StopOnSignal

    options = trainer_options(cfg, overrides)
    max_time = options.pop("max_time", None)
    callbacks = build_callbacks(cfg, run_dir, job_type=job_type)
    if job_type == "distill":
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        callbacks.append(StopOnSignal(last))
        if max_time is not None:
            callbacks.append(ProcessTimer(duration=time_budget(max_time), interval="step"))
    options.setdefault("enable_model_summary", False)
    return _trainer(
        default_root_dir=str(run_dir),
        logger=build_logger(cfg, run_dir, job_type=job_type, resume=resume),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        # off without our bar (no terminal): Lightning would add its tqdm bar, a carriage-return mess in a log
        enable_progress_bar=any(isinstance(callback, ProgressBar) for callback in callbacks),
        enable_checkpointing=bool(cfg.callbacks.checkpoint),
        **options,
    )
