"""Stage 1 of a two-stage run (`teacher.name=deformable`): distil the deformable teacher itself.

`dvos train` with `teacher=deformable` and no `teacher.deformable.checkpoint` first trains the
teacher's network (`teacher.deformable.model`) exactly as it would train a student — the same data,
schedule and losses, from the label-propagation teacher (the other `teacher.*` keys), for
`teacher.deformable.max_steps` steps — then distils the student from it (stage 2). The stage-1
network is written once to a cache file named by the hash of everything that makes it
(`deformable_teacher_path`), like the CRW teacher's (`dvos.cli.pretrain_cmd.teacher_path`), and
reused while those settings do not change. The file is a student checkpoint (its weights under
`student.` and its model config), so `dvos evaluate --ckpt FILE` scores the teacher on its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

# Keys that do not change what stage 1 learns (where it logs, what it evaluates, how it is shown).
UNHASHED = ("name", "run_dir", "ckpt_path", "experiment", "logger", "callbacks", "eval", "paths")
UNHASHED_DATA = ("num_workers", "decord_threads", "root", "sequences", "split")
# The trainer's keys that change what stage 1 learns (the others: validation, logging, checks).
HASHED_TRAINER = (
    "max_epochs",
    "max_steps",
    "limit_train_batches",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "precision",
    "devices",
    "num_nodes",
)


def stage_one_config(cfg: DictConfig) -> DictConfig:
    """The run config of stage 1: the teacher's network as `model`, the label-propagation teacher as
    `teacher`, `teacher.deformable.max_steps` optimizer steps (when set)."""
    stage = copy.deepcopy(cfg)
    deformable = cfg.teacher.deformable
    stage.model = copy.deepcopy(deformable.model)
    stage.teacher.name = "label_propagation"
    stage.teacher.deformable.checkpoint = None
    if deformable.max_steps is not None:
        stage.trainer.max_steps = int(deformable.max_steps)
        stage.trainer.max_epochs = -1
    return stage


def deformable_teacher_path(cfg: DictConfig) -> Path:
    """Where stage 1's network goes: `${paths.data_dir}/teachers/deformable-<hash>.pt`, the hash of
    the stage-1 config without the keys that do not change what it learns (`UNHASHED`,
    `UNHASHED_DATA`, the trainer's other than `HASHED_TRAINER`)."""
    from dvos.config import to_dict

    settings = {key: value for key, value in to_dict(stage_one_config(cfg)).items() if key not in UNHASHED}
    settings["data"] = {key: value for key, value in settings["data"].items() if key not in UNHASHED_DATA}
    settings["trainer"] = {key: settings["trainer"][key] for key in HASHED_TRAINER}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.paths.data_dir) / "teachers" / f"deformable-{digest}.pt"


def save_network(module: object, cfg: DictConfig, output: Path) -> None:
    """The stage-1 network (the EMA copy when enabled) as a student checkpoint file, atomically."""
    from dvos.config import to_dict
    from dvos.utils.io import atomic_path

    state = {f"student.{key}": value for key, value in module.eval_student.state_dict().items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        torch.save({"state_dict": state, "dvos_config": {"model": to_dict(cfg.model)}}, tmp)


def train_deformable_teacher(cfg: DictConfig, run_dir: Path, output: Path) -> Path:
    """Stage 1: distil `teacher.deformable.model` from the label-propagation teacher; write it to `output`."""
    import lightning.pytorch as pl

    from dvos.cli.common import log
    from dvos.cli.factory import build_trainer, finish_wandb
    from dvos.data.builders import build_clip_datamodule
    from dvos.lit.distill import DistillationModule

    stage = stage_one_config(cfg)
    pl.seed_everything(int(stage.seed), workers=True)
    module = DistillationModule(stage)
    log.info("deformable teacher, stage 1: %s distilled from the label-propagation teacher", stage.model.name)
    log.info("deformable teacher encoder: %s", module.student_init)
    stage_dir = run_dir / "teacher"
    trainer = build_trainer(
        stage,
        stage_dir,
        job_type="teacher",
        overrides={"limit_val_batches": 0, "val_check_interval": None, "check_val_every_n_epoch": None},
    )
    trainer.fit(module, datamodule=build_clip_datamodule(stage))
    if trainer.is_global_zero:
        save_network(module, stage, output)
        log.info("deformable teacher written to %s", output)
    trainer.strategy.barrier()
    finish_wandb(trainer)
    return output


def ensure_deformable_teacher(cfg: DictConfig, run_dir: Path) -> None:
    """Give `cfg.teacher.deformable.checkpoint` a file when the teacher is deformable without one:
    the cached stage-1 network, or a new one trained now (`train_deformable_teacher`)."""
    from dvos.cli.common import log

    if cfg.teacher.name != "deformable" or cfg.teacher.deformable.checkpoint is not None:
        return
    output = deformable_teacher_path(cfg)
    if output.is_file():
        log.info("deformable teacher: %s (cached; delete it to train it again)", output)
    elif cfg.trainer.fast_dev_run:
        # A one-batch check must not leave a one-step teacher in the cache that real runs would load.
        output = run_dir / "teacher" / "teacher-fast-dev-run.pt"
        train_deformable_teacher(cfg, run_dir, output)
    else:
        train_deformable_teacher(cfg, run_dir, output)
    OmegaConf.update(cfg, "teacher.deformable.checkpoint", str(output))
