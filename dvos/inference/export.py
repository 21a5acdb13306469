"""Export of the student's frame step (ONNX / TorchScript) for devices without Python or dvos.

The exported graph is `FrameStep`: encoder + gated deformable propagation + FPN decoder + the ID
embedding of the frame's mask, with the constant-size memory as explicit tensors in and out. Shapes are
fixed when exporting: batch 1, frame H × W, K = max_objects; d = the student's `d_model`,
h = ⌈H/16⌉, w = ⌈W/16⌉. The memory maps below are d wide for the default student; in general keys
are C_k and values and ID maps C_v wide, the L propagation layers' entries side by side
(`memory_channels`; the file's description records them).

Inputs (in this order; names as in the ONNX graph):

    image            1 × 3 × H × W   float32  RGB in [0, 1]
    reference_key    1 × d × h × w   float32  long-term memory (the reference frame) ...
    reference_value  1 × d × h × w   float32
    reference_id     1 × d × h × w   float32  ... and its ID embedding
    previous_key     1 × d × h × w   float32  short-term memory (the previous frame) ...
    previous_value   1 × d × h × w   float32
    previous_id      1 × d × h × w   float32  ... and the ID embedding of its mask
    num_objects      1               int64    objects in the video (1..K); higher ids get logit −1e4
    given_labels     1 × H × W       int64    ids to use instead of the prediction where ≥ 0; −1: predict

Outputs:

    logits           1 × (K+1) × H × W  float32  per-object logits (0 = background)
    labels           1 × H × W          int64    given_labels where ≥ 0, else argmax of the logits
    key              1 × d × h × w      float32  this frame's memory entries: key, visual value and
    value            1 × d × h × w      float32  the ID embedding of its mask: the given labels where
    id_embedding     1 × d × h × w      float32  ≥ 0, else the softmax of the logits (`soft_memory`,
                                                 the default, as the engine) or `labels` one-hot

One graph does the whole video (what `ExportedSegmenter` does, and what a device program does):

- frame 0: memory inputs all zeros, `given_labels` = the first mask (every pixel ≥ 0); the outputs
  (key, value, id_embedding) become both the reference and the previous memory (the logits of this
  call are meaningless: the memory was empty); with L > 1 layers call it L times, each time with the
  last call's outputs as both memories: layer l's entries depend on layers < l reading the frame
  itself, so the l-th call makes layer l's exact (as `DeformableStudent.own_entries`);
- frame t > 0: `given_labels` all −1; `labels` is the prediction; (key, value, id_embedding)
  replace the previous memory, the reference memory stays;
- objects appearing at frame t: run frame t again with `given_labels` = the new objects' ids where
  they are and the prediction elsewhere; its outputs replace both memories (the graph has one
  long-term slot: the engine's rule with `max_long_term=1`, see `dvos.inference.engine`; the
  Python engine keeps the reference and adds the frame).

The graph is exported in eval mode (identity ID permutation) with the engine's memory reading
(`eval.soft_memory`, `eval.attention_topk`, `eval.long_term_weight`; recorded in the description).
Frames of another size must be resized to H × W by the caller. Both formats carry a JSON description (sizes, names,
the source checkpoint) in the file: ONNX metadata property `dvos`, TorchScript extra file
`dvos_export.json`; `load_exported` reads it back.

ONNX: exported with torch's dynamo exporter (needs the `onnx` and `onnxscript` packages) at opset 18
(GridSample exists from opset 16); run with onnxruntime. Install both with `pip install 'dvos[export]'`.
TorchScript: traced (`torch.jit.trace`); runs with torch alone (C++ `torch::jit::load` included).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dvos import __version__
from dvos.config import MIN_MODEL_SIZE
from dvos.inference.engine import _TorchSegmenter
from dvos.models.memory import Memory
from dvos.models.student import FEATURE_STRIDE, DeformableStudent
from dvos.utils.errors import DvosError
from dvos.utils.io import atomic_path, ensure_writable_dir, write_bytes

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
INPUT_NAMES = (
    "image",
    "reference_key",
    "reference_value",
    "reference_id",
    "previous_key",
    "previous_value",
    "previous_id",
    "num_objects",
    "given_labels",
)
OUTPUT_NAMES = ("logits", "labels", "key", "value", "id_embedding")
METADATA_KEY = "dvos"  # ONNX metadata property
TORCHSCRIPT_EXTRA = "dvos_export.json"  # TorchScript extra file
EXPORT_EXTRA_HINT = "pip install 'dvos[export]' (onnx, onnxscript, onnxruntime)"


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over dim 1 of B × C × H × W, written out (max, exp, sum, divide): exported as
    element-wise ops and reductions, several times faster in ONNX Runtime than its `Softmax` over a
    non-last axis (a transpose each way and a short row per pixel)."""
    shifted = (logits - logits.amax(dim=1, keepdim=True)).exp()
    return shifted / shifted.sum(dim=1, keepdim=True)


