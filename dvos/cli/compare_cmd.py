"""`dvos compare`: compare runs side by side (table + PNG) (placeholder until issue 5)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.placeholders import register_planned

    register_planned(subparsers, "compare", "compare runs side by side (table + PNG)", "issue 5")
