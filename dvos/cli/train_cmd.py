"""`dvos train`: the whole pipeline: data, teacher, distillation, evaluation, one table.

    dvos train                                   # embedded data, everything at its defaults
    dvos train experiment=smoke                  # a few steps on a tiny set
    dvos train data=davis2017 data.root=/data/DAVIS trainer.max_epochs=20
    dvos train ckpt_path=last                    # continue the newest run where it stopped
    dvos train ckpt_path=last run_dir=runs/X     # continue that run (its config.yaml; key=value on top)

Steps: (1) the run folder with the resolved config; (2) the embedded data, built once; (3) the
teacher: pretrained by contrastive random walk unless its file exists (cached by settings); with
`teacher=deformable`, a network of the student's kind then distilled from it first (stage 1, cached
by settings: `dvos.cli.teacher_stage`); (4)
distillation with validation J&F every `trainer.val_check_interval`; (5) the first-frame-copy
baseline, the teacher and the student evaluated on the validation set with the same engine and the
official J&F rules; `summary.json` and the printed table; the run folder's path printed last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="build data, pretrain the teacher, distil the student, evaluate; takes config overrides",
        description="Train with the config built from conf/ and the overrides, e.g. "
        "`dvos train data=davis2017 data.root=/data/DAVIS trainer.max_epochs=2` (docs/configuration.md). "
        "`ckpt_path=last` continues the newest run (or run_dir=...) from its last.ckpt.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="group choices (data=davis2016) and dot-key overrides (a.b=c)"
    )
    parser.set_defaults(func=run, stop_signals=True)


def resolve_resume(cfg: Any) -> str | None:
    """`ckpt_path=last`: the last.ckpt of `run_dir`, or of the newest run; the run folder is reused."""
    from dvos.inference.checkpoints import check_training_checkpoint, find_latest_checkpoint
    from dvos.utils.errors import ConfigError

    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path != "last":
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path: no checkpoint file at {path}")
    elif cfg.run_dir:
        path = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"ckpt_path=last: {path} does not exist")
    else:
        path = find_latest_checkpoint(cfg.paths.runs_dir)
        if path is None:
            raise ConfigError(
                f"ckpt_path=last: no run under {cfg.paths.runs_dir}/ has checkpoints/last.ckpt "
                "(runs marked FAILED are skipped: name one with run_dir=...)"
            )
        cfg.run_dir = str(path.parent.parent)
    check_training_checkpoint(path, key="ckpt_path")  # a teacher file, a truncated one: one line
    return str(path)


def resumed_config(cfg: Any, overrides: list[str]) -> Any:
    """The config to continue the run in `cfg.run_dir` with: its saved `config.yaml`, and the
    command line's key=value overrides on top (e.g. `trainer.max_steps=4000` to train longer).

    Group and experiment choices on the command line are ignored (the saved config already holds
    what they chose, and re-applying them would undo overrides the run was started with).
    """
    from omegaconf import OmegaConf

    from dvos.cli.common import log
    from dvos.config import _merge, check_config, check_resolvable, schema, split_overrides

    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file():
        log.warning("ckpt_path=last: %s has no config.yaml; using the command line's config", cfg.run_dir)
        return cfg
    choices, dotlist = split_overrides(list(overrides))
    if choices:
        log.warning(
            "continuing %s with its saved config.yaml: ignoring %s (override single keys instead)",
            cfg.run_dir,
            " ".join(f"{key}={value}" for key, value in choices.items()),
        )
    resumed = _merge(schema(), OmegaConf.load(saved), str(saved))
    if dotlist:
        resumed = _merge(resumed, OmegaConf.from_dotlist(dotlist), "the command line")
    resumed.ckpt_path = cfg.ckpt_path
    resumed.run_dir = cfg.run_dir
    check_resolvable(resumed)
    check_config(resumed)
    return resumed


def run(args: argparse.Namespace) -> int:
    # Imported here: `dvos --help` and light commands should not pay for torch / lightning.
    import lightning.pytorch as pl

    from dvos.callbacks.checkpoints import final_student_checkpoint
    from dvos.callbacks.stopping import stopped_by_timer
    from dvos.cli.common import is_launched_rank, log, setup_logging, start_run
    from dvos.cli.factory import build_trainer, check_trainer, finish_wandb
    from dvos.cli.pretrain_cmd import ensure_teacher
    from dvos.cli.teacher_stage import ensure_deformable_teacher
    from dvos.config import load_config, save_config, with_data
    from dvos.data.builders import (
        build_clip_datamodule,
        build_eval_datamodule,
        check_training_excludes_evaluation,
        prepare_data,
        require_train_root,
    )
    from dvos.inference.evaluate import final_evaluation, format_summary
    from dvos.lit.distill import DistillationModule, check_distill_config
    from dvos.utils.errors import TimeBudgetSpent
    from dvos.utils.io import write_json
    from dvos.utils.run_summary import publish_run_summary

    started = time.perf_counter()
    setup_logging()
    cfg = load_config(args.overrides)
    resume = resolve_resume(cfg)
    if resume and cfg.ckpt_path == "last":
        cfg = resumed_config(cfg, args.overrides)
    # Before any folder, data or teacher pretraining: a bad setting must not cost minutes first.
    check_distill_config(cfg, max_objects=int(cfg.model.max_objects))
    require_train_root(cfg)
    check_trainer(cfg)
    run_dir = start_run(cfg, resume=resume)
    prepare_data(cfg)
    eval_data = build_eval_datamodule(cfg)
    eval_data.setup("validate")
    check_training_excludes_evaluation(cfg.data.train_root, eval_data.dataset.names)
    ensure_teacher(cfg, run_dir)
    ensure_deformable_teacher(cfg, run_dir)  # stage 1 of a two-stage run (teacher=deformable)
    # Seeded after the teacher: pretraining it here draws random numbers that loading it from the
    # cache does not, and a run must give the same student either way
    # (docs/DESIGN.md, "Distillation training").
    pl.seed_everything(int(cfg.seed), workers=True)
    if not is_launched_rank():
        save_config(cfg, run_dir / "config.yaml")  # now with the teacher file it uses

    clips = build_clip_datamodule(cfg, val_dataloader_fn=eval_data.val_dataloader)
    module = DistillationModule(cfg)
    log.info("student encoder: %s", module.student_init)
    trainer = build_trainer(cfg, run_dir, job_type="distill", resume=bool(resume))
    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(module, datamodule=clips, ckpt_path=resume)
    if stopped_by_timer(trainer):  # an unfinished run: no table; the job script may requeue it
        raise TimeBudgetSpent(f"trainer.max_time spent at step {trainer.global_step}")

    if not trainer.is_global_zero:
        return 0
    if cfg.trainer.fast_dev_run:
        print("fast_dev_run: no final evaluation")
        print(run_dir)
        return 0
    checkpoint = final_student_checkpoint(cfg, trainer)
    summary = final_evaluation(cfg, run_dir, module, checkpoint)
    write_json(run_dir / "summary.json", summary)
    tables = [(str(cfg.data.name), summary)]
    for name in cfg.eval.extra_sets:  # e.g. the generated set beside the real one
        extra_cfg = with_data(cfg, name)
        prepare_data(extra_cfg)
        extra = final_evaluation(extra_cfg, run_dir, module, checkpoint, folder=f"eval-{name}")
        write_json(run_dir / f"summary-{name}.json", extra)
        tables.append((str(extra_cfg.data.name), extra))
    publish_run_summary(trainer, summary, run_dir)  # the same W&B summary keys in every run (rank 0)
    finish_wandb(trainer)  # now, so that W&B's closing lines come before the table and the folder
    write_json(run_dir / "timing.json", {"wall_s": round(time.perf_counter() - started, 1)})
    for title, table in tables:
        if len(tables) > 1:
            print(f"{title}:")
        print(format_summary(table))
    print(run_dir)
    return 0
