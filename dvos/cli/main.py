"""Entry point of the `dvos` console script: one sub-command per job.

Each sub-command lives in its own module with `register(subparsers)`, which adds a parser and sets
`func=run` on it. `main` turns any `DvosError` (and a full disk) into one line on stderr and exit
status 2; a job stopped by SIGTERM / SIGINT / `trainer.max_time` into one line and 143 / 130 / 75. A
run folder the command started and did not finish is removed, or marked failed, or (stopped with a
checkpoint) kept with the command that resumes it in that line (`dvos.utils.runs`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys

from dvos import __version__
from dvos.utils.errors import DvosError, Interrupted, Stopped
from dvos.utils.io import no_room
from dvos.utils.runs import STARTED_RUNS, settle_unfinished_runs

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
    STARTED_RUNS.clear()
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if getattr(args, "stop_signals", False):  # training: SIGTERM / SIGINT stop it with a checkpoint
        from dvos.callbacks.stopping import stop_signals

        guard = stop_signals()
    try:
        with guard:
            code = int(args.func(args) or 0)
    except DvosError as err:
        return _fail(f"dvos: error: {err}", str(err))
    except Stopped as err:
        return _stop(err)
    except KeyboardInterrupt:
        return _stop(Interrupted(signal.SIGINT))
    except OSError as err:
        if not no_room(err):
            _settle(_one_line(err))
            raise
        where = f" ({err.filename})" if err.filename else ""
        return _fail(f"dvos: error: {err.strerror}{where}", err.strerror or "no space left")
    except SystemExit as err:
        if not _is_lightning_sigterm(err):
            raise
        return _stop(Interrupted(signal.SIGTERM))
    except BaseException as err:
        _settle(_one_line(err))
        raise
    if code != 0:
        _settle(f"exit status {code}")
    STARTED_RUNS.clear()
    return code


def _settle(failure: str | None) -> str:
    """`settle_unfinished_runs`, never failing itself (it runs on the way out of an error)."""
    try:
        if STARTED_RUNS:
            _close_wandb(failure)  # else its service writes into a run folder after it is removed
        return settle_unfinished_runs(failure)
    except Exception as err:  # the original error matters more
        return f"; could not tidy the run folder: {_one_line(err)}"


def _close_wandb(failure: str | None) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failure else 0)


def _fail(line: str, failure: str) -> int:
    print(line + _settle(failure), file=sys.stderr)
    return 2


def _stop(stopped: Stopped) -> int:
    """A job stopped on request: one line, the run kept to be resumed (or removed when it has no
    checkpoint yet), the exit status of the stop (143 for SIGTERM, 130 for SIGINT, 75 for max_time)."""
    print(f"dvos: {stopped}{_settle(None)}", file=sys.stderr)
    return stopped.exit_status


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _is_lightning_sigterm(err: SystemExit) -> bool:
    """Lightning's own stop on SIGTERM (a SystemExit with status 0) where dvos's did not come first."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(err, exceptions.SIGTERMException)


if __name__ == "__main__":
    sys.exit(main())
