"""A sub-command whose implementation lands with a later issue: listed so `dvos --help` is complete."""

from __future__ import annotations

import argparse
import sys


def register_planned(subparsers: argparse._SubParsersAction, name: str, help_text: str, issue: str) -> None:
    parser = subparsers.add_parser(name, help=f"{help_text} [arrives with {issue}]")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=_not_yet, planned=(name, issue))


def _not_yet(args: argparse.Namespace) -> int:
    name, issue = args.planned
    print(f"dvos {name}: not available yet, arrives with {issue}", file=sys.stderr)
    return 1
