"""Export of the student's frame step: ONNX and TorchScript files compute what PyTorch computes (within
1e-4), segment a video like the PyTorch engine, describe themselves, and fail in one line."""

import os
from pathlib import Path

import helpers_models
import numpy as np
import pytest
import torch
from helpers_disk import fill_disk

from dvos.cli.main import main
from dvos.inference.engine import StudentSegmenter, segment_sequence
from dvos.inference.export import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    ExportedSegmenter,
    FrameStep,
    export_student,
    load_exported,
    memory_shape,
    step_inputs,
    verify_export,
    zero_memory,
)
from dvos.utils.errors import DvosError

# The real MobileNet-V2 encoder (the ops a device must run), a small propagation layer.
TINY_OVERRIDES = helpers_models.tiny_model_overrides(max_objects=4)
HEIGHT, WIDTH = 56, 88  # not multiples of 16: the padding is part of the graph
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def student():
    model = helpers_models.tiny_student(max_objects=4)
    # Non-zero offsets (a fresh offset network samples the regular grid): exercise grid_sample for real.
    for attention in (model.propagation.long_term, model.propagation.short_term):
        torch.nn.init.normal_(attention.offset_network.to_offsets.weight, std=0.5)
    return model.eval()


def scene(num_frames=4):
    """Frames `T × H × W × 3` and the first mask: two boxes moving over a textured background."""
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 80, size=(1, HEIGHT, WIDTH, 3)), num_frames, axis=0).astype(np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    for t in range(num_frames):
        frames[t, 8:28, 10 + 2 * t : 30 + 2 * t] = (230, 40, 40)
        frames[t, 30:50, 50 - t : 74 - t] = (40, 230, 40)
    mask[8:28, 10:30], mask[30:50, 50:74] = 1, 2
    return frames, mask


def check_against_pytorch(student, exported):
    """Frame 0 (memory from the given mask), then two frames propagated from the exported memory."""
    step = FrameStep(student)
    frames, mask = scene(3)
    images = [torch.from_numpy(f).permute(2, 0, 1)[None].float() / 255 for f in frames]
    given = torch.from_numpy(mask).long()[None]
    memory = zero_memory(student.d_model, HEIGHT, WIDTH)
    partly_given = torch.full_like(given, -1)
    partly_given[:, :20] = given[:, :20]
    for index, labels in enumerate((given, None, partly_given)):
        inputs = step_inputs(images[index], memory, 2, labels)
        with torch.inference_mode():
            expected = step(*inputs)
        got = exported(*inputs)
        assert len(got) == len(OUTPUT_NAMES)
        for name, a, b in zip(OUTPUT_NAMES, expected, got):
            assert a.shape == b.shape, name
            if name == "labels":
                assert torch.equal(a, b), f"frame {index}: labels differ"
            else:
                difference = (a - b).abs().max().item()
                assert difference < TOLERANCE, f"frame {index}: {name} differs by {difference:.2e}"
        _, _, key, value, id_embedding = got
        memory = (*memory[:3], key, value, id_embedding) if index else (key, value, id_embedding) * 2
    assert torch.equal(got[1][:, :20], given[:, :20])  # given pixels are taken as they are


def segment_both(student, exported):
    """A video through the PyTorch engine and through the exported step; object 5 appears at frame 2."""
    frames, mask = scene()
    late = np.zeros_like(mask)
    late[2:8, 70:86] = 5
    frames[2:, 2:8, 70:86] = (240, 240, 60)
    masks = {0: mask, 2: late}
    reference, ours = [], []
    # the exported step holds one long-term frame: the engine with one long-term slot computes the same
    engine = StudentSegmenter(student, max_long_term=1)
    segment_sequence(engine, frames, masks, on_frame=lambda i, p: reference.append(p))
    segment_sequence(ExportedSegmenter(exported), frames, masks, on_frame=lambda i, p: ours.append(p))
    assert (ours[2] == 5).sum() == 6 * 16  # the late object's given mask, pasted as it is
    return np.stack(reference), np.stack(ours)


def test_torchscript_round_trip_matches_pytorch_and_the_engine(student, tmp_path):
    path = export_student(student, "torchscript", tmp_path / "step.pt", height=HEIGHT, width=WIDTH)
    assert path == tmp_path / "step.pt" and os.listdir(tmp_path) == ["step.pt"]  # no temporary left
    exported = load_exported(path, "torchscript")
    assert exported.spec["height"] == HEIGHT and exported.spec["width"] == WIDTH
    assert exported.spec["memory_shape"] == list(memory_shape(32, HEIGHT, WIDTH)) == [1, 32, 4, 6]
    assert exported.spec["inputs"] == list(INPUT_NAMES) and exported.spec["max_objects"] == 4
    check_against_pytorch(student, exported)
    reference, ours = segment_both(student, exported)
    assert np.array_equal(reference, ours)  # a whole video: exported step == PyTorch engine
    # Frames of another size are resized to the exported size and predicted at their own size.
    frames, mask = scene(3)
    frames, mask = np.pad(frames, ((0, 0), (0, 8), (0, 4), (0, 0))), np.pad(mask, ((0, 8), (0, 4)))
    outputs = []
    segment_sequence(ExportedSegmenter(exported), frames, mask, on_frame=lambda i, p: outputs.append(p))
    assert [p.shape for p in outputs] == [(HEIGHT + 8, WIDTH + 4)] * 3 and np.array_equal(outputs[0], mask)


def test_onnx_round_trip_matches_pytorch(student, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    path = export_student(student, "onnx", tmp_path / "step.onnx", height=HEIGHT, width=WIDTH, max_objects=3)
    assert os.listdir(tmp_path) == ["step.onnx"]  # one self-contained file, no external data
    model = onnx.load(str(path))
    assert [node.name for node in model.graph.input] == list(INPUT_NAMES)
    assert [node.name for node in model.graph.output] == list(OUTPUT_NAMES)
    assert "GridSample" in {node.op_type for node in model.graph.node}  # the deformable sampling
    assert model.opset_import[0].version >= 16

    def dims(value):
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {value.name: dims(value) for value in (*model.graph.input, *model.graph.output)}
    assert shapes["image"] == [1, 3, HEIGHT, WIDTH] and shapes["given_labels"] == [1, HEIGHT, WIDTH]
    assert shapes["reference_key"] == shapes["id_embedding"] == [1, 32, 4, 6]
    assert shapes["logits"] == [1, 4, HEIGHT, WIDTH]  # max_objects=3: background + 3

    exported = load_exported(path, "onnx")
    assert exported.spec["max_objects"] == 3
    # max_objects=3 < the student's 4: compare with the PyTorch step of the same K
    inputs = step_inputs(torch.rand(1, 3, HEIGHT, WIDTH), [torch.randn(1, 32, 4, 6) for _ in range(6)], 3)
    with torch.inference_mode():
        expected = FrameStep(student, max_objects=3)(*inputs)
    for name, a, b in zip(OUTPUT_NAMES, expected, exported(*inputs)):
        assert (a.float() - b.float()).abs().max().item() < TOLERANCE, name
    reference, ours = segment_both(student, exported)
    assert np.mean(reference == ours) > 0.999


def test_export_cli_writes_and_verifies(tmp_path, capsys):
    checkpoint = tmp_path / "student.pt"
    model = helpers_models.tiny_student(max_objects=4)
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "export" / "step.pt"
    code = main(
        ["export", "--ckpt", str(checkpoint), "--format", "torchscript", "--out", str(out),
         "--height", "32", "--width", "48", *TINY_OVERRIDES, "eval.attention_topk=1",
         "eval.refine_iterations=2"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "verified against PyTorch: largest difference" in printed
    # the edge refinement runs in the Python engine only: said, and the graph is the network's step
    assert "no edge refinement (eval.refine_iterations=2" in printed
    exported = load_exported(out, "torchscript")
    assert (exported.spec["height"], exported.spec["width"]) == (32, 48)
    assert exported.spec["attention_topk"] == 1 and exported.spec["soft_memory"] is True  # eval.* reading
    assert os.listdir(out.parent) == ["step.pt"]


def run_failing(args, capsys):
    code = main(["export", *args, *TINY_OVERRIDES])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].startswith("dvos: error: ")
    return error[-1]


def test_export_errors_are_one_line_and_write_nothing(tmp_path, capsys, student, monkeypatch):
    checkpoint = tmp_path / "student.pt"
    torch.save(student.state_dict(), checkpoint)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "out" / "step.onnx"
    common = ["--height", "32", "--width", "32"]
    line = run_failing(["--ckpt", str(checkpoint), "--format", "tflite", "--out", str(out), *common], capsys)
    assert "unknown export format 'tflite'" in line
    line = run_failing(["--ckpt", str(tmp_path / "nope.ckpt"), "--format", "onnx", "--out", str(out)], capsys)
    assert "nope.ckpt" in line and "not found" in line
    line = run_failing(["--ckpt", str(garbage), "--format", "onnx", "--out", str(out), *common], capsys)
    assert "garbage.ckpt" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = run_failing(
        ["--ckpt", str(checkpoint), "--format", "onnx", "--out", str(blocker / "s.onnx")], capsys
    )
    assert str(blocker) in line
    line = run_failing(["--ckpt", str(checkpoint), "--format", "onnx", "--out", str(tmp_path)], capsys)
    assert "is a folder" in line
    torchscript = ["--ckpt", str(checkpoint), "--format", "torchscript", "--out", str(out), *common]
    for extra, message in (
        (["--max-objects", "9"], "max_objects 9"),
        (["eval.attention_topk=-1"], "eval.attention_topk must be ≥ 0 (0: all points) or null, got -1"),
        (
            ["eval.long_term_weight=3"],
            "eval.long_term_weight must be in [0, 2] (1: as trained) or null, got 3",
        ),
        (["eval.refine_iterations=1", "eval.refine_radius=0"], "eval.refine_radius must be ≥ 1, got 0"),
    ):
        assert message in run_failing([*torchscript, *extra], capsys)
    assert not out.parent.exists() or not os.listdir(out.parent)

    # An exporter that fails half-way leaves nothing behind, not even its temporary.
    def broken_trace(*args, **kwargs):
        raise RuntimeError("tracer failure\nwith a long C++ stack")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    with pytest.raises(DvosError, match="torchscript export to .* failed: RuntimeError: tracer failure$"):
        export_student(student, "torchscript", out, height=32, width=32)
    assert os.listdir(out.parent) == []
    with pytest.raises(DvosError, match="exported model not found"):
        load_exported(out, "torchscript")


# ONNX is slow here (the dynamo export itself); its bytes go through the same write as TorchScript's.
@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=pytest.mark.slow)])
def test_export_to_a_full_disk_is_one_line_and_keeps_the_earlier_file(
    tmp_path, capsys, student, monkeypatch, fmt
):
    """torch.jit.save writing a file itself aborted the interpreter on a full disk (a C++ c10::Error);
    the bytes are now written by Python, so a full disk is an OSError: one line, exit 2."""
    checkpoint = tmp_path / "student.pt"
    torch.save(student.state_dict(), checkpoint)
    out = tmp_path / "out" / f"step.{fmt}"
    out.parent.mkdir()
    out.write_bytes(b"an earlier export")
    fill_disk(monkeypatch, out.stem)  # its temporary: .step.<random>.tmp.<format>
    line = run_failing(["--ckpt", str(checkpoint), "--format", fmt, "--out", str(out), "--height", "32",
                        "--width", "32", "--no-verify"], capsys)  # fmt: skip
    assert line == f"dvos: error: cannot write {out}: No space left on device"
    assert os.listdir(out.parent) == [out.name] and out.read_bytes() == b"an earlier export"


