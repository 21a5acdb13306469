"""experiments/gpu/check.sh: its steps (CUDA tests, a short `dvos train`, `dvos bench`) and its JSON,
checked on the CPU with `--dry-run` (tiny settings); a real run needs a CUDA device and says so."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu" / "check.sh"


def run_check(*args, timeout=900):
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable)), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the real check would run")
def test_without_cuda_the_check_refuses_and_points_at_the_dry_run(tmp_path):
    done = run_check("--out", str(tmp_path / "check"), timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stdout and "--dry-run" in done.stdout
    assert not (tmp_path / "check" / "gpu-check.json").exists()


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "check"
    data = f"paths.data_dir={tmp_path / 'data'}"
    done = run_check("--dry-run", "--out", str(out), "--train-args", data, "--bench-args", data)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["schema"] == "dvos-gpu-check/1" and report["complete"] is True and report["ok"] is True
    machine = report["machine"]
    assert machine["dry_run"] is True and machine["torch"] == torch.__version__ and machine["dvos"]
    assert machine["gpu"] is None and machine["cuda_available"] is False
    assert report["precision"] == "32-true"  # never bf16 on a CPU
    steps = report["steps"]
    assert list(steps) == ["tests", "train", "bench"]
    assert all(
        step["rc"] == 0 and step["seconds"] > 0 and Path(step["log"]).is_file() for step in steps.values()
    )
    counts = steps["tests"]["counts"]  # every CUDA-marked test collected, and skipped without a GPU
    assert counts["tests"] >= 5 and counts["skipped"] == counts["tests"] and counts["failures"] == 0
    assert Path(steps["train"]["run_dir"]).parent == out / "runs"
    assert steps["train"]["summary"]  # the run's summary.json: the final evaluation ran
    assert steps["bench"]["summary"]["student_fps"] > 0 and not steps["bench"]["errors"]
    goals = report["goals"]
    assert goals["target_fps"] == 100 and goals["student_fps"] > 0
    assert goals["target_met"] is None  # not a GPU run at 480p: no verdict
