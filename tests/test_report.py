"""`dvos report`: the results page and the README's results block come from run folders only."""

import json
from pathlib import Path

import yaml

from dvos.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SUMMARY = {
    "baseline": {"J&F": 0.3214, "J": 0.30, "F": 0.3428, "fps": 900.0, "params": 0, "peak_rss_mb": 1.0},
    "teacher": {"J&F": 0.9512, "J": 0.95, "F": 0.9524, "fps": 1.31, "params": 2_780_000, "peak_rss_mb": 9.0},
    "student": {
        "J&F": 0.8846,
        "J": 0.8831,
        "F": 0.8861,
        "fps": 1.712,
        "params": 5_340_000,
        "peak_rss_mb": 8.0,
    },
}


def make_run(root: Path, name: str = "20261207-101500-dvos", *, timing: bool = True) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"name": "dvos", "experiment": "cpu", "seed": 1, "data": {"name": "synthetic"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    environment = {
        "commit": "0123456789abcdef",
        "cpu": "AMD EPYC",
        "cpu_count": "2",
        "started": "2026-12-07T10:15:00",
    }
    (run / "environment.json").write_text(json.dumps(environment))
    if timing:
        (run / "timing.json").write_text(json.dumps({"wall_s": 1053.4}))
    return run


def test_report_writes_the_table_and_its_provenance(tmp_path):
    run = make_run(tmp_path / "runs")
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    # two decimals; FPS of the copy baseline (no model) is not a model speed
    assert "| first-frame copy | 0.32 | 0.30 | 0.34 | - | - |" in page
    assert "| teacher | 0.95 | 0.95 | 0.95 | 1.31 | 2.78 M |" in page
    assert "| student | 0.88 | 0.88 | 0.89 | 1.71 | 5.34 M |" in page
    assert "2026-12-07 · commit 0123456789 · AMD EPYC (2 cores) · 17 min 33 s" in page
    assert "`dvos train experiment=cpu seed=1`" in page and run.name in page


def test_report_shows_each_evaluation_set_under_its_name(tmp_path):
    run = make_run(tmp_path / "runs")
    second = {name: {**row, "J&F": row["J&F"] / 2} for name, row in SUMMARY.items()}
    (run / "summary-synthetic_small.json").write_text(json.dumps(second))
    out = tmp_path / "RESULTS.md"
    assert main(["report", str(run), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.index("*synthetic*") < page.index("*synthetic_small*")
    assert "| student | 0.44 | 0.88 | 0.89 | 1.71 | 5.34 M |" in page.split("*synthetic_small*")[1]


def test_report_fills_only_the_readme_block(tmp_path):
    run = make_run(tmp_path / "runs", timing=False)
    readme = tmp_path / "README.md"
    readme.write_text("# x\nbefore\n<!-- results:begin -->\nold table\n<!-- results:end -->\nafter\n")
    assert main(["report", str(run), "--out", str(tmp_path / "R.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n<!-- results:begin -->\n*synthetic*\n\n| | J&F |") and text.endswith(
        "-->\nafter\n"
    )
    assert "old table" not in text and "wall time not recorded" in text


def test_report_names_what_is_missing_and_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "runs")
    (run / "summary.json").unlink()
    out = tmp_path / "RESULTS.md"
    out.write_text("earlier page\n")
    assert main(["report", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(run / "summary.json") in err
    assert out.read_text() == "earlier page\n"
    good = make_run(tmp_path / "runs", "20261207-111500-dvos")
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert main(["report", str(good), "--out", str(out), "--readme", str(readme)]) == 2
    assert "no results block" in capsys.readouterr().err
    assert out.read_text() == "earlier page\n" and readme.read_text() == "no markers here\n"


def test_the_readme_has_a_results_block():
    text = (REPO / "README.md").read_text()
    assert text.count("<!-- results:begin -->") == 1 and text.count("<!-- results:end -->") == 1


def test_report_without_runs_says_so_and_refuses_to_fill_the_readme(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    assert main(["report", "--out", str(out)]) == 0
    assert "No run is recorded here yet" in out.read_text()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\nx\n<!-- results:end -->\n")
    assert main(["report", "--out", str(out), "--readme", str(readme)]) == 2
    assert "--readme needs a run folder" in capsys.readouterr().err
