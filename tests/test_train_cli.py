"""`dvos pretrain` and `dvos train` through the real CLI with tiny configs: fast_dev_run checks, the
teacher file that pretraining writes and training loads, resuming a run killed with SIGKILL, and a
2-process DDP run (gloo on CPU) whose validation J&F is synced across ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dvos.cli.main import main
from dvos.cli.pretrain_cmd import teacher_path
from dvos.config import load_config
from dvos.models.teacher_checkpoint import load_resnet_encoder

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_STEPS = 3  # not a multiple of the smoke epoch (2 batches): the final step must be exported


@pytest.fixture(autouse=True)
def quiet_process_state(monkeypatch, one_thread):
    """In-process runs set these; give every test a clean copy (and one torch thread)."""
    for name in ("DVOS_RUN_DIR", "PL_GLOBAL_SEED"):
        monkeypatch.setenv(name, "")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    # WANDB_SERVICE: a W&B service started by an earlier in-process test would be shared by the
    # children; it keeps a SIGKILLed child's run "in use", so its resume could not reopen the run.
    # MASTER_ADDR / MASTER_PORT / RANK: a DDP child must not inherit a rendezvous of the test process.
    for name in (
        *("DVOS_RUN_DIR", "PL_GLOBAL_SEED", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "WANDB_SERVICE"),
        *("MASTER_ADDR", "MASTER_PORT", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"),
    ):
        env.pop(name, None)
    return env


def dvos_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvos.cli.main", *args]


def run_dvos(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        dvos_command(*args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`dvos pretrain experiment=smoke` once (in-process): the smoke data and its cached teacher."""
    root = tmp_path_factory.mktemp("smoke")
    args = [
        "experiment=smoke",
        f"paths.data_dir={root / 'data'}",
        f"paths.runs_dir={root / 'runs'}",
        f"pretrain.max_steps={PRETRAIN_STEPS}",
    ]
    saved = {name: os.environ.get(name) for name in ("DVOS_RUN_DIR", "PL_GLOBAL_SEED")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["pretrain", *args])
    finally:
        torch.set_num_threads(threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert code == 0
    return {"root": root, "args": args, "teacher": teacher_path(load_config(args))}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------- pretrain
def test_pretrain_writes_the_final_teacher_that_train_loads(smoke, capsys):
    teacher = smoke["teacher"]
    assert teacher.is_file() and teacher.parent == smoke["root"] / "data" / "teachers"
    payload = torch.load(teacher, map_location="cpu", weights_only=True)
    assert payload["encoder_config"]["global_step"] == PRETRAIN_STEPS  # the last step, not an epoch's end
    assert load_resnet_encoder(teacher).out_channels == 16  # smoke widths [8, 16, 16]

    code = main(["train", *smoke["args"], "trainer.fast_dev_run=true"])
    out = capsys.readouterr().out
    assert code == 0
    assert "fast_dev_run: no final evaluation" in out
    run_dir = Path(last_line(out))
    assert run_dir.parent == smoke["root"] / "runs"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["teacher"]["checkpoint"] == str(teacher)  # the cached teacher, not a new one
    assert not (run_dir / "pretrain").exists()
    assert not (run_dir / "summary.json").exists()


def test_the_student_starts_the_same_whether_its_teacher_was_just_pretrained_or_cached(
    smoke, monkeypatch, capsys
):
    """A fresh clone pretrains the teacher inside `dvos train`, a second run loads it from the cache:
    the same seed must give the same student (pretraining draws random numbers the cache does not)."""
    import random

    import numpy as np

    import dvos.cli.pretrain_cmd as pretrain_cmd
    import dvos.lit.distill as distill

    starts = []

    class Recorded(distill.DistillationModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            starts.append({k: v.clone() for k, v in self.student.state_dict().items()})

    monkeypatch.setattr(distill, "DistillationModule", Recorded)
    cached = pretrain_cmd.ensure_teacher

    def pretraining_draws(*args, **kwargs):  # what a teacher trained in this run would draw
        torch.rand(1000), np.random.rand(10), random.random()
        return cached(*args, **kwargs)

    for ensure in (cached, pretraining_draws):
        monkeypatch.setattr(pretrain_cmd, "ensure_teacher", ensure)
        assert main(["train", *smoke["args"], "trainer.fast_dev_run=true"]) == 0
    capsys.readouterr()
    assert len(starts) == 2 and starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_pretrain_fast_dev_run_never_fills_the_teacher_cache(smoke, capsys):
    args = [*smoke["args"][:-1], "pretrain.max_steps=5"]  # another cache key
    cached = teacher_path(load_config(args))
    assert not cached.exists()
    code = main(["pretrain", *args, "trainer.fast_dev_run=true"])
    assert code == 0
    written = Path(last_line(capsys.readouterr().out))
    assert written.name == "teacher-fast-dev-run.pt" and written.parent.name == "pretrain"
    assert torch.load(written, map_location="cpu", weights_only=True)["encoder_config"]["global_step"] == 1
    assert not cached.exists()  # a later real run must not pick up a one-step teacher


# ---------------------------------------------------------------------------------------- resume
RESUME_STEPS = 8


def resume_args(smoke, tmp_path) -> list[str]:
    """Steps of a few ms on one batch whose content is fixed (one video of exactly clip_len frames,
    no random augmentation): the data stream after a restart is the one of an uninterrupted run,
    so the weights can be compared exactly. (Clip sampling and augmentation state are not part of
    a checkpoint: a resumed run with random augmentation sees other clips than it would have.)"""
    return [
        "experiment=smoke",
        f"paths.data_dir={smoke['root'] / 'data'}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"data.synth.out={tmp_path / 'synthetic-resume'}",
        "data.synth.num_train=1",
        "data.synth.train_frames=3",
        "data.reverse_prob=0",
        "data.hflip_p=0",
        "data.photometric_p=0",
        "data.scale=[1.0,1.0]",
        f"teacher.checkpoint={smoke['teacher']}",
        f"trainer.max_steps={RESUME_STEPS}",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=4",
        "callbacks.checkpoint_every_n_steps=2",
    ]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_run(smoke, tmp_path):
    args = resume_args(smoke, tmp_path)
    interrupted = tmp_path / "runs" / "interrupted"
    # the uninterrupted reference and the run to kill, side by side
    reference = subprocess.Popen(
        dvos_command("train", *args, f"run_dir={tmp_path / 'runs' / 'reference'}", "logger=none"),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        dvos_command("train", *args, f"run_dir={interrupted}", "logger=wandb"),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(interrupted / "checkpoints" / "last.ckpt", victim)
        victim.send_signal(signal.SIGKILL)  # kill -9: no hook runs, nothing is flushed
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_at = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert killed_at["global_step"] in range(2, RESUME_STEPS, 2), killed_at["global_step"]

    # continue it: the run folder's config.yaml is the config, so nothing else needs repeating
    resumed = run_dvos("train", "ckpt_path=last", f"run_dir={interrupted}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr
    assert Path(last_line(resumed.stdout)) == interrupted
    assert json.loads((interrupted / "summary.json").read_text())["student"]["params"] > 0

    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]
    final = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    expected = torch.load(
        tmp_path / "runs" / "reference" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert final["global_step"] == expected["global_step"] == RESUME_STEPS
    assert set(final["state_dict"]) == set(expected["state_dict"])
    assert any(key.startswith("student_ema.") for key in final["state_dict"])
    for key, value in expected["state_dict"].items():  # student and EMA weights, bit for bit
        assert torch.equal(final["state_dict"][key], value), key
    final_optimizer, expected_optimizer = final["optimizer_states"][0], expected["optimizer_states"][0]
    for index, state in expected_optimizer["state"].items():  # AdamW moments and step counts
        for name, value in state.items():
            assert torch.equal(final_optimizer["state"][index][name], value), (index, name)
    assert final["lr_schedulers"] == expected["lr_schedulers"]

    # one W&B run continued across the restart (offline: two run folders with the same id)
    run_id = (interrupted / "wandb-id.txt").read_text().strip()
    offline_runs = sorted((interrupted / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline_runs)


# ---------------------------------------------------------------------------------------- W&B
def no_wandb_credentials_env(tmp_path: Path) -> dict[str, str]:
    """A child's environment with no W&B configuration at all (no mode, no key, empty home)."""
    env = subprocess_env()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR", "NETRC", "WANDB_BASE_URL"):
        env.pop(name, None)
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "home"), WANDB_DIR=str(tmp_path))
    return env


def wandb_train(smoke, tmp_path: Path, env: dict[str, str]) -> Path:
    """`dvos train experiment=smoke logger=wandb` that pretrains its own teacher; the run folder."""
    args = [*smoke["args"], "logger=wandb", f"paths.runs_dir={tmp_path / 'runs'}"]
    args.append(f"pretrain.output={tmp_path / 'teacher.pt'}")  # not the cached one: it pretrains
    result = subprocess.run(
        dvos_command("train", *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "teacher.pt").is_file()
    return Path(last_line(result.stdout))


def test_wandb_runs_of_one_train_are_one_group_named_typed_with_the_config_once(smoke, tmp_path):
    """Without any W&B configuration `logger.mode=auto` runs offline (no prompt); the teacher
    pretraining and the distillation are two runs of the run folder's group; the final table is in
    the distillation run."""
    from helpers_wandb import offline_runs

    run_dir = wandb_train(smoke, tmp_path, no_wandb_credentials_env(tmp_path))
    pretrain, distill = offline_runs(run_dir)
    assert pretrain.folder.parent.parent == run_dir / "pretrain" and distill.folder.parent.parent == run_dir
    assert (pretrain.name, pretrain.job_type) == (f"{run_dir.name}-pretrain", "pretrain")
    assert (distill.name, distill.job_type) == (run_dir.name, "distill")
    assert pretrain.group == distill.group == run_dir.name
    # logger.tags (the CPU recipe's, which smoke extends), then the experiment and the data
    assert pretrain.tags == distill.tags == ["cpu", "smoke", "synthetic"]
    assert (run_dir / "wandb-id.txt").read_text().strip() == distill.run_id
    assert (run_dir / "pretrain" / "wandb-id.txt").read_text().strip() == pretrain.run_id != distill.run_id
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for run in (pretrain, distill):  # the resolved config once, nested; no copy under `config`
        config = {key: value for key, value in run.config.items() if not key.startswith("_wandb")}
        assert set(config) == set(saved) | {"environment"}
        assert config["data"] == saved["data"] and config["pretrain"] == saved["pretrain"]
        assert "config" not in config and "widths" not in config  # no module hyper-parameters
    # the final table: a wandb.Table of the three methods and the same numbers under final/
    flat = json.loads((run_dir / "run_summary.json").read_text())
    for method in ("baseline", "teacher", "student"):
        for field in ("J&F", "J", "F", "fps", "params", "peak_rss_mb"):
            assert distill.summary[f"final/{method}/{field}"] == flat[f"{method}/{field}"]
    assert distill.summary["val/J&F"] == flat["val/J&F"]
    assert distill.summary["final/table/_type"] == "table-file" and distill.summary["final/table/nrows"] == 3
    table_file = next(distill.folder.glob("files/media/table/final/table_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["method", "J&F", "J", "F", "FPS", "peak memory (MB)", "params (M)"]
    assert [row[0] for row in table["data"]] == ["baseline", "teacher", "student"]
    assert table["data"][2][1] == flat["student/J&F"] and table["data"][2][4] == flat["student/fps"]
    assert table["data"][0][4] is None  # no FPS for the copy baseline
    assert "_wandb/visualize/final/J&F vs FPS" in distill.config  # its scatter plot panel


def test_wandb_agent_trial_is_one_run_with_the_agents_id(smoke, tmp_path):
    """Inside `wandb agent` (its variables set, offline) wandb uses the agent's run id for every run of
    the process: the trial's teacher pretraining logs no W&B run of its own, and wandb-id.txt holds
    the id the distillation run really has."""
    from helpers_wandb import offline_runs

    env = subprocess_env()
    env.update(WANDB_SWEEP_ID="sweep01", WANDB_RUN_ID="agentrun7")
    run_dir = wandb_train(smoke, tmp_path, env)
    (distill,) = offline_runs(tmp_path)
    assert (distill.run_id, distill.job_type, distill.group) == ("agentrun7", "distill", "sweep01")
    assert (run_dir / "wandb-id.txt").read_text().strip() == "agentrun7"
    assert not (run_dir / "pretrain" / "wandb-id.txt").exists()
    assert "final/student/J&F" in distill.summary


# ---------------------------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes_sync_the_validation_jf(smoke, tmp_path):
    """trainer=ddp with 2 gloo processes, 3 validation sequences (rank 0 scores two, rank 1 one:
    Lightning's sampler gives rank 1 a repeat of the first, which must not count twice). The val
    J&F that chose the best checkpoint equals a single-process evaluation of that checkpoint over
    all sequences, and only rank 0 writes the run folder and prints."""
    runs = tmp_path / "runs"
    args = [
        "experiment=smoke",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.data_dir={smoke['root'] / 'data'}",
        f"paths.runs_dir={runs}",
        f"data.synth.out={smoke['root'] / 'data' / 'synthetic-ddp'}",
        "data.synth.num_val=3",
        "data.clips_per_video=4",  # 2 videos × 4 clips / 2 ranks / batch 2: 2 steps per epoch
        "trainer.limit_val_batches=null",
        "callbacks.vos_results=true",
        "eval.val_refine_iterations=12",  # validation refines like the final table (the root's 12 passes)
    ]
    result = run_dvos("train", *args, timeout=240)  # about 15 s on 2 cores
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in runs.iterdir()] == [Path(last_line(result.stdout)).name]  # one folder
    run_dir = runs / Path(last_line(result.stdout)).name
    assert result.stdout.count("student ") == 1 and result.stdout.count(str(run_dir)) == 1  # rank 0 only

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    best_scores = [state["best_model_score"] for state in last["callbacks"].values() if state.get("monitor")]
    assert len(best_scores) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(best_scores[0]) == pytest.approx(summary["student"]["J&F"], abs=1e-6)

    table = json.loads((run_dir / f"val-step{2:06d}.json").read_text())
    assert [row["sequence"] for row in table["sequences"]] == [f"synth_val_{i:04d}" for i in range(3)]
    # the teacher was pretrained under DDP too (its own cache key: other data), to its last step
    teacher = teacher_path(load_config(args))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["teacher"]["checkpoint"] == str(teacher)
    assert torch.load(teacher, map_location="cpu", weights_only=True)["encoder_config"]["global_step"] == 2


def test_unusable_distill_setting_fails_before_any_run_folder_data_or_teacher(tmp_path, capsys):
    args = [f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}"]
    assert main(["train", *args, "eval.min_size=8"]) == 2
    assert (
        last_line(capsys.readouterr().err)
        == "dvos: error: eval.min_size must be at least 16 pixels (or null), got 8"
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    for setting, message in (
        ("model.attention_topk=-1", "model.attention_topk must be ≥ 0 (0: all points), got -1"),
        ("data.reference_gap=0", "data.reference_gap must be ≥ 1 (or null), got 0"),
        (
            "data.crop_size=[224]",
            "data.crop_size must be [height, width] of at least 16 pixels each, got [224]",
        ),
        (
            "data.crop_size=[224,8]",
            "data.crop_size must be [height, width] of at least 16 pixels each, got [224, 8]",
        ),
        (
            "data.scale=[0.2,0.1]",
            "data.scale must be [low, high] with 0 < low <= high <= 1 of a frame's area, got [0.2, 0.1]",
        ),
        (
            "data.scale=[0.5,1.5]",
            "data.scale must be [low, high] with 0 < low <= high <= 1 of a frame's area, got [0.5, 1.5]",
        ),
        ("eval.attention_topk=-1", "eval.attention_topk must be ≥ 0 (0: all points) or null, got -1"),
        ("eval.final_checkpoint=newest", "eval.final_checkpoint must be one of best, last, got 'newest'"),
        (
            "model.short_term_read=global",
            "model.short_term_read must be one of deformable, local, got global",
        ),
    ):
        assert main(["train", *args, setting]) == 2
        assert last_line(capsys.readouterr().err) == f"dvos: error: {message}"
        assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


# A deformable teacher small enough for a test: two DeAOT-form layers on a narrow network.
TINY_DEFORMABLE_TEACHER = [
    "teacher.deformable.model.pretrained=none",
    "teacher.deformable.model.d_model=16",
    "teacher.deformable.model.key_dim=8",
    "teacher.deformable.model.decoder_dim=8",
    "teacher.deformable.model.num_layers=2",
    "teacher.deformable.model.deform_stride=2",
]


def test_two_stages_from_one_config_and_the_deformable_teacher_is_cached(smoke, capsys):
    """`teacher=deformable`: stage 1 distils the teacher's network from the label-propagation
    teacher and caches it under data/teachers/; stage 2 distils the student from it and the table
    scores it as the teacher; a second run loads the cached network instead of training it."""
    from dvos.inference.checkpoints import load_student

    args = [*smoke["args"], "teacher=deformable", "teacher.deformable.max_steps=1", *TINY_DEFORMABLE_TEACHER]
    assert main(["train", *args, "trainer.max_steps=1"]) == 0
    out = capsys.readouterr().out
    run_dir = Path(last_line(out))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    cached = Path(config["teacher"]["deformable"]["checkpoint"])
    assert cached.parent == smoke["root"] / "data" / "teachers" and cached.name.startswith("deformable-")
    assert config["teacher"]["checkpoint"] == str(smoke["teacher"])  # stage 1's label-propagation teacher
    assert (run_dir / "teacher" / "checkpoints" / "last.ckpt").is_file()  # stage 1 ran in the run folder
    network, _ = load_student(cached, {})
    assert network.num_layers == 2 and network.d_model == 16
    teacher_row = next(line for line in out.splitlines() if line.startswith("teacher"))
    assert teacher_row.split()[-1] == f"{sum(p.numel() for p in network.parameters()) / 1e6:.2f}M"

    assert main(["train", *args, "trainer.fast_dev_run=true"]) == 0
    second = Path(last_line(capsys.readouterr().out))
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["teacher"]["deformable"]["checkpoint"] == str(cached) and not (second / "teacher").exists()


def test_summary_table_shows_no_fps_for_the_model_free_baseline():
    from dvos.inference.evaluate import format_summary

    row = {"J&F": 0.5, "J": 0.6, "F": 0.4}
    table = format_summary(
        {
            "baseline": {**row, "fps": 90000.0, "params": 0},
            "student": {**row, "fps": 7.14, "params": 5_340_000},
        }
    ).splitlines()
    assert table[1].split() == ["baseline", "0.500", "0.600", "0.400", "-", "0.00M"]
    assert table[2].split() == ["student", "0.500", "0.600", "0.400", "7.1", "5.34M"]


@pytest.mark.parametrize(
    ("choice", "expected"), [("best", "best-step000096-jf0.5000.ckpt"), ("last", "last.ckpt")]
)
def test_the_final_table_scores_the_checkpoint_that_eval_final_checkpoint_names(tmp_path, choice, expected):
    from types import SimpleNamespace

    from dvos.callbacks.checkpoints import LastCheckpoint, final_student_checkpoint

    best = SimpleNamespace(best_model_path=str(tmp_path / "best-step000096-jf0.5000.ckpt"))
    last = LastCheckpoint(tmp_path)
    last.last_model_path = str(tmp_path / "last.ckpt")
    trainer = SimpleNamespace(checkpoint_callback=best, callbacks=[best, last])
    cfg = load_config([f"eval.final_checkpoint={choice}"])
    assert final_student_checkpoint(cfg, trainer) == str(tmp_path / expected)
    # without checkpoint files (callbacks.checkpoint=false) the student in memory is scored
    bare = SimpleNamespace(checkpoint_callback=None, callbacks=[])
    assert final_student_checkpoint(cfg, bare) is None
