"""Finding and loading a trained student for inference.

Accepted files:

- a Lightning checkpoint of the distillation run (`runs/<run>/checkpoints/*.ckpt`): the student's
  weights are the `state_dict` entries under `student_ema.` (the EMA copy, preferred when present)
  or `student.`; the full resolved config saved with it (`checkpoint["dvos_config"]`, a plain dict)
  gives the model config the student is built with, so a checkpoint always rebuilds its own
  architecture whatever `model.*` the command line says;
- a plain state dict of a `DeformableStudent` (optionally under `state_dict`/`model`, keys
  optionally prefixed `module.`), built with the model config given.

Files are read tensors-only (`torch.load(weights_only=True)`); a Lightning checkpoint whose
hyper-parameters hold pickled objects is unpickled in full only as a fallback (load only files you
trust, as Lightning itself does).

Without a path the newest `runs/*/checkpoints/last.ckpt` (by modification time) is used, and with
none a randomly initialised student with a logged warning: every command runs without training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dvos.config import ModelConfig
from dvos.models.build import build_student, model_config
from dvos.models.state import state_dict_problems
from dvos.models.student import DeformableStudent
from dvos.utils.errors import DvosError
from dvos.utils.runs import is_failed

logger = logging.getLogger(__name__)

STUDENT_PREFIXES = ("student_ema.", "student.")  # tried in this order


def find_latest_checkpoint(runs_dir: str | os.PathLike = "runs") -> Path | None:
    """The newest `<runs_dir>/*/checkpoints/last.ckpt` by modification time, or None. Runs marked
    failed (`dvos.utils.runs.FAILED_MARKER`) are skipped."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    candidates = [
        path
        for path in runs_dir.glob("*/checkpoints/last.ckpt")
        if path.is_file() and not is_failed(path.parent.parent)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda path: (path.stat().st_mtime, str(path)))


def run_dir_of(checkpoint: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: `runs/<run>` for `runs/<run>/checkpoints/x.ckpt`, else its folder."""
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint(path: str | os.PathLike) -> Any:
    """`torch.load` on CPU, tensors only first, a full unpickle as the fallback; one-line DvosError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DvosError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "Unsupported global" not in str(err) and "weights_only" not in str(err):
            raise DvosError(f"cannot read checkpoint {path}: {_one_line(err)}") from err
    logger.info("checkpoint %s holds pickled objects: loading it in full (trusted files only)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DvosError(f"cannot read checkpoint {path}: {_one_line(err)}") from err


def check_training_checkpoint(path: str | os.PathLike, *, key: str = "ckpt_path") -> None:
    """A one-line DvosError, naming `key` and the file, unless `path` is a dvos distillation
    checkpoint that training can continue from: readable in full (not truncated), with
    Lightning's training state and the student's weights. Tensors are memory-mapped, not read."""
    path = Path(path).expanduser()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        if "Unsupported global" not in str(err) and "weights_only" not in str(err):
            raise DvosError(f"{key}: cannot read {path} (truncated or damaged? {_one_line(err)})") from err
        checkpoint = read_checkpoint(path)  # hyper-parameters with pickled objects
    if not isinstance(checkpoint, Mapping) or "loops" not in checkpoint or "state_dict" not in checkpoint:
        what = (
            "a teacher file (give it as teacher.checkpoint=...)"
            if isinstance(checkpoint, Mapping) and "encoder_config" in checkpoint
            else "no Lightning training state"
        )
        raise DvosError(f"{key}: {path} is not a dvos training checkpoint: {what}")
    state = checkpoint["state_dict"]
    if not any(str(name).startswith("student.") for name in state):
        raise DvosError(
            f"{key}: {path} is not a distillation checkpoint: no student weights "
            "(a teacher pretraining checkpoint?)"
        )


def student_state_dict(checkpoint: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The student's tensors from a Lightning checkpoint or a plain state dict, and where they came from.

    Returns:
        (state, source): source is "student_ema", "student" or "state dict".
    """
    if not isinstance(checkpoint, Mapping):
        raise DvosError(f"checkpoint {path} is a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            state = checkpoint[key]
            break
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DvosError(f"checkpoint {path} holds no tensors")
    for prefix in STUDENT_PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if picked:
            return picked, prefix.rstrip(".")
    if "state_dict" in checkpoint:
        sample = ", ".join(list(tensors)[:3])
        raise DvosError(
            f"checkpoint {path} holds no student weights (no 'student.' keys; keys: {sample}, ...)"
        )
    return tensors, "state dict"


def _load_weights(student: DeformableStudent, state: dict[str, torch.Tensor], path: Path) -> None:
    problems = state_dict_problems(student.state_dict(), state)
    if problems:
        raise DvosError(f"checkpoint {path} does not fit the student: " + "; ".join(problems))
    student.load_state_dict(state, strict=True)


def load_student(
    path: str | os.PathLike | None,
    model_cfg: ModelConfig | DictConfig | Mapping[str, Any],
    *,
    runs_dir: str | os.PathLike = "runs",
) -> tuple[DeformableStudent, str]:
    """A student ready for inference (eval mode, CPU) and one line describing where it came from.

    Args:
        path: a Lightning checkpoint or a plain student state dict; None: the latest
            `<runs_dir>/*/checkpoints/last.ckpt`, else a randomly initialised student (with a warning).
        model_cfg: the model config (`cfg.model`, `dvos.models.build.model_config`) used when the
            checkpoint carries none.
        runs_dir: where runs are looked for when `path` is None.

    Raises:
        DvosError: the file is missing, unreadable, or its weights do not fit (one line naming it).
    """
    cfg = model_config(model_cfg)
    if path is None:
        path = find_latest_checkpoint(runs_dir)
        if path is None:
            student, init = build_student(cfg)
            message = (
                f"no trained checkpoint found under {Path(runs_dir)}/: using a randomly initialised student; "
                "predictions will be meaningless"
            )
            logger.warning(message)
            return student.eval(), f"randomly initialised student ({init})"
        logger.info("using the latest run checkpoint %s", path)
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path)
    state, source = student_state_dict(checkpoint, path)
    saved = checkpoint.get("dvos_config") if isinstance(checkpoint, Mapping) else None
    if isinstance(saved, Mapping) and isinstance(saved.get("model"), Mapping):
        cfg = model_config({**dataclasses.asdict(cfg), **saved["model"]})
        config_source = "the checkpoint's config"
    else:
        config_source = "the given model config"
    # The checkpoint overwrites every weight: no need to read ImageNet weights first.
    cfg = dataclasses.replace(cfg, pretrained="none")
    try:
        student, _ = build_student(cfg)
    except (TypeError, ValueError, AttributeError) as err:
        raise DvosError(
            f"checkpoint {path}: cannot build the student from {config_source}: {_one_line(err)}"
        ) from err
    _load_weights(student, state, path)
    details = [f"{source} weights", f"model from {config_source}"]
    if isinstance(checkpoint, Mapping):
        for key in ("epoch", "global_step"):
            if isinstance(checkpoint.get(key), int):
                details.append(f"{key} {checkpoint[key]}")
    description = f"student from {path} ({', '.join(details)})"
    logger.info(description)
    return student.eval(), description
