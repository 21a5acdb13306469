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
from dvos.inference.evaluate import TIMING_JSON, check_ground_truth, evaluate_segmenter, format_report


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
    """`<run>/eval-<data.name>` for a run checkpoint, `<folder>/eval-<data.name>-<stem>` for an exported
    .onnx file, else `eval/<data.name>-<date>-<time>`."""
    from dvos.inference.checkpoints import run_dir_of

    if checkpoint is not None and Path(checkpoint).suffix.lower() == ".onnx":  # beside the exported file
        return Path(checkpoint).parent / f"eval-{cfg.data.name}-{Path(checkpoint).stem}"
    if checkpoint is not None:
        return run_dir_of(checkpoint) / f"eval-{cfg.data.name}"
    return Path("eval") / f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def publish_evaluation(cfg: Any, out_dir: Path, method: str, row: dict[str, Any], *, checkpoint: Any) -> None:
    """`dvos evaluate`'s W&B run (job type evaluate): its row of the table (`final/table`, the scatter
    plot) and `final/<method>/...` in the summary. In the group of the checkpoint's run folder (the
    training's runs), named `<run folder>-evaluate`; without a checkpoint, after the output folder.
    Its files go into `<out_dir>/.wandb` (hidden: the folder's subfolders are the predicted sequences).
    """
    import copy

    from dvos.cli.factory import build_logger
    from dvos.inference.checkpoints import run_dir_of
    from dvos.utils.run_summary import flat_summary, log_final_table, wandb_summary

    job = copy.deepcopy(cfg)
    job.run_dir = str(run_dir_of(checkpoint) if checkpoint is not None else out_dir)
    if not job.logger.enabled or job.logger.name == "none":
        return
    (Path(out_dir) / ".wandb").mkdir(exist_ok=True)  # wandb writes into `.wandb` where one exists
    logger = build_logger(job, Path(out_dir), job_type="evaluate")
    if not logger:
        return
    log_final_table(logger.experiment, {method: row})
    logger.experiment.summary.update(wandb_summary(flat_summary({method: row})))
    logger.experiment.finish()


def run(args: argparse.Namespace) -> int:
    # Imported here: `dvos --help` should not pay for torch.
    from dvos.cli.common import setup_logging
    from dvos.cli.segment_cmd import build_segmenter, config_overrides, resolve_device
    from dvos.config import load_config
    from dvos.data.builders import build_eval_datamodule, prepare_data
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
