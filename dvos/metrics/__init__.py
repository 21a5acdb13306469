"""J&F (region similarity and boundary accuracy) identical to the official DAVIS toolkit."""

from dvos.metrics.evaluation import (
    clear_results,
    evaluate_arrays,
    evaluate_davis,
    evaluate_sequence,
    format_table,
    score_sequence,
    summarize,
    write_results,
)
from dvos.metrics.jf import boundary_accuracy, boundary_map, disk, region_similarity, statistics

__all__ = [
    "JFMetric",
    "boundary_accuracy",
    "boundary_map",
    "clear_results",
    "disk",
    "evaluate_arrays",
    "evaluate_davis",
    "evaluate_sequence",
    "format_table",
    "region_similarity",
    "score_sequence",
    "statistics",
    "summarize",
    "write_results",
]


def __getattr__(name: str):
    # JFMetric needs torch and torchmetrics; loading them lazily keeps `dvos eval-masks` and its
    # worker processes light.
    if name == "JFMetric":
        from dvos.metrics.torchmetric import JFMetric

        return JFMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
