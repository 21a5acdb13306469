"""`dvos segment`: segment one video (mp4 or frame folder) from the mask of its first frame.

    dvos segment --video clip.mp4 --mask 00000.png --out masks/ [--overwrite] [--ckpt C | --teacher CFG]
                 [--overlay overlay.mp4] [--max-size N] [--max-frames N] [--device auto] [key=value ...]

Predictions are palette PNGs written flat into OUT (`OUT/<frame name>.png`: `00000.png`, ... for a
video file, the frame files' stems for a folder), with the first mask's palette, at the video's size.
OUT must be new or empty (`--overwrite` empties it, once the model has loaded): masks of two runs
never mix in one folder.
The model: `--ckpt` (a run checkpoint or a student state dict), `--teacher` (a teacher config name
from conf/teacher or a YAML path; `teacher.checkpoint=...` among the overrides), or by default the
newest `runs/*/checkpoints/last.ckpt`, else a random student (with a warning).

Also used by `dvos evaluate`: `resolve_device`, `build_segmenter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dvos.config import MIN_MODEL_SIZE

DEFAULT_OVERLAY_FPS = 24.0  # frame folders have no frame rate of their own


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


NO_SIZE_LIMIT = 0  # `--max-size none` / `--min-size none`: no limit, whatever eval.* says


def size_limit(text: str) -> int:
    """A --max-size / --min-size value: a whole number ≥ 16, or `none` (NO_SIZE_LIMIT)."""
    if text.strip().lower() in ("none", "null"):
        return NO_SIZE_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels or 'none', got {text!r}"
        ) from None
    if value < MIN_MODEL_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_MODEL_SIZE} pixels (or 'none'), got {value}")
    return value


class IntermixedArgumentParser(argparse.ArgumentParser):
    """A sub-command parser that accepts options after the positional overrides.

    `dvos evaluate --ckpt C data=davis2016 data.root=R --out OUT` puts an option after the
    overrides; plain argparse stops filling a `nargs="*"` positional at the first option and
    rejects the rest, so this parser parses intermixed (`parse_known_intermixed_args`).
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixing:  # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_intermixed_parser(
    subparsers: argparse._SubParsersAction, name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """`subparsers.add_parser`, creating an `IntermixedArgumentParser`."""
    parser_class = subparsers._parser_class
    subparsers._parser_class = IntermixedArgumentParser
    try:
        return subparsers.add_parser(name, **kwargs)
    finally:
        subparsers._parser_class = parser_class


