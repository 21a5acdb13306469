"""The `dvos` command line through its real entry point: help, errors, `dvos train` at this stage."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from dvos.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def run_dvos(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "dvos.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_help_lists_the_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in (
        "train",
        "eval-masks",
        "data",
        "pretrain",
        "segment",
        "evaluate",
        "bench",
        "sweep",
        "export",
    ):
        assert command in out


def test_bad_config_key_is_one_line_exit_2():
    result = run_dvos("train", "trainer.max_epoch=1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "trainer.max_epoch" in lines[0] and "trainer.max_epochs" in lines[0]


def test_train_smoke_writes_run_folder(tmp_path):
    result = run_dvos(
        "train",
        "experiment=smoke",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.runs_dir={tmp_path / 'runs'}",
    )
    assert result.returncode == 0, result.stderr
    run_dir = Path(result.stdout.strip().splitlines()[-1])  # the run folder is printed last
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.endswith("-smoke")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["root"] == str(tmp_path / "data" / "synthetic-smoke" / "val")
    assert config["experiment"] == "smoke"
    versions = json.loads((run_dir / "environment.json").read_text())
    assert {"dvos", "torch", "lightning"} <= versions.keys()
    baseline = json.loads((run_dir / "summary.json").read_text())["baseline"]
    assert 0.0 < baseline["J&F"] <= 1.0
    assert abs(baseline["J&F"] - (baseline["J"] + baseline["F"]) / 2) < 1e-12
    # the table's student is the end of training (the CPU recipe's eval.final_checkpoint=last)
    scored = json.loads((run_dir / "eval" / "student" / "results.json").read_text())["config"]["method"]
    assert f"student from {run_dir / 'checkpoints' / 'last.ckpt'} " in scored
    # the embedded data was built where the config says, DAVIS layout
    val = tmp_path / "data" / "synthetic-smoke" / "val"
    assert (val / "ImageSets" / "2017" / "val.txt").is_file()
