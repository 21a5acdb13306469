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
from dvos.models.propagation import SHORT_TERM_READS
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


def model_problem(cfg: ModelConfig, prefix: str = "model") -> str | None:
    """What is wrong with a student's config, one line naming the key as `<prefix>.<key>`, or None."""
    key_dim = cfg.d_model if cfg.key_dim is None else int(cfg.key_dim)
    value_dim = int(round(cfg.expand_ratio * cfg.d_model)) if cfg.expand_ratio > 0 else cfg.d_model
    checks = (
        (int(cfg.num_layers) >= 1, "num_layers", cfg.num_layers, "must be ≥ 1"),
        (int(cfg.num_heads) >= 1, "num_heads", cfg.num_heads, "must be ≥ 1"),
        (int(cfg.d_model) % 4 == 0, "d_model", cfg.d_model, "must be a multiple of 4 (the sine position)"),
        (
            key_dim >= 1 and key_dim % int(cfg.num_heads) == 0,
            "key_dim",
            cfg.key_dim,
            f"must be ≥ 1 and divisible by model.num_heads={cfg.num_heads} (null: d_model)",
        ),
        (
            int(cfg.num_groups) >= 1 and int(cfg.num_heads) % int(cfg.num_groups) == 0,
            "num_groups",
            cfg.num_groups,
            f"must divide model.num_heads={cfg.num_heads}",
        ),
        (float(cfg.expand_ratio) >= 0, "expand_ratio", cfg.expand_ratio, "must be ≥ 0 (0: no expansion)"),
        (
            value_dim % int(cfg.num_heads) == 0 and value_dim % int(cfg.num_groups) == 0,
            "expand_ratio",
            cfg.expand_ratio,
            f"gives values {value_dim} wide: not divisible by the heads and offset groups",
        ),
        (
            int(cfg.dw_kernel) >= 0 and (int(cfg.dw_kernel) == 0 or int(cfg.dw_kernel) % 2 == 1),
            "dw_kernel",
            cfg.dw_kernel,
            "must be 0 (none) or an odd kernel size",
        ),
        (float(cfg.ffn_ratio) >= 0, "ffn_ratio", cfg.ffn_ratio, "must be ≥ 0 (0: no feed-forward)"),
        (
            cfg.short_term_read in SHORT_TERM_READS,
            "short_term_read",
            cfg.short_term_read,
            f"must be one of {', '.join(SHORT_TERM_READS)}",
        ),
        (
            int(cfg.local_window) >= 1 and int(cfg.local_window) % 2 == 1,
            "local_window",
            cfg.local_window,
            "must be odd and ≥ 1 (DeAOT 15)",
        ),
        (int(cfg.offset_kernel) % 2 == 1, "offset_kernel", cfg.offset_kernel, "must be odd"),
    )
    for ok, key, value, what in checks:
        if not ok:
            return f"{prefix}.{key} {what}, got {value}"
    return None


def build_student(
    model_cfg: ModelConfig | DictConfig | Mapping[str, Any],
    *,
    encoder: nn.Module | None = None,
    prefix: str = "model",
) -> tuple[DeformableStudent, str]:
    """The student from its config (`cfg.model`), with ImageNet encoder weights as `pretrained` says.

    Args:
        model_cfg: the `model` config (`model_config`).
        encoder: inject an encoder (tests); its weights are left alone.
        prefix: how errors name the config (`model`, or `teacher.model` for a deformable teacher).

    Returns:
        (student, init): init says, in one line, how the encoder was initialised (for the run's log).

    Raises:
        ConfigError: a setting the student cannot be built with (`model_problem`).
    """
    cfg = model_config(model_cfg)
    problem = model_problem(cfg, prefix)
    if problem is not None:
        raise ConfigError(problem)
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
        num_layers=int(cfg.num_layers),
        key_dim=None if cfg.key_dim is None else int(cfg.key_dim),
        expand_ratio=float(cfg.expand_ratio),
        dw_kernel=int(cfg.dw_kernel),
        gate_id=bool(cfg.gate_id),
        id_norm=bool(cfg.id_norm),
        short_term_read=str(cfg.short_term_read),
        local_window=int(cfg.local_window),
        freeze_bn=bool(cfg.freeze_bn),
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