def add_model_arguments(parser: argparse.ArgumentParser, *, baseline: bool = False) -> None:
    """--ckpt / --teacher (/ --baseline), --max-size, --device, --queue and the config overrides."""
    method = parser.add_mutually_exclusive_group()
    method.add_argument(
        "--ckpt",
        type=Path,
        metavar="C",
        help="student checkpoint (a run's .ckpt, a student state dict, or a file of `dvos export --format onnx`, "
        "fp32 or int8); default: the newest <paths.runs_dir>/*/checkpoints/last.ckpt, else a random student",
    )
    method.add_argument(
        "--teacher",
        metavar="CFG",
        help="use the label-propagation teacher instead: a conf/teacher name (label_propagation) or a "
        "YAML file; its weights with the override teacher.checkpoint=PATH",
    )
    if baseline:
        method.add_argument("--baseline", choices=("copy",), help="first-frame copy baseline (no model)")
    parser.add_argument(
        "--max-size",
        type=size_limit,
        metavar="N",
        default=None,
        help="cap the long side of frames fed to the model at N pixels (predictions keep the original "
        "size; default: eval.max_size; none: no cap)",
    )
    parser.add_argument(
        "--min-size",
        type=size_limit,
        metavar="N",
        default=None,
        help="upsample frames whose short side is below N pixels for the model (predictions keep the "
        "original size; default: eval.min_size; none: never)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available"
    )
    parser.add_argument(
        "--queue", type=positive_int, default=16, metavar="N", help="masks waiting to be written, at most"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides (model.d_model=128, teacher.checkpoint=..., ...)"
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `segment` sub-command."""
    parser = add_intermixed_parser(
        subparsers,
        "segment",
        help="segment a video from its first-frame mask",
        description=(
            "Segment a video (mp4/avi/webm/mkv/mov or a folder of JPEG/PNG frames) from the palette-PNG "
            "mask of its first frame, frame by frame with constant memory. Writes one palette PNG per "
            "frame directly into OUT (flat: OUT/00000.png, ... for a video file, OUT/<frame stem>.png "
            "for a frame folder), with the first mask's palette, at the video's size; prints FPS and "
            "peak memory."
        ),
    )
    parser.add_argument(
        "--video", required=True, type=Path, metavar="PATH", help="video file or frame folder"
    )
    parser.add_argument(
        "--mask",
        required=True,
        type=Path,
        metavar="PNG",
        help="palette PNG of the first frame (ids 1..K; an RGB PNG in DAVIS palette colours is converted)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder for the predicted PNGs: new or empty (see --overwrite)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="--out may hold files: everything in it is deleted first (once the model has loaded)",
    )
    parser.add_argument("--overlay", type=Path, metavar="MP4", help="also write an overlay video (H.264 mp4)")
    parser.add_argument(
        "--max-frames", type=positive_int, metavar="N", default=None, help="segment only the first N frames"
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run)
    return parser


# --------------------------------------------------------------------------------------------------
# Shared with `dvos evaluate`
# --------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> Any:
    """ "auto" → cuda when available, else cpu; "cuda" without a GPU is a one-line error."""
    import torch

    from dvos.utils.errors import DvosError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DvosError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's overrides, plus the teacher group choice for `--teacher CFG`."""
    overrides = list(args.overrides)
    if getattr(args, "teacher", None):
        overrides.append(f"teacher={args.teacher}")
    return overrides


def size_limit_of(args: argparse.Namespace, cfg: Any, key: str) -> int | None:
    """--max-size / --min-size (`key` = "max_size" / "min_size"), else `eval.<key>` of the config
    (None: no limit)."""
    given = getattr(args, key, None)
    if given is not None:
        return None if given == NO_SIZE_LIMIT else int(given)
    value = cfg.get("eval", {}).get(key) if hasattr(cfg, "get") else None
    return None if value is None else int(value)


def is_exported_file(path: str | Path) -> bool:
    """An exported ONNX frame step (`dvos export`), by its suffix."""
    return Path(path).suffix.lower() == ".onnx"


def exported_segmenter(
    path: Path, cfg: Any, sizes: dict[str, int | None], reading: dict[str, Any]
) -> tuple[Any, str]:
    """An exported ONNX file (fp32 or int8) in the engine (`ExportedSegmenter`, onnxruntime on the CPU,
    torch's thread count): frames go in at the graph's fixed size, whatever --max-size / --min-size
    say, and the edge refinement is not in the graph (both noted in the log)."""
    import torch

    from dvos.cli.common import log
    from dvos.inference.export import ExportedSegmenter, load_exported

    step = load_exported(path, "onnx", threads=torch.get_num_threads())
    spec = step.spec
    quantized = "int8" if spec.get("quantization") else "fp32"
    if any(value is not None for value in sizes.values()) or reading.get("refine") is not None:
        log.info(
            "%s runs at its exported size %s×%s without edge refinement (eval.max_size / min_size / "
            "refine_* apply to checkpoints only)",
            path,
            spec.get("height"),
            spec.get("width"),
        )
    description = f"exported student {path} (ONNX {quantized}, {spec.get('height')}×{spec.get('width')})"
    return ExportedSegmenter(step), description


def build_segmenter(args: argparse.Namespace, cfg: Any, device: Any) -> tuple[Any, str, Path | None]:
    """The segmenter the arguments ask for.

    `--ckpt FILE.onnx` runs an exported frame step (`exported_segmenter`).

    Returns:
        (segmenter, description, checkpoint): checkpoint is the student's file (None for the teacher,
        the copy baseline or a random student).
    """
    from dvos.inference.checkpoints import find_latest_checkpoint, load_student
    from dvos.inference.engine import (
        CopySegmenter,
        StudentSegmenter,
        TeacherSegmenter,
        long_term_bound,
        reading_options,
    )
    from dvos.models.build import build_teacher

    sizes = {
        "max_size": size_limit_of(args, cfg, "max_size"),
        "min_size": size_limit_of(args, cfg, "min_size"),
    }
    if getattr(args, "baseline", None) == "copy":
        return CopySegmenter(), "first-frame copy baseline", None
    reading = reading_options(cfg.get("eval"))
    bound = long_term_bound(cfg.get("eval"))
    if args.teacher:
        teacher = build_teacher(cfg.teacher)
        weights = cfg.teacher.checkpoint or "random weights"
        description = (
            f"label-propagation teacher ({cfg.teacher.encoder}, {weights}, n_recent={teacher.n_recent})"
        )
        return TeacherSegmenter(teacher, device=device, **sizes, refine=reading["refine"]), description, None
    checkpoint = args.ckpt
    if checkpoint is not None and is_exported_file(checkpoint):
        return (*exported_segmenter(Path(checkpoint), cfg, sizes, reading), Path(checkpoint))
    if checkpoint is None:
        checkpoint = find_latest_checkpoint(cfg.paths.runs_dir)
        if checkpoint is None:
            student, description = load_student(None, cfg.model, runs_dir=cfg.paths.runs_dir)
            segmenter = StudentSegmenter(student, device=device, max_long_term=bound, **sizes, **reading)
            return segmenter, description, None
    student, description = load_student(checkpoint, cfg.model, runs_dir=cfg.paths.runs_dir)
    segmenter = StudentSegmenter(student, device=device, max_long_term=bound, **sizes, **reading)
    return segmenter, description, Path(checkpoint)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def check_out_folder(out: Path, *, overwrite: bool) -> int:
    """The number of entries `out` holds (0: new or empty). Without `overwrite` a folder with
    entries is refused: new masks beside older ones would mix two runs in one folder."""
    from dvos.utils.errors import DvosError

    if out.exists() and not out.is_dir():
        raise DvosError(f"--out {out} is a file, not a folder")
    held = sum(1 for _ in out.iterdir()) if out.is_dir() else 0
    if held and not overwrite:
        raise DvosError(
            f"--out {out} is not empty ({held} entries): give a new or empty folder, or --overwrite to "
            "delete its contents first"
        )
    return held


def empty_folder(folder: Path) -> None:
    """Delete everything inside `folder` (the folder itself stays)."""
    import shutil

    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _overlay(args: argparse.Namespace, reader: Any, frames: int, palette: list[int] | None) -> int:
    """Second pass: frames from the video, masks read back from OUT (memory: one frame)."""
    from dvos.inference.overlay import write_overlay_video
    from dvos.utils.masks import read_mask

    names = reader.frame_names[:frames]

    def read_frames():
        for start in range(0, frames, 8):
            yield from reader.get_batch(list(range(start, min(frames, start + 8))))

    masks = (read_mask(args.out / f"{name}.png")[0] for name in names)
    fps = reader.fps or DEFAULT_OVERLAY_FPS
    return write_overlay_video(args.overlay, read_frames(), masks, palette, fps)


def run(args: argparse.Namespace) -> int:
    # Imported here: `dvos --help` should not pay for torch.
    from dvos.cli.common import log, setup_logging
    from dvos.config import load_config
    from dvos.data.readers import open_video
    from dvos.inference.engine import mask_object_ids, segment_sequence
    from dvos.inference.evaluate import format_memory
    from dvos.inference.writer import MaskWriter
    from dvos.utils.errors import DataError
    from dvos.utils.io import check_writable_file
    from dvos.utils.masks import read_mask

    setup_logging()
    cfg = load_config(config_overrides(args))
    # Cheap checks first: the inputs and the output folder, before a model is built.
    reader = open_video(args.video)
    # An RGB mask in DAVIS palette colours (a palette PNG re-saved by an image editor) is read as ids.
    mask, palette = read_mask(args.mask, convert_rgb=True)
    if tuple(mask.shape) != tuple(reader.size):
        raise DataError(
            f"first mask {args.mask} is {mask.shape[0]}×{mask.shape[1]} but video {args.video} is "
            f"{reader.size[0]}×{reader.size[1]}"
        )
    if not mask_object_ids(mask):
        raise DataError(f"first mask {args.mask} holds no object (only background / void)")
    held = check_out_folder(args.out, overwrite=args.overwrite)
    if args.overlay is not None:
        check_writable_file(args.overlay, what="--overlay")
    device = resolve_device(args.device)
    # The model before the output folder: a bad checkpoint leaves no folder and no file changed.
    segmenter, description, _ = build_segmenter(args, cfg, device)
    if held:
        empty_folder(args.out)
        log.info("--overwrite: deleted %d entries of %s", held, args.out)
    with MaskWriter(args.out, maxsize=args.queue) as writer:
        writer.open_sequence(None, palette)
        log.info("segmenting %s with %s on %s", args.video, description, device)
        stats = segment_sequence(
            segmenter, reader, mask, writer=writer, flat=True, max_frames=args.max_frames, palette=palette
        )
    size = getattr(segmenter, "input_size", None) or reader.size
    print(
        f"{stats.frames} frames of {args.video} at {size[0]}×{size[1]} (model input): "
        f"{stats.fps:.2f} FPS ({stats.seconds:.2f} s), {format_memory(stats)}"
    )
    print(f"wrote {stats.frames} masks to {args.out}")
    if args.overlay is not None:
        count = _overlay(args, reader, stats.frames, palette)
        print(f"wrote overlay {args.overlay} ({count} frames)")
    reader.close()
    return 0
