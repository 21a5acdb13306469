"""What several commands share: logging, starting a run (folder, saved config, DDP ranks)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig

from dvos.config import environment_info, save_config
from dvos.utils.io import remove_stale_temporaries, write_json
from dvos.utils.runs import FAILED_MARKER, STARTED_RUNS, StartedRun, make_run_dir

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


def start_run(cfg: DictConfig, *, resume: str | None = None) -> Path:
    """Create the run folder, save the resolved config and the versions in it; return the folder.

    `resume`: the checkpoint the job continues from. Only a job continuing the run in `run_dir`
    (`ckpt_path=last`, or a checkpoint inside that folder) may use an existing run folder; the
    temporaries a killed job left there are deleted, and a `FAILED` mark with them. The folder is
    recorded (`dvos.utils.runs.STARTED_RUNS`) so that a command that fails or is stopped removes
    or marks it (`settle_unfinished_runs`).

    DDP: the processes Lightning launches for ranks ≥ 1 re-run the command; they take the folder of
    rank 0 from `$DVOS_RUN_DIR` (set here) and write nothing into it, so a job has one folder.
    (Processes started by torchrun or SLURM do not share it: give them `run_dir=...`.)
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and is_launched_rank():
        cfg.run_dir = inherited
        return Path(inherited)
    continuing = resume is not None and bool(cfg.run_dir) and _continues(cfg, resume)
    existed = bool(cfg.run_dir) and Path(cfg.run_dir).is_dir()
    fresh = not existed or not any(Path(cfg.run_dir).iterdir())
    run_dir = make_run_dir(
        cfg.paths.runs_dir, cfg.name, run_dir=cfg.run_dir, resume=continuing or is_launched_rank()
    )
    cfg.run_dir = str(run_dir)
    if is_launched_rank():  # torchrun / srun rank ≥ 1 (with run_dir=...): rank 0 writes the files
        return run_dir
    STARTED_RUNS.append(StartedRun(run_dir, created=not existed, fresh=fresh))
    if continuing:
        (run_dir / FAILED_MARKER).unlink(missing_ok=True)
        for folder in (run_dir, run_dir / "checkpoints"):
            for stale in remove_stale_temporaries(folder):
                log.info("removed %s (left by a job killed while writing it)", stale)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "environment.json", environment_info())
    log.info("run folder %s (config.yaml saved)", run_dir)
    return run_dir


def _continues(cfg: DictConfig, resume: str) -> bool:
    """The job continues the run in `cfg.run_dir`: `ckpt_path=last`, or a checkpoint inside it."""
    if cfg.ckpt_path == "last":
        return True
    return Path(resume).resolve().is_relative_to(Path(cfg.run_dir).resolve())


def print_json(obj: object) -> None:
    print(json.dumps(obj, indent=1))
