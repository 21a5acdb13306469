"""`dvos bench`: FLOP counting, the dense-memory baseline's growing memory against the student's
constant one (counted in tensors and tokens, never timed), the cells, and a tiny end-to-end run that
checks the results schema and the picture (no speed assertions)."""

import json
from types import SimpleNamespace

import helpers_models
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dvos.bench.cells import CellSpec, SyntheticVideo, fast_forward, run_cell
from dvos.bench.dense import DenseMemorySegmenter, DenseMemoryStudent
from dvos.bench.measure import count_flops, matmul_gflops
from dvos.cli.bench_cmd import parse_size
from dvos.cli.main import main
from dvos.config import load_config, to_dict
from dvos.inference.engine import StudentSegmenter

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_student():
    return helpers_models.tiny_student().eval()


def test_flop_count_matches_a_hand_count():
    linear = nn.Linear(4, 3)
    total, per_module, _ = count_flops(lambda: linear(torch.randn(2, 4)))
    assert total == 2 * (2 * 4 * 3)  # 2 FLOP per multiply-add, bias not counted
    assert per_module == {"Linear": total}
    conv = nn.Conv2d(2, 5, 3, padding=1)
    total, _, out = count_flops(lambda: conv(torch.randn(1, 2, 6, 7)))
    assert out.shape == (1, 5, 6, 7)
    assert total == 2 * (6 * 7) * 5 * (2 * 3 * 3)


def test_matmul_rate_is_positive_and_described():
    rate = matmul_gflops(size=64, seconds=0.01)
    assert rate["gflops"] > 0 and rate["repeats"] >= 3 and rate["dtype"] == "float32"


def test_parse_size():
    assert parse_size("480p") == (480, 854)  # DAVIS's 854 × 480
    assert parse_size("240x432") == (240, 432)
    with pytest.raises(Exception, match="480p"):
        parse_size("big")


def test_dense_memory_grows_every_fifth_frame_while_the_student_memory_is_constant():
    student = tiny_student()
    video = SyntheticVideo((64, 96), seed=0)
    frame0, mask0, ids = video.first()
    dense, deformable = DenseMemorySegmenter(student), StudentSegmenter(student)
    dense.start(frame0, mask0, ids)
    deformable.start(frame0, mask0, ids)
    tokens_per_frame = 4 * 6  # ⌈64/16⌉ × ⌈96/16⌉
    dense_bytes, student_bytes = {}, {}
    for t in range(1, 21):
        frame = video.frame(t)
        prediction = dense.step(frame)
        deformable.step(frame)
        assert prediction.shape == (64, 96) and prediction.dtype == np.uint8
        bank = 1 + t // 5  # the reference frame, then frames 5, 10, 15, 20
        assert dense.dense_memory.frames == bank
        assert dense.memory_tokens == (bank + 1) * tokens_per_frame  # bank + the previous frame
        dense_bytes[t], student_bytes[t] = dense.memory_bytes(), deformable.memory_bytes()
    assert len(set(student_bytes.values())) == 1
    per_frame = dense_bytes[5] - dense_bytes[4]
    assert per_frame > 0 and dense_bytes[20] - dense_bytes[1] == 4 * per_frame
    # fast-forward gives the state a real walk has before that frame
    fresh = DenseMemorySegmenter(student)
    fresh.start(frame0, mask0, ids)
    fast_forward(fresh, 21)
    assert fresh.memory_bytes() == dense_bytes[20] and fresh.frame_index == 20


def test_dense_read_with_a_one_frame_memory_is_global_attention_over_its_tokens():
    """With one memory frame, each dense read is softmax(q·kᵀ/√d)·v over that frame's tokens."""
    student = tiny_student()
    model = DenseMemoryStudent(student)
    torch.manual_seed(1)
    queries = torch.randn(1, 32, 2, 3)
    keys, values = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    memory = SimpleNamespace(
        long_key=keys,
        long_visual=values,
        long_id=values,
        short_key=keys,
        short_visual=values,
        short_id=values,
    )
    heads = queries.flatten(2).transpose(1, 2).reshape(1, 6, 4, 8).transpose(1, 2)
    expected = torch.softmax(heads @ keys.transpose(-1, -2) / 8**0.5, dim=-1) @ values
    propagation = student.propagation
    with torch.no_grad():
        visual, _ = model.read_memory(queries, queries, memory)
        tokens = queries.flatten(2).transpose(1, 2)
        read = (2 * expected).transpose(1, 2).reshape(1, 6, 32)
        gate = torch.nn.functional.silu(propagation.gate_visual(propagation.norm_input(tokens)))
        torch.testing.assert_close(visual, tokens + propagation.out_visual(read * gate))


