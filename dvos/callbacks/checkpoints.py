"""Checkpoints a killed run can resume from: `last.ckpt` every N steps, always written atomically.

- `LastCheckpoint`: a `ModelCheckpoint` that keeps only `last.ckpt`, written every
  `every_n_train_steps` optimizer steps (`callbacks.checkpoint_every_n_steps`) and once more when
  training ends (Lightning's own `save_last` skips the final step when it was not a multiple of N).
  The best checkpoint on `val/J&F` is a separate `ModelCheckpoint` (the Trainer's
  `checkpoint_callback`); `final_student_checkpoint` picks the one the final table scores.
- `AtomicCheckpointIO`: Lightning writes a checkpoint straight into its final name, so a process
  killed while writing leaves a truncated `last.ckpt` that looks complete; this plugin serialises
  the checkpoint in memory (as Lightning does), writes it to a hidden temporary name in the same
  folder and renames it into place (`dvos.utils.io.atomic_write`). A full disk is a one-line
  `DvosError` naming the file, and the earlier checkpoint stays as it was.
  What a process killed while writing leaves (`.last.ckpt.<random>.tmp`) is removed when the run
  is resumed (`dvos.utils.io.remove_stale_temporaries`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dvos.utils.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes to a temporary file beside the target and renames it."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with atomic_write(Path(path), "wb") as handle:
            handle.write(buffer.getbuffer())


class LastCheckpoint(ModelCheckpoint):
    """Only `last.ckpt`: every `every_n_train_steps` optimizer steps and at the end of training.

    Args:
        dirpath: the folder (`<run>/checkpoints`).
        every_n_train_steps: interval in optimizer steps; 0 writes it only at the end of training.
    """

    def __init__(self, dirpath: str | Path, *, every_n_train_steps: int = 0) -> None:
        if int(every_n_train_steps) < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(every_n_train_steps) or None,
            every_n_epochs=None if int(every_n_train_steps) else 0,
            # Always last.ckpt, replaced atomically: never a last-v1.ckpt beside an older one (Lightning
            # versions the name when a run folder was moved and its last_model_path is not restored).
            enable_version_counter=False,
        )

    def save_now(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt now (at the end of a training step: a signal stops the run there)."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not only when nothing was saved yet (ModelCheckpoint's rule): whenever the final step is not
        # the one last saved, so a finished run's last.ckpt always holds its final weights.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def final_student_checkpoint(cfg: Any, trainer: Any) -> str | None:
    """The checkpoint the final table scores (`eval.final_checkpoint`): the best on val/J&F, or
    last.ckpt; None when the run kept no such file (the student in memory, at the end of training)."""
    if cfg.eval.final_checkpoint == "last":
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        path = last.last_model_path if last is not None else ""
    else:
        path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    return path or None
