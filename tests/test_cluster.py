"""Cluster launch scripts: the SLURM batch script and the torchrun recipe parse (`bash -n`), the
command lines they build are valid `dvos train` configs, they resume from the newest checkpoint of a
fixed per-job run folder, and Lightning's SLURM environment accepts what the script asks for."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dvos.config import load_config

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "experiments" / "slurm" / "train.sbatch"
TORCHRUN = REPO / "experiments" / "torchrun" / "train.sh"
DATA = [
    "experiment=distill_davis2017",
    "data.root=/data/DAVIS",
    "data.train_root=/data/YouTubeVOS/train/JPEGImages",
]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def recorder(folder: Path, name: str) -> Path:
    """A stand-in for srun/torchrun that writes its arguments, one per line, to `<folder>/<name>.args`."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{folder}/{name}.args"\n')
    script.chmod(0o755)
    return script


def slurm_env(tmp_path: Path, fake_bin: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_MODE", "RUN_DIR"))}
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env.get('PATH', '')}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="dvos",
        SLURM_NNODES="2",
        SLURM_NTASKS_PER_NODE="4",
        SLURM_CPUS_PER_TASK="8",
        SLURM_SUBMIT_DIR=str(tmp_path),
        **extra,
    )
    return env


def run_sbatch(tmp_path: Path, *args: str, **extra: str) -> list[str]:
    fake_bin = tmp_path / "bin"
    recorder(fake_bin, "srun")
    result = subprocess.run(
        ["bash", str(SBATCH), *args],
        env=slurm_env(tmp_path, fake_bin, **extra),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return (fake_bin / "srun.args").read_text().splitlines()


def dvos_overrides(argv: list[str]) -> list[str]:
    """The `key=value` words after `dvos train` (or `-m dvos.cli.main train`)."""
    return argv[argv.index("train") + 1 :]


@pytest.mark.parametrize("script", [SBATCH, TORCHRUN], ids=["sbatch", "torchrun"])
def test_scripts_parse_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_sbatch_directives_one_task_per_gpu_requeue_on_signal():
    directives = dict(
        re.match(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line).groups()
        for line in SBATCH.read_text().splitlines()
        if line.startswith("#SBATCH --")
    )
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # Lightning checks it
    assert "ntasks" not in directives  # Lightning refuses --ntasks
    assert directives["signal"] == "SIGUSR1@90" and "requeue" in directives
    assert directives["job-name"] not in ("bash", "interactive")  # those turn SLURM detection off
    assert directives["open-mode"] == "append"


def test_sbatch_srun_line_is_a_valid_train_config(tmp_path):
    argv = run_sbatch(tmp_path, *DATA)
    assert argv[:3] == ["--kill-on-bad-exit=1", ".venv/bin/dvos", "train"]
    overrides = dvos_overrides(argv)
    assert not any(word.startswith("ckpt_path=") for word in overrides)  # first start: nothing to resume
    cfg = load_config(overrides)
    assert cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"
    assert cfg.run_dir == "runs/slurm-4242"  # fixed by the job id: same for every rank and restart
    assert cfg.experiment == "distill_davis2017" and cfg.data.crop_size == [465, 465]
    global_batch = (
        cfg.data.batch_size
        * cfg.trainer.devices
        * cfg.trainer.num_nodes
        * cfg.trainer.accumulate_grad_batches
    )
    assert global_batch == 32


def test_sbatch_resumes_from_the_newest_checkpoint_of_the_job_folder(tmp_path):
    run_dir = tmp_path / "runs" / "slurm-4242"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA))
    assert "ckpt_path=last" in overrides  # requeued without the signal (crash, node failure)
    assert load_config(overrides).ckpt_path == "last"

    hpc = run_dir / "hpc_ckpt_1.ckpt"  # what Lightning saves on SIGUSR1 before requeueing
    hpc.write_bytes(b"x")
    later = time.time() + 5
    os.utime(hpc, (later, later))
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA))
    assert "ckpt_path=runs/slurm-4242/hpc_ckpt_1.ckpt" in overrides
    assert load_config(overrides).ckpt_path == "runs/slurm-4242/hpc_ckpt_1.ckpt"

    os.utime(last, (later + 5, later + 5))  # last.ckpt written after the resume: newer again
    assert "ckpt_path=last" in dvos_overrides(run_sbatch(tmp_path, *DATA))


def test_sbatch_run_folder_from_argument_or_environment(tmp_path):
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA, "run_dir=runs/sweeps/x/x-t00"))
    assert load_config(overrides).run_dir == "runs/sweeps/x/x-t00"
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA, RUN_DIR="runs/mine"))
    assert load_config(overrides).run_dir == "runs/mine"