def cell(model, **fields):
    cfg = load_config(["experiment=smoke"])
    return CellSpec(
        model=model, size=(48, 80), model_cfg=to_dict(cfg.model), teacher_cfg=to_dict(cfg.teacher), **fields
    )


def test_a_cell_in_a_fresh_process_reports_fps_and_peak_memory():
    result = run_cell(cell("student", lengths=[6], window=2, threads=1))
    assert "error" not in result, result.get("error")
    (row,) = result["rows"]
    assert row["model"] == "student" and row["length"] == 6 and row["timed_frames"] == 2
    assert row["fps"] > 0 and row["peak_mb"] >= row["before_mb"] > 0
    assert row["fast_forwarded_frames"] == 2 and row["segmented_frames"] == 3


def test_a_failing_cell_is_recorded_not_raised():
    result = run_cell(
        cell("student", lengths=[6], window=2, student_checkpoint="/nonexistent.ckpt"), isolate=False
    )
    assert result["rows"] == [] and "checkpoint not found" in result["error"]


def test_bench_quick_writes_results_and_picture(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "experiment=smoke",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.runs_dir={tmp_path / 'runs'}",
            "--quick",
            "--in-process",
            "--threads",
            "1",
            "--davis",
            "none",
            "--out",
            str(out),
            "--lengths",
            "4",
            "12",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Inference at 64×112" in printed and "J&F against FPS" in printed
    assert "The student's attention at inference, whole map against row blocks" in printed
    assert "of which pseudo_objects:" in printed
    assert "Model group files: parameters and FLOPs per 64×112 frame" in printed
    assert "model=deaot_t" in printed and "DeAOT's published: 7.2 M" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "dvos-bench/1" and results["complete"] is True
    assert "errors" not in results, results.get("errors")
    for key in (
        "machine",
        "versions",
        "options",
        "config",
        "student",
        "teacher",
        "dense",
        "matmul",
        "summary",
    ):
        assert key in results
    assert "randomly initialised" in results["student"]["weights"]
    assert results["matmul"]["start"]["gflops"] > 0

    # the attention section: both kinds of the student's attention at the benchmark size only
    # (--quick), the same outputs computed whole and in row blocks
    attention = results["attention"]["rows"]
    assert [(row["size"], row["attention"]) for row in attention] == [
        ([64, 112], "self-propagation"),
        ([64, 112], "deformable read"),
    ]
    assert attention[0]["queries"] == attention[0]["keys"] == 4 * 7  # the stride-16 grid of 64 × 112
    for row in attention:
        assert row["whole_ms"] > 0 and row["blocked_ms"] > 0 and row["max_abs_difference"] < 1e-5

    rows = results["inference"]["rows"]
    assert {(row["model"], row["length"]) for row in rows} == {
        (model, length) for model in ("student", "dense", "teacher") for length in (4, 12)
    }
    for row in rows:
        assert row["fps"] > 0 and row["timed_frames"] == 2 and row["peak_mb"] > 0
    state = {(row["model"], row["length"]): row["state_bytes"] for row in rows}
    assert state["student", 12] == state["student", 4]  # constant memory
    assert state["dense", 12] > state["dense", 4]  # the bank grew
    frames = {(row["model"], row["length"]): row["memory_frames"] for row in rows}
    assert frames["dense", 4] == 2 and frames["dense", 12] == 4 and frames["student", 12] == 2

    stream = {(row["model"], row["length"]): row for row in results["stream"]["rows"]}
    assert (
        stream["student", 12]["segmented_frames"] == 11
        and stream["student", 12]["fast_forwarded_frames"] == 0
    )
    assert stream["student", 12]["state_bytes"] == stream["student", 4]["state_bytes"]
    assert stream["dense", 12]["state_bytes"] > stream["dense", 4]["state_bytes"]
    growth = results["summary"]["memory_growth_stream"]
    assert growth["student"]["state_bytes_change"] == 0 and growth["dense"]["state_bytes_change"] > 0

    flops = results["flops"]["student"]
    assert flops["flops_per_frame"] > 0 and flops["by_module_gflops"]["encoder"] > 0
    assert results["summary"]["student_share_of_matmul"] > 0

    loading = results["data_loading"]
    assert loading["mp4"]["single"]["clips_per_s"] > 0 and loading["frames"]["single"]["clips_per_s"] > 0
    assert loading["train_step"]["clips_per_s"] > 0 and loading["train_step"]["skipped_steps"] == 0
    parts = loading["train_step"]["parts"]  # the pseudo-objects' share of the step, the k-means within it
    assert 0 < parts["kmeans"]["seconds_per_step"] <= parts["pseudo_objects"]["seconds_per_step"]
    assert 0 < parts["pseudo_objects"]["share"] < 1

    (dataset,) = results["accuracy"]["datasets"]
    assert dataset["name"] == "synthetic" and {row["model"] for row in dataset["rows"]} == {
        "student",
        "dense",
        "teacher",
    }
    for row in dataset["rows"]:
        assert 0 <= row["J&F"] <= 1 and row["fps"] > 0

    with Image.open(out / "results.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000


def test_sizes_section_counts_every_model_group_file(tmp_path):
    """`dvos bench`'s sizes: parameters and FLOPs of one frame step of each conf/model/ file, DeAOT's
    published count beside the files named after its models."""
    from dvos.bench.sizes import model_sizes, size_lines
    from dvos.models.build import build_student

    tiny = "d_model: 32\nnum_heads: 4\nnum_groups: 2\ndecoder_dim: 16\nmax_objects: 3\npretrained: none\n"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "student.yaml").write_text(tiny)
    (tmp_path / "model" / "deaot_t.yaml").write_text(tiny + "num_layers: 2\nexpand_ratio: 2.0\n")
    sizes = model_sizes(tmp_path, (64, 96))
    assert sorted(sizes["models"]) == ["deaot_t", "student"] and sizes["size"] == [64, 96]
    for name, layers in (("student", 1), ("deaot_t", 2)):
        row = sizes["models"][name]
        options = dict(
            d_model=32, num_heads=4, num_groups=2, decoder_dim=16, max_objects=3, pretrained="none"
        )
        extra = {"num_layers": 2, "expand_ratio": 2.0} if name == "deaot_t" else {}
        student, _ = build_student({**options, **extra})
        assert (
            row["parameters"]
            == sum(p.numel() for p in student.parameters())
            == sum(row["parameters_by_part"].values())
        )
        assert row["num_layers"] == layers and row["gflops_per_frame"] > 0
    assert sizes["models"]["deaot_t"]["gflops_per_frame"] > sizes["models"]["student"]["gflops_per_frame"]
    lines = size_lines(sizes)
    assert any("model=deaot_t" in line and "DeAOT's published: 7.2 M" in line for line in lines)
    assert any("model=student" in line and "published" not in line for line in lines)


def vit_parameters(dim: int, patch: int, blocks: int = 12) -> int:
    """DINO's ViT without head, counted by hand: patch embedding, class token, 1 + (224/p)² positions,
    per block 2 LayerNorms, qkv, proj and a 4× MLP (weights and biases), the final LayerNorm."""
    per_block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim)
    per_block += 4 * dim * dim + dim
    return (
        3 * patch * patch * dim + dim + dim + (1 + (224 // patch) ** 2) * dim + blocks * per_block + 2 * dim
    )


def test_the_teachers_are_the_published_architectures():
    from dvos.bench.teachers import TEACHERS

    cfg = to_dict(load_config([]).teacher)
    sizes = {name: sum(p.numel() for p in entry.build(cfg).parameters()) for name, entry in TEACHERS.items()}
    # torchvision's resnet18 has 11 689 512 parameters, of which the 1000-class fc holds 513 000
    assert sizes["crw-resnet18"] == 11_689_512 - 513_000
    assert sizes["dino-vits8"] == vit_parameters(384, 8) and sizes["dino-vitb8"] == vit_parameters(768, 8)
    crw = TEACHERS["crw-resnet18"].build(cfg)
    assert crw.encoder(torch.rand(1, 3, 64, 96)).shape == (1, 512, 8, 12)  # stride 8, 512 channels
    assert crw.n_recent == cfg["n_recent"] and crw.topk == cfg["topk"]


def test_a_teacher_too_large_for_the_memory_is_timed_at_a_smaller_size():
    from dvos.bench.teachers import TEACHERS, fitting_size

    cfg = to_dict(load_config([]).teacher)
    teacher = TEACHERS["dino-vitb8"]
    full = teacher.peak_bytes((480, 854), cfg)
    assert fitting_size(teacher, (480, 854), cfg, available=None) == ((480, 854), full)
    assert fitting_size(teacher, (480, 854), cfg, available=2 * full)[0] == (480, 854)
    half = teacher.peak_bytes((240, 432), cfg)
    assert half < full
    # room for half the sides only (margin 0.8): the half size, sides multiples of 16
    assert fitting_size(teacher, (480, 854), cfg, available=int(half / 0.8) + 1) == ((240, 432), half)
    size, estimate = fitting_size(teacher, (480, 854), cfg, available=1)
    assert size is None and estimate == teacher.peak_bytes((128, 208), cfg)  # the smallest tried


def test_bench_times_the_student_against_every_teacher(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        ["bench", "experiment=smoke", f"paths.data_dir={tmp_path / 'data'}",
         f"paths.runs_dir={tmp_path / 'runs'}", "--quick", "--in-process", "--threads", "1", "--davis", "none",
         "--out", str(out), "--lengths", "4", "--skip", "stream", "loading", "attention", "accuracy",
         "--teachers", "all"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "The student against the teachers at 64×112, 4-frame video" in printed
    results = json.loads((out / "results.json").read_text())
    assert "errors" not in results, results.get("errors")
    block = results["teachers"]
    assert "random weights" in block["weights"]
    rows = {row["model"]: row for row in block["rows"]}
    assert list(rows) == [
        "student",
        "teacher",
        "teacher:crw-resnet18",
        "teacher:dino-vits8",
        "teacher:dino-vitb8",
    ]
    for model, row in rows.items():
        assert row["fps"] > 0 and row["peak_mb"] > 0 and row["size"] == [64, 112], model
        assert row["student_fps_over_this"] == pytest.approx(rows["student"]["fps"] / row["fps"])
    assert results["summary"]["student_fps_over_teacher"]["teacher:dino-vitb8"] == pytest.approx(
        rows["student"]["fps"] / rows["teacher:dino-vitb8"]["fps"]
    )
    assert rows["teacher:dino-vits8"]["parameters"] == vit_parameters(384, 8)
    # FLOPs: at least the ViT's own (8 × 14 patches + the class token), propagation on top
    tokens, dim = 1 + 8 * 14, 384
    vit = 12 * (24 * tokens * dim * dim + 4 * tokens * tokens * dim) + 2 * 8 * 14 * dim * 3 * 64
    assert vit / 1e9 <= rows["teacher:dino-vits8"]["gflops_per_frame"] < 1.5 * vit / 1e9
    assert rows["teacher:dino-vitb8"]["gflops_per_frame"] > rows["teacher:dino-vits8"]["gflops_per_frame"]
    assert rows["teacher:dino-vits8"]["memory_frames"] == 1 + 2  # the smoke teacher: n_recent 2


@pytest.mark.slow
def test_bench_times_and_scores_the_int8_student(tmp_path, davis_fixture):
    """The int8 student is made, timed beside the fp32 ONNX and PyTorch students, and scored on a DAVIS
    tree at the exported size; the summary gives its FPS and the J&F it loses against fp32."""
    pytest.importorskip("onnxruntime.quantization", reason="the export extra (onnxruntime) is not installed")
    davis = tmp_path / "davis"
    for kind in ("JPEGImages", "Annotations"):
        (davis / kind / "480p").mkdir(parents=True)
        (davis / kind / "480p" / "blackswan").symlink_to(davis_fixture / kind / "480p" / "blackswan")
    (davis / "ImageSets" / "2016").mkdir(parents=True)
    (davis / "ImageSets" / "2016" / "val.txt").write_text("blackswan\n")
    out = tmp_path / "bench"
    code = main(
        ["bench", "experiment=smoke", f"paths.data_dir={tmp_path / 'data'}",
         f"paths.runs_dir={tmp_path / 'runs'}", "--quick", "--in-process", "--threads", "1", "--davis", str(davis),
         "--out", str(out), "--lengths", "4", "--skip", "stream", "loading", "attention",
         "--export", "onnx", "onnx-int8", "--teachers", "none"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert "errors" not in results, results.get("errors")
    assert results["export"]["quantization"]["calibration_frames"] > 0
    int8 = results["summary"]["int8_student"]
    assert int8["fps"] > 0 and int8["fps_fp32_onnx"] > 0 and int8["fps_pytorch"] > 0
    rows = {row["model"]: row for row in results["accuracy"]["datasets"][1]["rows"]}
    assert {"exported-onnx", "exported-onnx-int8", "student@64x112"} <= set(rows)
    assert int8["jf_set"] == "davis2016-sample" and int8["jf"] == rows["exported-onnx-int8"]["J&F"]
    assert int8["jf_delta"] == pytest.approx(rows["exported-onnx-int8"]["J&F"] - rows["exported-onnx"]["J&F"])
