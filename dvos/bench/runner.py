"""`run_benchmark`: every measurement of `dvos bench` in one run, written to `OUT/results.json`.

Order (so that ratios between models hold on a machine whose load changes):

1. the machine's fp32 matmul rate (again at the end; the larger is used);
2. FLOPs per frame of the student and the teacher at the benchmark size (`FlopCounterMode`), the
   parameters and FLOPs of every model group file (`dvos.bench.sizes`), and
   the student's attention computed whole against in blocks of query rows (`dvos.bench.attention`;
   the benchmark size and 1080p; CPU only);
3. inference cells at the benchmark size, interleaved: for each length L, student → dense → teacher
   (each cell a fresh process, `dvos.bench.cells`); the student exported to ONNX / TorchScript
   (`dvos.inference.export`, exported just before) joins the round of the shortest length;
4. the memory-growth walk: every frame of the longest video segmented at a small size, memory read
   at each length;
5. data loading (mp4 / frame folders) against the training step's consumption;
6. J&F against FPS on the configured validation set and, when present, the DAVIS-2016 sample.

`results.json` is rewritten (atomically) after every section with `"complete": false`, so a run
stopped half-way still leaves what it measured; a section that fails records its error and the run
goes on.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import gc
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dvos.bench.attention import measure_attention
from dvos.bench.cells import MODELS, CellSpec, SyntheticVideo, build_student_model, fast_forward, run_cell
from dvos.bench.dense import MEMORY_EVERY, DenseMemorySegmenter
from dvos.bench.measure import count_flops, matmul_gflops
from dvos.bench.sizes import model_sizes
from dvos.config import DEFAULT_CONF_DIR
from dvos.utils.io import ensure_writable_dir, write_json

log = logging.getLogger("dvos.bench")

SCHEMA = "dvos-bench/1"
RESULTS_JSON = "results.json"
PLOT_PNG = "results.png"
SECTIONS = ("inference", "stream", "flops", "sizes", "attention", "loading", "accuracy", "export")
HD_SIZE = (1080, 1920)  # the attention section also measures a 1080p frame (not with --quick)


@dataclass
class BenchOptions:
    """What to measure and how (the `dvos bench` options, resolved; see `dvos bench --help`)."""

    out: Path = Path("bench")
    lengths: list[int] = field(default_factory=lambda: [50, 200, 1000])
    size: tuple[int, int] = (480, 854)
    device: str = "cpu"
    amp: bool = True
    models: list[str] = field(default_factory=lambda: list(MODELS))
    window: int = 4  # timed frames per length (0: the whole video)
    warmup: int = 1
    stream_size: tuple[int, int] | None = (64, 112)
    isolate: bool = True
    jf_max_size: int | None = 240
    jf_sequences: int | None = 3
    davis_root: Path | None = None
    loader_batches: int = 4
    train_steps: int = 2
    matmul_size: int = 2048
    export_formats: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    seed: int = 0
    threads: int | None = None
    quick: bool = False
    cell_timeout: float | None = None
    teachers: list[str] = field(
        default_factory=list
    )  # `dvos.bench.teachers` names, timed at the shortest length
    teacher_window: int = 2  # timed frames of each of those (after one warm-up frame whose FLOPs are counted)
    calibration: Path | None = (
        None  # videos calibrating the int8 student (None: the embedded training videos)
    )


@dataclass
class Weights:
    """Where the measured models' weights come from.

    Attributes:
        student_checkpoint: the student's checkpoint file, None for random weights.
        student_source: how it was chosen (one line, e.g. "--ckpt", "the newest run's best checkpoint").
        teacher: one line on the teacher's weights (its file is `cfg.teacher.checkpoint`).
    """

    student_checkpoint: Path | None
    student_source: str
    teacher: str
    student: str = ""  # filled in when the student is built


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    with contextlib.suppress(OSError):
        info["load_average_start"] = list(os.getloadavg())
    return info


class Recorder:
    """The results dict, saved after every section; a failing section is recorded, not fatal."""

    def __init__(self, results: dict[str, Any], path: Path) -> None:
        self.results = results
        self.path = path

    def save(self) -> None:
        write_json(self.path, self.results)

    @contextlib.contextmanager
    def section(self, name: str, title: str) -> Iterator[None]:
        log.info("bench: %s ...", title)
        started = time.perf_counter()
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a long benchmark keeps what the other sections give
            line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.results.setdefault("errors", {})[name] = line
            log.warning("bench: %s failed: %s", name, line)
        finally:
            seconds = time.perf_counter() - started
            self.results.setdefault("section_seconds", {})[name] = round(seconds, 2)
            log.info("bench: %s done in %.0f s", title, seconds)
            self.save()


def _first_frames(size: tuple[int, int], seed: int) -> tuple[Any, Any, Any, list[int]]:
    video = SyntheticVideo(size, seed=seed)
    frame0, mask0, object_ids = video.first()
    return video, frame0, mask0, object_ids


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def measure_flops(
    student: Any, teacher: Any | None, options: BenchOptions, device: torch.device
) -> dict[str, Any]:
    """FLOPs of one frame step of the student (and the teacher, its context full) at the bench size."""
    from dvos.inference.engine import StudentSegmenter, TeacherSegmenter

    video, frame0, mask0, object_ids = _first_frames(options.size, options.seed)
    frame1 = video.frame(1)
    result: dict[str, Any] = {
        "size": list(options.size),
        "counter": "torch.utils.flop_counter.FlopCounterMode",
    }
    segmenter = StudentSegmenter(student, device=device)
    segmenter.start(frame0, mask0, object_ids)
    total, per_module, _ = count_flops(lambda: segmenter.step(frame1))
    result["student"] = {
        "flops_per_frame": total,
        "gflops_per_frame": total / 1e9,
        "by_module_gflops": _by_child(student, total, per_module),
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    if teacher is not None:
        teacher_segmenter = TeacherSegmenter(teacher, device=device)
        teacher_segmenter.start(frame0, mask0, object_ids)
        fast_forward(teacher_segmenter, teacher.n_recent + 1)
        total, per_module, _ = count_flops(lambda: teacher_segmenter.step(frame1))
        result["teacher"] = {
            "flops_per_frame": total,
            "gflops_per_frame": total / 1e9,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "context_frames": teacher_segmenter.context_size,
        }
    # The dense read cannot be counted on CPU (the fused attention kernel is unknown to the counter):
    # QKᵀ and A·V for the visual and the ID values, 2·N·M·d FLOP each, over bank + previous frame.
    tokens = segmenter.memory.reference_key.shape[-2] * segmenter.memory.reference_key.shape[-1]
    d_model = int(student.d_model)
    result["dense_read"] = {
        "formula": "8·N·M·d (QKᵀ and A·V, visual and ID values), N = query tokens, M = memory tokens",
        "tokens_per_frame": int(tokens),
        "gflops_by_length": {
            str(length): 8 * tokens * tokens * (_bank_frames(length) + 1) * d_model / 1e9
            for length in options.lengths
        },
    }
    return result


def _by_child(model: Any, total: int, per_module: dict[str, int]) -> dict[str, float]:
    """GFLOPs per top-level child of `model` (the counter names modules by class; children of a class
    that occurs twice, and work outside any child, go to "other")."""
    classes: dict[str, list[str]] = {}
    for name, child in model.named_children():
        classes.setdefault(type(child).__name__, []).append(name)
    out: dict[str, float] = {}
    for class_name, names in classes.items():
        if len(names) == 1 and class_name in per_module:
            out[names[0]] = per_module[class_name] / 1e9
    out["other"] = max(0.0, total / 1e9 - sum(out.values()))
    return out


def _bank_frames(length: int, every: int = MEMORY_EVERY) -> int:
    """Frames in the dense bank while the last frame of an L-frame video is segmented."""
    return 1 + (max(1, length - 1) - 1) // every


def cell_spec(cfg: Any, options: BenchOptions, weights: Weights, **fields: Any) -> CellSpec:
    from dvos.config import to_dict

    base = {
        "threads": options.threads,
        "device": options.device,
        "amp": options.amp,
        "seed": options.seed,
        "warmup": options.warmup,
        "window": options.window,
        "model_cfg": to_dict(cfg.model),
        "teacher_cfg": to_dict(cfg.teacher),
        "student_checkpoint": None if weights.student_checkpoint is None else str(weights.student_checkpoint),
    }
    return CellSpec(**{**base, **fields})


def teacher_specs(cfg: Any, options: BenchOptions, weights: Weights, length: int) -> list[dict[str, Any]]:
    """The cells of the extra teachers (`options.teachers`) at `length`: each at the largest size whose
    estimated peak fits the memory available now (`dvos.bench.teachers.fitting_size`).

    Returns:
        one {"model", "spec" (None when not even the smallest size fits), "note", "estimated_peak_mb"}
        per teacher.
    """
    from dvos.bench.teachers import TEACHERS, available_bytes, fitting_size
    from dvos.config import to_dict

    available = available_bytes() if options.device == "cpu" else None
    teacher_cfg = to_dict(cfg.teacher)
    out = []
    for name in options.teachers:
        size, estimate = fitting_size(TEACHERS[name], tuple(options.size), teacher_cfg, available=available)
        note = None
        if size is None:
            note = (
                f"does not fit: about {estimate / 2**20:.0f} MB even at a quarter of the size, "
                f"{(available or 0) / 2**20:.0f} MB available"
            )
        elif tuple(size) != tuple(options.size):
            full = TEACHERS[name].peak_bytes(tuple(options.size), teacher_cfg)
            note = (
                f"timed at {size[0]}×{size[1]}: {options.size[0]}×{options.size[1]} needs about "
                f"{full / 2**20:.0f} MB, {(available or 0) / 2**20:.0f} MB available"
            )
        spec = None
        if size is not None:
            spec = cell_spec(
                cfg,
                options,
                weights,
                model=f"teacher:{name}",
                size=tuple(size),
                lengths=[length],
                window=options.teacher_window,
                warmup=max(1, options.warmup),
                count_flops=True,
            )
        out.append(
            {"model": f"teacher:{name}", "spec": spec, "note": note, "estimated_peak_mb": estimate / 2**20}
        )
    return out


def run_inference_cells(
    cfg: Any, options: BenchOptions, weights: Weights, *, exported: dict[str, str] | None = None
) -> dict[str, Any]:
    """FPS and peak memory at each length, models interleaved (length outer, model inner).

    Exported students (`exported`: model name → file) and the extra teachers (`options.teachers`,
    fewer timed frames, FLOPs counted) join the round of the shortest length only: the students'
    memory is two frames and the teachers' context is full from frame 1 + n_recent, so one length
    says it all.
    """
    rows, errors, method, notes = [], [], None, {}
    for length in options.lengths:
        cells = [
            (
                model,
                cell_spec(
                    cfg,
                    options,
                    weights,
                    model=model,
                    size=options.size,
                    lengths=[length],
                    exported_path=(exported or {}).get(model),
                ),
            )
            for model in options.models + (list(exported or {}) if length == min(options.lengths) else [])
        ]
        if length == min(options.lengths):
            for entry in teacher_specs(cfg, options, weights, length):
                notes[entry["model"]] = {key: entry[key] for key in ("note", "estimated_peak_mb")}
                if entry["spec"] is None:
                    errors.append({"model": entry["model"], "length": length, "error": entry["note"]})
                    continue
                cells.append((entry["model"], entry["spec"]))
        for model, spec in cells:
            result = run_cell(spec, isolate=options.isolate, timeout=options.cell_timeout)
            method = result.get("memory_method", method)
            if result.get("error"):
                errors.append({"model": model, "length": length, "error": result["error"]})
                log.warning("bench: %s at %d frames failed: %s", model, length, result["error"])
            for row in result["rows"]:
                log.info(
                    "bench: %-8s L=%-5d %.3g FPS, peak %.0f MB (+%.0f MB), state %.1f MB",
                    model,
                    length,
                    row["fps"] or 0,
                    row["peak_mb"],
                    row["growth_mb"],
                    row["state_bytes"] / 2**20,
                )
                rows.append(row)
    whole = options.window <= 0
    how = (
        f"every frame 1..L−1 segmented; FPS over frames {options.warmup + 1}..L−1"
        if whole
        else (
            f"window: the state fast-forwarded to its size at frame L−{options.window + options.warmup}, "
            f"then {options.warmup} warm-up + {options.window} timed frames ending at frame L−1"
        )
    )
    return {
        "size": list(options.size),
        "video": "dvos.data.synth scene, 3 objects, rendered on demand",
        "teacher_notes": notes,
        "measured": how,
        "isolation": "a fresh process per cell" if options.isolate else "in this process (RSS less exact)",
        "memory_method": method,
        "rows": rows,
        "errors": errors,
    }


def compare_teachers(results: dict[str, Any], options: BenchOptions) -> dict[str, Any] | None:
    """The student against every teacher measured in the round of the shortest length: FPS, peak
    memory, state, parameters, FLOPs per frame and the student's FPS over each teacher's."""
    from dvos.bench.teachers import RANDOM_WEIGHTS_NOTE, TEACHERS

    inference = results.get("inference") or {}
    length = min(options.lengths)
    by_model = {row["model"]: row for row in inference.get("rows") or [] if row["length"] == length}
    student = by_model.get("student")
    if student is None:
        return None
    flops = results.get("flops") or {}
    notes = inference.get("teacher_notes") or {}

    def entry(model: str, title: str, row: dict[str, Any], counted: dict[str, Any] | None) -> dict[str, Any]:
        counted = counted or row
        return {
            "model": model,
            "title": title,
            "size": row["size"],
            "fps": row["fps"],
            "peak_mb": row["peak_mb"],
            "growth_mb": row["growth_mb"],
            "state_mb": row["state_bytes"] / 2**20,
            "memory_frames": row["memory_frames"],
            "parameters": counted.get("parameters"),
            "gflops_per_frame": counted.get("gflops_per_frame"),
            "student_fps_over_this": student["fps"] / row["fps"] if student["fps"] and row["fps"] else None,
            "note": (notes.get(model) or {}).get("note"),
        }

    rows = [entry("student", "the student (PyTorch)", student, flops.get("student"))]
    if "teacher" in by_model:
        encoder = ((results.get("config") or {}).get("teacher") or {}).get("encoder", "?")
        title = f"the configured teacher ({encoder} label propagation; its weights: see 'teacher:')"
        rows.append(entry("teacher", title, by_model["teacher"], flops.get("teacher")))
    failed = {error["model"]: error["error"] for error in inference.get("errors") or []}
    for name in options.teachers:
        model = f"teacher:{name}"
        if model in by_model:
            rows.append(entry(model, TEACHERS[name].title, by_model[model], None))
        else:
            rows.append(
                {"model": model, "title": TEACHERS[name].title, "error": failed.get(model, "not run")}
            )
    return {
        "length": length,
        "size": list(options.size),
        "weights": RANDOM_WEIGHTS_NOTE,
        "measured": f"the inference cells of the {length}-frame round (the extra teachers: "
        f"{options.teacher_window} timed frames after one warm-up frame whose FLOPs are counted)",
        "rows": rows,
    }


def run_stream(cfg: Any, options: BenchOptions, weights: Weights) -> dict[str, Any]:
    """Every frame of the longest video segmented at `stream_size`; memory read at each length."""
    rows, errors, method = [], [], None
    for model in options.models:
        spec = cell_spec(
            cfg,
            options,
            weights,
            model=model,
            size=options.stream_size,
            lengths=list(options.lengths),
            mode="stream",
        )
        result = run_cell(spec, isolate=options.isolate, timeout=options.cell_timeout)
        method = result.get("memory_method", method)
        if result.get("error"):
            errors.append({"model": model, "error": result["error"]})
            log.warning("bench: memory walk of %s failed: %s", model, result["error"])
        rows.extend(result["rows"])
    return {
        "size": list(options.stream_size),
        "measured": "every frame segmented (no fast-forward); peak = high-water mark up to frame L",
        "isolation": "a fresh process per model" if options.isolate else "in this process",
        "memory_method": method,
        "rows": rows,
        "errors": errors,
    }


def _synthetic_roots(cfg: Any) -> tuple[Path, Path]:
    """(mp4 training videos, JPEG frame folders) of the embedded set, built if needed."""
    from dvos.data.builders import synthetic_root

    root = synthetic_root(cfg)
    return root / "train", root / "val" / "JPEGImages" / "480p"


def run_data_loading(cfg: Any, options: BenchOptions, device: torch.device) -> dict[str, Any]:
    """Clips/s from mp4 (decord) and frame folders, one process and the configured DataLoader, and
    clips/s consumed by the distillation training step."""
    from dvos.bench.workload import loader_throughput, training_step_throughput
    from dvos.data.builders import build_clip_datamodule
    from dvos.lit.distill import DistillationModule
    from dvos.models import pseudo_objects

    mp4_root, frames_root = _synthetic_roots(cfg)
    workers = int(cfg.data.num_workers)

    def factory(root: Path) -> Callable[[int], Any]:
        def make(num_workers: int) -> Any:
            local = copy.deepcopy(cfg)
            local.data.train_root = str(root)
            local.data.num_workers = num_workers
            return build_clip_datamodule(local)

        return make

    result: dict[str, Any] = {
        "clip": {
            "clip_len": int(cfg.data.clip_len),
            "crop_size": list(cfg.data.crop_size),
            "batch_size": int(cfg.data.batch_size),
        },
        "sources": {"mp4": str(mp4_root), "frames": str(frames_root)},
    }
    for key, root in (("mp4", mp4_root), ("frames", frames_root)):
        entry = {
            "single": loader_throughput(
                factory(root), batches=max(1, options.loader_batches // 2), num_workers=0
            )
        }
        if workers > 0:
            entry["loader"] = loader_throughput(
                factory(root), batches=options.loader_batches, num_workers=workers
            )
        result[key] = entry
        gc.collect()
    batch = next(iter(factory(mp4_root)(0).train_dataloader()))
    module = DistillationModule(cfg)
    precision = str(cfg.trainer.precision)
    # The pseudo-objects of each clip (clustering the reference frame), and the k-means inside it.
    parts = {
        "pseudo_objects": (module.teacher, "cluster_reference"),
        "kmeans": (pseudo_objects, "kmeans_segments"),
    }
    result["train_step"] = {
        **training_step_throughput(
            module,
            batch,
            steps=options.train_steps,
            device=device,
            amp=device.type == "cuda" and "16" in precision,
            parts=parts,
        ),
        "what": "DistillationModule.training_step (teacher + student forward, losses) + backward + AdamW step",
        "parts_what": {
            "pseudo_objects": "LabelPropagationTeacher.cluster_reference: k-means of the reference frame, "
            "connected components (distill.components) and upsampling",
            "kmeans": "dvos.models.pseudo_objects.kmeans_segments: the batched k-means alone",
        },
        "precision": precision,
    }
    del module
    gc.collect()
    loader = (result["mp4"].get("loader") or result["mp4"]["single"])["clips_per_s"]
    consumed = result["train_step"]["clips_per_s"]
    if loader and consumed:
        result["loader_over_step"] = loader / consumed
        result["verdict"] = (
            f"loading keeps up ({loader / consumed:.1f}× the step's consumption)"
            if loader >= consumed
            else f"loading is the bottleneck (it delivers {loader / consumed:.2f}× what the step consumes)"
        )
    return result


def _eval_sets(cfg: Any, options: BenchOptions) -> list[tuple[str, Any, list[Any], str | None]]:
    """(name, config, sequences, note) for the configured validation set and the DAVIS-2016 sample."""
    from dvos.config import load_config
    from dvos.data.builders import build_eval_datamodule, prepare_data

    sets = []
    prepare_data(cfg)
    data = build_eval_datamodule(cfg)
    data.setup("validate")
    sequences = list(data.dataset)
    sets.append((str(cfg.data.name), cfg, sequences, None))
    davis = options.davis_root
    if davis is not None:
        davis = Path(davis)
        if (davis / "JPEGImages").is_dir() and davis.resolve() != Path(str(cfg.data.root)).resolve():
            davis_cfg = load_config([*_overrides_of(cfg), "data=davis2016", f"data.root={davis}"])
            data = build_eval_datamodule(davis_cfg)
            data.setup("validate")
            sets.append(("davis2016-sample", davis_cfg, list(data.dataset), None))
        else:
            sets.append(("davis2016-sample", None, [], f"skipped: no DAVIS tree at {davis}"))
    return sets


def _overrides_of(cfg: Any) -> list[str]:
    """The model and teacher settings of `cfg` as dot-list overrides (for a second data set)."""
    from dvos.config import to_dict

    overrides = []
    for group in ("model", "teacher", "eval"):
        for key, value in to_dict(cfg[group]).items():
            overrides.append(f"{group}.{key}={'null' if value is None else value}")
    overrides.append(f"paths.data_dir={cfg.paths.data_dir}")
    overrides.append(f"paths.runs_dir={cfg.paths.runs_dir}")
    return overrides


def run_accuracy(
    cfg: Any,
    options: BenchOptions,
    student: Any,
    teacher: Any | None,
    device: torch.device,
    weights: Weights,
    *,
    exported: dict[str, str] | None = None,
) -> dict[str, Any]:
    """J&F and FPS of each model on the configured set and the DAVIS-2016 sample; the exported
    students (`exported`: model name → file, fixed at the bench size) on the DAVIS sample only, at
    their own size, beside the PyTorch student at that size (its J&F is the fp32 reference)."""
    from dvos.bench.accuracy import score_models
    from dvos.inference.engine import StudentSegmenter, TeacherSegmenter
    from dvos.inference.export import ExportedSegmenter, load_exported

    datasets = []
    for name, set_cfg, sequences, note in _eval_sets(cfg, options):
        if set_cfg is None:
            datasets.append({"name": name, "rows": [], "note": note})
            continue
        if options.jf_sequences is not None:
            sequences = sequences[: options.jf_sequences]
        segmenters: dict[str, tuple[Any, str]] = {}
        if "student" in options.models:
            segmenters["student"] = (
                StudentSegmenter(student, device=device, max_size=options.jf_max_size),
                weights.student,
            )
        if "dense" in options.models:
            segmenters["dense"] = (
                DenseMemorySegmenter(student, device=device, max_size=options.jf_max_size),
                f"dense-memory baseline on the student's weights ({weights.student})",
            )
        if "teacher" in options.models and teacher is not None:
            segmenters["teacher"] = (
                TeacherSegmenter(teacher, device=device, max_size=options.jf_max_size),
                weights.teacher,
            )
        onnx_files = {model: path for model, path in (exported or {}).items() if path.endswith(".onnx")}
        if name == "davis2016-sample" and onnx_files:
            full = tuple(options.size)
            segmenters[f"student@{full[0]}x{full[1]}"] = (
                StudentSegmenter(student, device=device, max_size=max(full), min_size=min(full)),
                f"{weights.student}, frames at {full[0]}×{full[1]} as the exported files",
            )
            for model, path in onnx_files.items():
                step = load_exported(path, "onnx", threads=options.threads)
                segmenters[model] = (ExportedSegmenter(step), f"{model}: {path}")
        rows = score_models(
            segmenters, set_cfg, sequences, options.out / "jf" / name, device=device, amp=options.amp
        )
        for row in rows:
            log.info("bench: %s %s J&F %s at %.3g FPS", name, row["model"], _fmt(row["J&F"]), row["fps"] or 0)
        datasets.append(
            {
                "name": name,
                "root": str(set_cfg.data.root),
                "sequences": [s.name for s in sequences],
                "frames": sum(len(s) for s in sequences),
                "max_size": options.jf_max_size,
                "rows": rows,
            }
        )
    return {
        "measured": "dvos evaluate's path: predictions written as PNGs, J&F by the DAVIS toolkit's rules; "
        "FPS = frames / seconds in the segmenter at the model input size (long side ≤ max_size; the "
        "exported students and student@HxW at the exported size instead)",
        "datasets": datasets,
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def export_student_files(cfg: Any, options: BenchOptions, student: Any) -> dict[str, Any]:
    """Export the student's frame step at the bench size in each format (`dvos.inference.export`);
    "onnx-int8" quantizes the fp32 ONNX file (`dvos.inference.quantize`), calibrated on
    `options.calibration` or the embedded synthetic training videos.

    Returns:
        {"files": {model name ("exported-onnx", ...): path}, "notes": [why a format is missing],
        "runtime", "quantization": the int8 file's calibration (when made)}; the files are timed with
        the other models in the inference section and scored on the DAVIS sample in the accuracy one.
    """
    from dvos.inference import export as export_module

    out = ensure_writable_dir(options.out / "export")
    files, notes, result = {}, [], {}
    size = f"{options.size[0]}x{options.size[1]}"
    for fmt in options.export_formats:
        if fmt == "onnx-int8":
            continue
        path = out / f"student-{size}.{'onnx' if fmt == 'onnx' else 'pt'}"
        try:
            export_module.export_student(student, fmt, path, height=options.size[0], width=options.size[1])
        except Exception as err:  # noqa: BLE001 - e.g. the optional exporter packages are missing
            notes.append(f"{fmt}: not exported ({str(err).splitlines()[0]})")
            continue
        files[f"exported-{fmt}"] = str(path)
    if "onnx-int8" in options.export_formats:
        from dvos.data.builders import calibration_videos
        from dvos.inference.quantize import quantize_student

        try:
            fp32 = files.get("exported-onnx") or str(
                export_module.export_student(
                    student,
                    "onnx",
                    out / f"student-{size}.onnx",
                    height=options.size[0],
                    width=options.size[1],
                )
            )
            videos, source = calibration_videos(cfg, options.calibration)
            path = out / f"student-{size}-int8.onnx"
            result["quantization"] = quantize_student(fp32, path, videos, source=source)
            files["exported-onnx-int8"] = str(path)
        except Exception as err:  # noqa: BLE001 - the other formats are still timed
            notes.append(f"onnx-int8: not made ({str(err).splitlines()[0]})")
    return {
        "files": files,
        "notes": notes,
        "runtime": "onnxruntime (CPU) / torch.jit (CPU), same threads",
        **result,
    }


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def int8_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """The int8 student beside the fp32 ONNX and PyTorch students: FPS (inference cells of the
    shortest length) and J&F on the DAVIS-2016 sample (the exported size), with the J&F it loses."""
    rows = (results.get("inference") or {}).get("rows") or []
    if not any(row["model"] == "exported-onnx-int8" for row in rows):
        return None
    length = min(row["length"] for row in rows if row["model"] == "exported-onnx-int8")
    fps = {row["model"]: row["fps"] for row in rows if row["length"] == length}
    out: dict[str, Any] = {
        "length": length,
        "fps": fps.get("exported-onnx-int8"),
        "fps_fp32_onnx": fps.get("exported-onnx"),
        "fps_pytorch": fps.get("student"),
    }
    for dataset in (results.get("accuracy") or {}).get("datasets") or []:
        scores = {row["model"]: row["J&F"] for row in dataset.get("rows") or []}
        if "exported-onnx-int8" in scores:
            reference = scores.get("exported-onnx")
            out.update(
                {
                    "jf_set": dataset["name"],
                    "jf": scores["exported-onnx-int8"],
                    "jf_fp32_onnx": reference,
                    "jf_pytorch": next((v for k, v in scores.items() if k.startswith("student@")), None),
                    "jf_delta": None
                    if reference is None or scores["exported-onnx-int8"] is None
                    else scores["exported-onnx-int8"] - reference,
                }
            )
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: matmul rate, the student's share of it, memory growth of each model."""
    summary: dict[str, Any] = {}
    matmul = results.get("matmul") or {}
    rates = [entry["gflops"] for entry in (matmul.get("start"), matmul.get("end")) if entry]
    if rates:
        summary["matmul_gflops"] = max(rates)
    rows = (results.get("inference") or {}).get("rows") or []
    student_fps = [row["fps"] for row in rows if row["model"] == "student" and row.get("fps")]
    flops = (results.get("flops") or {}).get("student")
    if student_fps and flops and rates:
        fps = sum(student_fps) / len(student_fps)
        achieved = flops["gflops_per_frame"] * fps
        summary["student_fps"] = fps
        summary["student_achieved_gflops"] = achieved
        summary["student_share_of_matmul"] = achieved / max(rates)
    int8 = int8_summary(results)
    if int8:
        summary["int8_student"] = int8
    teachers = (results.get("teachers") or {}).get("rows") or []
    ratios = {row["model"]: row.get("student_fps_over_this") for row in teachers if row["model"] != "student"}
    if ratios:
        summary["student_fps_over_teacher"] = ratios
    for source in ("inference", "stream"):
        by_model: dict[str, list[dict[str, Any]]] = {}
        for row in (results.get(source) or {}).get("rows") or []:
            by_model.setdefault(row["model"], []).append(row)
        growth = {}
        for model, model_rows in by_model.items():
            if len(model_rows) < 2:
                continue
            model_rows.sort(key=lambda row: row["length"])
            first, last = model_rows[0], model_rows[-1]
            growth[model] = {
                "from_length": first["length"],
                "to_length": last["length"],
                "peak_mb_change": last["peak_mb"] - first["peak_mb"],
                "growth_mb_change": last["growth_mb"] - first["growth_mb"],
                "state_bytes_change": last["state_bytes"] - first["state_bytes"],
            }
        if growth:
            summary[f"memory_growth_{source}"] = growth
    return summary


def new_results(cfg: Any, options: BenchOptions, weights: Weights, device: torch.device) -> dict[str, Any]:
    from dvos.config import environment_info, to_dict

    return {
        "schema": SCHEMA,
        "complete": False,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": environment_info(),
        "options": {key: _jsonable(value) for key, value in asdict(options).items()},
        "student": {
            "weights": weights.student_source,
            "checkpoint": None if weights.student_checkpoint is None else str(weights.student_checkpoint),
        },
        "teacher": {"weights": weights.teacher},
        "dense": {
            "description": "the student with global attention over a memory bank that adds a frame every "
            f"{MEMORY_EVERY} frames (DeAOT-L / AOT) and the previous frame; same modules and weights",
            "memory_every": MEMORY_EVERY,
        },
        "config": to_dict(cfg),
        "notes": [],
    }


def run_benchmark(cfg: Any, options: BenchOptions, weights: Weights) -> dict[str, Any]:
    """Run every section not in `options.skip`; returns the results (also in OUT/results.json)."""
    from dvos.bench.plot import draw_results
    from dvos.models.build import build_teacher

    started = time.perf_counter()
    device = torch.device(options.device)
    out = ensure_writable_dir(options.out)
    results = new_results(cfg, options, weights, device)
    recorder = Recorder(results, out / RESULTS_JSON)
    if device.type == "cpu" and options.amp:
        results["notes"].append("AMP is used on CUDA only (bf16 is very slow on CPUs such as this one): fp32")
    load = results["machine"].get("load_average_start")
    if device.type == "cpu" and load and torch.get_num_threads() > 1 and load[0] > (os.cpu_count() or 1):
        note = (
            f"the machine is busy (load average {load[0]:.1f} on {os.cpu_count()} CPUs): multi-threaded CPU "
            f"timings suffer most (threads wait for each other); --threads 1 is steadier on a shared machine"
        )
        results["notes"].append(note)
        log.warning("bench: %s", note)
    # The rate the models can reach: fp16 where they run under AMP (CUDA), else fp32.
    matmul_dtype = torch.float16 if device.type == "cuda" and options.amp else torch.float32
    results["matmul"] = {"start": matmul_gflops(size=options.matmul_size, device=device, dtype=matmul_dtype)}
    recorder.save()

    checkpoint = None if weights.student_checkpoint is None else str(weights.student_checkpoint)
    student, description = build_student_model(
        dict(results["config"]["model"]), checkpoint, seed=options.seed
    )
    student = student.to(device)
    weights.student = f"{description} [{weights.student_source}]"
    results["student"]["weights"] = weights.student
    teacher = build_teacher(cfg.teacher) if "teacher" in options.models else None
    results["student"]["parameters"] = sum(p.numel() for p in student.parameters())

    if "flops" not in options.skip:
        with recorder.section("flops", "FLOPs per frame"):
            results["flops"] = measure_flops(student, teacher, options, device)
    if "sizes" not in options.skip:
        with recorder.section("sizes", "parameters and FLOPs of the model group files"):
            results["sizes"] = model_sizes(DEFAULT_CONF_DIR, tuple(options.size), device, seed=options.seed)
    if "attention" not in options.skip:
        if device.type != "cpu":
            results["notes"].append("the attention section runs on the CPU only: GPUs compute the whole map")
        else:
            sizes = [tuple(options.size)]
            if not options.quick and tuple(options.size) != HD_SIZE:
                sizes.append(HD_SIZE)
            with recorder.section("attention", "the student's attention, whole map against row blocks"):
                results["attention"] = measure_attention(cfg.model, sizes, device, seed=options.seed)
    exported: dict[str, str] = {}
    if "export" not in options.skip and options.export_formats:
        with recorder.section("export", "exporting the student"):
            results["export"] = export_student_files(cfg, options, student)
            exported = results["export"]["files"]
    if "inference" not in options.skip:
        with recorder.section("inference", f"inference at {options.size[0]}×{options.size[1]}"):
            results["inference"] = run_inference_cells(cfg, options, weights, exported=exported)
            results["teachers"] = compare_teachers(results, options)
    if "stream" not in options.skip and options.stream_size is not None:
        size = options.stream_size
        with recorder.section(
            "stream", f"memory walk over {max(options.lengths)} frames at {size[0]}×{size[1]}"
        ):
            results["stream"] = run_stream(cfg, options, weights)
    if "loading" not in options.skip:
        with recorder.section("loading", "data loading and the training step"):
            results["data_loading"] = run_data_loading(cfg, options, device)
    if "accuracy" not in options.skip:
        with recorder.section("accuracy", "J&F against FPS"):
            results["accuracy"] = run_accuracy(
                cfg, options, student, teacher, device, weights, exported=exported
            )
    results["matmul"]["end"] = matmul_gflops(size=options.matmul_size, device=device, dtype=matmul_dtype)
    with contextlib.suppress(OSError):
        results["machine"]["load_average_end"] = list(os.getloadavg())
    results["summary"] = summarise(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["complete"] = True
    recorder.save()
    draw_results(results, out / PLOT_PNG)
    return results
