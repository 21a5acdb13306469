"""Speed and memory of one model on one generated video: a benchmark *cell*.

A cell builds one segmenter (student, dense-memory baseline or teacher), walks a procedurally
generated video (`dvos.data.synth` scene, rendered frame by frame on demand: any length costs the
same memory) and reports frames per second and peak memory at one or several lengths.

Two ways to reach frame L (`CellSpec.mode`):

- `"window"` (long videos at full size on a slow machine): the segmenter starts on frame 0, its state
  is *fast-forwarded* to the size it has just before frame s = L − window − warmup (`fast_forward`:
  the student's memory is two frames whatever s is; the teacher's context is filled to 1 + n_recent
  frames; the dense bank gets 1 + ⌊(s − 1)/5⌋ frames, copies of the reference entry — attention
  costs the same whatever the tokens hold), then frames s .. L − 1 are really segmented: the first
  `warmup` untimed, the others timed. Peak memory covers the whole cell after the model is built.
- `"stream"` (checking that memory does not grow): every frame 1 .. max(L) is segmented, nothing
  is skipped; speed and memory are read at each length L (the high-water mark up to frame L is the
  peak of an L-frame video).

`run_cell` runs a cell in a fresh Python process by default (`python -m dvos.bench.cells SPEC OUT`),
so that one process's RSS high-water mark measures one cell only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvos.bench.dense import MEMORY_EVERY, DenseMemorySegmenter
from dvos.bench.measure import PeakMemory, autocast, count_flops, synchronize
from dvos.data.synth import sample_scene
from dvos.inference.engine import StudentSegmenter, TeacherSegmenter, mask_object_ids
from dvos.models.teacher import ContextEntry

MODELS = ("student", "dense", "teacher")
VIDEO_OBJECTS = 3  # objects in the generated benchmark video


@dataclass
class CellSpec:
    """Everything a cell process needs (JSON-serialisable).

    Attributes:
        model: "student", "dense" or "teacher".
        size: (H, W) of the generated frames (fed to the model as they are).
        lengths: video lengths L to report (`window`: exactly one).
        mode: "window" or "stream" (see the module docstring).
        window: timed frames per length (`window` mode).
        warmup: untimed frames segmented before the timed ones.
        device: "cpu" or "cuda".
        amp: fp16 autocast on CUDA.
        seed: video and random-weight seed.
        model_cfg: the student's `ModelConfig` as a dict.
        teacher_cfg: the `TeacherConfig` as a dict (its `checkpoint` resolved).
        student_checkpoint: a student checkpoint file, or None for random weights (seeded).
        memory_every: the dense baseline's long-term memory period.
        exported_path: the exported student's file, for the models "exported-onnx",
            "exported-onnx-int8" and "exported-torchscript" (`dvos.inference.export`).
        threads: torch's intra-op threads (None: torch's default).
        count_flops: count the FLOPs of the first warm-up frame (or, without warm-up, of one more
            frame after the timed ones) and the parameters: `gflops_per_frame`, `parameters`.
    """

    model: str
    size: tuple[int, int]
    lengths: list[int]
    mode: str = "window"
    window: int = 4
    warmup: int = 1
    device: str = "cpu"
    amp: bool = True
    seed: int = 0
    model_cfg: dict[str, Any] = field(default_factory=dict)
    teacher_cfg: dict[str, Any] = field(default_factory=dict)
    student_checkpoint: str | None = None
    memory_every: int = MEMORY_EVERY
    exported_path: str | None = None
    threads: int | None = None
    count_flops: bool = False


# --------------------------------------------------------------------------------------------------
# Models and the video
# --------------------------------------------------------------------------------------------------
def build_student_model(
    model_cfg: dict[str, Any], checkpoint: str | None, *, seed: int = 0
) -> tuple[Any, str]:
    """The student from a checkpoint, or randomly initialised from `seed` (encoder as configured).

    Returns:
        (student in eval mode, one line saying where its weights come from).
    """
    from dvos.inference.checkpoints import load_student
    from dvos.models.build import build_student

    if checkpoint is not None:
        student, description = load_student(checkpoint, model_cfg)
        return student.eval(), description
    torch.manual_seed(seed)
    student, init = build_student(model_cfg)
    return student.eval(), f"randomly initialised student (seed {seed}; {init})"


def build_cell_segmenter(spec: CellSpec) -> Any:
    """The segmenter a cell measures, on the spec's device (original frame size: no `max_size`).

    Models: "student", "dense", "teacher" (the configured one), "teacher:<name>" (`dvos.bench.teachers`,
    random weights seeded by `spec.seed`), "exported-<format>" (`spec.exported_path`)."""
    device = torch.device(spec.device)
    if spec.model.startswith("teacher:"):
        from dvos.bench.teachers import TEACHERS

        entry = TEACHERS[spec.model.removeprefix("teacher:")]
        torch.manual_seed(spec.seed)
        return entry.segmenter(entry.build(spec.teacher_cfg), device)
    if spec.model == "teacher":
        from dvos.models.build import build_teacher

        return TeacherSegmenter(build_teacher(spec.teacher_cfg), device=device)
    if spec.model.startswith("exported-"):
        from dvos.inference.export import ExportedSegmenter, load_exported

        fmt = spec.model.removeprefix("exported-").split("-")[0]  # "onnx-int8" is an ONNX file
        return ExportedSegmenter(load_exported(spec.exported_path, fmt, threads=spec.threads))
    student, _ = build_student_model(spec.model_cfg, spec.student_checkpoint, seed=spec.seed)
    if spec.model == "dense":
        return DenseMemorySegmenter(student, memory_every=spec.memory_every, device=device)
    if spec.model == "student":
        return StudentSegmenter(student, device=device)
    raise ValueError(f"unknown model {spec.model!r} (one of {', '.join(MODELS)})")


class SyntheticVideo:
    """A generated video of any length, rendered one frame at a time (`dvos.data.synth` scene).

    The scene is the same for every length (its visibility is checked over the first 256 frames and
    objects follow bounded paths), so an L-frame video is the first L frames of a longer one.
    """

    def __init__(self, size: tuple[int, int], *, seed: int = 0, num_objects: int = VIDEO_OBJECTS) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 6, 1000]))
        self.scene = sample_scene(rng, (int(size[0]), int(size[1])), num_objects, num_frames=256)

    def frame(self, t: int) -> np.ndarray:
        """Frame t, H × W × 3 uint8 RGB."""
        return self.scene.render(t)[0]

    def first(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(frame 0, its mask H × W uint8, the object ids in it)."""
        frame, mask = self.scene.render(0)
        return frame, mask, mask_object_ids(mask)


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------
def memory_frames(segmenter: Any) -> int:
    """Frames the segmenter's carried state holds now."""
    if isinstance(segmenter, DenseMemorySegmenter):
        return segmenter.memory_frames
    if isinstance(segmenter, TeacherSegmenter):
        return segmenter.context_size
    if isinstance(segmenter, StudentSegmenter):
        return 0 if segmenter.memory is None else 2
    return 2 if getattr(segmenter, "reference", None) is not None else 0  # an exported student