def test_an_export_that_fails_its_check_keeps_the_earlier_file(tmp_path, capsys, student, monkeypatch):
    import dvos.inference.export as export

    checkpoint = tmp_path / "student.pt"
    torch.save(student.state_dict(), checkpoint)
    out = tmp_path / "step.pt"
    out.write_bytes(b"an earlier export")
    differs = {name: 0.5 for name in OUTPUT_NAMES}  # as a graph computing something else would

    monkeypatch.setattr(export, "verify_export", lambda *args, **kwargs: differs)
    line = run_failing(["--ckpt", str(checkpoint), "--format", "torchscript", "--out", str(out),
                        "--height", "32", "--width", "32"], capsys)  # fmt: skip
    assert line == f"dvos: error: exported {out} differs from PyTorch by 5.00e-01 (> 1e-04); not written"
    assert (
        sorted(os.listdir(tmp_path)) == ["step.pt", "student.pt"] and out.read_bytes() == b"an earlier export"
    )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_topk_student_exports_and_matches_pytorch(fmt, tmp_path):
    """A student with `model.attention_topk` exports too: topk and scatter are in the graph."""
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
        pytest.importorskip("onnxruntime", reason="the export extra (onnxruntime) is not installed")
    model = helpers_models.tiny_student(max_objects=4, attention_topk=3).eval()
    assert model.propagation.long_term.topk == 3
    path = export_student(model, fmt, tmp_path / f"step.{fmt}", height=HEIGHT, width=WIDTH)
    exported = load_exported(path, fmt)
    inputs = step_inputs(torch.rand(1, 3, HEIGHT, WIDTH), [torch.randn(1, 32, 4, 6) for _ in range(6)], 2)
    with torch.inference_mode():
        expected = FrameStep(model)(*inputs)
    for name, a, b in zip(OUTPUT_NAMES, expected, exported(*inputs)):
        assert (a.float() - b.float()).abs().max().item() < TOLERANCE, name


