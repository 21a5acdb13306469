"""Stopping a training job cleanly: on SIGTERM / SIGINT, and when its time budget is spent.

- `stop_signals()`: for the whole command, SIGTERM (what `timeout`, `docker stop` and schedulers
  send) and SIGINT (Ctrl-C) raise `Interrupted`, so that `finally` blocks and atomic writes clean up
  and the CLI exits with 128 + the signal's number (143, 130) instead of Lightning's 0 / 1. While a
  Trainer with `StopOnSignal` fits, the signal is only recorded: the callback finishes the current
  step, writes `last.ckpt` and then raises. A second signal does not wait.
- `ProcessTimer`: Lightning's `Timer` (`trainer.max_time`) counting this process's training time:
  restored from a checkpoint it starts again at zero, so a job resumed under a new time limit (a
  SLURM job requeued) gets its whole budget. `stopped_by_timer` tells whether it ended the fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer

from dvos.callbacks.checkpoints import LastCheckpoint
from dvos.utils.errors import Interrupted

log = logging.getLogger("dvos")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _SignalState:
    """What the handlers share with the callback (signal handlers run in the main thread)."""

    fitting = False  # a Trainer with StopOnSignal is between on_fit_start and teardown
    received: int | None = None  # the signal recorded while fitting
    owner = 0  # the process that installed the handlers (forked data-loading workers inherit them)


def _handle(signum: int, frame: Any) -> None:
    if os.getpid() != _SignalState.owner:
        return  # a data-loading worker: the main process stops the job (and the workers with it)
    if _SignalState.fitting and _SignalState.received is None:
        _SignalState.received = signum
        log.warning(
            "%s: stopping after the current training step (writing last.ckpt first); send it again to "
            "stop at once",
            signal.Signals(signum).name,
        )
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` (or, while fitting, stop after the step) inside the block."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _SignalState.fitting, _SignalState.received, _SignalState.owner = False, None, os.getpid()
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _handle)
    except ValueError:  # not the main thread: signals cannot be handled here at all
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _SignalState.fitting, _SignalState.received = False, None


class StopOnSignal(pl.Callback):
    """Ends the fit at the first step end after SIGTERM / SIGINT, with `last.ckpt` written there.

    Args:
        last: the callback writing last.ckpt (None: checkpoints are off; nothing is written).

    In a multi-process run (DDP) no checkpoint is written at the signal (all ranks would have to
    save at the same step): the last periodic `last.ckpt` is the one to resume from.
    """

    def __init__(self, last: LastCheckpoint | None) -> None:
        self.last = last

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _SignalState.fitting = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _SignalState.fitting = False

    def _stop(self, trainer: pl.Trainer) -> None:
        signum = _SignalState.received
        if signum is None:
            return
        step = trainer.global_step
        if self.last is None:
            raise Interrupted(signum, f"at step {step} (no checkpoint: callbacks.checkpoint=false)")
        if trainer.world_size == 1 and self.last._last_global_step_saved != step:
            self.last.save_now(trainer)
        raise Interrupted(signum, f"at step {step}")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._stop(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._stop(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A signal after the last step: last.ckpt holds the final weights (LastCheckpoint.on_train_end).
        signum = _SignalState.received
        if signum is not None:
            raise Interrupted(signum, f"at step {trainer.global_step}, after the last one")


class ProcessTimer(Timer):
    """`Timer` whose budget counts this process only (not restored from a checkpoint)."""

    fired = False  # the budget ended the fit

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the elapsed time of earlier jobs does not count against this one's budget

    def _check_time_remaining(self, trainer: pl.Trainer) -> None:
        assert self._duration is not None
        spent = trainer.strategy.broadcast(self.time_elapsed() >= self._duration)  # rank 0 decides
        if spent and not self.fired:
            self.fired = True
            trainer.should_stop = True
            log.info(
                "trainer.max_time spent (%.0f s of training): stopping at step %d",
                self._duration,
                trainer.global_step,
            )


def stopped_by_timer(trainer: pl.Trainer) -> bool:
    """True when `trainer.max_time` ended the fit before `max_steps` / `max_epochs` did."""
    timer = next((c for c in trainer.callbacks if isinstance(c, ProcessTimer)), None)
    if timer is None or not timer.fired:
        return False
    steps_done = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
    epochs_done = trainer.max_epochs not in (None, -1) and trainer.current_epoch >= trainer.max_epochs
    return not (steps_done or epochs_done)
