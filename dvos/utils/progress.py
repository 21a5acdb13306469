"""Progress as plain lines for output that is not a terminal: the line format, and
`EvaluationProgress` for a loop outside Lightning (the final table's evaluation). The Lightning side
is `dvos.callbacks.progress.LogProgress`."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def output_is_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stdout) is a terminal, where a progress bar can draw."""
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: short and sortable by eye."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, what: str, done: int, total: int | None, rate: float, unit: str) -> str:
    """`[label] what done/total (p%)  r unit/s  ETA t` (no total: no share, no ETA)."""
    if total:
        share = f"{done}/{total} ({100 * done / total:.0f}%)"
        eta = f"  ETA {format_duration((total - done) / rate)}" if rate > 0 else ""
    else:
        share, eta = str(done), ""
    return f"[{label}] {what} {share}  {rate:.2f} {unit}/s{eta}"


class EvaluationProgress:
    """Lines for `total` items of an evaluation loop: about every tenth, and the last one.

    Args:
        label: the job (`evaluate teacher`).
        total: the number of items (sequences).
        what: what is counted, in the line (default: `unit`).
        unit: what an item is, plural (`sequences`), in the rate.
        stream: where lines go (default: stdout, at the time of each line).
        enabled: False prints nothing (a terminal, or switched off).
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        what: str | None = None,
        unit: str = "sequences",
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.unit, self.stream, self.enabled = (
            label,
            int(total),
            unit,
            stream,
            enabled,
        )
        self.what = what or unit
        self.every = max(1, math.ceil(self.total / 10))
        self.done = 0
        self.started = time.perf_counter()

    def update(self, count: int = 1) -> None:
        """`count` more items are done; print when a tenth is complete, or all."""
        before, self.done = self.done, self.done + count
        if not self.enabled or (self.done // self.every == before // self.every and self.done < self.total):
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        line = progress_line(self.label, self.what, self.done, self.total, self.done / elapsed, self.unit)
        print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)