def test_lightning_slurm_environment_accepts_the_job(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in {
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NAME": "dvos",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "node[01-02]",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
    }.items():
        monkeypatch.setenv(key, value)
    # SLURMEnvironment writes MASTER_ADDR / MASTER_PORT into os.environ itself: register them with
    # monkeypatch so they are removed afterwards (a leaked MASTER_ADDR=node01 hangs later DDP tests).
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert SLURMEnvironment.detect()
    environment = SLURMEnvironment()
    assert environment.auto_requeue and environment.requeue_signal.name == "SIGUSR1"
    environment.validate_settings(num_devices=4, num_nodes=2)  # devices = --ntasks-per-node
    assert environment.global_rank() == 5 and environment.local_rank() == 1 and environment.node_rank() == 1
    assert environment.main_address == "node01"
    with pytest.raises(ValueError, match="ntasks-per-node"):
        environment.validate_settings(num_devices=2, num_nodes=2)


def test_torchrun_recipe_is_a_valid_train_config(tmp_path):
    fake_bin = tmp_path / "bin"
    fake = recorder(fake_bin, "torchrun")
    run_dir = tmp_path / "runs" / "big"
    env = {k: v for k, v in os.environ.items() if k != "RUN_DIR"}
    env.update(
        TORCHRUN=str(fake), NPROC="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", RUN_DIR=str(run_dir)
    )
    result = subprocess.run(["bash", str(TORCHRUN), *DATA], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = (fake_bin / "torchrun.args").read_text().splitlines()
    assert argv[:5] == [
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=8",
        "--master-addr=node0",
        "--master-port=29500",
    ]
    assert argv[5:8] == ["-m", "dvos.cli.main", "train"]
    cfg = load_config(dvos_overrides(argv))
    assert cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2 and cfg.run_dir == str(run_dir)
    assert cfg.ckpt_path is None

    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    subprocess.run(["bash", str(TORCHRUN), *DATA], env=env, check=True, capture_output=True)
    assert "ckpt_path=last" in (fake_bin / "torchrun.args").read_text().splitlines()

    env.pop("RUN_DIR")  # several nodes need one shared folder: refused without it
    result = subprocess.run(["bash", str(TORCHRUN), *DATA], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "RUN_DIR" in result.stderr


def test_multinode_trainer_group_loads_with_every_experiment():
    for experiment in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        cfg = load_config([f"experiment={experiment.stem}", "trainer=ddp_multinode", *DATA[1:]])
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2
    cfg = load_config(["trainer=ddp", "trainer.accumulate_grad_batches=4"])
    assert cfg.trainer.accumulate_grad_batches == 4 and cfg.trainer.devices == 2


@pytest.mark.parametrize("variable", ["SLURM_PROCID", "RANK"])
def test_ranks_started_by_srun_or_torchrun_write_nothing_into_the_run_folder(tmp_path, monkeypatch, variable):
    from dvos.cli.common import RUN_DIR_ENV, start_run

    for name in ("SLURM_PROCID", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(RUN_DIR_ENV, "")  # start_run sets it: restored after the test
    run_dir = tmp_path / "runs" / "slurm-4242"
    monkeypatch.setenv(variable, "3")
    cfg = load_config([f"run_dir={run_dir}"])
    assert start_run(cfg) == run_dir and run_dir.is_dir()
    assert not list(run_dir.iterdir())  # rank 3: the folder, nothing written into it
    monkeypatch.setenv(variable, "0")
    start_run(load_config([f"run_dir={run_dir}"]))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()


def fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(f"#!/bin/bash\n{body}\n")
    (folder / name).chmod(0o755)


def max_time_of(overrides: list[str]) -> int | None:
    """trainer.max_time=DD:HH:MM:SS as seconds (None when the script set none)."""
    words = [word for word in overrides if word.startswith("trainer.max_time=")]
    if not words:
        return None
    days, hours, minutes, seconds = (int(part) for part in words[0].split("=", 1)[1].strip("'").split(":"))
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def test_sbatch_stops_training_before_the_time_limit_and_requeues_to_continue(tmp_path):
    fake_bin = tmp_path / "bin"
    # The job ends in an hour: training gets that minus TIME_MARGIN (default 600 s).
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA, SLURM_JOB_END_TIME=str(int(time.time()) + 3600)))
    assert 3000 - 5 <= max_time_of(overrides) <= 3000
    assert load_config(overrides).trainer.max_time == overrides[-len(DATA) - 1].split("=", 1)[1].strip("'")
    # Without SLURM_JOB_END_TIME, squeue's time left ([D-][HH:]MM:SS); none known: no max_time.
    fake_command(fake_bin, "squeue", 'echo "12-02:03:04"')
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA, TIME_MARGIN="4"))
    assert max_time_of(overrides) == 12 * 86400 + 7384 - 4
    assert load_config(overrides).trainer.max_time == "12:02:03:00"  # a string, not YAML's base-60 number
    fake_command(fake_bin, "squeue", 'echo "UNLIMITED"')
    assert max_time_of(dvos_overrides(run_sbatch(tmp_path, *DATA))) is None
    # the user's own trainer.max_time comes after the script's: it wins
    overrides = dvos_overrides(run_sbatch(tmp_path, *DATA, "trainer.max_time=00:01:00:00", TIME_MARGIN="4"))
    assert load_config(overrides).trainer.max_time == "00:01:00:00"

    # `dvos train` exits 75 when the budget is spent: the job requeues itself and ends well.
    fake_command(fake_bin, "srun", "exit 75")
    fake_command(fake_bin, "scontrol", f'echo "$@" > "{fake_bin}/scontrol.args"')
    result = subprocess.run(["bash", str(SBATCH), *DATA], env=slurm_env(tmp_path, fake_bin),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (fake_bin / "scontrol.args").read_text().split() == ["requeue", "4242"]
    fake_command(fake_bin, "srun", "exit 2")  # a failure is not requeued
    (fake_bin / "scontrol.args").unlink()
    result = subprocess.run(["bash", str(SBATCH), *DATA], env=slurm_env(tmp_path, fake_bin),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and not (fake_bin / "scontrol.args").exists()
