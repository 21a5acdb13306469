"""`VOSResults`: per-sequence validation scores and predicted-mask overlays, in W&B and on disk.

After every validation epoch (not the sanity check) the LightningModule holds, on each rank, the
results of the sequences that rank evaluated in `pl_module.val_sequence_results`: dicts with
`sequence`, `J`, `F`, `J&F`, `num_objects`, `fps` and `samples` (a few frames, each with
`frame_index`, `image` H × W × 3 uint8, `prediction` H × W uint8 ids, `ground_truth` H × W uint8 ids
or None). This callback gathers them from every rank (`torch.distributed.all_gather_object` when a
process group is initialised), then on global rank 0:

- logs `val/sequences`, a `wandb.Table` with columns sequence, J, F, J&F, objects, fps (sorted by
  sequence name), and `val/overlays`, the sample frames of the first `num_overlays` sequences (by
  name, so the same ones every epoch) as `wandb.Image`s with W&B's interactive masks
  `prediction` and `ground_truth` (at `trainer/global_step`); the global `val/J&F`, `val/J`, `val/F`
  are logged by the module (synced by torchmetrics), not here;
- writes `<default_root_dir>/val-step<NNNNNN>.json` (the table) and
  `<default_root_dir>/pictures/val-step<NNNNNN>.png`: one row per shown sequence, one panel per
  sample frame, the frame tinted with the predicted ids' palette colours and the ground truth
  outlined in white.

Only the shown sequences' frames travel between ranks (a second, small gather), shrunk to at most
`max_side` pixels. A failure while drawing or logging is reported once as a `PictureWarning` and
never stops training; the gathers happen on every rank whatever fails, so ranks never hang.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch.distributed as dist

from dvos.callbacks import render
from dvos.callbacks.attention import FailureReporter, pictures_dir, wandb_loggers
from dvos.utils.io import write_json

TABLE_COLUMNS = ("sequence", "J", "F", "J&F", "objects", "fps")
GT_OUTLINE = (255, 255, 255)


def gather_objects(value: Any) -> list[Any]:
    """One picklable object per rank, in rank order (`[value]` without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """A sequence result → its table row {sequence, J, F, J&F, objects, fps} (non-finite → None)."""
    return {
        "sequence": str(result["sequence"]),
        "J": _finite_or_none(result["J"]),
        "F": _finite_or_none(result["F"]),
        "J&F": _finite_or_none(result["J&F"]),
        "objects": int(result["num_objects"]),
        "fps": _finite_or_none(result.get("fps", float("nan"))),
    }


def shrink_sample(sample: dict[str, Any], max_side: int) -> dict[str, Any]:
    """A sample frame with image and masks resized so that the longer side is ≤ max_side (masks: nearest)."""
    image = np.asarray(sample["image"], dtype=np.uint8)
    height, width = image.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    size = (max(1, round(height * factor)), max(1, round(width * factor)))

    def resize_ids(ids: Any) -> np.ndarray | None:
        if ids is None:
            return None
        return render.resize_image(np.asarray(ids, dtype=np.uint8), size, nearest=True)

    return {
        "frame_index": int(sample["frame_index"]),
        "image": render.resize_image(image, size),
        "prediction": resize_ids(sample["prediction"]),
        "ground_truth": resize_ids(sample.get("ground_truth")),
    }


def class_labels(*masks: np.ndarray | None) -> dict[int, str]:
    """W&B class labels for the ids present in the masks: 0 background, k "object k", 255 void."""
    ids = {0}
    for mask in masks:
        if mask is not None:
            ids |= {int(v) for v in np.unique(mask)}
    return {i: "background" if i == 0 else "void" if i == 255 else f"object {i}" for i in sorted(ids)}


def overlay_panel(
    sample: dict[str, Any], width: int, *, alpha: float = 0.5, palette: list[int] | None = None
) -> np.ndarray:
    """The frame tinted with the predicted ids and the ground truth outlined in white, `width` wide.

    Args:
        sample: {"image": H × W × 3 uint8, "prediction": H × W ids, "ground_truth": H × W ids or None}.
        width: panel width in pixels (height keeps the aspect ratio).

    Returns:
        h × width × 3 uint8 RGB.
    """
    image = np.asarray(sample["image"], dtype=np.uint8)
    height = max(1, round(image.shape[0] * width / image.shape[1]))
    size = (height, width)
    panel = render.resize_image(image, size)
    prediction = render.resize_image(np.asarray(sample["prediction"], dtype=np.uint8), size, nearest=True)
    panel = render.overlay_ids(panel, prediction, alpha=alpha, palette=palette)
    if sample.get("ground_truth") is not None:
        truth = render.resize_image(np.asarray(sample["ground_truth"], dtype=np.uint8), size, nearest=True)
        panel = render.draw_outlines(panel, truth, color=GT_OUTLINE, thickness=2)
    return panel


def render_overlays(
    rows: list[dict[str, Any]],
    samples: dict[str, list[dict[str, Any]]],
    *,
    max_width: int = 1600,
    header: str = "",
) -> np.ndarray | None:
    """A grid: one row per sequence of `samples` (in `rows`' order), one overlay panel per sample frame.

    Args:
        rows: table rows (`table_row`), for the titles' J&F.
        samples: {sequence: [sample, ...]}.
        max_width: picture width limit in pixels.

    Returns:
        H × W × 3 uint8 RGB, or None when there is nothing to show.
    """
    shown = [row for row in rows if samples.get(row["sequence"])]
    if not shown:
        return None
    columns = max(len(samples[row["sequence"]]) for row in shown)
    widest = max(np.asarray(s["image"]).shape[1] for row in shown for s in samples[row["sequence"]])
    panel_w = max(32, min(widest, (max_width - (columns + 1) * render.GAP) // columns))
    panels, titles = [], []
    for row in shown:
        score = "n/a" if row["J&F"] is None else f"{row['J&F']:.3f}"
        panels.append([overlay_panel(sample, panel_w) for sample in samples[row["sequence"]]])
        titles.append(
            [f"{row['sequence']} f{s['frame_index']} J&F {score}" for s in samples[row["sequence"]]]
        )
    return render.tile(panels, titles, header=f"{header}prediction colours, ground truth outlined in white")


class VOSResults(pl.Callback):
    """Per-sequence validation table and mask overlays after each validation epoch (see the module).

    Args:
        num_overlays: sequences (first by name) whose sample frames are shown; 0 shows none.
        enabled: False turns the callback into a no-op (for configs).
        max_side: the shown frames are shrunk to at most this many pixels on their longer side.
        max_width: width limit of the overlay grid PNG in pixels.

    Logged (rank 0, `WandbLogger`): `val/sequences` (`wandb.Table`), `val/overlays` (list of
    `wandb.Image` with `prediction` / `ground_truth` masks). Written: `<default_root_dir>/val-step<NNNNNN>.json`
    and `<default_root_dir>/pictures/val-step<NNNNNN>.png`. `last_paths` holds the files of the latest epoch.
    """

    def __init__(
        self, num_overlays: int = 4, enabled: bool = True, *, max_side: int = 480, max_width: int = 1600
    ) -> None:
        super().__init__()
        if int(num_overlays) < 0:
            raise ValueError(f"num_overlays must be ≥ 0, got {num_overlays}")
        self.num_overlays = int(num_overlays)
        self.enabled = bool(enabled)
        self.max_side = int(max_side)
        self.max_width = int(max_width)
        self.last_paths: list[Path] = []
        self._failures = FailureReporter(type(self).__name__)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        step = int(trainer.global_step)
        results: list[dict[str, Any]] = []
        local_rows: list[dict[str, Any]] = []
        try:
            results = list(getattr(pl_module, "val_sequence_results", None) or [])
            local_rows = [table_row(result) for result in results]
        except Exception as err:
            self._failures.report(f"reading val_sequence_results at step {step}", err)
        # Every rank takes part in both gathers, whatever failed above.
        rows = sorted(
            (row for rank_rows in gather_objects(local_rows) for row in rank_rows),
            key=lambda r: r["sequence"],
        )
        shown = {row["sequence"] for row in rows[: self.num_overlays]}
        local_samples: dict[str, list[dict[str, Any]]] = {}
        if shown:
            try:
                for result in results:
                    if str(result["sequence"]) in shown:
                        local_samples[str(result["sequence"])] = [
                            shrink_sample(sample, self.max_side) for sample in result.get("samples") or []
                        ]
            except Exception as err:
                self._failures.report(f"preparing overlays at step {step}", err)
                local_samples = {}
            samples = {name: value for rank in gather_objects(local_samples) for name, value in rank.items()}
        else:
            samples = {}
        if not trainer.is_global_zero:
            return
        try:
            self.publish(trainer, rows, samples, step)
        except Exception as err:  # a picture must never stop training
            self._failures.report(f"validation results at step {step}", err)

    def publish(
        self,
        trainer: pl.Trainer,
        rows: list[dict[str, Any]],
        samples: dict[str, list[dict[str, Any]]],
        step: int,
    ) -> None:
        """Write the JSON table and the overlay PNG, log the table and overlays to W&B (rank 0)."""
        root = Path(trainer.default_root_dir)
        paths = []
        table = {
            "step": step,
            "epoch": int(trainer.current_epoch),
            "columns": list(TABLE_COLUMNS),
            "sequences": rows,
        }
        json_path = root / f"val-step{step:06d}.json"
        write_json(json_path, table)
        paths.append(json_path)
        ordered = [row for row in rows if row["sequence"] in samples]
        picture = render_overlays(
            ordered, samples, max_width=self.max_width, header=f"validation step {step}: "
        )
        if picture is not None:
            paths.append(render.save_png(pictures_dir(trainer) / f"val-step{step:06d}.png", picture))
        self.last_paths = paths
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        import wandb

        metrics: dict[str, Any] = {
            "val/sequences": wandb.Table(
                columns=list(TABLE_COLUMNS), data=[[row[c] for c in TABLE_COLUMNS] for row in rows]
            )
        }
        images = []
        for row in ordered:
            for sample in samples[row["sequence"]]:
                prediction, truth = sample["prediction"], sample.get("ground_truth")
                labels = class_labels(prediction, truth)
                masks = {"prediction": {"mask_data": prediction, "class_labels": labels}}
                if truth is not None:
                    masks["ground_truth"] = {"mask_data": truth, "class_labels": labels}
                caption = f"{row['sequence']} frame {sample['frame_index']}"
                images.append(wandb.Image(sample["image"], masks=masks, caption=caption))
        if images:
            metrics["val/overlays"] = images
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
