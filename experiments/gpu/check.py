"""The GPU check: CUDA tests, a short mixed-precision `dvos train` and `dvos bench --device cuda`, one JSON.

    experiments/gpu/check.sh [--out gpu-check] [--train-args "key=value ..."] [--bench-args "..."]
    experiments/gpu/check.sh --dry-run --out /tmp/check     # every step on the CPU, tiny settings

Steps, each a fresh process whose output goes to OUT/<step>.log:

1. tests: `pytest -m cuda` (the CUDA-marked tests: student forward/backward in fp32, fp16 and bf16
   autocast, the engine on CUDA against the CPU, the teacher); JUnit XML in OUT/tests.xml.
2. train: `dvos train experiment=cpu` with bf16 mixed precision (fp16 where the GPU has no bf16),
   a few hundred steps, its run folder under OUT/runs: the summary table's J&F.
3. bench: `dvos bench --device cuda` at 480p (videos of 50, 200 and 1000 frames, every frame
   segmented): the student, the dense baseline and every teacher side by side, into OUT/bench.

OUT/gpu-check.json holds the machine (GPU name, memory, CUDA and driver versions, torch, dvos), each
step's exit status, seconds and headline numbers, and the goal: the student at 100 FPS or more at 480p
on an H100. Exit status 0 when every step passed, 1 otherwise, 2 for bad usage or no CUDA device.

`--dry-run` runs the same steps on the CPU with tiny settings (the CUDA tests then skip, training is
the smoke experiment in fp32, the benchmark `--quick`): it checks the script and the JSON, not a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

SCHEMA = "dvos-gpu-check/1"
GOAL_FPS = 100.0  # the student at 480p on an H100
TRAIN_GPU = ["experiment=cpu", "trainer.max_steps=300", "pretrain.max_steps=300", "logger=none"]
BENCH_GPU = ["--device", "cuda", "--size", "480p", "--lengths", "50", "200", "1000"]
TRAIN_DRY = ["experiment=smoke"]
BENCH_DRY = [
    "experiment=smoke",
    "--device", "cpu", "--quick", "--in-process", "--threads", "1", "--davis", "none", "--lengths", "4",
    "--skip", "stream", "loading", "attention", "accuracy",
]  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="output folder (gpu-check)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny settings")
    parser.add_argument(
        "--train-args", default="", help="extra `dvos train` overrides (quoted, space-separated)"
    )
    parser.add_argument("--bench-args", default="", help="extra `dvos bench` options (quoted)")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=("tests", "train", "bench"), help="steps to leave out"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step at most (3600)")
    return parser.parse_args(argv)


def machine(dry_run: bool) -> dict[str, Any]:
    """Versions and the GPU: torch's view, and nvidia-smi's driver where it exists."""
    import torch

    from dvos.config import environment_info

    info: dict[str, Any] = {
        **environment_info(),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": None,
        "dry_run": dry_run,
        "python_executable": sys.executable,
        "node": platform.node(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": properties.name,
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}.{properties.minor}",
            "count": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def run_step(name: str, command: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run one step; its output to OUT/<name>.log. Returns {"command", "rc", "seconds", "tail"}."""
    log = out / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    print(f"gpu-check: {name}: {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        try:
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - started
    lines = log.read_text(errors="replace").splitlines()
    print(f"gpu-check: {name}: exit {rc} after {seconds:.0f} s (log: {log})", flush=True)
    return {"command": command, "rc": rc, "seconds": round(seconds, 1), "log": str(log), "tail": lines[-15:]}


def tests_step(out: Path, timeout: float) -> dict[str, Any]:
    junit = out / "tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    result = run_step("tests", [*command, "tests"], out, timeout)
    if junit.is_file():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        result["counts"] = counts
    return result


def train_step(out: Path, overrides: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "dvos.cli.main", "train", *overrides]
    command += [f"paths.runs_dir={out / 'runs'}"]
    result = run_step("train", command, out, timeout)
    runs = sorted((out / "runs").glob("*/summary.json"), key=lambda path: path.stat().st_mtime)
    if runs:
        result["run_dir"] = str(runs[-1].parent)
        result["summary"] = json.loads(runs[-1].read_text())
    return result


def bench_step(out: Path, options: list[str], timeout: float) -> dict[str, Any]:
    bench = out / "bench"
    # Config overrides (key=value) first: `dvos bench`'s options that take several values would eat them.
    overrides = [item for item in options if "=" in item and not item.startswith("-")]
    options = [item for item in options if item not in overrides]
    command = [sys.executable, "-m", "dvos.cli.main", "bench", *overrides, *options, "--out", str(bench)]
    result = run_step("bench", command, out, timeout)
    path = bench / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        result["results"] = str(path)
        result["summary"] = results.get("summary")
        result["teachers"] = results.get("teachers")
        result["errors"] = results.get("errors")
        result["size"] = (results.get("options") or {}).get("size")
    return result


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """The student's FPS at 480p against `GOAL_FPS` (a GPU run at 480 × 854 only)."""
    bench = report["steps"].get("bench") or {}
    fps = (bench.get("summary") or {}).get("student_fps")
    at_480p = bench.get("size") == [480, 854] and not report["machine"]["dry_run"]
    return {
        "student_fps": fps,
        "target_fps": GOAL_FPS,
        "target_met": None if fps is None or not at_480p else fps >= GOAL_FPS,
        "what": "the student's FPS at 480 × 854 in `dvos bench --device cuda` (inference cells, mean over lengths)",
    }


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA device (torch.cuda.is_available() is False); --dry-run checks the steps on the CPU"
        )
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        train, bench, precision = list(TRAIN_DRY), list(BENCH_DRY), "32-true"
    else:
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        train, bench = list(TRAIN_GPU), list(BENCH_GPU)
    train += [f"trainer.precision={precision}", *shlex.split(args.train_args)]
    bench += shlex.split(args.bench_args)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "complete": False,
        "machine": machine(args.dry_run),
        "precision": precision,
        "steps": {},
    }
    json_path = out / "gpu-check.json"
    write_json(json_path, report)
    for name in ("tests", "train", "bench"):
        if name in args.skip:
            continue
        if name == "tests":
            report["steps"][name] = tests_step(out, args.timeout)
        elif name == "train":
            report["steps"][name] = train_step(out, train, args.timeout)
        else:
            report["steps"][name] = bench_step(out, bench, args.timeout)
        write_json(json_path, report)  # what is done is kept if a later step hangs
    report["goals"] = goals(report)
    report["ok"] = all(step["rc"] == 0 for step in report["steps"].values())
    report["complete"] = True
    write_json(json_path, report)
    print(f"gpu-check: {'all steps passed' if report['ok'] else 'a step FAILED'}; wrote {json_path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
