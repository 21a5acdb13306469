"""`dvos report`: docs/RESULTS.md (and the README's results block) from run folders and the bench.

    dvos report runs/20261207-101500-dvos --bench bench/results.json
    dvos report runs/A runs/B --out docs/RESULTS.md --readme README.md

The page is written from what the runs recorded (dvos/report.py), atomically; the README's block
between its results markers shows the first run given.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `report` sub-command."""
    parser = subparsers.add_parser(
        "report",
        help="write docs/RESULTS.md from run folders (and bench/results.json)",
        description=(
            "Write the results page from finished `dvos train` run folders (their final table, "
            "commit, CPU and wall time) and, with --bench, the benchmark's results.json. With "
            "--readme, also replace the README's results block with the first run's table."
        ),
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run folders (runs/<date>-<time>-<name>); none: a page saying so",
    )
    parser.add_argument("--bench", metavar="JSON", help="a `dvos bench` results.json to include")
    parser.add_argument(
        "--out", default="docs/RESULTS.md", help="the page to write (default: docs/RESULTS.md)"
    )
    parser.add_argument("--readme", metavar="MD", help="also fill this file's results block (e.g. README.md)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dvos.report import fill_block, load_bench, read_run, readme_block, results_page
    from dvos.utils.errors import DataError
    from dvos.utils.io import atomic_write

    runs = [read_run(path) for path in args.runs]
    bench = load_bench(args.bench) if args.bench else None
    page = results_page(runs, bench=bench, bench_source=str(args.bench or ""))
    readme = None
    if args.readme:
        readme_path = Path(args.readme)
        try:
            text = readme_path.read_text()
        except OSError as err:
            raise DataError(f"{readme_path}: cannot read ({err.strerror})") from err
        if not runs:
            raise DataError("--readme needs a run folder: the README's block shows the first run's table")
        readme = fill_block(text, readme_block(runs[0]), source=str(readme_path))
    # everything is read and checked before anything is written
    with atomic_write(Path(args.out)) as handle:
        handle.write(page)
    print(f"wrote {args.out}")
    if readme is not None:
        with atomic_write(readme_path) as handle:
            handle.write(readme)
        print(f"filled the results block of {readme_path}")
    return 0
