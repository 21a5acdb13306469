"""`dvos sweep`: W&B sweep files expanded offline (grid, seeded random, bayes → random), dot-key
overrides reaching the config, a crashed trial recorded while the sweep goes on, and a real offline
sweep of `dvos train` trials (each its own W&B run in the group of its sweep run) ranked by val/J&F."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dvos import sweeps
from dvos.cli.main import main
from dvos.config import load_config
from dvos.utils.errors import DvosError
from dvos.utils.run_summary import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[1]
# experiment=smoke cut further for the default test run: a one-step epoch (then validation), two-frame
# clips, a short teacher context.
FAST = ["trainer.limit_train_batches=1", "data.clip_len=2", "teacher.n_recent=1"]
TRIAL_ENV = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
TRIAL_ENV["WANDB_MODE"] = "offline"
SWEEPS = REPO / "experiments" / "sweeps"


def write_sweep(path: Path, **content) -> Path:
    sweep = {
        "method": "grid",
        "metric": {"name": "val/J&F", "goal": "maximize"},
        "command": ["${env}", "dvos", "train", "${args_no_hyphens}"],
        **content,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_every_sweep_file_is_a_valid_sweep_whose_trials_load(tmp_path):
    files = sorted(SWEEPS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"distill_losses", "deformable", "learning_rate"}
    swept = set()
    for path in files:
        spec = sweeps.load_sweep(path)
        assert spec.metric == "val/J&F" and spec.goal == "maximize"
        assert "${args_no_hyphens}" in spec.command and spec.command[1:3] == ["dvos", "train"]
        # a small budget by default: the trials of every file run on a CPU
        assert spec.parameters["experiment"] == {"value": "sweep_cpu"}
        swept |= set(spec.swept_keys)
        trials = sweeps.prepare_trials(spec, tmp_path / spec.name, sweeps.expand_trials(spec, count=2), [])
        assert len(trials) == 2
    assert {
        "distill.lambda_att",
        "distill.lambda_inter",
        "distill.lambda_intra",
        "distill.tau",
        "model.deform_stride",
        "model.offset_range",
        "optim.lr",
    } <= swept
    assert {sweeps.load_sweep(p).method for p in files} == {"grid", "random", "bayes"}


def test_grid_expansion_every_combination_last_key_fastest():
    spec = sweeps.load_sweep(SWEEPS / "deformable.yaml")
    assert sweeps.grid_size(spec) == 9
    trials = sweeps.expand_trials(spec)
    assert len(trials) == 9
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 9
    assert trials[0] == {"experiment": "sweep_cpu", "model.deform_stride": 1, "model.offset_range": 2.0}
    assert trials[1]["model.offset_range"] == 4.0 and trials[3]["model.deform_stride"] == 2
    assert sweeps.expand_trials(spec, count=4) == trials[:4]


def test_random_expansion_is_repeatable_for_a_seed_and_stays_in_range():
    spec = sweeps.load_sweep(SWEEPS / "distill_losses.yaml")
    first = sweeps.expand_trials(spec, count=6, seed=3)
    assert first == sweeps.expand_trials(spec, count=6, seed=3)
    assert first != sweeps.expand_trials(spec, count=6, seed=4)
    assert len(sweeps.expand_trials(spec)) == spec.run_cap  # no --count: the file's run_cap
    for trial in first:
        assert 0.5 <= trial["distill.tau"] <= 4.0
        assert trial["distill.lambda_att"] in (0.25, 0.5, 1.0, 2.0)
        assert trial["distill.lambda_inter"] in (0.5, 1.0, 2.0)


def test_distributions_and_value_formatting():
    import random

    rng = random.Random(0)
    draw = sweeps.sample_parameter
    assert draw({"value": 3}, rng) == 3
    assert all(1 <= draw({"min": 1, "max": 3}, rng) <= 3 for _ in range(20))  # int_uniform inferred
    assert all(isinstance(draw({"min": 1, "max": 3}, rng), int) for _ in range(5))
    assert all(
        1e-4 <= draw({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, rng) <= 1e-2
        for _ in range(20)
    )
    assert draw({"distribution": "q_uniform", "min": 0, "max": 10, "q": 5}, rng) in (0, 5, 10)
    words = sweeps.parameter_words({"a.b": 1e-5, "c": True, "d": None, "e": [224, 224], "f": "x"})
    assert words == ["a.b=1e-05", "c=true", "d=null", "e=[224,224]", "f=x"]
    from omegaconf import OmegaConf

    assert OmegaConf.from_dotlist(words[:4]) == {"a": {"b": 1e-5}, "c": True, "d": None, "e": [224, 224]}


def test_dot_key_overrides_reach_the_config_and_command_line_words_win(tmp_path):
    spec = sweeps.load_sweep(SWEEPS / "distill_losses.yaml")
    parameters = sweeps.expand_trials(spec, count=3, seed=1)
    trials = sweeps.prepare_trials(spec, tmp_path / "sweep", parameters, ["trainer.max_steps=3"])
    for trial in trials:
        cfg = load_config(trial.overrides)
        assert cfg.experiment == "sweep_cpu"
        for key in spec.swept_keys:
            section, name = key.split(".")
            assert cfg[section][name] == pytest.approx(trial.parameters[key])
        assert cfg.logger.group == "sweep"  # the sweep folder's name: one W&B group per sweep run
        assert cfg.run_dir == str(tmp_path / "sweep" / trial.name) and cfg.name == trial.name
        assert cfg.trainer.max_steps == 3  # the extra word comes last
    again = sweeps.prepare_trials(spec, tmp_path / "sweep-2", parameters, [])  # the same file again
    assert {load_config(trial.overrides).logger.group for trial in again} == {"sweep-2"}


def test_bad_sweep_files_fail_in_one_line(tmp_path, capsys):
    cases = {
        "method.yaml": {"method": "hyperband", "parameters": {"optim.lr": {"values": [1e-4]}}},
        "grid.yaml": {"parameters": {"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 0.2}}},
        "key.yaml": {"parameters": {"optim.lrr": {"values": [1e-4, 2e-4]}}},
        "value.yaml": {"parameters": {"optim.lr": {"values": ["fast"]}}},
        "dist.yaml": {"method": "random", "parameters": {"optim.lr": {"distribution": "beta"}}},
    }
    expected = {
        "method.yaml": "'method' must be one of",
        "grid.yaml": "grid sweeps need 'values'",
        "key.yaml": "unknown config key 'optim.lrr'",
        "value.yaml": "bad value for config key 'optim.lr'",
        "dist.yaml": "distribution 'beta' is not supported",
    }
    for name, content in cases.items():
        path = write_sweep(tmp_path / name, **content)
        assert main(["sweep", str(path), "--dry-run", f"paths.runs_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dvos: error:") and expected[name] in err[0], err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "sweep file not found" in capsys.readouterr().err


def test_bayes_falls_back_to_random_offline_with_a_warning(tmp_path, capsys):
    code = main(["sweep", str(SWEEPS / "learning_rate.yaml"), "--count", "3", "--dry-run", "--mode", "offline",
                 f"paths.runs_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    out, err = capsys.readouterr()
    assert "bayes search needs the W&B sweep server" in err and "random search" in err
    commands = [line for line in out.splitlines() if line.startswith("dvos train ")]
    assert len(commands) == 3 and all(
        "optim.lr=" in line and re.search(r"logger\.group=\d{8}-\d{6}-learning-rate ", line)
        for line in commands
    )
    assert not (tmp_path / "sweeps").exists()  # a dry run creates nothing


def test_online_mode_sends_the_file_to_wandb_with_extra_words(tmp_path):
    spec = sweeps.load_sweep(SWEEPS / "deformable.yaml")
    config = sweeps.online_sweep_config(spec, ["data.root=/data/DAVIS"])
    assert config["method"] == "grid" and config["metric"] == {"name": "val/J&F", "goal": "maximize"}
    assert config["command"] == ["${env}", "dvos", "train", "${args_no_hyphens}", "data.root=/data/DAVIS"]
    assert config["parameters"]["model.deform_stride"] == {"values": [1, 2, 4]}


def fake_launcher(metrics: dict[str, float | None], fail: set[str], calls: list[str]):
    """A launcher that writes a run_summary.json like `dvos train` would, or fails."""

    def launch(overrides, log_path, verbose):
        name = next(word.split("=", 1)[1] for word in overrides if word.startswith("name="))
        run_dir = Path(next(word.split("=", 1)[1] for word in overrides if word.startswith("run_dir=")))
        calls.append(name)
        log_path.write_text(f"$ dvos train {' '.join(overrides)}\n")
        if name in fail:
            log_path.write_text(log_path.read_text() + "Traceback ...\nRuntimeError: boom in the middle\n")
            return 1
        run_dir.mkdir(parents=True)
        value = metrics[name]
        (run_dir / SUMMARY_FILE).write_text(json.dumps({} if value is None else {"val/J&F": value}))
        return 0

    return launch


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    path = write_sweep(
        tmp_path / "s.yaml", name="s", parameters={"distill.tau": {"values": [1.0, 2.0, 3.0, 4.0]}}
    )
    spec = sweeps.load_sweep(path)
    sweep_dir = tmp_path / "sweep"
    trials = sweeps.prepare_trials(spec, sweep_dir, sweeps.expand_trials(spec), [])
    calls: list[str] = []
    launcher = fake_launcher({"s-t00": 0.5, "s-t02": 0.7, "s-t03": None}, {"s-t01"}, calls)
    sweeps.run_trials(spec, trials, sweep_dir, method="grid", seed=0, launcher=launcher)
    assert calls == ["s-t00", "s-t01", "s-t02", "s-t03"]  # the sweep went on after t01 crashed
    out = capsys.readouterr().out
    assert "FAILED (exit 1)" in out and "RuntimeError: boom in the middle" in out
    ranking = json.loads((sweep_dir / "ranking.json").read_text())
    rows = [(row["trial"], row["status"], row["rank"], row["metric"]) for row in ranking["trials"]]
    assert rows == [
        ("s-t02", "finished", 1, 0.7),
        ("s-t00", "finished", 2, 0.5),
        ("s-t03", "finished", None, None),
        ("s-t01", "failed", None, None),
    ]
    assert ranking["metric"] == {"name": "val/J&F", "goal": "maximize"}
    table = sweeps.format_ranking(spec, trials).splitlines()
    assert table[1].split()[:4] == ["1", "s-t02", "finished", "0.7000"]
    assert table[-1].split()[:3] == ["-", "s-t01", "failed"]


def test_a_launcher_error_or_minimize_goal(tmp_path):
    path = write_sweep(
        tmp_path / "m.yaml", name="m", metric={"name": "val/J&F", "goal": "minimize"},
        parameters={"distill.tau": {"values": [1.0, 2.0, 3.0]}},
    )  # fmt: skip
    spec = sweeps.load_sweep(path)
    trials = sweeps.prepare_trials(spec, tmp_path / "sweep", sweeps.expand_trials(spec), [])
    good = fake_launcher({"m-t00": 0.5, "m-t02": 0.2}, set(), [])

    def launcher(overrides, log_path, verbose):
        if "name=m-t01" in overrides:
            raise OSError("cannot start the process")
        return good(overrides, log_path, verbose)

    sweeps.run_trials(spec, trials, tmp_path / "sweep", method="grid", seed=0, launcher=launcher)
    assert [t.status for t in trials] == ["finished", "failed", "finished"]
    assert "cannot start the process" in trials[1].error
    assert [t.name for t in sweeps.rank_trials(trials, spec.goal)] == ["m-t02", "m-t00", "m-t01"]


def test_offline_sweep_through_the_real_train_command(tmp_path):
    """Two real `dvos train` trials (tiny configs), each its own offline W&B run in the group of this
    sweep run (its folder's name, not the file's), ranked by val/J&F; then `dvos compare` on the
    sweep folder."""
    from helpers_wandb import offline_runs

    path = write_sweep(
        tmp_path / "tiny.yaml",
        name="tiny",
        parameters={"experiment": {"value": "smoke"}, "distill.tau": {"values": [1.0, 2.0]}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "dvos.cli.main", "sweep", str(path), "--mode", "offline", "logger=wandb",
         "--threads", "1",  # on a small shared CPU torch's thread pool spinning made trials 10x slower
         *FAST, f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=TRIAL_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "runs" / "sweeps").iterdir()
    assert sweep_dir.name.endswith("-tiny")
    ranking = json.loads((sweep_dir / "ranking.json").read_text())
    assert [row["status"] for row in ranking["trials"]] == ["finished", "finished"]
    assert [row["rank"] for row in ranking["trials"]] == [1, 2]
    metrics = [row["metric"] for row in ranking["trials"]]
    assert metrics == sorted(metrics, reverse=True) and all(0.0 <= m <= 1.0 for m in metrics)
    assert "ranking by val/J&F" in result.stdout and "2 finished, 0 failed" in result.stdout
    for tau, name in ((1.0, "tiny-t00"), (2.0, "tiny-t01")):
        run_dir = sweep_dir / name
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["distill"]["tau"] == tau and config["logger"]["group"] == sweep_dir.name
        assert config["logger"]["enabled"] and config["experiment"] == "smoke"
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        assert {"student/J&F", "teacher/J&F", "baseline/J&F", "student/fps", "val/J&F"} <= summary.keys()
        # its own offline W&B run (the first trial also has one under pretrain/: it pretrained the
        # teacher), all in the sweep run's group
        runs = {run.job_type: run for run in offline_runs(run_dir)}
        assert set(runs) == ({"pretrain", "distill"} if name == "tiny-t00" else {"distill"})
        assert runs["distill"].name == name and runs["distill"].group == sweep_dir.name
        assert runs["distill"].run_id == (run_dir / "wandb-id.txt").read_text().strip()
        assert runs["distill"].summary["final/student/J&F"] == summary["student/J&F"]
        assert runs["distill"].config["distill"]["tau"] == tau and "smoke" in runs["distill"].tags
        if "pretrain" in runs:
            assert (runs["pretrain"].name, runs["pretrain"].group) == (f"{name}-pretrain", sweep_dir.name)
        assert (sweep_dir / "logs" / f"{name}.log").read_text().startswith("$ dvos train ")

    out = tmp_path / "compare"
    assert main(["compare", str(sweep_dir), "--out", str(out)]) == 0
    data = json.loads((out / "comparison.json").read_text())
    assert [run["name"] for run in data["runs"]] == [row["trial"] for row in ranking["trials"]]
    assert data["differing_keys"] == ["distill.tau"]
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "comparison.html").is_file()


def test_real_sweep_with_a_trial_that_crashes_at_run_time(tmp_path):
    """The real command: a trial that fails after its run started (a missing teacher file) is
    recorded as failed; the next one still runs and is ranked."""
    path = write_sweep(
        tmp_path / "crash.yaml",
        name="crash",
        parameters={
            "experiment": {"value": "smoke"},
            "teacher.checkpoint": {"values": [str(tmp_path / "no-such-teacher.pt"), None]},
        },
    )
    result = subprocess.run(
        [sys.executable, "-m", "dvos.cli.main", "sweep", str(path), "--mode", "offline", "--threads", "1",
         *FAST, f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=TRIAL_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 finished, 1 failed" in result.stdout and "no-such-teacher.pt" in result.stdout
    (sweep_dir,) = (tmp_path / "runs" / "sweeps").iterdir()
    rows = json.loads((sweep_dir / "ranking.json").read_text())["trials"]
    assert [(row["trial"], row["status"], row["rank"]) for row in rows] == [
        ("crash-t01", "finished", 1),
        ("crash-t00", "failed", None),
    ]
    assert rows[1]["returncode"] == 2 and "teacher checkpoint not found" in rows[1]["error"]


def test_sweep_that_only_fails_exits_1(tmp_path, monkeypatch):
    path = write_sweep(tmp_path / "f.yaml", name="f", parameters={"distill.tau": {"values": [1.0]}})
    monkeypatch.setattr(sweeps, "launch", fake_launcher({}, {"f-t00"}, []))
    assert main(["sweep", str(path), "--mode", "offline", "--out", str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "sweep.yaml").is_file()
    with pytest.raises(DvosError, match="needs a number of trials"):
        sweeps.expand_trials(
            sweeps.load_sweep(
                write_sweep(
                    tmp_path / "r.yaml", method="random", parameters={"optim.lr": {"min": 0.1, "max": 0.2}}
                )
            )
        )


def test_online_mode_creates_the_sweep_and_starts_the_agent(tmp_path, monkeypatch):
    import wandb

    created, started = {}, {}

    def fake_sweep(sweep, project=None, entity=None):
        created.update(sweep=sweep, project=project, entity=entity)
        return "abc123"

    def fake_call(command, env=None):
        started.update(command=command, env=env)
        return 0

    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(sweeps.subprocess, "call", fake_call)
    code = main(["sweep", str(SWEEPS / "deformable.yaml"), "--mode", "online", "--count", "2",
                 "logger.project=vos", f"paths.runs_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    assert created["project"] == "vos" and created["sweep"]["name"] == "deformable"
    extra = ["logger.project=vos", f"paths.runs_dir={tmp_path}"]
    assert created["sweep"]["command"] == ["${env}", "dvos", "train", "${args_no_hyphens}", *extra]
    assert Path(started["command"][0]).name == "wandb"
    assert started["command"][1:] == ["agent", "vos/abc123", "--count", "2"]
    assert started["env"]["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # finds `dvos`

    monkeypatch.setattr(wandb, "sweep", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("No API key")))
    with pytest.raises(DvosError, match="could not create the sweep .No API key.*--mode offline"):
        sweeps.run_online(sweeps.load_sweep(SWEEPS / "deformable.yaml"), [], count=None, cfg=load_config([]))
