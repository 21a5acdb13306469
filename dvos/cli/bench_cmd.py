"""`dvos bench`: speed, memory, FLOPs, data loading and J&F-vs-FPS of the student, the teacher and a
dense-memory baseline, in one run, with the exported students (fp32 and int8 ONNX, TorchScript) and
larger teachers (`dvos.bench.teachers`) beside them; prints a table, writes OUT/results.json and
OUT/results.png.

    dvos bench                                  # defaults: 480p, videos of 50/200/1000 frames
    dvos bench --quick                          # a tiny smoke version (seconds)
    dvos bench --device cuda --lengths 50 200 1000 --out bench-gpu
    dvos bench --ckpt runs/x/checkpoints/last.ckpt --skip accuracy loading
    dvos bench --teachers dino-vits8 --export onnx onnx-int8 --calibration ../shared/data/davis2016-train-videos

What is measured, and how, is in `dvos.bench` (runner, cells, measure); defaults depend on the
device: on a CPU long videos are timed on a window of frames at their end after the state was
fast-forwarded, on CUDA every frame is segmented.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from dvos.cli.segment_cmd import add_intermixed_parser, positive_int

DEFAULT_DAVIS = Path("../shared/data/davis2016-sample")


class _Auto:
    """Default of the options whose default depends on the device (not a string: argparse would parse it)."""

    def __repr__(self) -> str:
        return "auto"


AUTO = _Auto()
QUICK = {
    "lengths": [6, 12],
    "size": (64, 112),
    "window": 2,
    "warmup": 1,
    "stream_size": (48, 80),
    "jf_max_size": 96,
    "jf_sequences": 1,
    "loader_batches": 2,
    "train_steps": 1,
    "matmul_size": 512,
}


def parse_size(text: str) -> tuple[int, int]:
    """'480p' → (480, 854) (16:9, width rounded up to even, as DAVIS's 854 × 480), 'HxW' → (H, W)."""
    text = text.strip().lower()
    match = re.fullmatch(r"(\d+)p", text)
    if match:
        height = int(match.group(1))
        width = -(-height * 16 // 9)
        return height, width + (width % 2)
    match = re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", text)
    if match:
        return int(match.group(1)), int(match.group(2))
    raise argparse.ArgumentTypeError(f"expected a size like 480p or 480x854, got {text!r}")


def optional(kind: Any) -> Any:
    """An argument type that also accepts 'none' / 'all' (→ None)."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "all", "off"):
            return None
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `bench` sub-command."""
    from dvos.bench.cells import MODELS
    from dvos.bench.runner import SECTIONS
    from dvos.bench.teachers import TEACHERS

    parser = add_intermixed_parser(
        subparsers,
        "bench",
        help="benchmark speed, memory, FLOPs, data loading and J&F vs FPS (student, teacher, dense baseline)",
        description=(
            "Measure, in one run, the student, the teacher and a dense-memory baseline (the student with "
            "global attention over a memory that grows by a frame every 5 frames, as DeAOT-L): FPS and peak "
            "memory on generated videos of several lengths, FLOPs per frame and the share of the machine's "
            "matmul rate, data loading against the training step, and J&F against FPS. Prints a table, writes "
            "OUT/results.json and OUT/results.png. Config overrides (key=value) go before the options that "
            "take several values (--lengths, --models, --skip, --export)."
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench"), metavar="DIR", help="output folder (bench)"
    )
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", metavar="L", help="video lengths in frames (50 200 1000)"
    )
    parser.add_argument("--size", type=parse_size, metavar="SIZE", help="frame size: 480p or HxW (480p)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny smoke version: small frames, short videos"
    )
    parser.add_argument(
        "--ckpt",
        type=Path,
        metavar="C",
        help="student checkpoint; default: the newest run's best (else last) checkpoint, else random weights",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, metavar="M", help=f"models ({' '.join(MODELS)})"
    )
    parser.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="frames timed at the end of each video after fast-forwarding its state; 0: segment every frame "
        "(default: 4 on CPU, 0 on CUDA)",
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N", help="untimed frames before the timed ones (1 CPU, 3 CUDA)"
    )
    parser.add_argument(
        "--stream-size",
        type=optional(parse_size),
        default=AUTO,
        metavar="SIZE",
        help="size of the memory walk that segments every frame of the longest video; none: skip "
        "(default: 64x112 on CPU, none on CUDA where the inference cells already segment every frame)",
    )
    parser.add_argument(
        "--jf-max-size",
        type=optional(positive_int),
        default=AUTO,
        metavar="N",
        help="cap on the long side of frames fed to the models for J&F; none: full size (default: 240 on CPU, none on CUDA)",
    )
    parser.add_argument(
        "--jf-sequences",
        type=optional(positive_int),
        default=AUTO,
        metavar="N",
        help="first N sequences of each set for J&F; all: every sequence (default: 3 on CPU, all on CUDA)",
    )
    parser.add_argument(
        "--davis",
        type=optional(Path),
        default=DEFAULT_DAVIS,
        metavar="DIR",
        help=f"a DAVIS-2016 tree for J&F besides the configured set; none: skip (default: {DEFAULT_DAVIS}, when present)",
    )
    parser.add_argument(
        "--export",
        nargs="+",
        choices=("onnx", "onnx-int8", "torchscript", "none"),
        metavar="FMT",
        help="exported student formats to time (default: torchscript, and onnx and onnx-int8 when "
        "onnxruntime is installed; none with --quick)",
    )
    parser.add_argument(
        "--teachers",
        nargs="+",
        choices=(*TEACHERS, "all", "none"),
        metavar="T",
        help=f"larger teachers timed beside the student, random weights ({' '.join(TEACHERS)}; "
        "default: all, none with --quick)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="videos (mp4 files or frame folders) calibrating the int8 student (default: the embedded "
        "training videos)",
    )
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="no fp16 autocast on CUDA")
    parser.add_argument(
        "--in-process",
        dest="isolate",
        action="store_false",
        help="run the speed/memory cells in this process instead of a fresh process each (faster; RSS peaks less exact)",
    )
    parser.add_argument(
        "--threads", type=positive_int, metavar="N", help="torch threads (default: torch's choice)"
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        choices=SECTIONS,
        default=[],
        metavar="SECTION",
        help=f"skip sections ({' '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated video and of random weights"
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides (model.d_model=128, data=davis2016, ...)"
    )
    parser.set_defaults(func=run)
    return parser


def newest_checkpoint(runs_dir: str | Path) -> tuple[Path | None, str]:
    """The newest run's best checkpoint (`best-*.ckpt`), else its `last.ckpt`; and how it was chosen."""
    from dvos.inference.checkpoints import find_latest_checkpoint

    last = find_latest_checkpoint(runs_dir)
    if last is None:
        return None, f"no trained checkpoint under {runs_dir}/"
    best = sorted(last.parent.glob("best*.ckpt"), key=lambda path: path.stat().st_mtime)
    if best:
        return best[-1], "the newest run's best checkpoint"
    return last, "the newest run's last checkpoint"


def resolve_teacher(cfg: Any) -> str:
    """Point `cfg.teacher.checkpoint` at the pretrained teacher when one exists; describe the weights."""
    from dvos.cli.pretrain_cmd import teacher_path

    teacher = cfg.teacher
    if teacher.checkpoint is not None:
        return f"label-propagation teacher ({teacher.encoder}, {teacher.checkpoint})"
    if teacher.encoder == "resnet":
        path = teacher_path(cfg)
        if path.is_file():
            teacher.checkpoint = str(path)
            return f"label-propagation teacher (resnet, pretrained by `dvos pretrain`: {path})"
        return (
            f"label-propagation teacher (resnet, RANDOM weights: no teacher.checkpoint and no pretrained file at "
            f"{path}; `dvos pretrain` or `dvos train` makes one)"
        )
    return f"label-propagation teacher ({teacher.encoder}, RANDOM weights: no teacher.checkpoint)"


def default_export_formats() -> list[str]:
    import importlib.util

    formats = ["torchscript"]
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        formats += ["onnx", "onnx-int8"]
    return formats


def resolve_teachers(given: list[str] | None, *, quick: bool) -> list[str]:
    """--teachers: the names given ("all": every one; "none": none); default all, none with --quick."""
    from dvos.bench.teachers import TEACHERS

    if not given:
        return [] if quick else list(TEACHERS)
    if "none" in given:
        return []
    if "all" in given:
        return list(TEACHERS)
    return list(dict.fromkeys(given))


def build_options(args: argparse.Namespace, device: Any) -> Any:
    """`BenchOptions` from the arguments, with the device's (or --quick's) defaults for what was not given."""
    from dvos.bench.runner import BenchOptions
    from dvos.utils.errors import ConfigError

    cuda = device.type == "cuda"
    base = dict(QUICK) if args.quick else {}

    def choose(name: str, given: Any, device_default: Any) -> Any:
        """The given value (None included: an explicit 'none'), else --quick's, else the device's default."""
        if given is AUTO or (given is None and name in ("window", "warmup")):
            return base.get(name, device_default)
        return given

    options = BenchOptions(
        out=args.out,
        lengths=sorted(set(args.lengths or base.get("lengths", [50, 200, 1000]))),
        size=args.size or base.get("size", (480, 854)),
        device=str(device),
        amp=bool(args.amp),
        models=list(dict.fromkeys(args.models)) if args.models else list(BenchOptions().models),
        window=choose("window", args.window, 0 if cuda else 4),
        warmup=choose("warmup", args.warmup, 3 if cuda else 1),
        stream_size=choose("stream_size", args.stream_size, None if cuda else (64, 112)),
        isolate=bool(args.isolate),
        jf_max_size=choose("jf_max_size", args.jf_max_size, None if cuda else 240),
        jf_sequences=choose("jf_sequences", args.jf_sequences, None if cuda else 3),
        davis_root=args.davis,
        loader_batches=base.get("loader_batches", 4),
        train_steps=base.get("train_steps", 2),
        matmul_size=base.get("matmul_size", 4096 if cuda else 2048),
        skip=list(args.skip),
        seed=int(args.seed),
        threads=args.threads,
        quick=bool(args.quick),
    )
    if args.export:
        options.export_formats = [] if "none" in args.export else list(dict.fromkeys(args.export))
    else:
        options.export_formats = [] if args.quick else default_export_formats()
    options.teachers = resolve_teachers(args.teachers, quick=bool(args.quick))
    options.calibration = args.calibration
    if options.calibration is not None and not options.calibration.exists():
        raise ConfigError(f"--calibration: {options.calibration} does not exist")
    if options.window < 0 or options.warmup < 0:
        raise ConfigError("--window and --warmup must be >= 0")
    if min(options.lengths) < options.warmup + 2:
        raise ConfigError(
            f"--lengths: the shortest video ({min(options.lengths)} frames) must be at least warm-up + 2 = "
            f"{options.warmup + 2} frames"
        )
    return options


def run(args: argparse.Namespace) -> int:
    # Imported here: `dvos --help` should not pay for torch.
    import torch

    from dvos.bench.report import format_report
    from dvos.bench.runner import PLOT_PNG, RESULTS_JSON, Weights, run_benchmark
    from dvos.cli.common import log, setup_logging
    from dvos.cli.segment_cmd import resolve_device
    from dvos.config import load_config
    from dvos.utils.io import ensure_writable_dir

    setup_logging()
    cfg = load_config(list(args.overrides))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(int(args.threads))
    options = build_options(args, device)
    ensure_writable_dir(options.out)
    if args.ckpt is not None:
        checkpoint, source = args.ckpt, "--ckpt"
    else:
        checkpoint, source = newest_checkpoint(cfg.paths.runs_dir)
    weights = Weights(student_checkpoint=checkpoint, student_source=source, teacher=resolve_teacher(cfg))
    log.info("bench on %s: %s; %s", device, source, weights.teacher)
    results = run_benchmark(cfg, options, weights)
    print(format_report(results))
    print(f"\nwrote {options.out / RESULTS_JSON} and {options.out / PLOT_PNG}")
    return 0
