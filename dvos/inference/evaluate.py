"""Evaluation through the inference engine: segment the sequences of a VOS set, time them, write
the predictions and score them with the official toolkit's rules (`dvos.metrics`).

`evaluate_segmenter` is the walk of `dvos evaluate`, the benchmark's J&F-against-FPS and the final
table of `dvos train`; `final_evaluation` is that table (the first-frame copy baseline, the teacher
and the student on the validation set).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dvos.utils.progress import EvaluationProgress, output_is_terminal

log = logging.getLogger("dvos")  # progress lines of the commands, `dvos: ...`

TIMING_JSON = "timing.json"


def format_memory(stats: Any) -> str:
    """Peak memory of a `SequenceStats` in one phrase."""
    text = f"peak RSS {stats.peak_rss_mb:.0f} MB (process baseline {stats.rss_before_mb:.0f} MB)"
    if stats.peak_cuda_mb is not None:
        text += f", peak CUDA {stats.peak_cuda_mb:.0f} MB"
    return text


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


def count_parameters(module: Any) -> int:
    """Parameters of a model (the table's `params`)."""
    return sum(parameter.numel() for parameter in module.parameters())


def final_evaluation(
    cfg: Any, run_dir: Path, module: Any, student_checkpoint: str | None, *, folder: str = "eval"
) -> dict[str, dict]:
    """Copy baseline, teacher and student on the validation set: J&F, J, F, FPS, parameters.
    `student_checkpoint`: the student's checkpoint (`eval.final_checkpoint`, found by
    `dvos.callbacks.checkpoints.final_student_checkpoint`), else the module's student in memory.
    Predictions and scores go to `run_dir/folder/<candidate>`."""
    import torch

    from dvos.data.builders import build_eval_datamodule
    from dvos.inference.checkpoints import load_student
    from dvos.inference.engine import (
        CopySegmenter,
        StudentSegmenter,
        TeacherSegmenter,
        long_term_bound,
        reading_options,
    )
    from dvos.models.deformable_teacher import DeformableTeacher

    eval_data = build_eval_datamodule(cfg)
    eval_data.setup("validate")
    sequences = list(eval_data.dataset)
    device = torch.device("cpu") if module.device.type == "cpu" else module.device
    max_size, min_size = cfg.eval.max_size, cfg.eval.min_size
    if student_checkpoint:
        student, description = load_student(student_checkpoint, cfg.model)
    else:
        student, description = module.eval_student, "the student at the end of training"
    teacher = module.teacher
    reading = reading_options(cfg.eval)  # the edge refinement applies to the teacher and the student alike
    if isinstance(teacher, DeformableTeacher):  # a network of the student's kind: the student's engine
        teacher_row = (
            StudentSegmenter(
                teacher.network,
                device=device,
                max_size=max_size,
                min_size=min_size,
                max_long_term=long_term_bound(cfg.eval),
                **reading,
            ),
            f"teacher (deformable, {cfg.teacher.deformable.checkpoint})",
            count_parameters(teacher.network),
        )
    else:
        teacher_row = (
            TeacherSegmenter(
                teacher, device=device, max_size=max_size, min_size=min_size, refine=reading["refine"]
            ),
            f"teacher ({cfg.teacher.encoder}, {cfg.teacher.checkpoint or 'random weights'})",
            count_parameters(teacher.encoder),
        )
    candidates = [
        ("baseline", CopySegmenter(), "first-frame copy baseline", 0),
        ("teacher", *teacher_row),
        (
            "student",
            StudentSegmenter(
                student.eval(),
                device=device,
                max_size=max_size,
                min_size=min_size,
                max_long_term=long_term_bound(cfg.eval),
                **reading,
            ),
            f"student ({description})",
            count_parameters(student),
        ),
    ]
    summary = {}
    for name, segmenter, what, params in candidates:
        report = evaluate_segmenter(segmenter, what, cfg, sequences, run_dir / folder / name, device=device)
        if report["results"] is None:
            log.warning("%s: the validation set has no dense ground truth; no J&F", name)
            continue
        scores = report["results"]["global"]
        summary[name] = {
            "J&F": scores["J&F-Mean"],
            "J": scores["J-Mean"],
            "F": scores["F-Mean"],
            "fps": report["fps"],
            "params": params,
            "peak_rss_mb": report["peak_rss_mb"],
        }
    return summary


def format_summary(summary: dict[str, dict]) -> str:
    """The table `make train` prints; FPS of a method without a model (the copy baseline, which
    only hands back its first mask) is shown as "-" (summary.json keeps the measured rate)."""
    lines = [f"{'':<9} {'J&F':>6} {'J':>6} {'F':>6} {'FPS':>8} {'params':>10}"]
    for name, row in summary.items():
        fps = f"{row['fps']:.1f}" if row["fps"] is not None and row["params"] > 0 else "-"
        lines.append(
            f"{name:<9} {row['J&F']:6.3f} {row['J']:6.3f} {row['F']:6.3f} {fps:>8} {row['params'] / 1e6:9.2f}M"
        )
    return "\n".join(lines)
