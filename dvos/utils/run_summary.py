"""The summary keys every `dvos train` run publishes, so that runs can be compared without editing.

At the end of a training run (global rank 0 only) the final table (`summary.json`: baseline, teacher,
student × J&F, J, F, FPS, parameters, peak memory) is flattened into one set of keys that is the same
for every run:

    student/J&F  student/J  student/F  student/fps  student/params  student/peak_rss_mb
    teacher/...  baseline/...  (the same six fields)
    val/J&F        the best validation J&F of the run (the score of its best-*.ckpt)
    val/J&F_last   the last validation J&F
    trainer/global_step

They go into `<run>/run_summary.json` (for offline tools: `dvos sweep` ranks trials by it, `dvos
compare` reads it) and into the W&B run's summary, where the candidates' keys sit under `final/`
(`final/student/J&F`, `final/student/fps`, ...: one section of the dashboard; `val/J&F` stays the
metric sweeps rank by). The W&B run also gets the table itself, `final/table` (a `wandb.Table`: method,
J&F, J, F, FPS, peak memory, parameters) and `final/J&F vs FPS`, a scatter plot of it, so a
workspace compares runs and plots J&F against FPS without editing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SUMMARY_FILE = "run_summary.json"
CANDIDATES = ("student", "teacher", "baseline")
FIELDS = ("J&F", "J", "F", "fps", "params", "peak_rss_mb")
FINAL_PREFIX = "final/"
TABLE_COLUMNS = ("method", "J&F", "J", "F", "FPS", "peak memory (MB)", "params (M)")


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
            log_final_table(logger.experiment, summary)
            logger.experiment.summary.update(wandb_summary(flat))
    return flat


def wandb_summary(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat summary as the W&B run shows it: `student/J&F` → `final/student/J&F` (the validation
    and trainer keys unchanged)."""
    return {
        (FINAL_PREFIX + key if key.split("/", 1)[0] in CANDIDATES else key): value
        for key, value in flat.items()
    }


def table_rows(summary: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per method of the final table, in its order (`TABLE_COLUMNS`); no FPS for a method
    without a model (the copy baseline only hands back its first mask)."""
    rows = []
    for name, row in summary.items():
        params = _number(row.get("params"))
        fps = _number(row.get("fps")) if params is None or params > 0 else None
        scores = [_number(row.get(key)) for key in ("J&F", "J", "F")]
        millions = None if params is None else params / 1e6
        rows.append([name, *scores, fps, _number(row.get("peak_rss_mb")), millions])
    return rows


def log_final_table(run: Any, summary: dict[str, dict[str, Any]]) -> None:
    """Log `final/table` and its `final/J&F vs FPS` scatter plot into a W&B run."""
    import wandb

    table = wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(summary))
    scatter = wandb.plot.scatter(table, "FPS", "J&F", title="J&F against FPS (final table)")
    run.log({"final/table": table, "final/J&F vs FPS": scatter})
