"""`dvos pretrain`: train the teacher's encoder without labels (contrastive random walk).

The result is a plain teacher file (`{"encoder.<key>": tensor, "encoder_config": ...}`) that
`teacher.checkpoint=PATH` loads frozen. `dvos train` calls `ensure_teacher` first, so the teacher is
pretrained once and reused while its settings and data do not change. A `trainer.fast_dev_run`
check writes its one-step teacher into the run folder, never into that cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train the teacher's encoder without labels (contrastive random walk)",
        description="Contrastive-random-walk pretraining of the teacher's ResNet encoder on unlabelled "
        "videos (data.train_root), e.g. `dvos pretrain pretrain.max_steps=2000`. Writes the teacher file "
        "at pretrain.output (default: a cache path under paths.data_dir/teachers/).",
    )
    parser.add_argument("overrides", nargs="*", help="group choices and dot-key overrides")
    parser.add_argument("--force", action="store_true", help="retrain even when the teacher file exists")
    parser.set_defaults(func=run, stop_signals=True)


def teacher_path(cfg: DictConfig) -> Path:
    """Where the pretrained teacher goes: `pretrain.output`, or a cache name from its settings."""
    from dvos.config import to_dict

    if cfg.pretrain.output != "auto":
        return Path(cfg.pretrain.output)
    settings = {
        key: value for key, value in to_dict(cfg.pretrain).items() if key not in ("enabled", "output")
    }
    key = {"pretrain": settings, "train_root": str(cfg.data.train_root), "seed": int(cfg.seed)}
    if cfg.data.synth.generate:
        key["synth"] = to_dict(cfg.data.synth)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.data_dir) / "teachers" / f"crw-resnet-{digest}.pt"


def check_pretrain_config(cfg: DictConfig) -> None:
    """One-line `ConfigError`s for pretraining settings that cannot work (before any data is read)."""
    from dvos.utils.errors import ConfigError

    p = cfg.pretrain
    if not 0.0 <= float(p.edge_dropout) < 1.0:
        raise ConfigError(f"pretrain.edge_dropout must be in [0, 1), got {p.edge_dropout}")
    if not float(p.temperature) > 0:
        raise ConfigError(f"pretrain.temperature must be > 0, got {p.temperature}")
    smallest = min(int(side) for side in p.crop_size)
    if not 0 <= int(p.spatial_jitter) <= smallest - 8:
        raise ConfigError(
            f"pretrain.spatial_jitter must be in [0, {smallest - 8}] pixels (crops of {smallest} px keep "
            f"at least 8), got {p.spatial_jitter}"
        )


def pretrain_teacher(cfg: DictConfig, run_dir: Path, output: Path) -> Path:
    """Run CRW pretraining on `data.train_root` clips and export the encoder to `output`."""
    import lightning.pytorch as pl

    from dvos.cli.common import log
    from dvos.cli.factory import build_trainer, finish_wandb
    from dvos.data.builders import build_clip_datamodule
    from dvos.lit.pretrain import CRWPretrainModule, export_teacher_encoder

    check_pretrain_config(cfg)
    p = cfg.pretrain
    pl.seed_everything(int(cfg.seed), workers=True)
    clips = build_clip_datamodule(
        cfg,
        batch_size=p.batch_size,
        clip_len=p.clip_len,
        crop_size=tuple(p.crop_size),
        per_frame_photometric=False,  # the walk matches appearance across frames: jitter the clip as one
        reference_gap=None,  # the walk has no reference frame: every step is a max_gap step
    )
    module = CRWPretrainModule(
        widths=list(p.widths),
        depths=list(p.depths),
        stem_width=p.stem_width,
        head_dim=p.head_dim,
        temperature=p.temperature,
        edge_dropout=p.edge_dropout,
        spatial_jitter=p.spatial_jitter,
        lr=p.lr,
        weight_decay=p.weight_decay,
        warmup_steps=p.warmup_steps,
        max_steps=p.max_steps,
    )
    pretrain_dir = run_dir / "pretrain"
    trainer = build_trainer(
        cfg,
        pretrain_dir,
        job_type="pretrain",
        overrides={
            "max_steps": int(p.max_steps),
            "max_epochs": -1,
            "limit_val_batches": 0,
            "val_check_interval": None,
            "check_val_every_n_epoch": None,
            "gradient_clip_val": None,
        },
    )
    log.info(
        "teacher pretraining (contrastive random walk): %d steps on %s", p.max_steps, cfg.data.train_root
    )
    trainer.fit(module, datamodule=clips)
    # The weights at the end of training: last.ckpt may be older (it is written every N steps) or
    # stale (a folder reused). Every rank calls save_checkpoint (it ends with a barrier); rank 0 writes.
    checkpoint = pretrain_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(checkpoint)
    if trainer.is_global_zero:
        export_teacher_encoder(checkpoint, output)
        log.info("teacher written to %s", output)
    trainer.strategy.barrier()
    finish_wandb(trainer)  # or the distillation logger of the same process would reuse this run
    return output


def ensure_teacher(cfg: DictConfig, run_dir: Path, *, force: bool = False) -> None:
    """Give `cfg.teacher.checkpoint` a pretrained file when the teacher is a ResNet without one."""
    from dvos.cli.common import log

    if cfg.teacher.encoder != "resnet" or cfg.teacher.checkpoint is not None:
        return
    if not cfg.pretrain.enabled:
        log.warning("teacher: ResNet with random weights (pretrain.enabled=false and no teacher.checkpoint)")
        return
    output = teacher_path(cfg)
    if output.is_file() and not force:
        log.info("teacher: pretrained file %s (cached; delete it or pass --force to retrain)", output)
    elif cfg.trainer.fast_dev_run:
        # A one-batch check must not leave a one-step teacher in the cache that real runs would load.
        output = run_dir / "pretrain" / "teacher-fast-dev-run.pt"
        log.info("teacher: fast_dev_run pretraining into %s (the cache is left alone)", output)
        pretrain_teacher(cfg, run_dir, output)
    else:
        pretrain_teacher(cfg, run_dir, output)
    cfg.teacher.checkpoint = str(output)


def run(args: argparse.Namespace) -> int:
    from dvos.cli.common import setup_logging, start_run
    from dvos.cli.factory import check_trainer
    from dvos.config import load_config
    from dvos.data.builders import prepare_data, require_train_root

    setup_logging()
    cfg = load_config(args.overrides)
    if cfg.teacher.encoder != "resnet":
        print(
            f"dvos pretrain: teacher.encoder={cfg.teacher.encoder} is loaded from a file; nothing to pretrain"
        )
        return 1
    check_pretrain_config(cfg)
    require_train_root(cfg)
    check_trainer(cfg)
    run_dir = start_run(cfg)
    prepare_data(cfg)
    cfg.teacher.checkpoint = None
    # fast_dev_run checks the pretraining itself: it runs even when a cached teacher exists.
    ensure_teacher(cfg, run_dir, force=args.force or bool(cfg.trainer.fast_dev_run))
    print(cfg.teacher.checkpoint)
    return 0
