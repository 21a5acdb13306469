"""Checking a state dict against a model before loading it, so a misfit is one line naming the keys."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def state_dict_problems(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, object],
    *,
    ignore_prefixes: tuple[str, ...] = (),
) -> list[str]:
    """What keeps `state` from loading strictly into a model whose state dict is `own`: missing and
    unexpected keys (those starting with `ignore_prefixes` excepted), entries that are not tensors and
    shape mismatches, each as a short phrase; empty when it fits."""
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own and not key.startswith(ignore_prefixes)]
    not_tensors = [key for key in own if key in state and not isinstance(state[key], torch.Tensor)]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} in file vs {tuple(own[key].shape)} in model"
        for key in own
        if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:3]} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:3]} ({len(unexpected)} in all)")
    if not_tensors:
        problems.append(f"not tensors {not_tensors[:3]}")
    if wrong_shape:
        problems.append(f"shape mismatch {wrong_shape[0]} ({len(wrong_shape)} in all)")
    return problems
