"""Training runs that must not lose or mix work, through the real `dvos train` command: a finished
run folder is never written into by a new run; SIGTERM and SIGINT stop training with a checkpoint,
exit 143 / 130 and print the command that resumes; `trainer.max_time` stops with 75; a resume
names a checkpoint that is not a dvos training checkpoint; a full disk while writing a checkpoint
or the config is one line; a run that fails leaves no folder that looks like a run. Each case checks
the exit status, the one `dvos:` line and that the files there before are byte-identical after.

A full disk is simulated in-process (tests/helpers_disk.py): writes through `dvos.utils.io` keep half
their bytes and then raise `OSError(ENOSPC)`.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_disk import fill_disk

from dvos.cli.main import main
from dvos.utils.runs import FAILED_MARKER

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def quiet_process_state(monkeypatch, one_thread):
    """In-process runs set these; give every test a clean copy (and one torch thread)."""
    for name in ("DVOS_RUN_DIR", "PL_GLOBAL_SEED"):
        monkeypatch.setenv(name, "")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke data, its pretrained teacher and one finished run (in-process, once)."""
    root = tmp_path_factory.mktemp("runs-smoke")
    args = ["experiment=smoke", f"paths.data_dir={root / 'data'}", f"paths.runs_dir={root / 'runs'}"]
    saved = {name: os.environ.get(name) for name in ("DVOS_RUN_DIR", "PL_GLOBAL_SEED")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *args, f"run_dir={root / 'runs' / 'finished'}"]) == 0
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    teacher = next((root / "data" / "teachers").glob("*.pt"))
    return {
        "root": root,
        "args": [*args, f"teacher.checkpoint={teacher}"],
        "finished": root / "runs" / "finished",
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code: int, expected_status: int) -> str:
    """The command's exit status and its single `dvos:` line on stderr."""
    err = capsys.readouterr().err
    assert code == expected_status, err[-2000:]
    lines = [
        line
        for line in err.splitlines()
        if line.startswith(("dvos: error: ", "dvos: stopped", "dvos: trainer."))
    ]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def copy_run(smoke, tmp_path) -> Path:
    """A copy of the finished run in a runs folder of its own (the original stays untouched)."""
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(smoke["finished"], copy)
    return copy


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


# ------------------------------------------------------------------------------------ run folders
def test_a_new_run_never_writes_into_an_existing_run_folder(smoke, capsys):
    finished = smoke["finished"]
    before = snapshot(finished)
    line = one_line(capsys, main(["train", *smoke["args"], "seed=5", f"run_dir={finished}"]), 2)
    assert line == (
        f"dvos: error: run_dir {finished} already holds a run: a new run needs a new or empty folder "
        f"(to continue that run: dvos train ckpt_path=last run_dir={finished})"
    )
    line = one_line(capsys, main(["pretrain", *smoke["args"], f"run_dir={finished}"]), 2)
    assert f"run_dir {finished} already holds a run" in line
    assert snapshot(finished) == before


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(smoke, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "other").mkdir(parents=True)
    (runs / "other" / "notes.txt").write_text("an earlier run's file")
    before = snapshot(runs)
    run_dir = runs / "bad-data"
    code = main(["train", *smoke["args"], f"paths.runs_dir={runs}", f"run_dir={run_dir}",
                 f"data.train_root={tmp_path / 'nowhere'}"])  # fmt: skip
    line = one_line(capsys, code, 2)
    assert line == (
        f"dvos: error: {tmp_path / 'nowhere'}: video folder not found; "
        f"no checkpoint yet: run folder {run_dir} removed"
    )
    assert not run_dir.exists() and snapshot(runs) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.devices=0", "trainer.devices must be a count ≥ 1, -1 (all), auto, or a list of device ids, got 0"),
        ("data.batch_size=0", "data.batch_size must be ≥ 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be ≥ 0, got -1"),
        ("optim.lr=-1", "optim.lr must be > 0, got -1"),
        ("model.d_model=30", "model.d_model (30) must be divisible by model.num_heads (4)"),
        ("logger.mode=onlin", "logger.mode must be one of auto, online, offline, disabled, got 'onlin'"),
        ("trainer.strategy=nonsense", "trainer: You selected an invalid strategy name: `strategy='nonsense'`. "
         "It must be either a string or an instance of `lightning.pytorch.strategies.Strategy`. Example "
         "choices: auto, ddp, ddp_spawn, deepspeed, ... Find a complete list of options in our documentation "
         "at https://lightning.ai"),
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu: this machine has no CUDA GPU (use "
         "trainer.accelerator=cpu or auto)"),
    ],
)  # fmt: skip
def test_a_bad_value_fails_in_one_line_before_any_run_folder_or_data(tmp_path, capsys, override, message):
    if override.startswith("trainer.accelerator") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["experiment=smoke", f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}"]
    assert one_line(capsys, main(["train", *args, override]), 2) == f"dvos: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_that_fails_keeps_its_files_and_is_marked_failed(smoke, tmp_path, capsys):
    copy = copy_run(smoke, tmp_path)
    hpc = copy / "hpc_ckpt_1.ckpt"  # what Lightning saves on SLURM's signal; no last.ckpt yet
    (copy / "checkpoints" / "last.ckpt").rename(hpc)
    before = snapshot(copy)
    code = main(["train", *smoke["args"], f"ckpt_path={hpc}", f"run_dir={copy}",
                 f"data.train_root={tmp_path / 'nowhere'}"])  # fmt: skip
    line = one_line(capsys, code, 2)
    assert (
        line
        == f"dvos: error: {tmp_path / 'nowhere'}: video folder not found; run folder {copy} marked FAILED"
    )
    after = snapshot(copy)
    resumed = {"config.yaml", "environment.json"}  # a resume writes these anew
    assert all(after[name] == data for name, data in before.items() if name not in resumed)


