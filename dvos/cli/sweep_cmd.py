"""`dvos sweep`: run a W&B sweep file, online or offline (placeholder until issue 5)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.placeholders import register_planned

    register_planned(subparsers, "sweep", "run a W&B sweep file, online or offline", "issue 5")
