"""An int8 student: ONNX Runtime static quantization of the exported frame step (`dvos.inference.export`).

    quantize_student(fp32.onnx, int8.onnx, videos)     # `dvos export --format onnx --quantize int8`

What is quantized (QDQ format, calibrated min/max ranges):

- weights int8 per output channel, activations uint8 per tensor (ONNX Runtime's x86 kernels, VNNI
  where the CPU has it);
- the operators in `QUANTIZED_OPS`: the convolutions (encoder, ID embedding, decoder, offset
  networks), the linear layers, and the element-wise neighbours that let consecutive int8 operators
  run without converting back to float between them;
- not the products of two activations (query·keyᵀ and attention·values, `activation_products`):
  quantized, ONNX Runtime fuses their softmax into a `QLinearSoftmax` about ten times slower than the
  float one at 480p; the softmax, `grid_sample`, the normalisations and the full-resolution tail
  (argmax, the soft ID masks) stay float32 as well.

Calibration walks real frames through the fp32 graph, exactly as `ExportedSegmenter` does, and
records the nine inputs of every call (so the memory inputs are realistic too): the first
`frames_per_video` frames `frame_stride` apart of each video, resized to the graph's size. Training
videos carry no labels: the first frame's mask is an ellipse over the centre of the frame (object 1;
half the height and width), where the videos of VOS benchmarks have their object. Ranges are the
minimum and maximum over every calibration frame.

The int8 file carries the fp32 file's description (`dvos` metadata) with a `quantization` entry, and
loads and runs like any exported file (`load_exported(path, "onnx")`, `ExportedSegmenter`). Whether
it segments as well as the fp32 student is measured by J&F: `dvos evaluate --ckpt int8.onnx`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dvos.inference.export import (
    INPUT_NAMES,
    METADATA_KEY,
    ExportedSegmenter,
    load_exported,
    step_inputs,
    zero_memory,
)
from dvos.utils.errors import DvosError
from dvos.utils.io import atomic_path

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Clip", "Relu", "Resize", "Concat")
FRAMES_PER_VIDEO = 4
FRAME_STRIDE = 3
MAX_VIDEOS = 8


def centre_ellipse(size: tuple[int, int]) -> np.ndarray:
    """H × W uint8 mask: 1 inside the ellipse of half the frame's height and width around its centre."""
    height, width = size
    ys, xs = np.mgrid[:height, :width]
    inside = ((ys + 0.5 - height / 2) / (height / 4)) ** 2 + ((xs + 0.5 - width / 2) / (width / 4)) ** 2 <= 1
    return inside.astype(np.uint8)


def calibration_frames(
    videos: Sequence[str | os.PathLike],
    *,
    frames_per_video: int = FRAMES_PER_VIDEO,
    frame_stride: int = FRAME_STRIDE,
) -> Iterator[list[np.ndarray]]:
    """For each video, its frames 0, s, 2s, ... (`frames_per_video` of them, fewer in a short video),
    H × W × 3 uint8."""
    from dvos.data.readers import open_video

    for video in videos:
        with open_video(video) as reader:
            indices = list(range(0, len(reader), max(1, int(frame_stride))))[: max(1, int(frames_per_video))]
            yield list(reader.get_batch(indices))


def record_inputs(
    fp32_path: str | os.PathLike, clips: Iterator[list[np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """Walk each clip through the fp32 graph as `ExportedSegmenter` does (frame 0 with the centre
    ellipse as its mask) and return the nine named inputs of every call."""
    segmenter = ExportedSegmenter(load_exported(fp32_path, "onnx"))
    feeds: list[dict[str, np.ndarray]] = []
    call = segmenter._call

    def recording(frame: np.ndarray, given: np.ndarray | None) -> Any:
        if segmenter.reference is None:
            memory = zero_memory(segmenter.d_model, *segmenter.export_size)
        else:
            memory = (*segmenter.reference, *segmenter.previous)
        labels = None if given is None else segmenter._labels(given)
        inputs = step_inputs(segmenter._image(frame), memory, len(segmenter.ids), labels)
        feeds.append({name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)})
        return call(frame, given)

    segmenter._call = recording
    for frames in clips:
        segmenter.start(frames[0], centre_ellipse(frames[0].shape[:2]), [1])
        for frame in frames[1:]:
            segmenter.step(frame)
    return feeds


def activation_products(model: Any) -> list[str]:
    """Names of the MatMul nodes of an ONNX model whose inputs are both activations (no initializer,
    no constant): the attention's products."""
    constants = {tensor.name for tensor in model.graph.initializer}
    constants |= {name for node in model.graph.node if node.op_type == "Constant" for name in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and not any(name in constants for name in node.input)
    ]


class _Feeds:
    """ONNX Runtime's `CalibrationDataReader` protocol over recorded inputs."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iterator = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iterator, None)


def quantize_student(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    videos: Sequence[str | os.PathLike],
    *,
    frames_per_video: int = FRAMES_PER_VIDEO,
    frame_stride: int = FRAME_STRIDE,
    source: str | None = None,
) -> dict[str, Any]:
    """Quantize an exported fp32 ONNX frame step to int8 (see the module docstring).

    Args:
        fp32_path: an ONNX file written by `export_student`.
        out_path: the int8 file, written atomically.
        videos: calibration videos (files or frame folders); the first frames of each are used.
        frames_per_video, frame_stride: which frames (0, s, 2s, ...).
        source: one line saying where the videos come from (stored in the file's description).

    Returns:
        the `quantization` entry stored in the file: method, operators, calibration frames and videos.

    Raises:
        DvosError: onnxruntime's quantization tools missing, no calibration video, or a failure (one line).
    """
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise DvosError(
            f"int8 quantization needs onnx and onnxruntime: pip install 'dvos[export]' ({err})"
        ) from err
    if not videos:
        raise DvosError("int8 quantization needs calibration videos; none given")
    feeds = record_inputs(
        fp32_path, calibration_frames(videos, frames_per_video=frames_per_video, frame_stride=frame_stride)
    )
    spec = json.loads(
        {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}.get(
            METADATA_KEY, "{}"
        )
    )
    entry = {
        "method": "onnxruntime static quantization (QDQ), min/max calibration",
        "weights": "int8, per output channel",
        "activations": "uint8, per tensor",
        "operators": list(QUANTIZED_OPS),
        "float": "products of two activations (attention), softmax, grid_sample, normalisations, "
        "the full-resolution tail",
        "calibration_frames": len(feeds),
        "calibration_videos": len(videos),
        "calibration_source": source or ", ".join(str(video) for video in videos[:3]),
        "first_mask": "an ellipse of half the frame's height and width around its centre (object 1)",
    }
    with tempfile.TemporaryDirectory(prefix="dvos-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = activation_products(onnx.load(str(prepared)))
        try:
            with atomic_path(out_path) as written:
                quantize_static(
                    str(prepared),
                    str(written),
                    _Feeds(feeds),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    nodes_to_exclude=excluded,
                    calibrate_method=CalibrationMethod.MinMax,  # ReduceMin/Max per tensor: small outputs
                )
                model = onnx.load(str(written))
                del model.metadata_props[:]
                prop = model.metadata_props.add()
                prop.key, prop.value = METADATA_KEY, json.dumps({**spec, "quantization": entry})
                onnx.save(model, str(written))
        except DvosError:
            raise
        except Exception as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise DvosError(
                f"int8 quantization of {fp32_path} failed: {type(err).__name__}: {lines[0] if lines else ''}"
            ) from err
    logger.info("quantized %s to int8 (%d calibration frames) → %s", fp32_path, len(feeds), out_path)
    return entry
