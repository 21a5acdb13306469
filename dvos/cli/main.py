"""Entry point of the `dvos` console script: one sub-command per job.

Each sub-command lives in its own module with `register(subparsers)`, which adds a parser and sets
`func=run` on it. `main` turns any `DvosError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dvos import __version__
from dvos.utils.errors import DvosError

# Modules under dvos.cli that provide sub-commands, in the order `dvos --help` lists them.
COMMAND_MODULES = [
    "dvos.cli.data_cmd",
    "dvos.cli.eval_masks",
    "dvos.cli.train_cmd",
    "dvos.cli.pretrain_cmd",
    "dvos.cli.segment_cmd",
    "dvos.cli.evaluate_cmd",
    "dvos.cli.sweep_cmd",
    "dvos.cli.compare_cmd",
    "dvos.cli.report_cmd",
    "dvos.cli.bench_cmd",
    "dvos.cli.export_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvos",
        description="Self-supervised video object segmentation by distilling deformable attention.",
    )
    parser.add_argument("--version", action="version", version=f"dvos {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet defaults chosen before wandb / albumentations are imported anywhere.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # A W&B service inherited from a parent process (a notebook, a test runner) would be shared with
    # it, and keeps a SIGKILLed job's run "in use": `ckpt_path=last` could not reopen that run.
    os.environ.pop("WANDB_SERVICE", None)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DvosError as err:
        print(f"dvos: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dvos: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