def test_export_reads_memory_as_the_engine_is_told(student, tmp_path):
    """`eval.soft_memory=false eval.attention_topk=2 eval.long_term_weight=1.5` exported: the file
    records them, and a whole video through it equals the engine's with the same reading."""
    path = export_student(
        student,
        "torchscript",
        tmp_path / "hard.pt",
        height=HEIGHT,
        width=WIDTH,
        soft_memory=False,
        attention_topk=2,
        long_term_weight=1.5,
    )
    exported = load_exported(path, "torchscript")
    assert exported.spec["soft_memory"] is False and exported.spec["attention_topk"] == 2
    assert exported.spec["long_term_weight"] == 1.5
    assert student.propagation.long_term.topk == 0  # the overrides did not stay on the student
    assert student.propagation.long_term_weight == 1.0
    frames, mask = scene(5)
    runs = {}
    for name, segmenter in (
        ("exported", ExportedSegmenter(exported)),
        ("engine", StudentSegmenter(student, soft_memory=False, attention_topk=2, long_term_weight=1.5)),
    ):
        logits = []
        segment_sequence(segmenter, frames, mask, on_frame=lambda i, p, out=logits: out.append(p))
        runs[name] = np.stack(logits)
    assert np.array_equal(runs["exported"], runs["engine"])
    assert max(verify_export(student, exported).values()) < TOLERANCE
    default = load_exported(
        export_student(student, "torchscript", tmp_path / "soft.pt", height=HEIGHT, width=WIDTH),
        "torchscript",
    )
    assert default.spec["soft_memory"] is True and default.spec["attention_topk"] == 0
    assert default.spec["long_term_weight"] == 1.0


