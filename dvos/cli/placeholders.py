"""Sub-commands whose implementation lands with a later issue: listed now so `dvos --help` is complete."""

from __future__ import annotations

import argparse
import sys

# command -> (help text, where it arrives)
PLANNED = {
    "sweep": ("run a W&B sweep file, online or offline", "issue 5"),
    "compare": ("compare runs side by side (table + PNG)", "issue 5"),
    "bench": ("speed / memory / FLOPs benchmarks", "issue 6"),
    "export": ("export the student's frame step to ONNX / TorchScript", "issue 6"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, (help_text, issue) in PLANNED.items():
        parser = subparsers.add_parser(name, help=f"{help_text} [arrives with {issue}]")
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=_not_yet, planned=(name, issue))


def _not_yet(args: argparse.Namespace) -> int:
    name, issue = args.planned
    print(f"dvos {name}: not available yet, arrives with {issue}", file=sys.stderr)
    return 1