class FrameStep(nn.Module):
    """The student's frame step with explicit memory tensors (the exported graph; see the module doc).

    Args:
        student: a `DeformableStudent` (its weights are shared, not copied; put in eval mode).
        max_objects: K of the exported graph, at most the student's `max_objects` (default: that).
        soft_memory: predicted pixels enter the ID embedding as softmax probabilities (as
            `StudentSegmenter`'s default); False: as the argmax one-hot.
    """

    def __init__(
        self, student: DeformableStudent, *, max_objects: int | None = None, soft_memory: bool = True
    ) -> None:
        super().__init__()
        limit = int(student.max_objects)
        max_objects = limit if max_objects is None else int(max_objects)
        if not 1 <= max_objects <= limit:
            raise DvosError(
                f"max_objects {max_objects} is outside 1..{limit} (the student's model.max_objects)"
            )
        self.student = student.eval()
        self.max_objects = max_objects
        self.soft_memory = bool(soft_memory)

    def forward(
        self,
        image: torch.Tensor,
        reference_key: torch.Tensor,
        reference_value: torch.Tensor,
        reference_id: torch.Tensor,
        previous_key: torch.Tensor,
        previous_value: torch.Tensor,
        previous_id: torch.Tensor,
        num_objects: torch.Tensor,
        given_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame; shapes in the module docstring. Returns (logits, labels, key, value, id_embedding)."""
        student = self.student
        identity = torch.arange(student.max_objects + 1, device=image.device)[None]
        memory = Memory(
            reference_key, reference_value, reference_id, previous_key, previous_value, previous_id, identity
        )
        features = student.encode_frame(image)
        output = student.propagate_frame(features, memory)
        logits = student.decode(output.propagated, features, num_objects=num_objects)[
            :, : self.max_objects + 1
        ]
        labels = torch.where(given_labels >= 0, given_labels, logits.argmax(dim=1))
        # One-hot by comparison (exports as Equal; every exporter and runtime has it).
        masks = (labels[:, None] == identity[:, :, None, None]).to(image.dtype)
        if self.soft_memory:
            # Ids above num_objects have logit −1e4: their probability is 0, as over all K + 1 ids.
            probabilities = channel_softmax(logits.float()).to(image.dtype)
            padding = masks.shape[1] - probabilities.shape[1]
            if padding:  # a full-resolution copy in the graph otherwise
                probabilities = nn.functional.pad(probabilities, (0, 0, 0, 0, 0, padding))
            masks = torch.where(given_labels[:, None] >= 0, masks, probabilities)
        id_embedding = student.memory_ids(student.embed_ids(masks), output.id_stream)
        return logits, labels, output.key, output.value, id_embedding


# --------------------------------------------------------------------------------------------------
# Shapes and example inputs
# --------------------------------------------------------------------------------------------------
def memory_shape(d_model: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Shape of a memory map `d_model` channels wide for frames of H × W: 1 × d × ⌈H/16⌉ × ⌈W/16⌉."""
    return (1, int(d_model), math.ceil(height / FEATURE_STRIDE), math.ceil(width / FEATURE_STRIDE))


def memory_channels(student: DeformableStudent) -> tuple[int, int, int]:
    """Channels of the key, visual value and ID maps of the student's memory: every layer's block
    side by side (d, d, d for the default student)."""
    layers = student.propagation_stack
    return (
        sum(layer.key_dim for layer in layers),
        sum(layer.value_dim for layer in layers),
        sum(layer.value_dim for layer in layers),
    )


def _channels(channels: int | Sequence[int]) -> tuple[int, int, int]:
    """(key, value, ID) channels from one width for all three or from the three."""
    if isinstance(channels, int):
        return (channels, channels, channels)
    return tuple(int(c) for c in channels)  # type: ignore[return-value]


def zero_memory(channels: int | Sequence[int], height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Six distinct zero maps (reference key/value/id, previous key/value/id): the memory of frame 0.

    Args:
        channels: d (every map that wide) or (key, value, ID) channels (`memory_channels`).
    """
    shapes = [memory_shape(c, height, width) for c in _channels(channels)]
    return tuple(torch.zeros(shape) for _ in range(2) for shape in shapes)


def step_inputs(
    image: torch.Tensor,
    memory: Sequence[torch.Tensor],
    num_objects: int,
    given_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The nine inputs of `FrameStep` in order.

    Args:
        image: 1 × 3 × H × W in [0, 1].
        memory: the six memory maps (reference key/value/id, previous key/value/id).
        num_objects: objects in the video.
        given_labels: 1 × H × W int64 (−1: predict); None: all −1.
    """
    if given_labels is None:
        given_labels = torch.full((1, *image.shape[-2:]), -1, dtype=torch.long)
    return (image, *memory, torch.tensor([int(num_objects)], dtype=torch.long), given_labels.long())


def example_inputs(
    channels: int | Sequence[int], height: int, width: int, max_objects: int, *, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the right shapes (distinct tensors: export merges aliased inputs into one);
    `channels` as in `zero_memory`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [memory_shape(c, height, width) for c in _channels(channels)] * 2
    image = torch.rand(1, 3, height, width, generator=generator)
    memory = [torch.randn(shape, generator=generator) for shape in shapes]
    labels = torch.full((1, height, width), -1, dtype=torch.long)
    labels[:, : height // 2, : width // 2] = torch.randint(
        0, max_objects + 1, (1, height // 2, width // 2), generator=generator
    )
    return step_inputs(image, memory, max(1, max_objects - 1), labels)


def export_spec(
    student: DeformableStudent,
    *,
    height: int,
    width: int,
    max_objects: int,
    soft_memory: bool = True,
    attention_topk: int | None = None,
    long_term_weight: float | None = None,
) -> dict[str, Any]:
    """The JSON description stored in an exported file (`attention_topk`, `long_term_weight`: the
    values the graph reads with, the student's own when None)."""
    if attention_topk is None:
        attention_topk = int(student.propagation.long_term.topk)
    if long_term_weight is None:
        long_term_weight = float(student.propagation.long_term_weight)
    channels = memory_channels(student)
    shape = memory_shape(channels[0], height, width)
    return {
        "dvos_version": __version__,
        "torch_version": torch.__version__,
        "height": int(height),
        "width": int(width),
        "max_objects": int(max_objects),
        "d_model": int(student.d_model),
        "memory_shape": list(shape),
        "memory_channels": list(channels),
        "num_layers": int(student.num_layers),
        "soft_memory": bool(soft_memory),
        "attention_topk": int(attention_topk),
        "long_term_weight": float(long_term_weight),
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
    }


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def check_format(fmt: str) -> str:
    """`fmt` lower-cased when it is one of `FORMATS`; otherwise a one-line DvosError."""
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise DvosError(f"unknown export format {fmt!r} (choose {' or '.join(FORMATS)})")
    return fmt


def _check_size(height: int, width: int) -> tuple[int, int]:
    if int(height) < MIN_MODEL_SIZE or int(width) < MIN_MODEL_SIZE:
        raise DvosError(
            f"export size {height}×{width} is too small (at least {MIN_MODEL_SIZE}×{MIN_MODEL_SIZE} pixels)"
        )
    return int(height), int(width)


def check_output_path(path: str | os.PathLike) -> Path:
    """The output file's folder exists (or is created) and can be written; the path is not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DvosError(f"output {path} is a folder; give a file name (e.g. {path / 'student.onnx'})")
    ensure_writable_dir(path.parent)
    return path


@contextlib.contextmanager
def _quiet_export():
    """Keep tracer/exporter chatter (warnings, progress prints, INFO logs) out of the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for item, level in zip(loggers, levels):
            item.setLevel(level)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _export_torchscript(step: FrameStep, inputs: tuple[torch.Tensor, ...], tmp: Path, spec: dict) -> None:
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(step, inputs, check_trace=False)
        # Into memory, then written by Python: torch.jit.save's own writer aborts the interpreter
        # (a C++ c10::Error) when the disk is full; a Python write raises an OSError instead.
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_EXTRA: json.dumps(spec)})
    write_bytes(tmp, buffer.getbuffer())


def _export_onnx(step: FrameStep, inputs: tuple[torch.Tensor, ...], tmp: Path, spec: dict) -> None:
    missing = [name for name in ("onnx", "onnxscript") if not _importable(name)]
    if missing:
        raise DvosError(f"ONNX export needs the packages {', '.join(missing)}: {EXPORT_EXTRA_HINT}")
    with _quiet_export(), torch.no_grad():
        program = torch.onnx.export(
            step,
            inputs,
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    program.model.metadata_props[METADATA_KEY] = json.dumps(spec)
    # One self-contained file (the weights inside, not beside it): it can be renamed into place.
    write_bytes(tmp, program.model_proto.SerializeToString())


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def export_student(
    student: DeformableStudent,
    fmt: str,
    path: str | os.PathLike,
    *,
    height: int,
    width: int,
    max_objects: int | None = None,
    soft_memory: bool = True,
    attention_topk: int | None = None,
    long_term_weight: float | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Export the student's frame step (`FrameStep`) for frames of `height` × `width`.

    Args:
        student: the student (put in eval mode).
        fmt: "onnx" or "torchscript".
        path: the output file, written atomically (temporary name beside it, then renamed).
        height, width: the fixed frame size H × W of the exported graph.
        max_objects: K of the graph (default: the student's `max_objects`).
        soft_memory, attention_topk, long_term_weight: the memory reading (`StudentSegmenter`'s
            arguments of those names, `eval.soft_memory` / `eval.attention_topk` /
            `eval.long_term_weight`).
        check: called with the written temporary file before it is renamed to `path` (e.g. a
            comparison with PyTorch): when it raises, `path` is left as it was.

    Returns:
        The written file.

    Raises:
        DvosError: unknown format, bad size or object count, an output that cannot be written, a
            missing exporter package, or an export failure (one line).
    """
    fmt = check_format(fmt)
    height, width = _check_size(height, width)
    path = check_output_path(path)
    if next(student.parameters()).device.type != "cpu":
        # Traced graphs keep the device of constants they create: export a CPU copy, so the file runs
        # anywhere (and the caller's student stays where it is).
        student = copy.deepcopy(student).cpu()
    step = FrameStep(student, max_objects=max_objects, soft_memory=soft_memory)
    spec = export_spec(
        student,
        height=height,
        width=width,
        max_objects=step.max_objects,
        soft_memory=soft_memory,
        attention_topk=attention_topk,
        long_term_weight=long_term_weight,
    )
    inputs = example_inputs(memory_channels(student), height, width, step.max_objects)
    exporter = _export_onnx if fmt == "onnx" else _export_torchscript
    try:
        with atomic_path(path) as tmp:
            with reading_of(student, spec):
                exporter(step, inputs, tmp, spec)
            if check is not None:
                try:
                    check(tmp)
                except DvosError as err:  # named after the file the user asked for, not the temporary
                    raise DvosError(str(err).replace(str(tmp), str(path))) from err
    except DvosError:
        raise
    except OSError as err:
        raise DvosError(f"cannot write {path}: {err.strerror or err}") from err
    except Exception as err:
        raise DvosError(f"{fmt} export to {path} failed: {_one_line(err)}") from err
    logger.info(
        "exported the student's frame step (%s, %d×%d, K=%d) to %s",
        fmt,
        height,
        width,
        step.max_objects,
        path,
    )
    return path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
class ExportedStep:
    """An exported frame step, called like `FrameStep`: nine tensors in, five tensors out (torch, CPU).

    Attributes:
        path: the file.
        fmt: "onnx" or "torchscript".
        spec: the JSON description stored in the file (`export_spec`): height, width, max_objects,
            d_model, memory_shape, inputs, outputs.
    """

    def __init__(self, path: Path, fmt: str, spec: dict[str, Any], run: Any) -> None:
        self.path = path
        self.fmt = fmt
        self.spec = spec
        self._run = run

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(INPUT_NAMES):
            raise TypeError(f"the frame step takes {len(INPUT_NAMES)} tensors ({', '.join(INPUT_NAMES)})")
        return self._run(inputs)

    def __repr__(self) -> str:
        return f"ExportedStep({str(self.path)!r}, {self.fmt}, {self.spec.get('height')}×{self.spec.get('width')})"


def load_exported(path: str | os.PathLike, fmt: str, *, threads: int | None = None) -> ExportedStep:
    """Load an exported frame step as a callable with `FrameStep`'s signature.

    Args:
        path: a file written by `export_student`.
        fmt: "onnx" (run with onnxruntime, CPU) or "torchscript" (torch.jit.load, CPU).
        threads: intra-op threads for onnxruntime (default: its own choice).

    Raises:
        DvosError: unknown format, a missing or unreadable file, onnxruntime not installed (one line).
    """
    fmt = check_format(fmt)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DvosError(f"exported model not found: {path}")
    if fmt == "torchscript":
        extra = {TORCHSCRIPT_EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 steers to torch.export
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as err:
            raise DvosError(f"cannot load TorchScript file {path}: {_one_line(err)}") from err
        spec = json.loads(extra[TORCHSCRIPT_EXTRA] or "{}")

        def run_torchscript(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return tuple(module(*inputs))

        return ExportedStep(path, fmt, spec, run_torchscript)

    try:
        import onnxruntime
    except ImportError as err:
        raise DvosError(f"running an ONNX model needs onnxruntime: {EXPORT_EXTRA_HINT}") from err
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise DvosError(f"cannot load ONNX file {path}: {_one_line(err)}") from err
    spec = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
    names = [node.name for node in session.get_inputs()]

    def run_onnx(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, inputs)}
        return tuple(torch.from_numpy(np.asarray(output)) for output in session.run(None, feed))

    return ExportedStep(path, fmt, spec, run_onnx)


def max_difference(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per output name (labels: the share of pixels that differ)."""
    result = {}
    for name, a, b in zip(OUTPUT_NAMES, expected, got):
        if name == "labels":
            result[name] = float((a != b).float().mean())
        else:
            result[name] = float((a.float() - b.float()).abs().max())
    return result


def reading_of(student: DeformableStudent, spec: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """The student reading its memory as an exported file's description says (files written before
    `long_term_weight` was recorded read as trained)."""
    return student.reading(
        attention_topk=spec.get("attention_topk"), long_term_weight=spec.get("long_term_weight")
    )


def verify_export(student: DeformableStudent, exported: ExportedStep, *, seed: int = 1) -> dict[str, float]:
    """Run the exported step and the PyTorch `FrameStep` on the same random inputs; `max_difference`."""
    spec = exported.spec
    step = FrameStep(student, max_objects=spec["max_objects"], soft_memory=spec.get("soft_memory", False))
    channels = spec.get("memory_channels", spec["d_model"])
    inputs = example_inputs(channels, spec["height"], spec["width"], spec["max_objects"], seed=seed)
    device = next(student.parameters()).device
    with torch.inference_mode(), reading_of(student, spec):
        expected = tuple(t.cpu() for t in step(*(t.to(device) for t in inputs)))
    return max_difference(expected, exported(*inputs))


# --------------------------------------------------------------------------------------------------
# Segmenting a video with an exported step
# --------------------------------------------------------------------------------------------------
class ExportedSegmenter(_TorchSegmenter):
    """The engine's `Segmenter` over an exported frame step: `segment_sequence(ExportedSegmenter(...), ...)`.

    Frames are resized to the exported H × W (bilinear, antialiased; masks nearest-exact) and the
    predictions back to the frame's size, as `StudentSegmenter` does with `max_size`.

    Args:
        step: a loaded step (`load_exported`) or a `FrameStep`; `spec` gives the sizes (for a
            `FrameStep`, pass height and width).
        height, width: the exported frame size (default: `step.spec`).
    """

    name = "exported"

    def __init__(self, step: Any, *, height: int | None = None, width: int | None = None) -> None:
        super().__init__(device="cpu")
        spec = dict(getattr(step, "spec", {}) or {})
        if isinstance(step, FrameStep):
            spec.setdefault("max_objects", step.max_objects)
            spec.setdefault("d_model", step.student.d_model)
            spec.setdefault("memory_channels", list(memory_channels(step.student)))
            spec.setdefault("num_layers", step.student.num_layers)
        if height is not None and width is not None:
            spec["height"], spec["width"] = int(height), int(width)
        if not {"height", "width", "max_objects", "d_model"} <= set(spec):
            raise DvosError("the exported step carries no size description; pass height= and width=")
        self.step_fn = step
        self.export_size = (int(spec["height"]), int(spec["width"]))
        self.max_objects = int(spec["max_objects"])
        self.d_model = int(spec["d_model"])
        self.channels = _channels(spec.get("memory_channels", self.d_model))
        self.num_layers = int(spec.get("num_layers", 1))
        self.reference: tuple[torch.Tensor, ...] | None = None
        self.previous: tuple[torch.Tensor, ...] | None = None
        self._previous_ids: np.ndarray | None = None

    def _begin(self, frame: np.ndarray, object_ids: Sequence[int]) -> None:
        super()._begin(frame, object_ids)
        self.input_size = self.export_size
        if len(self.ids) > self.max_objects:
            raise DvosError(
                f"the video has {len(self.ids)} objects; the exported step segments at most {self.max_objects}"
            )

    def _call(self, frame: np.ndarray, given: np.ndarray | None) -> tuple[torch.Tensor, ...]:
        memory = (
            (*self.reference, *self.previous)
            if self.reference is not None
            else zero_memory(self.channels, *self.export_size)
        )
        labels = None if given is None else self._labels(given)
        with torch.inference_mode():
            return self.step_fn(*step_inputs(self._image(frame), memory, len(self.ids), labels))

    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        self._begin(frame, object_ids)
        self.reference = self.previous = None
        model_ids = self.ids.to_model(mask_ids)
        for _ in range(self.num_layers):  # L calls make L layers' entries exact (module docstring)
            _, _, key, value, id_embedding = self._call(frame, model_ids)
            self.reference = self.previous = (key, value, id_embedding)
        self._previous_ids = model_ids
        return self.ids.to_sequence(model_ids)

    def step(self, frame: np.ndarray) -> np.ndarray:
        if self.reference is None:
            raise RuntimeError("ExportedSegmenter.step() before start()")
        logits, _, key, value, id_embedding = self._call(frame, None)
        self.previous = (key, value, id_embedding)
        model_ids = self._ids_at_frame_size(logits[:, : len(self.ids) + 1])
        self._previous_ids = model_ids
        return self.ids.to_sequence(model_ids)

    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        if self.reference is None or self._previous_ids is None:
            raise RuntimeError("ExportedSegmenter.add_objects() before start()")
        self.ids.add(new_ids)
        if len(self.ids) > self.max_objects:
            raise DvosError(
                f"the video has {len(self.ids)} objects; the exported step segments at most {self.max_objects}"
            )
        given = self.ids.to_model(mask_ids, only=new_ids)
        merged = np.where(given > 0, given, self._previous_ids).astype(np.uint8)
        _, _, key, value, id_embedding = self._call(frame, merged)
        self.reference = self.previous = (key, value, id_embedding)
        self._previous_ids = merged
        return self.ids.to_sequence(merged)

    def memory_bytes(self) -> int:
        """Bytes of the six memory maps (constant for the exported size)."""
        if self.reference is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.reference, *self.previous))
