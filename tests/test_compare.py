"""`dvos compare` on offline run folders (table, PNG, HTML, JSON) and the summary keys every run
publishes (`run_summary.json` and the W&B run summary, rank 0 only)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dvos import compare
from dvos.cli.main import main
from dvos.config import load_config, to_dict
from dvos.utils.run_summary import SUMMARY_FILE, flat_summary, publish_run_summary


def summary_table(jf: float, fps: float) -> dict:
    row = {"J&F": jf, "J": jf - 0.01, "F": jf + 0.01, "fps": fps, "params": 5_300_000, "peak_rss_mb": 900.0}
    return {
        "baseline": {**row, "J&F": 0.5, "fps": 9000.0, "params": 0},
        "teacher": {**row, "J&F": 0.6, "fps": 3.0, "params": 2_000_000},
        "student": row,
    }


def make_run(folder: Path, overrides: list[str], jf: float, fps: float, *, flat: bool = True) -> Path:
    """A run folder as `dvos train` leaves it: config.yaml, summary.json (+ run_summary.json)."""
    folder.mkdir(parents=True)
    cfg = load_config(
        ["data.root=/data/DAVIS", "data.train_root=/data/videos", f"run_dir={folder}", *overrides]
    )
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    table = summary_table(jf, fps)
    (folder / "summary.json").write_text(json.dumps(table))
    if flat:
        (folder / SUMMARY_FILE).write_text(
            json.dumps(flat_summary(table, val_best=jf + 0.02, global_step=100))
        )
    return folder


def test_compare_two_offline_runs_writes_table_png_and_html(tmp_path, capsys):
    first = make_run(tmp_path / "runs" / "a-run", ["distill.tau=1.0", "logger.group=g"], 0.61, 40.0)
    second = make_run(
        tmp_path / "runs" / "b-run", ["distill.tau=2.0", "model.deform_stride=4"], 0.64, 35.0, flat=False
    )
    out = tmp_path / "out"
    assert main(["compare", str(first), str(second), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert "a-run" in lines[0] and "b-run" in lines[0]
    jf = next(line for line in lines if line.startswith("J&F"))
    assert jf.split()[1:] == ["0.6100", "0.6400*"]
    fps = next(line for line in lines if line.startswith("FPS"))
    assert fps.split()[-2:] == ["40.0*", "35.0"]
    assert any(line.startswith("parameters") and "5.30" in line for line in lines)
    assert any(line.startswith("peak memory") for line in lines)
    for key in ("distill.tau", "model.deform_stride", "logger.group"):
        assert any(line.startswith(key) for line in lines), key
    assert not any(line.startswith(("run_dir", "name ", "paths.")) for line in lines)

    image = Image.open(out / "comparison.png")
    assert image.format == "PNG" and image.size[0] == 1400 and image.size[1] > 400
    colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 20  # bars, text, colours: not a blank canvas
    page = (out / "comparison.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and 'src="comparison.png"' in page
    assert "a-run" in page and "b-run" in page and "distill.tau" in page and "<b>0.6400</b>" in page
    data = json.loads((out / "comparison.json").read_text())
    assert [run["name"] for run in data["runs"]] == ["a-run", "b-run"]
    by_key = {metric["key"]: metric for metric in data["metrics"]}
    assert by_key["J&F"]["best"] == 1 and by_key["fps"]["best"] == 0
    assert by_key["params"]["best"] is None  # equal: nothing to choose
    assert data["differing_values"]["distill.tau"] == [1.0, 2.0]
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_compare_teacher_rows_and_folders_of_runs_with_a_group(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "one", ["logger.group=deformable", "model.deform_stride=1"], 0.5, 10.0)
    make_run(runs / "two", ["logger.group=deformable", "model.deform_stride=2"], 0.7, 12.0)
    make_run(runs / "other", ["logger.group=else"], 0.9, 12.0)
    (runs / "crashed").mkdir()
    (runs / "crashed" / "config.yaml").write_text("name: crashed\n")  # no results: left out
    out = tmp_path / "out"
    assert main(["compare", str(runs), "--group", "deformable", "--model", "teacher", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) outside group 'deformable' left out" in printed
    data = json.loads((out / "comparison.json").read_text())
    assert [run["name"] for run in data["runs"]] == ["one", "two"]
    assert data["model"] == "teacher" and data["metrics"][0]["values"] == [0.6, 0.6]
    assert data["differing_keys"] == ["model.deform_stride"]


def test_compare_a_sweep_folder_follows_its_ranking(tmp_path):
    sweep = tmp_path / "runs" / "sweeps" / "20260101-000000-s"
    make_run(sweep / "s-t00", ["distill.tau=1.0"], 0.4, 10.0)
    make_run(sweep / "s-t01", ["distill.tau=2.0"], 0.8, 10.0)
    (sweep / "s-t02").mkdir()  # the failed trial
    trials = [{"trial": f"s-t0{i}", "run_dir": str(Path("elsewhere") / f"s-t0{i}")} for i in (1, 2, 0)]
    (sweep / "ranking.json").write_text(json.dumps({"trials": trials}))
    assert [path.name for path in compare.find_run_folders(sweep)] == ["s-t01", "s-t00"]
    runs, _ = compare.offline_runs([tmp_path / "runs"], None)
    assert [run.name for run in runs] == ["s-t01", "s-t00"]


def test_compare_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no runs to compare" in err[0]
    assert main(["compare", str(tmp_path / "missing"), "--mode", "offline"]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_flat_summary_keys_are_the_same_for_every_run():
    flat = flat_summary(summary_table(0.5, 20.0), val_best=torch.tensor(0.55), val_last=0.5, global_step=7)
    expected = {f"{model}/{field}" for model in ("student", "teacher", "baseline")
                for field in ("J&F", "J", "F", "fps", "params", "peak_rss_mb")}  # fmt: skip
    assert set(flat) == expected | {"val/J&F", "val/J&F_last", "trainer/global_step"}
    assert flat["val/J&F"] == pytest.approx(0.55) and flat["val/J&F_last"] == 0.5
    assert isinstance(flat["val/J&F"], float) and flat["trainer/global_step"] == 7
    # no validation: no val keys; a missing model row: no keys for it
    partial = flat_summary({"student": summary_table(0.5, 1.0)["student"]})
    assert set(partial) == {key for key in expected if key.startswith("student/")}


def test_publish_run_summary_updates_wandb_summary_on_rank_zero_only(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class RecordingWandbLogger(WandbLogger):
        """A WandbLogger whose run is a plain object (no wandb process in the test)."""

        def __init__(self):
            super().__init__(project="test", mode="disabled")
            self.logged = []
            self.run = SimpleNamespace(summary={}, log=self.logged.append)

        @property
        def experiment(self):
            return self.run

    logger = RecordingWandbLogger()
    callback = SimpleNamespace(monitor="val/J&F", best_model_score=torch.tensor(0.7))
    trainer = SimpleNamespace(
        is_global_zero=True,
        global_step=12,
        callback_metrics={"val/J&F": torch.tensor(0.65)},
        checkpoint_callback=callback,
        loggers=[logger],
    )
    flat = publish_run_summary(trainer, summary_table(0.66, 30.0), tmp_path)
    assert flat["val/J&F"] == pytest.approx(0.7)
    assert flat["val/J&F_last"] == pytest.approx(0.65) and flat["student/J&F"] == 0.66
    assert json.loads((tmp_path / SUMMARY_FILE).read_text()) == flat
    # W&B: the same numbers, the final table's under final/; the table itself logged once
    renamed = {
        ("final/" + key if key.split("/")[0] in ("student", "teacher", "baseline") else key) for key in flat
    }
    assert set(logger.run.summary) == renamed and logger.run.summary["final/student/J&F"] == 0.66
    assert logger.run.summary["val/J&F"] == flat["val/J&F"]
    (logged,) = logger.logged
    assert set(logged) == {"final/table", "final/J&F vs FPS"}

    other = tmp_path / "rank1"
    other.mkdir()
    logger.run.summary = {}
    trainer.is_global_zero = False
    assert publish_run_summary(trainer, summary_table(0.66, 30.0), other) == {}
    assert logger.run.summary == {} and not (other / SUMMARY_FILE).exists()


def test_online_compare_reads_the_wandb_api(tmp_path, monkeypatch, capsys):
    import wandb

    def fake_run(name, tau, jf):
        config = {"distill": {"tau": tau}, "run_dir": f"/x/{name}", "_wandb": {"internal": 1}}
        summary = {f"final/student/{k}": v for k, v in summary_table(jf, 20.0)["student"].items()} | {
            "_step": 3
        }
        return SimpleNamespace(name=name, url=f"https://wandb.ai/e/p/runs/{name}", summary=summary,
                               config=config, group="g")  # fmt: skip

    calls = {}

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def runs(self, path, filters=None, per_page=50):
            calls["runs"] = (path, filters)
            return iter([fake_run("r1", 1.0, 0.3), fake_run("r2", 2.0, 0.4)])

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setenv("WANDB_MODE", "online")
    out = tmp_path / "out"
    assert main(["compare", "--project", "dvos", "--entity", "me", "--group", "g", "--out", str(out)]) == 0
    assert calls["runs"] == ("me/dvos", {"group": "g"})
    data = json.loads((out / "comparison.json").read_text())
    assert [run["name"] for run in data["runs"]] == ["r1", "r2"]
    assert data["differing_keys"] == ["distill.tau"] and data["metrics"][0]["best"] == 1
    assert "r1" in capsys.readouterr().out