def test_stacked_layers_export_and_segment_like_the_engine(tmp_path):
    """Two DeAOT-form layers with a local short-term read: the TorchScript step segments a video as
    the PyTorch engine does; frame 0 called twice gives the reference memory the engine builds."""
    student = helpers_models.tiny_student(
        max_objects=4,
        num_layers=2,
        num_heads=1,
        num_groups=1,
        key_dim=16,
        expand_ratio=2.0,
        dw_kernel=3,
        gate_id=False,
        id_norm=True,
        ffn_ratio=0.0,
        short_term_read="local",
        local_window=3,
    ).eval()
    path = export_student(student, "torchscript", tmp_path / "step.pt", height=HEIGHT, width=WIDTH)
    exported = load_exported(path, "torchscript")
    assert exported.spec["num_layers"] == 2 and exported.spec["memory_channels"] == [32, 128, 128]
    assert max(verify_export(student, exported).values()) < TOLERANCE
    frames, mask = scene(1)
    image = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 255
    given = torch.from_numpy(mask).long()[None]
    memory = zero_memory((32, 128, 128), HEIGHT, WIDTH)
    for _ in range(2):
        _, _, key, value, ids = exported(*step_inputs(image, memory, 2, given))
        memory = (key, value, ids) * 2
    with torch.inference_mode():
        features = student.encode_frame(image)
        one_hot = torch.nn.functional.one_hot(given, 5).permute(0, 3, 1, 2).float()
        expected = student.initialize_memory(features, one_hot)
    for got, want in zip(
        memory[:3], (expected.reference_key, expected.reference_value, expected.reference_id)
    ):
        assert (got - want).abs().max() < TOLERANCE
    reference, ours = segment_both(student, exported)
    assert (reference == ours).mean() > 0.999


