"""`JFMetric`: DAVIS J&F as a torchmetrics Metric, for validation inside Lightning (DDP-safe).

Each `update` scores one whole sequence with the same rules as `dvos eval-masks`
(`dvos.metrics.evaluation.evaluate_arrays`) and stores each object's Mean/Recall/Decay in list
states reduced by concatenation, so every rank ends up with every object and `compute` gives the
same means over objects as the folder evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from dvos.metrics.evaluation import evaluate_arrays
from dvos.metrics.jf import DEFAULT_BOUND_TH

# state name → the per-object statistic it holds
_STATES = {
    "j_mean": "J-Mean",
    "j_recall": "J-Recall",
    "j_decay": "J-Decay",
    "f_mean": "F-Mean",
    "f_recall": "F-Recall",
    "f_decay": "F-Decay",
}


class JFMetric(Metric):
    """Mean over objects of J and F (Mean, Recall, Decay), DAVIS semi-supervised rules.

    Args:
        year: 2017 (objects kept apart) or 2016 (all objects merged into one).
        bound_th: F boundary tolerance as a fraction of the image diagonal.

    Example:
        metric = JFMetric()
        metric.update(gt_ids, pred_ids)  # one sequence: T × H × W ids, frames 1..T−2 scored
        metric.compute()["J&F"]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, year: int = 2017, bound_th: float = DEFAULT_BOUND_TH, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.year = int(year)
        self.bound_th = float(bound_th)
        for state in _STATES:
            self.add_state(state, default=[], dist_reduce_fx="cat")
        # float64 keeps the folder evaluation's precision; it is also the dtype torchmetrics gives
        # the empty placeholder of a rank that saw no sequence, so all ranks gather one dtype.
        self.set_dtype(torch.float64)

    def update(
        self, gt: Any = None, pred: Any = None, *, objects: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Score one sequence (or add the per-object results of one already scored).

        Args:
            gt: `T × H × W` ground-truth ids of every frame (tensor or array; 255 = void).
            pred: `T × H × W` predicted ids of every frame; frames 0 and T−1 are not scored.
            objects: instead of gt/pred, the output of `evaluate_arrays` for one sequence (so a
                caller that also wants the per-sequence numbers scores it once).
        """
        if objects is None:
            if gt is None or pred is None:
                raise ValueError("JFMetric.update needs gt and pred, or objects")
            objects = evaluate_arrays(gt, pred, year=self.year, bound_th=self.bound_th)
        for state, statistic in _STATES.items():
            values = [scores[statistic] for scores in objects.values()]
            getattr(self, state).append(torch.tensor(values, dtype=self.dtype, device=self.device))

    def _values(self, state: str) -> torch.Tensor:
        value = getattr(self, state)
        if isinstance(value, list):
            if not value:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            return dim_zero_cat(value)
        return value  # already concatenated by a DDP sync

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over all objects: keys `J&F`, `J`, `F`, `J-Recall`, `J-Decay`, `F-Recall`,
        `F-Decay` (scalars, float64 by default; NaN when no object was seen)."""
        means = {state: self._values(state).mean() for state in _STATES}
        return {
            "J&F": (means["j_mean"] + means["f_mean"]) / 2,
            "J": means["j_mean"],
            "F": means["f_mean"],
            "J-Recall": means["j_recall"],
            "J-Decay": means["j_decay"],
            "F-Recall": means["f_recall"],
            "F-Decay": means["f_decay"],
        }
