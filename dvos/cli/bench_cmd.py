"""`dvos bench`: speed / memory / FLOPs benchmarks (placeholder until issue 6)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.placeholders import register_planned

    register_planned(subparsers, "bench", "speed / memory / FLOPs benchmarks", "issue 6")
