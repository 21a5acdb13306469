"""J&F against FPS: each model segments a VOS set through the evaluation path of `dvos evaluate`.

The predictions are written as palette PNGs and scored by `dvos.metrics` with the official DAVIS
toolkit's rules (`dvos.inference.evaluate.evaluate_segmenter`); the FPS is the same walk's: frames
segmented / seconds spent in the segmenter (reading frames and writing PNGs excluded), at the
model input size the walk used (`max_size` caps the long side; J&F is always scored at the
ground truth's size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dvos.bench.measure import autocast


def warm_up(segmenter: Any, sequence: Any, *, frames: int = 3) -> None:
    """Segment the first frames of a sequence, untimed: the first calls of a model pay one-off costs
    (kernel selection, allocations) that would weigh on a short set's FPS."""
    from dvos.inference.engine import segment_sequence

    segment_sequence(segmenter, sequence, max_frames=frames)


def score_models(
    segmenters: dict[str, tuple[Any, str]],
    cfg: Any,
    sequences: list[Any],
    out_dir: Path,
    *,
    device: torch.device,
    amp: bool,
    workers: int | None = None,
) -> list[dict[str, Any]]:
    """J&F and FPS of each model on `sequences` (a DAVIS-layout set described by `cfg.data`).

    Args:
        segmenters: {model name: (segmenter, description)}.
        cfg: the resolved config whose `data` section describes the set (root, year, split).
        sequences: `VOSSequence`s to segment (all with dense ground truth for J&F).
        out_dir: predictions go to `out_dir/<model>/<sequence>/`.
        device: where the models run.
        amp: fp16 autocast on CUDA.

    Returns:
        One row per model: {"model", "J&F", "J", "F", "fps", "frames", "sequences", "description"}
        (J&F fields None when the set has no dense ground truth).
    """
    from dvos.inference.evaluate import evaluate_segmenter

    rows = []
    for name, (segmenter, description) in segmenters.items():
        with autocast(device, amp):
            warm_up(segmenter, sequences[0])
            report = evaluate_segmenter(
                segmenter, description, cfg, sequences, out_dir / name, device=device, workers=workers
            )
        scores = (report["results"] or {}).get("global")
        rows.append(
            {
                "model": name,
                "J&F": None if scores is None else scores["J&F-Mean"],
                "J": None if scores is None else scores["J-Mean"],
                "F": None if scores is None else scores["F-Mean"],
                "fps": report["fps"],
                "frames": report["frames"],
                "sequences": [s.name for s in sequences],
                "description": description,
            }
        )
    return rows
