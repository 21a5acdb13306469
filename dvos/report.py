"""The results page: `docs/RESULTS.md` and the README's results block, written from run folders.

`dvos report RUN... [--bench bench/results.json]` reads what each `dvos train` run folder holds
(`config.yaml`, `summary.json`: the final table, `environment.json`: versions, commit, CPU,
`timing.json`: wall time) and what `dvos bench` wrote, and writes one Markdown page. The page is
regenerated, never hand-edited, so it cannot drift from the runs it names.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dvos.utils.errors import DataError
from dvos.utils.runs import FAILED_MARKER, is_failed

CANDIDATES = {"baseline": "first-frame copy", "teacher": "teacher", "student": "student"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RUN_STAMP = re.compile(r"^(\d{8})-(\d{6})-")


@dataclass
class RunRecord:
    """What one run folder says about itself."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, dict[str, Any]]
    environment: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # summary-<set>.json

    @property
    def tables(self) -> list[tuple[str, dict[str, dict[str, Any]]]]:
        """(evaluation set, table): the main set (data.name), then each extra set."""
        main = str((self.config.get("data") or {}).get("name", "validation set"))
        return [(main, self.summary), *self.extra.items()]

    @property
    def command(self) -> str:
        experiment = self.config.get("experiment")
        words = [
            "dvos train",
            *([f"experiment={experiment}"] if experiment else []),
            f"seed={self.config.get('seed')}",
        ]
        return " ".join(words)

    @property
    def date(self) -> str:
        started = self.environment.get("started") or self.timing.get("started")
        if started:
            return str(started)[:10]
        stamp = RUN_STAMP.match(self.path.name)
        if stamp:
            return _dt.datetime.strptime(stamp.group(1), "%Y%m%d").date().isoformat()
        return "unknown date"


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise DataError(f"{path}: not found (is {path.parent} a finished `dvos train` run folder?)")
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from err
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run(path: str | Path) -> RunRecord:
    """The record of a finished run folder (`DataError` naming the file that is missing or bad)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a run folder")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise DataError(f"{config_path}: not found (is {path} a `dvos train` run folder?)")
    if is_failed(path):
        raise DataError(f"{path}: the run is marked failed ({path / FAILED_MARKER}): no results to report")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{config_path}: cannot read YAML ({str(err).splitlines()[0]})") from err
    summary = _summary(path / "summary.json")
    extra = {p.stem.removeprefix("summary-"): _summary(p) for p in sorted(path.glob("summary-*.json"))}
    return RunRecord(
        path=path,
        config=config,
        summary=summary,
        environment=_read_json(path / "environment.json", required=False),
        timing=_read_json(path / "timing.json", required=False),
        extra=extra,
    )


def _summary(path: Path) -> dict[str, dict[str, Any]]:
    summary = _read_json(path, required=True)
    unknown = [name for name in summary if name not in CANDIDATES]
    if unknown or not summary:
        raise DataError(f"{path}: expected rows {', '.join(CANDIDATES)}, got {', '.join(summary) or 'none'}")
    return summary


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "wall time not recorded"
    minutes, rest = divmod(round(float(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _fps(row: dict[str, Any]) -> str:
    # the copy baseline has no model: its "rate" is how fast it hands back its first mask
    if row.get("fps") is None or not row.get("params"):
        return "-"
    return f"{row['fps']:.2f}"


def table_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The final table as Markdown: one row per candidate (J&F, J, F to two decimals)."""
    lines = ["| | J&F | J | F | FPS | params |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in CANDIDATES.items():
        row = summary.get(name)
        if row is None:
            continue
        params = f"{row['params'] / 1e6:.2f} M" if row.get("params") else "-"
        lines.append(
            f"| {label} | {row['J&F']:.2f} | {row['J']:.2f} | {row['F']:.2f} | {_fps(row)} | {params} |"
        )
    return lines


def provenance(run: RunRecord) -> str:
    """One line: date, commit, CPU model, wall time, command and run folder."""
    env = run.environment
    commit = str(env.get("commit") or "unknown")
    short = commit[:10] + ("+dirty" if commit.endswith("+dirty") else "") if commit != "unknown" else commit
    cpu = env.get("cpu") or "unknown CPU"
    cores = f" ({env['cpu_count']} cores)" if env.get("cpu_count") else ""
    return (
        f"{run.date} · commit {short} · {cpu}{cores} · {_duration(run.timing.get('wall_s'))} · "
        f"`{run.command}` · run folder `{run.path.name}`"
    )


def tables_lines(run: RunRecord) -> list[str]:
    """Each evaluation set's table under its name."""
    lines: list[str] = []
    for name, table in run.tables:
        lines += [f"*{name}*", "", *table_lines(table), ""]
    return lines


def readme_block(run: RunRecord) -> str:
    """The README's results block: the run's table and its provenance line, between the markers."""
    lines = [BEGIN, *tables_lines(run), provenance(run), END]
    return "\n".join(lines)


def fill_block(text: str, block: str, *, source: str) -> str:
    """`text` with the part between the results markers (markers included) replaced by `block`."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise DataError(f"{source}: no results block (a line {BEGIN} and, after it, a line {END})")
    return text[:start] + block + text[end + len(END) :]


def bench_lines(bench: dict[str, Any], source: str) -> list[str]:
    """The benchmark's own printed report, verbatim, under its provenance."""
    from dvos.bench.report import format_report

    machine = bench.get("machine") or {}
    device = machine.get("cuda") or machine.get("device") or "unknown device"
    return [
        "## Benchmark",
        "",
        f"`dvos bench` ({source}); {device}, {machine.get('threads', '?')} torch threads.",
        "",
        "```text",
        format_report(bench),
        "```",
    ]


def results_page(
    runs: list[RunRecord], *, bench: dict[str, Any] | None = None, bench_source: str = ""
) -> str:
    """docs/RESULTS.md: one section per run (table + provenance), then the benchmark if given."""
    lines = [
        "# Results",
        "",
        "Written by `dvos report` from the run folders named below; regenerate it, do not edit it.",
        "How each number was measured: [LOG.md](LOG.md); what each setting is: [DESIGN.md](DESIGN.md).",
    ]
    for run in runs:
        experiment = run.config.get("experiment") or "root config"
        lines += [
            "",
            f"## {run.config.get('name', run.path.name)} ({experiment}, seed {run.config.get('seed')})",
        ]
        lines += ["", *tables_lines(run), provenance(run)]
    if not runs:
        lines += [
            "",
            "No run is recorded here yet: run `make train`, then `dvos report runs/<run> --readme README.md`.",
        ]
    if bench is not None:
        lines += ["", *bench_lines(bench, bench_source)]
    return "\n".join(lines) + "\n"


def load_bench(path: str | Path) -> dict[str, Any]:
    """`bench/results.json` as written by `dvos bench` (`DataError` naming the file if unreadable)."""
    bench = _read_json(Path(path), required=True)
    if "student" not in bench or "machine" not in bench:
        raise DataError(f"{path}: not a `dvos bench` results file (no 'student' / 'machine')")
    return bench
