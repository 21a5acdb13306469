"""`dvos data`: dataset utilities. `dvos data synth` builds the embedded default (synthetic) data.

Example:
    dvos data synth --out data/synth                      # the defaults: 24 train videos, 6 val
    dvos data synth --out /tmp/tiny --train 2 --val 1 --size 64x96
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from dvos.utils.errors import DvosError


def _parse_size(text: str) -> tuple[int, int]:
    """'240x432' -> (240, 432): height × width in pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW (height x width, e.g. 240x432), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.data import synth  # light: numpy and cv2 only (PyAV is imported when writing)

    data_parser = subparsers.add_parser(
        "data", help="build or inspect datasets", description=__doc__.splitlines()[0]
    )
    data_parser.set_defaults(func=lambda args: _print_help(data_parser))
    commands = data_parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    parser = commands.add_parser(
        "synth",
        help="build the synthetic default data (mp4 training videos + DAVIS-layout validation)",
        description=(
            "Render procedural videos of textured, moving, deforming, occluding objects: H.264 mp4 files "
            "for unlabelled training (OUT/train) and a DAVIS-layout validation set with ground truth "
            "(OUT/val). Cached: with the same parameters a second run does nothing."
        ),
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (created; cached by parameters)"
    )
    parser.add_argument(
        "--train", type=int, default=synth.DEFAULT_NUM_TRAIN, help="number of training videos (%(default)s)"
    )
    parser.add_argument(
        "--val", type=int, default=synth.DEFAULT_NUM_VAL, help="number of validation sequences (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=synth.DEFAULT_SEED, help="base seed (%(default)s)")
    parser.add_argument(
        "--size",
        type=_parse_size,
        default=synth.DEFAULT_SIZE,
        metavar="HxW",
        help="frame height x width, even (default {}x{})".format(*synth.DEFAULT_SIZE),
    )
    parser.add_argument(
        "--train-frames",
        type=int,
        default=synth.DEFAULT_TRAIN_FRAMES,
        help="frames per training video (%(default)s)",
    )
    parser.add_argument(
        "--val-frames",
        type=int,
        default=synth.DEFAULT_VAL_FRAMES,
        help="frames per validation sequence (%(default)s)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild even when an identical build exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-video progress lines")
    parser.set_defaults(func=run)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _folder_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def run(args: argparse.Namespace) -> int:
    from dvos.data import synth

    params = {
        "num_train": args.train,
        "num_val": args.val,
        "seed": args.seed,
        "size": tuple(args.size),
        "train_frames": args.train_frames,
        "val_frames": args.val_frames,
    }
    start = time.perf_counter()
    if not args.overwrite and synth.is_synthetic_current(args.out, **params):
        print(
            f"{args.out}: up to date ({args.train} train videos, {args.val} val sequences) [{time.perf_counter() - start:.1f} s]"
        )
        return 0
    progress = None if args.quiet else (lambda line: print(f"  {line}", flush=True))
    try:
        out = synth.generate_synthetic(args.out, overwrite=args.overwrite, progress=progress, **params)
    except OSError as err:
        raise DvosError(f"cannot build synthetic data in {args.out}: {err}") from err
    elapsed = time.perf_counter() - start
    height, width = args.size
    print(
        f"built {out}: {args.train} training videos ({args.train_frames} frames) in {out / 'train'}, "
        f"{args.val} validation sequences ({args.val_frames} frames, DAVIS layout) in {out / 'val'}; "
        f"{height}x{width}, seed {args.seed}, {_folder_size(out) / 1e6:.1f} MB [{elapsed:.1f} s]"
    )
    return 0
