"""What several commands share: starting a run (folder, saved config) and building the data from config."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig

from dvos.config import environment_info, save_config
from dvos.data.datamodules import VideoClipDataModule, VOSEvalDataModule
from dvos.data.synth import ensure_synthetic
from dvos.utils.io import write_json
from dvos.utils.runs import make_run_dir

log = logging.getLogger("dvos")

# The run folder of this job, for the processes Lightning's DDP launcher starts (they inherit it).
RUN_DIR_ENV = "DVOS_RUN_DIR"


def is_launched_rank() -> bool:
    """True in a DDP process of a rank ≥ 1: started by Lightning's DDP launcher (it re-runs the
    command from the start, with `LOCAL_RANK` ≥ 1 in its environment), by torchrun (`RANK`) or by
    srun (`SLURM_PROCID`), which start every rank themselves."""
    for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        try:
            if int(os.environ.get(name, "0")) > 0:
                return True
        except ValueError:
            continue
    return False


def setup_logging(level: int = logging.INFO) -> None:
    """Plain `dvos: message` lines on stderr, once."""
    root = logging.getLogger()
    if not any(getattr(handler, "_dvos", False) for handler in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler._dvos = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # Known, harmless notices that would bury the run's own messages: the EMA copy of the student is
    # in eval mode on purpose; Lightning's internal pytree call is deprecated by torch.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def start_run(cfg: DictConfig) -> Path:
    """Create the run folder, save the resolved config and the versions in it; return the folder.

    DDP: the processes Lightning launches for ranks ≥ 1 re-run the command; they take the folder of
    rank 0 from `$DVOS_RUN_DIR` (set here) and write nothing into it, so a job has one folder.
    (Processes started by torchrun or SLURM do not share it: give them `run_dir=...`.)
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and is_launched_rank():
        cfg.run_dir = inherited
        return Path(inherited)
    run_dir = make_run_dir(cfg.paths.runs_dir, cfg.name, run_dir=cfg.run_dir)
    cfg.run_dir = str(run_dir)
    if is_launched_rank():  # torchrun / srun rank ≥ 1 (with run_dir=...): rank 0 writes the files
        return run_dir
    os.environ[RUN_DIR_ENV] = str(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "environment.json", environment_info())
    log.info("run folder %s (config.yaml saved)", run_dir)
    return run_dir


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
        backend=data.backend,
        pin_memory=data.pin_memory,
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


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1))
