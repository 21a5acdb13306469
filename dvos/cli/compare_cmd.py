"""`dvos compare`: runs side by side (`dvos/compare.py`): J&F, J, F, FPS, peak memory, parameters
and the config keys in which they differ, as a printed table, a PNG and an HTML page.

    dvos compare runs/20261124-101500-dvos runs/20261124-113000-dvos   # two run folders
    dvos compare runs/sweeps/20261124-120000-distill-losses             # every trial of a sweep
    dvos compare --group distill-losses                                  # runs/ filtered by logger.group
    dvos compare --project dvos --group deformable                       # from the W&B API (online)

Offline (run folders on disk) is the default whenever a RUN is a path or no W&B API key is
configured; `runs/` when no RUN is given. Online (a W&B API key, no path given, or `--mode online`):
the runs of `--project` (default `logger.project`, `dvos`) in `--group`, or the W&B run paths given.
Written into `--out` (default `runs/comparisons/<date>-<time>/`): `comparison.png`,
`comparison.html`, `comparison.json`. `--model teacher|baseline` compares those rows instead of the
student's.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from dvos.compare import comparison, format_table, offline_runs, online_runs, write_outputs
from dvos.utils.errors import DvosError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.segment_cmd import add_intermixed_parser

    # Intermixed: options may come after the positional words (`dvos compare X --out O a=b`).
    parser = add_intermixed_parser(
        subparsers,
        "compare",
        help="compare runs side by side: table, PNG and HTML (run folders offline, the W&B API online)",
        description="Compare runs side by side: J&F, J, F, FPS, peak memory, parameters and the config "
        "keys in which they differ. RUN: run folders, sweep folders or folders holding runs (offline; "
        "default runs/), or W&B run paths entity/project/id (online). Writes comparison.png, "
        "comparison.html and comparison.json into --out.",
    )
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="run / sweep folders, or W&B run paths (online)"
    )
    parser.add_argument("--project", default=None, help="W&B project (online; default: logger.project)")
    parser.add_argument("--entity", default=None, help="W&B entity (online; default: your default entity)")
    parser.add_argument(
        "--group", default=None, help="only runs of this group (logger.group; a sweep's name)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/comparisons/<time>)"
    )
    parser.add_argument(
        "--model", choices=("student", "teacher", "baseline"), default="student", help="which rows to compare"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "online", "offline"),
        default="auto",
        help="auto (default): run folders when a RUN is a path or no W&B API key, else the W&B API",
    )
    parser.add_argument("--limit", type=int, default=50, help="most runs read from W&B (default 50)")
    parser.set_defaults(func=run)


def choose_source(args: argparse.Namespace) -> str:
    from dvos.utils.runs import choose_wandb_mode

    if args.mode != "auto":
        return args.mode
    if any(Path(run).exists() for run in args.runs):
        return "offline"
    return "online" if choose_wandb_mode("auto") == "online" else "offline"


def run(args: argparse.Namespace) -> int:
    source = choose_source(args)
    if source == "online":
        runs = online_runs(
            list(args.runs),
            project=args.project or "dvos",
            entity=args.entity,
            group=args.group,
            limit=args.limit,
        )
        notes: list[str] = []
        where = f"W&B project {args.project or 'dvos'}"
    else:
        if args.project is not None:
            print("dvos compare: no W&B API key (offline): --project is ignored, reading run folders")
        paths = [Path(run) for run in args.runs] or [Path("runs")]
        runs, notes = offline_runs(paths, args.group)
        where = ", ".join(str(path) for path in paths)
    for note in notes:
        print(f"dvos compare: {note}")
    if not runs:
        raise DvosError(
            f"no runs to compare in {where}"
            + (f" (group {args.group})" if args.group else "")
            + ": give run folders (with config.yaml and run_summary.json) or a sweep folder"
        )
    data = comparison(runs, args.model)
    out_dir = args.out or Path("runs") / "comparisons" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = write_outputs(data, out_dir)
    print(format_table(data))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0
