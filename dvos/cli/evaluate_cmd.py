"""`dvos evaluate`: segment every sequence of a VOS set, then score J&F, FPS and peak memory.

    dvos evaluate --ckpt runs/x/checkpoints/last.ckpt data=davis2016 data.root=/data/DAVIS
    dvos evaluate --teacher label_propagation teacher.checkpoint=dino_deitsmall16_pretrain.pth
    dvos evaluate --baseline copy data=davis2017 data.root=/data/DAVIS --out eval/copy

The set comes from the config (`data=...`, default: the embedded synthetic validation set, built on
first use). Predictions are written in DAVIS layout, `OUT/<sequence>/<frame>.png`, by a background
thread; OUT defaults to `<run folder of the checkpoint>/eval-<data.name>`, or
`eval/<data.name>-<date>-<time>` without a checkpoint. When the sequences have dense ground truth
(DAVIS), J&F is computed with the official toolkit's rules (`dvos.metrics`) from the written files:
`global_results-<split>.csv`, `per-sequence_results-<split>.csv`, `results.json`. Always written:
`timing.json` (per sequence: frames, FPS, peak memory) and `config.yaml` (the resolved config).
YouTube-VOS (no dense ground truth) gets predictions only, packed for the benchmark's server into
`OUT/submission.zip` (`Annotations/<video>/<frame>.png` for the frames its meta.json lists).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dvos.cli.segment_cmd import add_intermixed_parser, add_model_arguments, positive_int

TIMING_JSON = "timing.json"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `evaluate` sub-command."""
    parser = add_intermixed_parser(
        subparsers,
        "evaluate",
        help="predict a VOS dataset with a checkpoint and score it (J&F, FPS, memory)",
        description=(
            "Segment every sequence of the configured VOS set (data=davis2016|davis2017|youtubevos|"
            "synthetic, data.root=...) and, where it has dense ground truth, score J&F like the official "
            "DAVIS toolkit. Predictions: OUT/<sequence>/<frame>.png. Also writes the CSVs, results.json, "
            "timing.json (FPS, peak memory per sequence) and config.yaml into OUT."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=None,
        help="output folder (default: <checkpoint's run>/eval-<data.name>, else eval/<data.name>-<time>)",
    )
    parser.add_argument(
        "--workers", type=positive_int, metavar="N", default=None, help="J&F processes (default: #CPU)"
    )
    add_model_arguments(parser, baseline=True)
    parser.set_defaults(func=run)
    return parser


def default_out_dir(cfg: Any, checkpoint: Path | None) -> Path:
    """`<run>/eval-<data.name>` for a run checkpoint, else `eval/<data.name>-<date>-<time>`."""
    from dvos.inference.checkpoints import run_dir_of

    if checkpoint is not None:
        return run_dir_of(checkpoint) / f"eval-{cfg.data.name}"
    return Path("eval") / f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def sequence_scores(results: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    """Per sequence: J, F (means over its objects `<seq>_<k>`) and J&F = (J + F) / 2."""
    out = {}
    for name in names:
        objects = [
            scores
            for key, scores in results["objects"].items()
            if key.rsplit("_", 1)[0] == name and key.rsplit("_", 1)[-1].isdigit()
        ]
        if not objects:
            continue
        j = sum(o["J-Mean"] for o in objects) / len(objects)
        f = sum(o["F-Mean"] for o in objects) / len(objects)
        out[name] = {"J&F": (j + f) / 2, "J": j, "F": f, "objects": len(objects)}
    return out


def check_ground_truth(sequences: list[Any]) -> None:
    """Check, before anything is segmented, what scoring will read: every scored sequence has at least
    3 frames and its ground-truth masks (frames 0..T−2) are id masks of the frames' size.

    Only the PNG headers are read (mode and size), so a bad file found here costs no segmenting time.

    Raises:
        DataError: one line naming the sequence folder or the mask file.
    """
    from PIL import Image

    from dvos.utils.errors import DataError

    for sequence in sequences:
        if not sequence.has_full_gt:
            continue
        if len(sequence) < 3:
            folder = sequence.mask_paths[0].parent
            raise DataError(
                f"{folder}: {len(sequence)} ground-truth frame(s); J&F needs at least 3 (the first and last "
                f"frames are not scored): leave {sequence.name!r} out with data.sequences=[...]"
            )
        height, width = sequence.size
        for path in sequence.mask_paths[:-1]:
            try:
                with Image.open(path) as image:
                    mode, size = image.mode, image.size
            except Exception as err:  # PIL raises many types for damaged files
                raise DataError(f"{path}: cannot read mask ({type(err).__name__}: {err})") from err
            if mode not in ("P", "L", "1"):
                raise DataError(
                    f"{path}: mask has mode {mode!r}; expected an indexed (palette, mode 'P') PNG of object ids"
                )
            if size != (width, height):
                raise DataError(
                    f"{path}: ground-truth mask is {size[0]}×{size[1]} but the frames of {sequence.name} are "
                    f"{width}×{height} (width×height)"
                )


def format_report(timing: list[dict[str, Any]], scores: dict[str, dict[str, float]] | None) -> str:
    """One table: per sequence J&F, J, F (when scored), frames, FPS and peak memory."""
    width = max([len("Sequence"), *(len(row["name"]) for row in timing)])
    memory_column = "CUDA MB" if any(row["peak_cuda_mb"] is not None for row in timing) else "RSS MB"
    header = f"{'Sequence':<{width}}"
    if scores is not None:
        header += f"  {'J&F':>6}  {'J':>6}  {'F':>6}"
    header += f"  {'frames':>6}  {'FPS':>7}  {memory_column:>8}"
    lines = [header]
    for row in timing:
        line = f"{row['name']:<{width}}"
        if scores is not None:
            score = scores.get(row["name"])
            if score is None:
                line += f"  {'-':>6}  {'-':>6}  {'-':>6}"
            else:
                line += f"  {score['J&F']:6.3f}  {score['J']:6.3f}  {score['F']:6.3f}"
        memory = row["peak_cuda_mb"] if row["peak_cuda_mb"] is not None else row["peak_rss_mb"]
        fps = f"{row['fps']:.2f}" if row["fps"] < 1000 else f"{row['fps']:.0f}"
        line += f"  {row['frames']:>6d}  {fps:>7}  {memory:8.0f}"
        lines.append(line)
    return "\n".join(lines)


def evaluate_segmenter(
    segmenter: Any,
    description: str,
    cfg: Any,
    sequences: list[Any],
    out_dir: Path,
    *,
    device: Any,
    checkpoint: Path | None = None,
    workers: int | None = None,
    queue: int = 16,
) -> dict[str, Any]:
    """Segment `sequences` into `out_dir`, write timing.json (and the J&F files when scorable).

    Returns:
        `{"timing": [per-sequence stats], "results": J&F results or None, "scores": per-sequence
        scores or None, "scored": [names], "frames", "fps", "peak_rss_mb", "peak_cuda_mb"}`.
    """
    from dvos.callbacks.progress import EvaluationProgress, output_is_terminal
    from dvos.cli.common import log
    from dvos.cli.segment_cmd import format_memory
    from dvos.config import environment_info, save_config, to_dict
    from dvos.inference.engine import segment_sequence
    from dvos.inference.writer import MaskWriter
    from dvos.metrics.evaluation import clear_results, default_workers, evaluate_davis, write_results
    from dvos.utils.io import write_json

    split = cfg.data.split
    clear_results(out_dir, split)  # no stale numbers if this run fails
    (out_dir / TIMING_JSON).unlink(missing_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    log.info(
        "evaluating %d sequences of %s (%s) with %s on %s → %s",
        len(sequences),
        cfg.data.name,
        cfg.data.root,
        description,
        device,
        out_dir,
    )
    timing = []
    # redirected output (a log file) gets a line every tenth of the sequences, with an ETA
    progress = EvaluationProgress(
        f"evaluate {out_dir.name}", len(sequences), enabled=not output_is_terminal()
    )
    with MaskWriter(out_dir, maxsize=queue) as writer:
        for sequence in sequences:
            stats = segment_sequence(segmenter, sequence, writer=writer)
            timing.append(stats.as_dict())
            log.info("%s: %d frames, %.2f FPS, %s", stats.name, stats.frames, stats.fps, format_memory(stats))
            progress.update()
    total_frames = sum(row["frames"] for row in timing)
    total_seconds = sum(row["seconds"] for row in timing)
    on_cuda = getattr(device, "type", str(device)) == "cuda"
    summary = {
        "frames": total_frames,
        "seconds": total_seconds,
        "fps": total_frames / total_seconds if total_seconds > 0 else None,
        "peak_rss_mb": max(row["peak_rss_mb"] for row in timing),
        "peak_cuda_mb": max((row["peak_cuda_mb"] or 0.0) for row in timing) if on_cuda else None,
    }
    run_info = {
        "command": "evaluate",
        "method": description,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "device": str(device),
        "max_size": getattr(segmenter, "max_size", None),
        "min_size": getattr(segmenter, "min_size", None),
        "data": {"name": cfg.data.name, "root": str(cfg.data.root), "split": split},
        "config": to_dict(cfg),
        "versions": environment_info(),
    }
    write_json(
        out_dir / TIMING_JSON,
        {
            **{k: run_info[k] for k in ("method", "checkpoint", "device", "max_size", "min_size")},
            **summary,
            "sequences": timing,
        },
    )
    scored = [s.name for s in sequences if s.has_full_gt] if cfg.data.format == "davis" else []
    results = scores = None
    if scored:
        started = time.perf_counter()
        results = evaluate_davis(
            cfg.data.root,
            out_dir,
            year=int(cfg.data.year),
            split=split,
            sequences=scored,
            workers=workers or default_workers(len(scored)),
        )
        run_info["seconds_jf"] = round(time.perf_counter() - started, 3)
        run_info["scored_sequences"] = scored
        write_results(results, out_dir, split, config=run_info)
        scores = sequence_scores(results, scored)
    return {"timing": timing, "results": results, "scores": scores, "scored": scored, **summary}


def method_of(args: argparse.Namespace) -> str:
    """The final table's name of what `dvos evaluate` scores: baseline, teacher or student."""
    if getattr(args, "baseline", None):
        return "baseline"
    return "teacher" if getattr(args, "teacher", None) else "student"


def evaluation_row(report: dict[str, Any], segmenter: Any) -> dict[str, Any]:
    """The final table's fields (J&F, J, F, fps, params, peak_rss_mb) of an evaluation report."""
    model = getattr(segmenter, "student", None)
    if model is None and getattr(segmenter, "teacher", None) is not None:
        model = segmenter.teacher.encoder  # as the final table counts it: the frozen encoder
    scores = (report["results"] or {}).get("global", {})
    return {
        "J&F": scores.get("J&F-Mean"),
        "J": scores.get("J-Mean"),
        "F": scores.get("F-Mean"),
        "fps": report["fps"],
        "params": sum(p.numel() for p in model.parameters()) if model is not None else 0,
        "peak_rss_mb": report["peak_rss_mb"],
    }


def run(args: argparse.Namespace) -> int:
    # Imported here: `dvos --help` should not pay for torch.
    from dvos.cli.common import build_eval_datamodule, prepare_data, setup_logging
    from dvos.cli.run_summary import publish_evaluation
    from dvos.cli.segment_cmd import build_segmenter, config_overrides, resolve_device
    from dvos.config import load_config
    from dvos.utils.errors import DvosError
    from dvos.utils.io import ensure_writable_dir

    setup_logging()
    cfg = load_config(config_overrides(args))
    prepare_data(cfg)
    eval_data = build_eval_datamodule(cfg)
    eval_data.setup("validate")
    sequences = list(eval_data.dataset)
    if not sequences:
        raise DvosError(f"no sequences to evaluate in {cfg.data.root}")
    if cfg.data.format == "davis":
        check_ground_truth(sequences)  # a bad mask fails now, not after every sequence is segmented
    device = resolve_device(args.device)
    segmenter, description, checkpoint = build_segmenter(args, cfg, device)
    out_dir = ensure_writable_dir(args.out or default_out_dir(cfg, checkpoint))
    if cfg.data.format == "youtubevos":
        from dvos.inference.submission import SUBMISSION_ZIP

        # An archive from an earlier run must not outlive a rerun that fails: it would look current.
        (out_dir / SUBMISSION_ZIP).unlink(missing_ok=True)
    report = evaluate_segmenter(
        segmenter,
        description,
        cfg,
        sequences,
        out_dir,
        device=device,
        checkpoint=checkpoint,
        workers=args.workers,
        queue=args.queue,
    )
    timing, results, scored = report["timing"], report["results"], report["scored"]
    publish_evaluation(
        cfg, out_dir, method_of(args), evaluation_row(report, segmenter), checkpoint=checkpoint
    )
    print(format_report(timing, report["scores"]))
    print()
    fps = report["fps"] if report["fps"] is not None else float("inf")
    speed = f"{report['frames']} frames at {fps:.2f} FPS, peak RSS {report['peak_rss_mb']:.0f} MB"
    if report["peak_cuda_mb"] is not None:
        speed += f", peak CUDA {report['peak_cuda_mb']:.0f} MB"
    if results is not None:
        g = results["global"]
        print(
            f"J&F {g['J&F-Mean']:.3f}  J {g['J-Mean']:.3f}  F {g['F-Mean']:.3f} over {len(scored)} sequences "
            f"({len(results['objects'])} objects); {speed}; {description}"
        )
        unscored = len(sequences) - len(scored)
        if unscored:
            print(f"{unscored} sequence(s) without dense ground truth: predictions only")
    else:
        print(f"{speed}; {description}")
        why = "YouTube-VOS" if cfg.data.format == "youtubevos" else "this set"
        print(
            f"{why} has no dense ground truth here: predictions only (no J&F); "
            "submit them to the benchmark's server"
        )
    print(
        f"wrote predictions, {TIMING_JSON}"
        + (" and J&F results" if results is not None else "")
        + f" to {out_dir}"
    )
    if cfg.data.format == "youtubevos":  # the benchmark server's layout: Annotations/<video>/<frame>.png
        from dvos.inference.submission import SUBMISSION_ZIP, write_youtubevos_submission

        meta = Path(cfg.data.root) / cfg.data.split / "meta.json"
        packed = write_youtubevos_submission(out_dir, sequences, meta, out_dir / SUBMISSION_ZIP)
        print(
            f"submission: {out_dir / SUBMISSION_ZIP} ({packed['frames']} frames of {packed['videos']} videos)"
        )
    return 0
