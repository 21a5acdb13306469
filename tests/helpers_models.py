"""Small models shared by the tests: a stand-in encoder, tiny students and a tiny teacher."""

from __future__ import annotations

import torch
from torch import nn

from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.build import build_student
from dvos.models.student import DeformableStudent
from dvos.models.teacher import LabelPropagationTeacher

# `model` config of a tiny student on the real MobileNet-V2 encoder (random weights, nothing loaded).
TINY_MODEL = dict(
    d_model=32,
    num_heads=4,
    num_groups=2,
    deform_stride=2,
    offset_range=4.0,
    offset_kernel=3,
    max_objects=5,
    decoder_dim=16,
    ffn_ratio=2.0,
    permute_ids=True,
    pretrained="none",
)


def tiny_model_overrides(**overrides) -> list[str]:
    """TINY_MODEL (with overrides) as command-line `model.key=value` overrides."""
    return [f"model.{key}={value}" for key, value in {**TINY_MODEL, **overrides}.items()]


def tiny_student(**overrides) -> DeformableStudent:
    """`build_student` of TINY_MODEL (with overrides), seeded."""
    torch.manual_seed(0)
    student, _ = build_student({**TINY_MODEL, **overrides})
    return student


class TinyEncoder(nn.Module):
    """Stand-in for MobileNet-V2: strided convs to stride 4, 8, 16 (sizes ⌈H/s⌉ for padded inputs);
    `batch_norm` adds a BatchNorm after the first conv (a buffer, e.g. for the EMA to copy)."""

    encoder_channels = (4, 8, 12)

    def __init__(self, *, batch_norm: bool = False) -> None:
        super().__init__()
        self.to4 = nn.Conv2d(3, 4, 4, stride=4)
        self.bn4 = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.to8 = nn.Conv2d(4, 8, 2, stride=2)
        self.to16 = nn.Conv2d(8, 12, 2, stride=2)

    def forward(self, image):
        stride4 = torch.relu(self.bn4(self.to4(image)))
        stride8 = torch.relu(self.to8(stride4))
        return stride4, stride8, self.to16(stride8)


def tiny_student_and_teacher(
    max_objects: int, *, batch_norm: bool = False
) -> tuple[DeformableStudent, LabelPropagationTeacher]:
    """A student on `TinyEncoder` and a label-propagation teacher on a tiny random ResNet, seeded."""
    torch.manual_seed(0)
    student = DeformableStudent(
        TinyEncoder(batch_norm=batch_norm),
        d_model=32,
        num_heads=4,
        num_groups=2,
        max_objects=max_objects,
        decoder_dim=16,
        offset_kernel=3,
    )
    teacher = LabelPropagationTeacher(
        ResNetEncoder(widths=(8, 8, 8), depths=(1, 1, 1), stem_width=8), radius=4
    )
    return student, teacher
