"""The teachers `dvos bench` times beside the student: a registry, name → how to build one.

The configured teacher (`cfg.teacher`, the model "teacher" of every section) is always measured;
these are the larger ones a researcher would distil from at paper scale, timed in the inference
section's round of the shortest video (`CellSpec.model = "teacher:<name>"`):

    crw-resnet18   CRW's ResNet-18 with all four stages at output stride 8 (layer3 and layer4 at
                   stride 1, 512 channels, as CRW's `modify()` does when layer4 is kept; CRW's
                   released model drops layer4, which is the configured teacher's size)
    dino-vits8     DINO ViT-S/8 label propagation (384 channels, 12 blocks, 6 heads)
    dino-vitb8     DINO ViT-B/8 label propagation (768 channels, 12 blocks, 12 heads)

Label propagation uses the configured teacher's top-k, window, temperature and `n_recent`. The
weights are random (seeded): a forward pass costs the same whatever the weights hold, so these rows
time the architectures; they have no J&F. A network of another kind (the large deformable teacher of
the student's family) is one more `register(BenchTeacher(...))` whose `segmenter` is a
`StudentSegmenter`.

Memory: before a teacher is timed, its peak memory for one frame step is estimated
(`BenchTeacher.peak_bytes`: weights, the encoder's largest activations, the propagation context and
its channels-last copy); where it exceeds the memory available at a size, the next smaller size of
`SIZE_STEPS` that fits is timed instead and the row says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SIZE_STEPS = (1.0, 0.75, 0.5, 0.25)  # fractions of the benchmark size tried when a teacher does not fit
VIDEO_LABELS = 4  # background + the benchmark video's 3 objects
FLOAT = 4  # bytes
# The sums below leave out the temporaries of the encoder and of the propagation tiles: the growth of
# the peak measured at 480p was 1.1 (ViT-B/8) to 1.45 (ViT-S/8, CRW ResNet-18) times them.
TEMPORARIES = 1.5


@dataclass(frozen=True)
class BenchTeacher:
    """A teacher the benchmark can time.

    Attributes:
        name: the registry key (`dvos bench --teachers NAME`).
        title: what it is, in a few words.
        build: teacher config (a `TeacherConfig` as a dict) → the model, weights random (seeded by
            the caller).
        segmenter: (model, device) → a segmenter of the inference engine.
        peak_bytes: (frame size, teacher config) → estimated peak memory of one frame step.
    """

    name: str
    title: str
    build: Callable[[Mapping[str, Any]], nn.Module]
    segmenter: Callable[[nn.Module, torch.device], Any]
    peak_bytes: Callable[[tuple[int, int], Mapping[str, Any]], int]


TEACHERS: dict[str, BenchTeacher] = {}
RANDOM_WEIGHTS_NOTE = (
    "the extra teachers run with random weights: a forward pass costs the same whatever the weights "
    "hold, so their FPS, memory and FLOPs are the trained networks'; they have no J&F"
)


def register(teacher: BenchTeacher) -> BenchTeacher:
    """Add a teacher to `TEACHERS` (a name already there is replaced)."""
    TEACHERS[teacher.name] = teacher
    return teacher


# --------------------------------------------------------------------------------------------------
# Label-propagation teachers
# --------------------------------------------------------------------------------------------------
def label_propagation(encoder: nn.Module, teacher_cfg: Mapping[str, Any]) -> nn.Module:
    """A `LabelPropagationTeacher` over `encoder` with the configured propagation settings."""
    from dvos.models.teacher import LabelPropagationTeacher

    return LabelPropagationTeacher(
        encoder,
        topk=int(teacher_cfg.get("topk", 5)),
        radius=teacher_cfg.get("radius", 12),
        temperature=float(teacher_cfg.get("temperature", 0.07)),
        n_recent=int(teacher_cfg.get("n_recent", 7)),
        chunk_size=16,
    )


def teacher_segmenter(model: nn.Module, device: torch.device) -> Any:
    from dvos.inference.engine import TeacherSegmenter

    return TeacherSegmenter(model, device=device)


def context_bytes(tokens: int, channels: int, teacher_cfg: Mapping[str, Any]) -> int:
    """The propagation context (1 + n_recent frames of features and soft labels) and its channels-last
    copy (`dvos.models.teacher`, module docstring)."""
    frames = 1 + int(teacher_cfg.get("n_recent", 7))
    return 2 * frames * (channels + VIDEO_LABELS) * tokens * FLOAT


def crw_resnet18(teacher_cfg: Mapping[str, Any]) -> nn.Module:
    from dvos.models.backbones.resnet import ResNetEncoder

    encoder = ResNetEncoder(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), output_stride=8)
    return label_propagation(encoder, teacher_cfg)


def crw_resnet18_bytes(size: tuple[int, int], teacher_cfg: Mapping[str, Any]) -> int:
    height, width = size
    tokens = math.ceil(height / 8) * math.ceil(width / 8)
    stem = 64 * math.ceil(height / 2) * math.ceil(width / 2) * FLOAT  # the largest map (stride 2)
    weights = 11_200_000 * FLOAT
    held = weights + 3 * stem + 4 * 512 * tokens * FLOAT + context_bytes(tokens, 512, teacher_cfg)
    return int(TEMPORARIES * held)


def dino_vit(size_name: str) -> Callable[[Mapping[str, Any]], nn.Module]:
    def build(teacher_cfg: Mapping[str, Any]) -> nn.Module:
        from dvos.models.backbones import vit
        from dvos.models.build import ViTPatchEncoder

        return label_propagation(ViTPatchEncoder(getattr(vit, size_name)(patch_size=8)), teacher_cfg)

    return build


def vit_bytes(dim: int, parameters: int) -> Callable[[tuple[int, int], Mapping[str, Any]], int]:
    """Weights, one block's activations (qkv, the MLP's 4·D, the residual stream: about 10 D per token;
    the attention map is not held: `scaled_dot_product_attention` runs blockwise on the CPU) and
    the context."""

    def estimate(size: tuple[int, int], teacher_cfg: Mapping[str, Any]) -> int:
        tokens = (size[0] // 8) * (size[1] // 8)
        held = parameters * FLOAT + 10 * dim * (tokens + 1) * FLOAT + context_bytes(tokens, dim, teacher_cfg)
        return int(TEMPORARIES * held)

    return estimate


register(
    BenchTeacher(
        "crw-resnet18",
        "CRW ResNet-18, four stages at stride 8 (512 channels), label propagation",
        crw_resnet18,
        teacher_segmenter,
        crw_resnet18_bytes,
    )
)
register(
    BenchTeacher(
        "dino-vits8",
        "DINO ViT-S/8 label propagation",
        dino_vit("vit_small"),
        teacher_segmenter,
        vit_bytes(384, 21_700_000),
    )
)
register(
    BenchTeacher(
        "dino-vitb8",
        "DINO ViT-B/8 label propagation",
        dino_vit("vit_base"),
        teacher_segmenter,
        vit_bytes(768, 85_800_000),
    )
)


# --------------------------------------------------------------------------------------------------
# Which size fits
# --------------------------------------------------------------------------------------------------
def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def fitting_size(
    teacher: BenchTeacher,
    size: tuple[int, int],
    teacher_cfg: Mapping[str, Any],
    *,
    available: int | None,
    margin: float = 0.8,
) -> tuple[tuple[int, int] | None, int]:
    """The largest of `size` scaled by `SIZE_STEPS` (sides rounded to multiples of 16) whose estimated
    peak is within `margin` × `available` bytes (None: no limit known → `size`).

    Returns:
        (the size, or None when not even the smallest fits; the estimated peak bytes at it, or at
        the smallest size when none fits).
    """
    estimate = 0
    for step in SIZE_STEPS:
        scaled = size if step == 1.0 else tuple(max(16, int(round(side * step / 16)) * 16) for side in size)
        estimate = int(teacher.peak_bytes(scaled, teacher_cfg))
        if available is None or estimate <= margin * available:
            return scaled, estimate
    return None, estimate


def parameters_of(segmenter: Any) -> int:
    """Parameters of the networks a segmenter holds (each counted once)."""
    seen: dict[int, int] = {}
    for value in vars(segmenter).values():
        if isinstance(value, nn.Module):
            for parameter in value.parameters():
                seen[id(parameter)] = parameter.numel()
    return sum(seen.values())