def write_frame_folder(folder: Path, frames: np.ndarray) -> Path:
    """A video as a folder of PNG frames (what `dvos.data.readers.open_video` reads)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
    return folder


def test_int8_quantization_calibrates_on_videos_and_runs_like_an_exported_file(student, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
    pytest.importorskip("onnxruntime.quantization", reason="the export extra (onnxruntime) is not installed")
    from dvos.inference.quantize import activation_products, quantize_student

    fp32 = export_student(student, "onnx", tmp_path / "fp32.onnx", height=HEIGHT, width=WIDTH)
    frames, mask = scene(7)
    videos = [write_frame_folder(tmp_path / name, frames[offset:]) for name, offset in (("a", 0), ("b", 1))]
    int8 = tmp_path / "int8.onnx"
    entry = quantize_student(fp32, int8, videos, source="two test videos")
    # frames 0, 3, 6, ... of each video (4 at most): 7 frames give 0, 3, 6 and 6 frames 0, 3
    assert entry["calibration_frames"] == 3 + 2 and entry["calibration_videos"] == 2
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "fp32.onnx", "int8.onnx"]  # no temporary left

    model = onnx.load(str(int8))
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.INT8 in weights.values()  # int8 weights ...
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "GridSample", "Softmax"} <= ops
    # ... but the attention's products and softmax stay float: no QuantizeLinear takes their outputs
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    attention = activation_products(onnx.load(str(fp32)))
    assert attention
    for node in model.graph.node:
        if node.name in attention or node.op_type == "Softmax":
            assert "QuantizeLinear" not in consumers.get(node.output[0], []), node.name
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size

    exported = load_exported(int8, "onnx")
    assert exported.spec["quantization"]["calibration_source"] == "two test videos"
    assert exported.spec["height"] == HEIGHT and exported.spec["max_objects"] == 4
    ours = []
    segment_sequence(ExportedSegmenter(exported), frames, mask, on_frame=lambda i, p: ours.append(p))
    assert len(ours) == 7 and ours[0].shape == (HEIGHT, WIDTH) and np.array_equal(ours[0], mask)
    with pytest.raises(DvosError, match="calibration videos"):
        quantize_student(fp32, tmp_path / "none.onnx", [])
