"""From a config to a model: the one way the CLI, the checkpoints, the training and the benchmark
build the student and the teacher.

A model config is a `ModelConfig` / `TeacherConfig` (dvos.config), its DictConfig (`cfg.model`,
`cfg.teacher`) or a plain mapping with the same keys (a checkpoint's saved config, a benchmark
cell's JSON); keys the schema does not know (a config of another dvos version) are ignored, missing
ones take the schema's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dvos.config import ModelConfig, TeacherConfig
from dvos.models.backbones.mobilenet_v2 import imagenet_normalize
from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.student import DeformableStudent
from dvos.models.teacher import LabelPropagationTeacher
from dvos.models.teacher_checkpoint import load_resnet_encoder
from dvos.utils.errors import ConfigError

logger = logging.getLogger(__name__)

TEACHER_ENCODERS = ("resnet", "vit_small", "vit_base")
Schema = TypeVar("Schema", ModelConfig, TeacherConfig)


def _typed(source: Any, schema: type[Schema], **overrides: Any) -> Schema:
    """`source` (a `schema` instance, a DictConfig or a mapping) as a `schema` instance, `overrides`
    on top; keys the schema does not know are dropped from `source`."""
    if isinstance(source, schema) and not overrides:
        return source
    if isinstance(source, schema):
        source = dataclasses.asdict(source)
    elif isinstance(source, DictConfig):
        source = OmegaConf.to_container(source, resolve=True)
    elif source is None:
        source = {}
    if not isinstance(source, Mapping):
        raise TypeError(
            f"a {schema.__name__} is expected, or a DictConfig or mapping; got {type(source).__name__}"
        )
    names = {field.name for field in dataclasses.fields(schema)}
    return schema(**{**{key: value for key, value in source.items() if key in names}, **overrides})


# --------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------
def model_config(source: ModelConfig | DictConfig | Mapping[str, Any]) -> ModelConfig:
    """The student's config as a `ModelConfig` (see the module docstring for what `source` may be)."""
    return _typed(source, ModelConfig)


def build_student(
    model_cfg: ModelConfig | DictConfig | Mapping[str, Any], *, encoder: nn.Module | None = None
) -> tuple[DeformableStudent, str]:
    """The student from its config (`cfg.model`), with ImageNet encoder weights as `pretrained` says.

    Args:
        model_cfg: the `model` config (`model_config`).
        encoder: inject an encoder (tests); its weights are left alone.

    Returns:
        (student, init): init says, in one line, how the encoder was initialised (for the run's log).
    """
    cfg = model_config(model_cfg)
    student = DeformableStudent(
        encoder,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_groups=cfg.num_groups,
        deform_stride=cfg.deform_stride,
        offset_range=cfg.offset_range,
        offset_kernel=cfg.offset_kernel,
        max_objects=cfg.max_objects,
        decoder_dim=cfg.decoder_dim,
        ffn_ratio=cfg.ffn_ratio,
        permute_ids=cfg.permute_ids,
        permute_slots=cfg.permute_slots,
        attention_scale=float(cfg.attention_scale),
        attention_topk=int(cfg.attention_topk),
        propagation_init=bool(cfg.propagation_init),
    )
    if encoder is not None:
        return student, "encoder: injected module"
    from dvos.models.backbones.weights import load_imagenet_mobilenet_v2

    return student, load_imagenet_mobilenet_v2(student.encoder, cfg.pretrained)


# --------------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------------
class ViTPatchEncoder(nn.Module):
    """A DINO ViT as a teacher encoder: frames in [0, 1] → normed last-layer patch tokens.

    The ViT sees ImageNet-normalised frames; the grid is ⌊H/p⌋ × ⌊W/p⌋ (remainder pixels dropped).
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.stride = int(vit.patch_size)
        self.out_channels = int(vit.embed_dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W in [0, 1] → B × D × ⌊H/p⌋ × ⌊W/p⌋."""
        return self.vit.patch_features(imagenet_normalize(image))


def build_teacher_encoder(
    name: str = "resnet", *, patch_size: int = 16, checkpoint: str | os.PathLike | None = None
) -> nn.Module:
    """The teacher's encoder (an `nn.Module` with `stride`), loaded from `checkpoint` when given.

    Args:
        name: "resnet" (ResNetEncoder; no checkpoint → random weights, with a warning),
            "vit_small" or "vit_base" (DINO ViT/`patch_size`; a checkpoint is required).
        patch_size: ViT patch size (8 or 16); ignored for resnet.
        checkpoint: a file; never downloaded.

    Raises:
        ConfigError: unknown name, or a ViT without checkpoint.
        DvosError: the checkpoint cannot be loaded (one line naming the file).
    """
    if name == "resnet":
        if checkpoint is None:
            logger.warning("teacher encoder: ResNetEncoder with RANDOM weights (no teacher.checkpoint given)")
            return ResNetEncoder()
        return load_resnet_encoder(checkpoint)
    if name in ("vit_small", "vit_base"):
        from dvos.models.backbones import vit  # lazy: the ViT module is optional for a resnet teacher

        if checkpoint is None:
            raise ConfigError(
                f"teacher.encoder={name} needs teacher.checkpoint (a DINO .pth file); nothing is downloaded"
            )
        model = getattr(vit, name)(patch_size=int(patch_size))
        vit.load_dino_checkpoint(model, Path(checkpoint).expanduser())
        return ViTPatchEncoder(model)
    raise ConfigError(f"teacher.encoder must be one of {', '.join(TEACHER_ENCODERS)}, got {name!r}")


def teacher_config(
    source: TeacherConfig | DictConfig | Mapping[str, Any] | None = None, **overrides: Any
) -> TeacherConfig:
    """The teacher's config as a `TeacherConfig` (None: its defaults), `overrides` on top.

    Raises:
        ConfigError: an override key that `TeacherConfig` does not have.
    """
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(TeacherConfig)})
    if unknown:
        raise ConfigError(f"unknown teacher option(s): {', '.join(unknown)}")
    return _typed(source, TeacherConfig, **overrides)


def build_teacher(
    teacher_cfg: TeacherConfig | DictConfig | Mapping[str, Any] | None = None,
    *,
    chunk_size: int | None = 16,
    **overrides: Any,
) -> LabelPropagationTeacher:
    """A frozen LabelPropagationTeacher from its config (`cfg.teacher`; `teacher_config`), with
    `overrides` of its keys on top. Never downloads anything.

    Args:
        chunk_size: side in cells of the query tiles (`LabelPropagationTeacher`).

    Raises:
        ConfigError: an unknown override key or encoder name, or a bad value.
        DvosError: a checkpoint that cannot be loaded (one line naming the file).
    """
    cfg = teacher_config(teacher_cfg, **overrides)
    encoder = build_teacher_encoder(
        str(cfg.encoder), patch_size=int(cfg.patch_size), checkpoint=cfg.checkpoint
    )
    return LabelPropagationTeacher(
        encoder,
        topk=cfg.topk,
        radius=cfg.radius,
        temperature=cfg.temperature,
        n_recent=cfg.n_recent,
        chunk_size=chunk_size,
    )