@torch.inference_mode()
def fast_forward(segmenter: Any, frame_index: int) -> None:
    """Give a started segmenter the state size it has just before frame `frame_index` (see the
    module docstring); the student's two-frame memory needs nothing."""
    if isinstance(segmenter, DenseMemorySegmenter):
        # The bank to one frame short, then the last frame appended as a real walk does (AOT
        # concatenates: old and new bank coexist for a moment, and that is part of the peak).
        target = segmenter.model.bank_frames_before(frame_index)
        if target - 1 > segmenter.dense_memory.frames:
            segmenter.fast_forward((target - 2) * segmenter.model.memory_every + 1)
        segmenter.fast_forward(frame_index)
    elif isinstance(segmenter, TeacherSegmenter):
        teacher = segmenter.teacher
        reference = teacher.memory.reference
        wanted = min(max(0, int(frame_index) - 1), teacher.n_recent)
        while len(teacher.memory.recent) < wanted:
            teacher.memory.push(ContextEntry(0, reference.features.clone(), reference.labels.clone()))


# --------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------
def run_cell_here(spec: CellSpec) -> dict[str, Any]:
    """Run a cell in this process.

    Returns:
        {"spec": ..., "rows": [one per length: model, length, fps, timed_frames, first_timed_frame,
        seconds_per_frame, segmented_frames, fast_forwarded_frames, peak_mb, before_mb, growth_mb,
        state_bytes, memory_frames, size, device],
        "memory_method", "build_seconds"}.
    """
    device = torch.device(spec.device)
    lengths = sorted(int(length) for length in spec.lengths)
    if spec.mode not in ("window", "stream"):
        raise ValueError(f"unknown cell mode {spec.mode!r}")
    if spec.mode == "window" and len(lengths) != 1:
        raise ValueError("a window cell measures one length")
    if lengths[0] < spec.warmup + 2:
        raise ValueError(f"video length {lengths[0]} is too short for {spec.warmup} warm-up frame(s) + 1")
    if spec.threads is not None:
        torch.set_num_threads(int(spec.threads))
    started = time.perf_counter()
    segmenter = build_cell_segmenter(spec)
    video = SyntheticVideo(spec.size, seed=spec.seed)
    frame0, mask0, object_ids = video.first()
    build_seconds = time.perf_counter() - started
    last = lengths[-1]
    whole = spec.mode == "stream" or spec.window <= 0
    first_step = 1 if whole else max(1, last - spec.window - spec.warmup)

    gc.collect()
    meter = PeakMemory(device)
    meter.reset()
    with autocast(device, spec.amp):
        segmenter.start(frame0, mask0, object_ids)
        fast_forward(segmenter, first_step)
        rows, times, seen, flops = [], [], 0, None
        for t in range(first_step, last):
            frame = video.frame(t)  # rendering is not timed
            if spec.count_flops and flops is None and spec.warmup > 0:  # the first warm-up frame
                flops = count_flops(lambda frame=frame: segmenter.step(frame))[0]
                times.append(0.0)
                continue
            synchronize(device)
            tick = time.perf_counter()
            segmenter.step(frame)
            synchronize(device)
            times.append(time.perf_counter() - tick)
            length = t + 1
            if length in lengths:
                # timed: after the warm-up and since the previous length, the last `window` of them
                recent = times[max(seen, spec.warmup) :]
                timed = recent[-spec.window :] if spec.window > 0 else recent
                seen = len(times)
                peak = meter.peak_mb()
                rows.append(
                    {
                        "model": spec.model,
                        "length": length,
                        "mode": spec.mode,
                        "fps": len(timed) / sum(timed) if timed and sum(timed) > 0 else None,
                        "seconds_per_frame": float(np.median(timed)) if timed else None,
                        "timed_frames": len(timed),
                        "first_timed_frame": length - len(timed),
                        "segmented_frames": len(times),
                        "fast_forwarded_frames": first_step - 1,
                        "peak_mb": peak,
                        "before_mb": meter.before_mb,
                        "growth_mb": peak - meter.before_mb,
                        "state_bytes": int(segmenter.memory_bytes()),
                        "memory_frames": memory_frames(segmenter),
                        "size": list(spec.size),
                        "device": str(device),
                    }
                )
        if spec.count_flops and flops is None:  # no warm-up frame: one more frame, after the timing
            flops = count_flops(lambda: segmenter.step(video.frame(last)))[0]
    if spec.count_flops:
        from dvos.bench.teachers import parameters_of

        for row in rows:
            row["gflops_per_frame"] = flops / 1e9
            row["parameters"] = parameters_of(segmenter)
    return {"spec": asdict(spec), "rows": rows, "memory_method": meter.method, "build_seconds": build_seconds}


