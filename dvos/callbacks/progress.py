"""Progress as plain lines, for output that is not a terminal (`make train > train.log`, SLURM logs).

A rich progress bar draws only on a terminal; redirected, a run would print nothing for the whole
of its training. Where stdout is not a terminal, `LogProgress` (switched on by `dvos.cli.factory`,
every `callbacks.progress_every_n_steps` steps) prints instead, to stdout:

    [distill] step 150/400 (38%)  loss 0.8123  2.41 steps/s  ETA 1m44s
    [distill] validation 3/6 (50%)  0.52 sequences/s  ETA 6s

Training: one line every N optimizer steps and one at the last step (loss: the mean over the batches
since the line before). Validation: a line about every tenth of the sequences and one at the end.
`EvaluationProgress` prints the same lines for a loop outside Lightning (the final table's).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl

from dvos.utils.progress import (  # noqa: F401  (re-exported: the callbacks' users import them here)
    EvaluationProgress,
    format_duration,
    output_is_terminal,
    progress_line,
)


class LogProgress(pl.Callback):
    """One line every `every_n_steps` optimizer steps (step, loss, steps/s, ETA), and validation lines.

    Args:
        every_n_steps: interval in optimizer steps (≥ 1).
        label: the job, shown in brackets (`pretrain`, `distill`).
        stream: where lines go (default: stdout at the time of each line).
    """

    def __init__(
        self, every_n_steps: int = 50, *, label: str = "train", stream: TextIO | None = None
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.label = label
        self.stream = stream
        self._losses: list[Any] = []  # detached loss tensors: read (a GPU sync) only when printing
        self._last_step = 0
        self._last_time = 0.0
        self._validation: EvaluationProgress | None = None

    def _print(self, line: str) -> None:
        print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int | None:
        """The optimizer steps this fit will take (None when unbounded or unknown)."""
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # a data loader without a length, or no max_epochs/max_steps
            return None
        return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step, self._last_time, self._losses = trainer.global_step, time.perf_counter(), []
        self._total = self.total_steps(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "item"):
            self._losses.append(loss.detach())
        step = trainer.global_step
        last = self._total is not None and step >= self._total
        crossed = step // self.every_n_steps > self._last_step // self.every_n_steps
        if step == self._last_step or not (crossed or last):
            return
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        losses = [float(loss.float().item()) for loss in self._losses]
        mean = f"loss {sum(losses) / len(losses):.4f}" if losses else "loss -"
        line = progress_line(self.label, "step", step, self._total, rate, "steps")
        # the loss goes after the position: `[distill] step 150/400 (38%)  loss 0.8123  2.41 steps/s ...`
        head, tail = line.split("  ", 1)
        self._print(f"{head}  {mean}  {tail}")
        self._last_step, self._last_time, self._losses = step, now, []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_val_batches
        total = int(sum(batches)) if isinstance(batches, list) else int(batches or 0)
        if trainer.sanity_checking or total <= 0 or not math.isfinite(total):
            self._validation = None
            return
        self._validation = EvaluationProgress(
            self.label, total, what="validation", stream=self.stream, enabled=trainer.is_global_zero
        )

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._validation is not None:
            self._validation.update()