# ------------------------------------------------------------------------------------ signals
def wait_for(path: Path, alive, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert alive(), f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def long_run(smoke, run_dir: Path) -> list[str]:
    """A run far longer than the test waits, writing last.ckpt every 2 steps."""
    return [*smoke["args"], f"run_dir={run_dir}", "trainer.max_steps=500", "trainer.max_epochs=-1",
            "trainer.limit_train_batches=null", "callbacks.checkpoint_every_n_steps=2"]  # fmt: skip


def test_sigterm_stops_training_with_a_checkpoint_and_the_command_that_resumes(smoke, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "term"
    env = {
        k: v for k, v in os.environ.items() if k not in ("DVOS_RUN_DIR", "PL_GLOBAL_SEED", "WANDB_SERVICE")
    }
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "dvos.cli.main", "train", *long_run(smoke, run_dir)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", lambda: process.poll() is None)
        written = snapshot(run_dir)
        process.send_signal(signal.SIGTERM)  # what `timeout`, `docker stop` and schedulers send
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = step_of(run_dir / "checkpoints" / "last.ckpt")
    assert (
        line
        == f"dvos: stopped by SIGTERM at step {step}; resume with: dvos train ckpt_path=last run_dir={run_dir}"
    )
    assert step >= 2 and "J&F" not in out  # stopped: no final table
    for name in ("config.yaml", "environment.json"):
        assert (run_dir / name).read_bytes() == written[name]

    # A job killed while writing a checkpoint leaves a hidden temporary: the resume removes it.
    stale = run_dir / "checkpoints" / ".last.ckpt.k1ll3d.tmp"
    stale.touch()
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["dvos", "train"]
    assert main([*resume[1:], f"trainer.max_steps={step + 2}"]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == run_dir
    assert not stale.exists() and step_of(run_dir / "checkpoints" / "last.ckpt") == step + 2


def test_sigint_stops_training_with_a_checkpoint_and_exit_130(smoke, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "int"
    done = threading.Event()

    def press_ctrl_c():
        try:
            wait_for(run_dir / "checkpoints" / "last.ckpt", lambda: not done.is_set())
        except AssertionError:
            return
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=press_ctrl_c, daemon=True)
    sender.start()
    try:
        code = main(["train", *long_run(smoke, run_dir)])
    finally:
        done.set()
        sender.join()
    line = one_line(capsys, code, 130)
    step = step_of(run_dir / "checkpoints" / "last.ckpt")
    assert (
        line
        == f"dvos: stopped by SIGINT at step {step}; resume with: dvos train ckpt_path=last run_dir={run_dir}"
    )
    assert not (run_dir / FAILED_MARKER).exists() and not (run_dir / "summary.json").exists()


def test_max_time_stops_with_a_checkpoint_and_exit_75_and_a_resume_gets_a_new_budget(smoke, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "budget"
    args = [*long_run(smoke, run_dir), "trainer.max_time=00:00:00:01", "trainer.check_val_every_n_epoch=1000"]
    line = one_line(capsys, main(["train", *args]), 75)
    step = step_of(run_dir / "checkpoints" / "last.ckpt")
    assert (
        line
        == f"dvos: trainer.max_time spent at step {step}; resume with: dvos train ckpt_path=last run_dir={run_dir}"
    )
    assert not (run_dir / "summary.json").exists()  # unfinished: no final table
    # the resumed job's clock starts at zero: it trains on for its own second
    line = one_line(capsys, main(["train", "ckpt_path=last", f"run_dir={run_dir}"]), 75)
    later = step_of(run_dir / "checkpoints" / "last.ckpt")
    assert later > step and line.startswith(f"dvos: trainer.max_time spent at step {later};")


# ------------------------------------------------------------------------------------ resuming
def test_resume_names_a_file_that_is_not_a_dvos_training_checkpoint(smoke, tmp_path, capsys):
    teacher = Path(smoke["args"][-1].split("=", 1)[1])
    line = one_line(capsys, main(["train", *smoke["args"], f"ckpt_path={teacher}"]), 2)
    assert line == (
        f"dvos: error: ckpt_path: {teacher} is not a dvos training checkpoint: a teacher file "
        "(give it as teacher.checkpoint=...)"
    )
    copy = copy_run(smoke, tmp_path)
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    before = snapshot(copy)
    line = one_line(capsys, main(["train", "ckpt_path=last", f"run_dir={copy}"]), 2)
    assert line.startswith(f"dvos: error: ckpt_path: cannot read {last} (truncated or damaged? ")
    assert snapshot(copy) == before


# ------------------------------------------------------------------------------------ full disk
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one(
    smoke, tmp_path, capsys, monkeypatch
):
    copy = copy_run(smoke, tmp_path)
    last = copy / "checkpoints" / "last.ckpt"
    before = snapshot(copy)
    fill_disk(monkeypatch, "last.ckpt")
    more = [f"trainer.max_steps={step_of(last) + 2}", "trainer.max_epochs=-1"]
    code = main(["train", "ckpt_path=last", f"run_dir={copy}", *more])
    line = one_line(capsys, code, 2)
    assert line == (
        f"dvos: error: cannot write {last}: No space left on device; run folder {copy} marked {FAILED_MARKER}"
    )
    after = snapshot(copy)
    assert after["checkpoints/last.ckpt"] == before["checkpoints/last.ckpt"]  # the earlier one, whole
    resumed = {"config.yaml", "environment.json"}  # a resume writes these anew
    assert all(after[name] == data for name, data in before.items() if name not in resumed)
    assert not [name for name in after if Path(name).name.startswith(".")]  # no temporary left
    assert after[FAILED_MARKER].decode().startswith("cannot write")

    # a run marked failed is not "the newest run" of ckpt_path=last (nor of segment / evaluate)
    monkeypatch.undo()
    line = one_line(capsys, main(["train", "ckpt_path=last", f"paths.runs_dir={copy.parent}"]), 2)
    assert line.startswith(
        f"dvos: error: ckpt_path=last: no run under {copy.parent}/ has checkpoints/last.ckpt"
    )
    # named, it continues (the disk has room again), and is no longer marked
    assert main(["train", "ckpt_path=last", f"run_dir={copy}", *more]) == 0
    assert not (copy / FAILED_MARKER).exists() and step_of(last) == int(more[0].split("=")[1])


def test_a_full_disk_while_writing_the_config_removes_the_new_run_folder(
    smoke, tmp_path, capsys, monkeypatch
):
    run_dir = tmp_path / "runs" / "full"
    fill_disk(monkeypatch, "config.yaml")
    line = one_line(capsys, main(["train", *smoke["args"], f"run_dir={run_dir}"]), 2)
    assert line == (
        f"dvos: error: cannot write {run_dir / 'config.yaml'}: No space left on device; "
        f"no checkpoint yet: run folder {run_dir} removed"
    )
    assert not run_dir.exists()
