"""`dvos eval-masks`: J&F of a folder of predicted masks against DAVIS annotations.

Same numbers as the official davis2017-evaluation toolkit (semi-supervised task), computed in
parallel. Writes `global_results-<split>.csv`, `per-sequence_results-<split>.csv` and
`results.json` (scores, per-frame values and the resolved settings) into `--out`; earlier versions
of these files are deleted first, so a failed run never leaves old numbers behind.

    dvos eval-masks --gt data/DAVIS --pred runs/x/predictions --out runs/x/eval --year 2017
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any

from dvos import __version__
from dvos.cli.segment_cmd import positive_int


def _sequence_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated sequence names")
    return names


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `eval-masks` sub-command."""
    parser = subparsers.add_parser(
        "eval-masks",
        help="J&F of predicted masks against DAVIS annotations (official toolkit's numbers)",
        description=(
            "Evaluate palette-PNG predictions (PRED/<seq>/<frame>.png) against a DAVIS tree "
            "(GT/Annotations/480p, GT/ImageSets) like the official davis2017-evaluation toolkit, "
            "semi-supervised task: frames 1..T-2 scored, objects 1..K of the first annotation."
        ),
    )
    parser.add_argument(
        "--gt", required=True, type=Path, metavar="ROOT", help="DAVIS root (Annotations/480p, ImageSets)"
    )
    parser.add_argument(
        "--pred", required=True, type=Path, metavar="DIR", help="folder with one sub-folder per sequence"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="OUT", help="folder for the CSV and JSON results"
    )
    parser.add_argument(
        "--year", type=int, choices=(2016, 2017), default=2017, help="2016 merges all objects (default 2017)"
    )
    parser.add_argument("--split", default="val", help="ImageSets/<year>/<split>.txt (default val)")
    parser.add_argument(
        "--sequences",
        type=_sequence_list,
        default=None,
        metavar="A,B,...",
        help="evaluate these instead of the split",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="processes (default min(#CPU, #sequences))",
    )
    parser.set_defaults(func=run)
    return parser


def _versions() -> dict[str, str]:
    """Versions logged with the results, read from package metadata: importing torch and lightning
    only to print their versions would take longer than the evaluation itself."""
    versions = {"dvos": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "lightning", "torchmetrics", "numpy", "opencv-python-headless", "pillow"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run(args: argparse.Namespace) -> int:
    from dvos.metrics.evaluation import (
        clear_results,
        default_workers,
        evaluate_davis,
        format_table,
        resolve_sequences,
        write_results,
    )
    from dvos.utils.io import ensure_writable_dir

    # Check the output folder and remove earlier results before the (long) evaluation.
    ensure_writable_dir(args.out)
    clear_results(args.out, args.split)
    sequences = resolve_sequences(args.gt, year=args.year, split=args.split, sequences=args.sequences)
    workers = args.workers or default_workers(len(sequences))
    config = {
        "command": "eval-masks",
        "gt": str(Path(args.gt).resolve()),
        "pred": str(Path(args.pred).resolve()),
        "out": str(Path(args.out).resolve()),
        "year": args.year,
        "split": args.split,
        "sequences": sequences,
        "workers": workers,
        "task": "semi-supervised",
        "versions": _versions(),
    }
    start = time.perf_counter()
    results = evaluate_davis(
        args.gt, args.pred, year=args.year, split=args.split, sequences=sequences, workers=workers
    )
    config["seconds"] = round(time.perf_counter() - start, 3)
    paths = write_results(results, args.out, args.split, config=config)
    print(format_table(results))
    print()
    print(f"{len(results['objects'])} objects evaluated in {config['seconds']:.2f} s")
    for path in paths.values():
        print(f"wrote {os.fspath(path)}")
    return 0
