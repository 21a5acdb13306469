"""Reading the teacher's encoder from a checkpoint file: a `dvos pretrain` checkpoint, an exported
encoder or a plain `ResNetEncoder` state dict. The architecture is read from the tensor shapes."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.state import state_dict_problems
from dvos.utils.errors import DvosError

logger = logging.getLogger(__name__)

# Checkpoint prefixes under which a Lightning checkpoint holds the teacher's encoder, tried in order.
ENCODER_PREFIXES = ("teacher.encoder.", "encoder.")


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_checkpoint(path: Path) -> Any:
    """torch.load a checkpoint on CPU: tensors only first; a Lightning checkpoint whose
    hyper-parameters hold objects is then unpickled in full, as Lightning itself does (load only
    files you trust)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Unsupported global" not in str(err):  # not a pickle of known objects: a bad file
            raise DvosError(f"cannot read teacher checkpoint {path}: {_one_line(err)}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DvosError(f"cannot read teacher checkpoint {path}: {_one_line(err)}") from err


def encoder_state_dict(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from a state dict or a Lightning checkpoint (`state_dict` entry).

    Keys lose a `module.` prefix; then the first of `teacher.encoder.` and `encoder.` that some key
    has is stripped and only those keys are kept; a plain ResNetEncoder state dict is used as is.
    """
    if not isinstance(checkpoint, Mapping):
        raise DvosError(f"teacher checkpoint {path} is a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint["state_dict"] if isinstance(checkpoint.get("state_dict"), Mapping) else checkpoint
    state = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ENCODER_PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state


def load_resnet_encoder(path: str | os.PathLike) -> ResNetEncoder:
    """A ResNetEncoder built from, and strictly loaded with, a checkpoint file.

    Widths, depths and stem width are read from the tensor shapes (`ResNetEncoder.config_from_state_dict`);
    the output stride is 8.

    Raises:
        DvosError: one line naming the file, when it is missing, unreadable, holds no ResNet
            encoder, or its keys / shapes do not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DvosError(f"teacher checkpoint not found: {path}")
    state = encoder_state_dict(_read_checkpoint(path), path)
    try:
        config = ResNetEncoder.config_from_state_dict(state)
        encoder = ResNetEncoder(**config)
    except (KeyError, ValueError, IndexError) as err:
        sample = ", ".join(list(state)[:3]) or "no tensors"
        raise DvosError(
            f"teacher checkpoint {path} holds no ResNet encoder ({_one_line(err)}; keys: {sample})"
        ) from err
    problems = state_dict_problems(encoder.state_dict(), state)
    if problems:
        raise DvosError(
            f"teacher checkpoint {path} does not fit ResNetEncoder{config}: " + "; ".join(problems)
        )
    encoder.load_state_dict(state, strict=True)
    logger.info("teacher encoder: ResNetEncoder %s from %s", config, path)
    return encoder