# --------------------------------------------------------------------------------------------------
# In a fresh process
# --------------------------------------------------------------------------------------------------
def run_cell(spec: CellSpec, *, isolate: bool = True, timeout: float | None = None) -> dict[str, Any]:
    """Run a cell, in a fresh Python process when `isolate` (its RSS high-water mark is the cell's).

    A cell that fails (an error, a process killed for memory, a timeout) returns
    {"spec", "rows": [], "error": one line} instead of raising: the other cells still run.
    """
    if not isolate:
        try:
            return run_cell_here(spec)
        except Exception as err:  # noqa: BLE001 - recorded in the results, the run goes on
            return {"spec": asdict(spec), "rows": [], "error": f"{type(err).__name__}: {err}"}
    with tempfile.TemporaryDirectory(prefix="dvos-bench-cell-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        command = [sys.executable, "-m", "dvos.bench.cells", str(spec_path), str(out_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"spec": asdict(spec), "rows": [], "error": f"timed out after {timeout:.0f} s"}
        if done.returncode == 0 and out_path.is_file():
            return json.loads(out_path.read_text())
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode}" + (
                " (out of memory?)" if done.returncode == -9 else ""
            )
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
        return {"spec": asdict(spec), "rows": [], "error": why}


def _main(argv: list[str]) -> int:
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    raw = json.loads(spec_path.read_text())
    raw["size"] = tuple(raw["size"])
    spec = CellSpec(**raw)
    try:
        result = run_cell_here(spec)
    except Exception:
        traceback.print_exc()
        return 1
    with contextlib.suppress(OSError):
        out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
