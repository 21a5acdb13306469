"""`dvos export`: export the student's frame step to ONNX / TorchScript (placeholder until issue 6)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.placeholders import register_planned

    register_planned(subparsers, "export", "export the student's frame step to ONNX / TorchScript", "issue 6")
