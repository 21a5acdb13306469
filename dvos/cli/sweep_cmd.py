"""`dvos sweep`: run a W&B sweep file, with W&B's own sweep server online or our runner offline
(`dvos/sweeps.py`).

    dvos sweep experiments/sweeps/deformable.yaml                  # grid: every combination
    dvos sweep experiments/sweeps/distill_losses.yaml --count 6 --seed 1
    dvos sweep FILE experiment=distill_davis2017 data.root=/data/DAVIS data.train_root=...  # more overrides
    make sweep SWEEP=experiments/sweeps/learning_rate.yaml COUNT=4

Extra `key=value` words after the file are appended to every trial's command line, after the swept
parameters, so they win (a warning names any swept key they override). The sweep folder is
`<paths.runs_dir>/sweeps/<date>-<time>-<name>/` (or `--out`); each trial writes its output to
`logs/<trial>.log` there (`--verbose` also streams it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from dvos import sweeps
from dvos.sweeps import (
    RANKING_JSON,
    check_train_command,
    expand_trials,
    format_ranking,
    load_sweep,
    prepare_trials,
    run_online,
    run_trials,
    train_overrides,
)
from dvos.utils.errors import DvosError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dvos.cli.segment_cmd import add_intermixed_parser

    # Intermixed: options may come after the positional words (`dvos sweep X --out O a=b`).
    parser = add_intermixed_parser(
        subparsers,
        "sweep",
        help="run a W&B sweep file: on the W&B server online, with our own runner offline",
        description="Run the sweep in FILE (W&B sweep format, experiments/sweeps/). Online (W&B API key): "
        "creates the sweep with W&B and starts `wandb agent`. Offline: expands grid/random sweeps "
        "itself (bayes falls back to random), runs the trials one after another as `dvos train` "
        "processes, each its own offline W&B run in a group named after the sweep folder, records crashed "
        "trials as failed and goes on, and prints the ranking by the sweep's metric "
        "(also <sweep folder>/ranking.json).",
    )
    parser.add_argument("file", type=Path, help="the sweep file (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra `key=value` words for every trial (after the swept ones: they win)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="number of trials (default: the whole grid, or run_cap of a random/bayes sweep)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws (offline; default 0)")
    parser.add_argument(
        "--mode",
        choices=("auto", "online", "offline"),
        default="auto",
        help="auto (default): online with a W&B API key (or WANDB_MODE=online), offline otherwise",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="sweep folder (default: <paths.runs_dir>/sweeps/<date>-<time>-<name>)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads of each trial (OMP_NUM_THREADS); 1 is much faster on a small CPU shared with "
        "other jobs, where torch's thread pool spins against them",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands, run nothing")
    parser.add_argument("--verbose", action="store_true", help="stream every trial's output (offline)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import datetime as _dt

    from dvos.config import load_config
    from dvos.utils.runs import choose_wandb_mode, make_run_dir

    spec = load_sweep(args.file)
    if args.count is not None and args.count < 1:
        raise DvosError(f"--count must be at least 1, got {args.count}")
    check_train_command(spec)
    extra = list(args.overrides)
    overridden = sorted({word.split("=", 1)[0] for word in extra} & set(spec.swept_keys))
    if overridden:
        print(
            f"dvos sweep: warning: the command line fixes swept parameter(s) {', '.join(overridden)}",
            file=sys.stderr,
        )
    constants = {key: value["value"] for key, value in spec.parameters.items() if "value" in value}
    cfg = load_config(train_overrides(spec, constants, extra))  # the sweep's own settings, checked once

    if args.threads is not None:
        if args.threads < 1:
            raise DvosError(f"--threads must be at least 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every trial (and the agent)
    mode = args.mode if args.mode != "auto" else choose_wandb_mode("auto")
    if mode == "online" and not args.dry_run:
        return run_online(spec, extra, count=args.count, cfg=cfg)

    method = spec.method
    if method == "bayes":
        print(
            f"dvos sweep: warning: {spec.path}: bayes search needs the W&B sweep server; offline it falls "
            "back to random search over the same parameters",
            file=sys.stderr,
        )
        method = "random"
    parameters_list = expand_trials(spec, count=args.count, seed=args.seed)
    if args.out is not None:
        sweep_dir = Path(args.out)
    elif args.dry_run:  # named, not created
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        sweep_dir = Path(cfg.paths.runs_dir) / "sweeps" / f"{stamp}-{spec.name}"
    else:
        sweep_dir = make_run_dir(Path(cfg.paths.runs_dir) / "sweeps", spec.name)
    trials = prepare_trials(spec, sweep_dir, parameters_list, extra)
    print(
        f"sweep {spec.name}: {method} over {', '.join(spec.swept_keys) or 'constants only'}, "
        f"{len(trials)} trial(s), ranked by {spec.metric} ({spec.goal}); offline runner"
    )
    if args.dry_run:
        for trial in trials:
            print("dvos train " + " ".join(trial.overrides))
        return 0
    sweep_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.path, sweep_dir / "sweep.yaml")
    print(f"sweep folder {sweep_dir}", flush=True)
    run_trials(
        spec, trials, sweep_dir, method=method, seed=args.seed, launcher=sweeps.launch, verbose=args.verbose
    )
    finished = sum(trial.status == "finished" for trial in trials)
    failed = sum(trial.status == "failed" for trial in trials)
    print()
    print(f"sweep {spec.name}: ranking by {spec.metric} ({spec.goal})")
    print(format_ranking(spec, trials))
    print(f"{finished} finished, {failed} failed; ranking: {sweep_dir / RANKING_JSON}")
    print(f"compare them: dvos compare {sweep_dir}")
    return 0 if finished else 1
