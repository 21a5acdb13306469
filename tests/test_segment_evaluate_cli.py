"""`dvos segment` and `dvos evaluate` through the real command line: outputs named, sized and coloured
like the inputs, overlay videos, J&F and timing files, and agreement with `dvos eval-masks`."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvos.cli.main import main
from dvos.data.synth import generate_synthetic
from dvos.utils.masks import read_mask

REPO = Path(__file__).resolve().parents[1]
# A small random student: the tests must run without a trained checkpoint and stay fast.
TINY_STUDENT = [
    "model.d_model=32",
    "model.num_heads=4",
    "model.num_groups=2",
    "model.decoder_dim=16",
    "model.offset_kernel=3",
    "model.pretrained=none",
]
TINY_TEACHER = ["teacher.radius=4"]


def run_dvos(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dvos.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def blackswan(shared_data):
    video = shared_data / "videos" / "blackswan.mp4"
    mask = shared_data / "davis2016-sample" / "Annotations" / "480p" / "blackswan" / "00000.png"
    if not video.is_file() or not mask.is_file():
        pytest.skip(f"blackswan video or mask missing under {shared_data}")
    return video, mask


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    """A tiny DAVIS-layout set with dense ground truth: 2 sequences of 8 frames, 64 × 96."""
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, num_train=1, num_val=2, seed=0, size=(64, 96), train_frames=6, val_frames=8)
    return root / "val"


def check_palette_pngs(folder: Path, count: int, size: tuple[int, int], palette: list[int]) -> None:
    names = sorted(path.name for path in folder.iterdir())
    assert names == [f"{t:05d}.png" for t in range(count)]
    for name in (names[0], names[-1]):
        with Image.open(folder / name) as image:
            assert image.mode == "P" and image.size == (size[1], size[0])
            assert image.getpalette()[:768] == palette[:768]


# --------------------------------------------------------------------------------------------
# dvos segment
# --------------------------------------------------------------------------------------------
def test_segment_random_student_through_the_cli_with_overlay(blackswan, tmp_path):
    from dvos.data.readers import open_video

    video, mask = blackswan
    out, overlay = tmp_path / "masks", tmp_path / "overlay.mp4"
    result = run_dvos(
        "segment",
        "--video", str(video),
        "--mask", str(mask),
        "--out", str(out),
        "--max-size", "240",
        "--max-frames", "10",
        "--device", "cpu",
        "--overlay", str(overlay),
        f"paths.runs_dir={tmp_path / 'runs'}",
        *TINY_STUDENT,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no trained checkpoint found under" in result.stderr  # says so, explicitly
    assert "FPS" in result.stdout and "peak RSS" in result.stdout
    _, palette = read_mask(mask)
    check_palette_pngs(out, 10, (480, 854), palette)
    with open_video(overlay) as reader:
        assert len(reader) == 10 and reader[0].shape == (480, 854, 3)


def test_segment_with_the_teacher(blackswan, tmp_path, monkeypatch, capsys):
    video, mask = blackswan
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "segment",
            "--video", str(video),
            "--mask", str(mask),
            "--out", str(tmp_path / "masks"),
            "--teacher", "label_propagation",
            "--max-size", "240",
            "--max-frames", "6",
            "--device", "cpu",
            *TINY_TEACHER,
        ]
    )  # fmt: skip
    assert code == 0
    assert "FPS" in capsys.readouterr().out
    _, palette = read_mask(mask)
    check_palette_pngs(tmp_path / "masks", 6, (480, 854), palette)
    ids = np.array(Image.open(tmp_path / "masks" / "00005.png"))
    assert set(np.unique(ids)) <= {0, 1}


def test_segment_frame_folder_names_outputs_after_the_frames(tmp_path, monkeypatch):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(0)
    names = ["frame_a", "frame_b", "frame_c"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(frames_dir / f"{name}.jpg")
    first = np.zeros((50, 70), np.uint8)
    first[10:30, 20:50] = 3
    Image.fromarray(first, mode="L").save(tmp_path / "first.png")  # greyscale: the DAVIS palette is used
    monkeypatch.chdir(tmp_path)
    code = main(
        ["segment", "--video", str(frames_dir), "--mask", str(tmp_path / "first.png"), "--out", "out",
         "--device", "cpu", f"paths.runs_dir={tmp_path / 'runs'}", *TINY_STUDENT]
    )  # fmt: skip
    assert code == 0
    assert sorted(p.stem for p in (tmp_path / "out").iterdir()) == names
    ids, _ = read_mask(tmp_path / "out" / "frame_c.png")
    assert ids.shape == (50, 70) and set(np.unique(ids)) <= {0, 3}


def test_segment_mask_of_another_size_is_one_line_naming_both(blackswan, tmp_path):
    video, _ = blackswan
    small = tmp_path / "small.png"
    Image.fromarray(np.ones((100, 120), np.uint8), mode="L").save(small)
    code_out = run_dvos(
        "segment", "--video", str(video), "--mask", str(small), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert code_out.returncode == 2
    lines = code_out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(small) in lines[0] and str(video) in lines[0]
    assert "100×120" in lines[0] and "480×854" in lines[0]


def test_size_flags_take_pixels_or_none_over_the_config(capsys):
    from argparse import Namespace

    from dvos.cli.segment_cmd import size_limit, size_limit_of
    from dvos.config import load_config

    cfg = load_config(["eval.min_size=600"])
    assert size_limit_of(Namespace(min_size=None), cfg, "min_size") == 600  # no flag: the config
    assert size_limit_of(Namespace(min_size=size_limit("480")), cfg, "min_size") == 480
    assert size_limit_of(Namespace(min_size=size_limit("none")), cfg, "min_size") is None  # never
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--baseline", "copy", "--min-size", "8"])
    assert info.value.code == 2
    assert "--min-size: must be at least 16 pixels (or 'none'), got 8" in capsys.readouterr().err


def test_evaluate_and_segment_read_the_student_memory_as_eval_says(tmp_path):
    from argparse import Namespace

    from helpers_models import tiny_model_overrides, tiny_student

    from dvos.cli.segment_cmd import build_segmenter
    from dvos.config import load_config

    checkpoint = tmp_path / "student.pt"
    torch.save(tiny_student().state_dict(), checkpoint)
    args = Namespace(ckpt=str(checkpoint), teacher=None, baseline=None, max_size=None, min_size=None)
    segmenter, _, _ = build_segmenter(args, load_config(tiny_model_overrides()), "cpu")
    assert (segmenter.soft_memory, segmenter.attention_topk) == (True, None)  # defaults: soft, as trained
    assert segmenter.refine is None  # the paper's protocol: no post-processing
    segmenter, _, _ = build_segmenter(args, load_config(["experiment=cpu", *tiny_model_overrides()]), "cpu")
    assert segmenter.refine.iterations == 12  # the CPU recipe's edge refinement
    assert segmenter.refine_soft_memory is False  # the refined mask is remembered as a one-hot
    cfg = load_config(
        [
            *tiny_model_overrides(),
            "eval.soft_memory=false",
            "eval.attention_topk=1",
            "eval.long_term_weight=1.5",
            "eval.refine_iterations=0",
            "eval.refine_soft_memory=true",
        ]
    )
    segmenter, _, _ = build_segmenter(args, cfg, "cpu")
    assert (segmenter.soft_memory, segmenter.attention_topk, segmenter.refine) == (False, 1, None)
    assert segmenter.refine_soft_memory is True
    assert segmenter.long_term_weight == 1.5


def test_segment_ckpt_and_teacher_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        main(
            ["segment", "--video", "v.mp4", "--mask", "m.png", "--out", "o", "--ckpt", "c", "--teacher", "t"]
        )
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# dvos evaluate
# --------------------------------------------------------------------------------------------
def evaluate(tmp_path, synthetic_val, *args):
    return main(
        ["evaluate", *args, "--device", "cpu", "--workers", "1", "data=synthetic", f"data.root={synthetic_val}",
         "data.synth.generate=false", f"paths.runs_dir={tmp_path / 'runs'}"]
    )  # fmt: skip


def test_evaluate_copy_baseline_matches_eval_masks(tmp_path, synthetic_val, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "copy"
    assert evaluate(tmp_path, synthetic_val, "--baseline", "copy", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "J&F" in printed and "FPS" in printed
    for name in ("global_results-val.csv", "per-sequence_results-val.csv", "results.json", "timing.json"):
        assert (out / name).is_file(), name
    sequences = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(sequences) == 2
    timing = json.loads((out / "timing.json").read_text())
    assert [row["name"] for row in timing["sequences"]] == sequences
    assert all(
        row["frames"] == 8 and row["fps"] > 0 and row["peak_rss_mb"] > 0 for row in timing["sequences"]
    )

    # The same predictions scored by `dvos eval-masks` give the same numbers.
    check = tmp_path / "check"
    assert (
        main(
            [
                "eval-masks",
                "--gt",
                str(synthetic_val),
                "--pred",
                str(out),
                "--out",
                str(check),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    ours = json.loads((out / "results.json").read_text())["global"]
    theirs = json.loads((check / "results.json").read_text())["global"]
    assert ours == theirs
    with open(out / "global_results-val.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["J&F-Mean"]) == ours["J&F-Mean"]
    assert 0 < ours["J&F-Mean"] <= 1


def test_evaluate_teacher_writes_scores_and_timing(tmp_path, synthetic_val, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "teacher"
    assert (
        evaluate(tmp_path, synthetic_val, "--teacher", "label_propagation", "--out", str(out), *TINY_TEACHER)
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["global"]["J&F-Mean"] <= 1
    assert "teacher" in results["config"]["method"]
    assert json.loads((out / "timing.json").read_text())["frames"] == 16


def test_evaluate_uses_the_latest_run_checkpoint_and_its_run_folder(
    tmp_path, synthetic_val, monkeypatch, capsys
):
    from dvos.models.build import build_student

    options = dict(
        d_model=32, num_heads=4, num_groups=2, deform_stride=2, offset_range=4.0, offset_kernel=3,
        max_objects=10, decoder_dim=16, ffn_ratio=2.0, permute_ids=True, pretrained="none",
    )  # fmt: skip
    student, _ = build_student(options)
    run_dir = tmp_path / "runs" / "20240101-000000-tiny"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(
        {
            "state_dict": {f"student.{k}": v for k, v in student.state_dict().items()},
            "dvos_config": {"model": options},
        },
        run_dir / "checkpoints" / "last.ckpt",
    )
    monkeypatch.chdir(tmp_path)
    assert evaluate(tmp_path, synthetic_val) == 0  # no --ckpt: the newest run checkpoint
    out = run_dir / "eval-synthetic"
    assert (out / "results.json").is_file() and (out / "timing.json").is_file()
    assert "last.ckpt" in json.loads((out / "timing.json").read_text())["method"]
    # its W&B run (offline here): job type evaluate, in the training run's group, the scores under final/
    from helpers_wandb import offline_runs

    (run,) = offline_runs(out / ".wandb")
    assert (run.job_type, run.group, run.name) == ("evaluate", run_dir.name, f"{run_dir.name}-evaluate")
    with open(out / "global_results-val.csv") as handle:  # the toolkit's file: J&F-Mean,J-Mean,...
        row = next(csv.DictReader(handle))
    assert run.summary["final/student/J&F"] == pytest.approx(float(row["J&F-Mean"]), abs=1e-6)
    assert run.summary["final/student/J"] == pytest.approx(float(row["J-Mean"]), abs=1e-6)
    assert run.summary["final/table/nrows"] == 1 and run.summary["final/student/params"] > 0
    assert run.run_id == (out / "wandb-id.txt").read_text().strip()


def test_evaluate_youtubevos_writes_predictions_only(tmp_path, monkeypatch, capsys):
    from test_engine import youtubevos_tree

    root = youtubevos_tree(tmp_path / "ytvos", num_frames=12, late_from=5)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "yt"
    code = main(
        ["evaluate", "--baseline", "copy", "--out", str(out), "data=youtubevos", f"data.root={root}",
         f"paths.runs_dir={tmp_path / 'runs'}"]
    )  # fmt: skip
    assert code == 0
    assert "predictions only" in capsys.readouterr().out
    assert len(list((out / "clip").iterdir())) == 12
    assert (out / "timing.json").is_file() and not (out / "results.json").exists()
    late, _ = read_mask(out / "clip" / "00007.png")
    assert set(np.unique(late)) == {0, 2, 4}


def test_export_int8_then_evaluate_the_onnx_file(tmp_path, synthetic_val, monkeypatch, capsys):
    """`dvos export --format onnx --quantize int8 --calibration VIDEOS` writes an int8 file that
    `dvos evaluate --ckpt FILE.onnx` runs through the engine and scores; bad combinations fail in one line."""
    pytest.importorskip("onnxruntime.quantization", reason="the export extra (onnxruntime) is not installed")
    from dvos.models.build import build_student

    monkeypatch.chdir(tmp_path)
    options = dict(
        d_model=32, num_heads=4, num_groups=2, offset_kernel=3, decoder_dim=16, pretrained="none", max_objects=4
    )  # fmt: skip
    student, _ = build_student(options)
    checkpoint = tmp_path / "student.pt"
    torch.save(student.state_dict(), checkpoint)
    overrides = [f"model.{key}={value}" for key, value in options.items()]
    int8 = tmp_path / "export" / "student-int8.onnx"
    export = ["export", "--ckpt", str(checkpoint), "--format", "onnx", "--height", "64", "--width", "96"]
    calibration = ["--calibration", str(synthetic_val.parent / "train")]
    assert main([*export, "--quantize", "int8", *calibration, "--out", str(int8), *overrides]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {int8} (onnx int8, 64×96 frames" in printed and "calibrated on" in printed
    assert "verified against PyTorch" in printed  # the fp32 graph it was made from was checked
    assert sorted(p.name for p in int8.parent.iterdir()) == ["student-int8.onnx"]

    assert evaluate(tmp_path, synthetic_val, "--ckpt", str(int8)) == 0
    out = int8.parent / "eval-synthetic-student-int8"  # beside the file, named after it
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["global"]["J&F-Mean"] <= 1
    timing = json.loads((out / "timing.json").read_text())
    assert timing["frames"] == 16 and "ONNX int8, 64×96" in timing["method"]
    sequence = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    with Image.open(out / sequence / "00003.png") as image:
        assert image.size == (96, 64)  # predictions at the frames' size

    capsys.readouterr()
    for args, message in (
        ([*export[:4], "torchscript", "--quantize", "int8"], "--quantize int8 needs --format onnx"),
        ([*export, "--calibration", str(tmp_path)], "--calibration is for --quantize int8"),
        ([*export, "--quantize", "int8", "--calibration", str(tmp_path / "nope")], "nope does not exist"),
    ):
        assert main([*args, "--out", str(tmp_path / "x.onnx"), *overrides]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x.onnx").exists()
