"""`dvos export`: export the student's frame step to ONNX or TorchScript (optionally int8 ONNX).

    dvos export --ckpt runs/x/checkpoints/last.ckpt --format onnx --out student.onnx
                [--height 480 --width 854] [--max-objects K] [--no-verify] [model.key=value ...]
    dvos export --ckpt C --format onnx --quantize int8 [--calibration VIDEOS] --out student-int8.onnx

The graph (`dvos.inference.export.FrameStep`) is encoder + deformable propagation + decoder + ID
embedding with the memory as explicit inputs and outputs, at a fixed frame size; its input and
output names and shapes are listed in `dvos/inference/export.py` and the README. The file is written
to a temporary name and renamed into place. Unless `--no-verify`, the exported file is loaded back and
compared with PyTorch on random inputs (ONNX: needs onnxruntime) before it is renamed into place; the
largest difference is printed, and a file that differs by more than 1e-4 is not written (a one-line
error). On any failure (a full disk included) the temporary file is removed and an earlier file at
the output path is left as it was.

`--quantize int8` exports the fp32 graph (checked as above), then quantizes it with ONNX Runtime's
static quantization calibrated on frames of `--calibration` videos (default: the embedded synthetic
training videos; `dvos.inference.quantize`) and writes only the int8 file. An int8 file is judged by
J&F, not by its difference from PyTorch: `dvos evaluate --ckpt FILE.onnx`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dvos.cli.segment_cmd import add_intermixed_parser, positive_int

TOLERANCE = 1e-4  # largest difference from PyTorch accepted by the check after export


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `export` sub-command."""
    parser = add_intermixed_parser(
        subparsers,
        "export",
        help="export the student's frame step to ONNX / TorchScript",
        description=(
            "Export the student's frame step (encoder + deformable propagation + decoder, memory as "
            "explicit tensors) for frames of a fixed size, then check the file against PyTorch."
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        metavar="C",
        help="student checkpoint (a run's .ckpt or a state dict)",
    )
    parser.add_argument("--format", required=True, metavar="FMT", dest="fmt", help="onnx or torchscript")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write")
    parser.add_argument("--height", type=positive_int, default=480, metavar="H", help="frame height (480)")
    parser.add_argument("--width", type=positive_int, default=854, metavar="W", help="frame width (854)")
    parser.add_argument(
        "--max-objects",
        type=positive_int,
        default=None,
        metavar="K",
        help="objects the graph handles (default: the student's model.max_objects)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip loading the file back and comparing with PyTorch"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 static quantization (ONNX only), calibrated on frames of --calibration videos",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="videos (mp4 files or frame folders, or one of them) for --quantize (default: the embedded "
        "synthetic training videos)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for a plain state dict (model.d_model=128, ...)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dvos.cli.common import setup_logging
    from dvos.config import load_config
    from dvos.inference.checkpoints import load_student
    from dvos.inference.engine import reading_options
    from dvos.inference.export import (
        check_format,
        check_output_path,
        export_student,
        load_exported,
        verify_export,
    )
    from dvos.utils.errors import DvosError

    setup_logging()
    # Cheap checks first: a bad format or output fails before the checkpoint is read.
    fmt = check_format(args.fmt)
    out = check_output_path(args.out)
    if args.quantize and fmt != "onnx":
        raise DvosError(f"--quantize {args.quantize} needs --format onnx, not {fmt}")
    if args.calibration is not None and not args.quantize:
        raise DvosError("--calibration is for --quantize int8")
    if args.calibration is not None and not args.calibration.exists():
        raise DvosError(f"--calibration: {args.calibration} does not exist")
    cfg = load_config(list(args.overrides))
    student, _ = load_student(args.ckpt, cfg.model)
    reading = reading_options(cfg.eval)
    refine = reading.pop("refine")
    reading.pop("refine_soft_memory")  # how refined masks are remembered: no refinement in the graph
    if refine is not None:
        print(
            f"note: the exported graph has no edge refinement (eval.refine_iterations={refine.iterations} "
            "runs in the Python engine only): it matches `dvos evaluate ... eval.refine_iterations=0`"
        )
    verified: dict[str, float] = {}

    def compare_with_pytorch(written: Path) -> None:
        """Before the file takes its name: it must compute what the student computes."""
        if args.no_verify or (fmt == "onnx" and not onnxruntime_installed()):
            return
        verified.update(verify_export(student, load_exported(written, fmt)))
        worst = max(value for name, value in verified.items() if name != "labels")
        if worst > TOLERANCE:
            raise DvosError(
                f"exported {out} differs from PyTorch by {worst:.2e} (> {TOLERANCE:.0e}); not written"
            )

    if args.quantize:
        return export_int8(args, cfg, student, out, reading, check=compare_with_pytorch, verified=verified)

    path = export_student(
        student,
        fmt,
        out,
        height=args.height,
        width=args.width,
        max_objects=args.max_objects,
        check=compare_with_pytorch,
        **reading,
    )
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({fmt}, {args.height}×{args.width} frames, {size:.1f} MB)")
    if args.no_verify:
        return 0
    if not verified:
        print("not verified: onnxruntime is not installed (pip install 'dvos[export]')")
        return 0
    worst = max(value for name, value in verified.items() if name != "labels")
    print(
        f"verified against PyTorch: largest difference {worst:.2e} "
        f"({', '.join(f'{name} {value:.1e}' for name, value in verified.items() if name != 'labels')}; "
        f"labels differ at {verified['labels']:.2%} of pixels)"
    )


def export_int8(
    args: argparse.Namespace,
    cfg: Any,
    student: Any,
    out: Path,
    reading: dict[str, Any],
    *,
    check: Any,
    verified: dict[str, float],
) -> int:
    """Export the fp32 graph to a temporary file, checked against PyTorch by `check` (unless
    --no-verify), then quantize it into `out`."""
    import tempfile

    from dvos.data.builders import calibration_videos
    from dvos.inference.export import export_student
    from dvos.inference.quantize import quantize_student

    videos, source = calibration_videos(cfg, args.calibration)
    with tempfile.TemporaryDirectory(prefix="dvos-export-") as tmp:
        fp32 = export_student(
            student,
            "onnx",
            Path(tmp) / "student-fp32.onnx",
            height=args.height,
            width=args.width,
            max_objects=args.max_objects,
            check=check,
            **reading,
        )
        if verified:  # the fp32 graph the int8 one is made from computes what the student computes
            worst = max(value for name, value in verified.items() if name != "labels")
            print(f"fp32 graph verified against PyTorch: largest difference {worst:.2e}")
        entry = quantize_student(fp32, out, videos, source=source)
        fp32_mb = fp32.stat().st_size / 2**20
    print(
        f"wrote {out} (onnx int8, {args.height}×{args.width} frames, {out.stat().st_size / 2**20:.1f} MB against "
        f"{fp32_mb:.1f} MB in fp32), calibrated on {entry['calibration_frames']} frames of {source}"
    )
    print(f"its J&F against the fp32 student's: dvos evaluate --ckpt {out} data=davis2016 data.root=...")
    return 0


def onnxruntime_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None
