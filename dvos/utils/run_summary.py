"""The summary keys every `dvos train` run publishes, so that runs can be compared without editing.

At the end of a training run (global rank 0 only) the final table (`summary.json`: baseline, teacher,
student × J&F, J, F, FPS, parameters, peak memory) is flattened into one set of keys that is the same
for every run:

    student/J&F  student/J  student/F  student/fps  student/params  student/peak_rss_mb
    teacher/...  baseline/...  (the same six fields)
    val/J&F        the best validation J&F of the run (the score of its best-*.ckpt)
    val/J&F_last   the last validation J&F
    trainer/global_step

They go into the W&B run's summary (so W&B's own dashboard and sweeps can sort and chart every run
by the same columns) and into `<run>/run_summary.json` (the same dict, for offline tools:
`dvos sweep` ranks trials by it, `dvos compare` reads it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SUMMARY_FILE = "run_summary.json"
CANDIDATES = ("student", "teacher", "baseline")
FIELDS = ("J&F", "J", "F", "fps", "params", "peak_rss_mb")


def _number(value: Any) -> float | int | None:
    """A plain finite number (tensors and numpy scalars included), else None."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def flat_summary(
    summary: dict[str, dict[str, Any]],
    *,
    val_best: Any = None,
    val_last: Any = None,
    global_step: int | None = None,
) -> dict[str, Any]:
    """`{"student/J&F": ..., ..., "val/J&F": best, "val/J&F_last": last, "trainer/global_step": n}`."""
    flat: dict[str, Any] = {}
    for name in CANDIDATES:
        row = summary.get(name) or {}
        for key in FIELDS:
            value = _number(row.get(key))
            if value is not None:
                flat[f"{name}/{key}"] = value
    best, last = _number(val_best), _number(val_last)
    if best is None:
        best = last
    if best is not None:
        flat["val/J&F"] = best
    if last is not None:
        flat["val/J&F_last"] = last
    if global_step is not None:
        flat["trainer/global_step"] = int(global_step)
    return flat


def validation_scores(trainer: Any) -> tuple[Any, Any]:
    """(best, last) validation J&F of a finished fit: the checkpoint callback's best score when it
    monitors val/J&F, and the last logged value."""
    last = trainer.callback_metrics.get("val/J&F")
    best = None
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is not None and getattr(callback, "monitor", None) == "val/J&F":
        best = callback.best_model_score
    return best, last


def publish_run_summary(trainer: Any, summary: dict[str, dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """Put the flat summary into every W&B logger's run summary and `<run_dir>/run_summary.json`.

    Only global rank 0 writes (other ranks return {}); the dict written is returned.
    """
    from dvos.utils.io import write_json

    if not trainer.is_global_zero:
        return {}
    best, last = validation_scores(trainer)
    flat = flat_summary(summary, val_best=best, val_last=last, global_step=trainer.global_step)
    write_json(Path(run_dir) / SUMMARY_FILE, flat)
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - lightning is a dependency
        return flat
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(flat)
    return flat
