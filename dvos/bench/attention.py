"""The student's attention at inference: the whole map against blocks of query rows.

`dvos.models.deformable.attend` computes an attention map a block of query rows at a time when no
gradient and no map is wanted (inference), instead of the whole N × M map at once. This section
measures both ways side by side, on the two kinds of attention one student step runs, at the shapes
of a frame of the given size: the self-propagation (N × N tokens of the stride-16 map) and a
deformable read (N tokens × M = ⌈h/s⌉·⌈w/s⌉ sampled points), each with the student's heads and two
value branches (visual and ID), on random tensors. Per call: the median time of `repeats`, the peak
memory above what was held before it, and the largest difference between the two outputs (the rows
of a softmax are independent, so it should be 0 or a rounding error).
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from dvos.bench.measure import PeakMemory, stopwatch, synchronize
from dvos.models.deformable import ATTENTION_BLOCK_ELEMENTS, attend
from dvos.models.student import FEATURE_STRIDE

WHOLE = 1 << 62  # a block budget no map reaches: the whole map at once


def attention_shapes(model_cfg: Any, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(queries N, keys M) of the student's self-propagation and of one deformable read for frames of
    `size` (H, W) fed to the model (padded to the stride-16 grid, as the student pads them)."""
    height, width = (math.ceil(side / FEATURE_STRIDE) for side in size)
    stride = int(model_cfg.deform_stride)
    tokens = height * width
    points = math.ceil(height / stride) * math.ceil(width / stride)
    return {"self-propagation": (tokens, tokens), "deformable read": (tokens, points)}


def _time_call(fn: Any, device: torch.device, repeats: int) -> tuple[float, float, Any]:
    """(median seconds, peak MiB above the start, last output) of `fn()` over `repeats` calls."""
    output = fn()  # warm-up (allocator, kernels)
    del output
    meter = PeakMemory(device)
    meter.reset()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        with stopwatch() as elapsed:
            output = fn()
            synchronize(device)
        seconds.append(elapsed[0])
    return statistics.median(seconds), max(0.0, meter.peak_mb() - meter.before_mb), output


@torch.inference_mode()
def measure_attention(
    model_cfg: Any,
    sizes: Sequence[tuple[int, int]],
    device: torch.device | str,
    *,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-map against blocked attention for frames of each size; see the module docstring."""
    device = torch.device(device)
    heads = int(model_cfg.num_heads)
    head_dim = int(model_cfg.d_model) // heads
    scale = float(model_cfg.attention_scale)
    generator = torch.Generator().manual_seed(seed)

    def tensor(n: int) -> torch.Tensor:
        return torch.randn(1, heads, n, head_dim, generator=generator).to(device)

    rows = []
    for size in sizes:
        for kind, (num_queries, num_keys) in attention_shapes(model_cfg, size).items():
            # the student's reads: cosine attention with a learned scale (attention_scale > 0);
            # its self-propagation: scaled dot product
            logit_scale = None
            if kind == "deformable read" and scale > 0:
                logit_scale = torch.full((heads,), math.log(scale), device=device)
            inputs = (
                tensor(num_queries),
                tensor(num_keys),
                [tensor(num_keys), tensor(num_keys)],
                logit_scale,
            )
            whole_s, whole_mb, whole = _time_call(
                functools.partial(attend, *inputs, need_weights=False, block_elements=WHOLE), device, repeats
            )
            blocked_s, blocked_mb, blocked = _time_call(
                functools.partial(
                    attend, *inputs, need_weights=False, block_elements=ATTENTION_BLOCK_ELEMENTS
                ),
                device,
                repeats,
            )
            difference = max(float((a - b).abs().max()) for a, b in zip(whole[0], blocked[0]))
            rows.append(
                {
                    "size": list(size),
                    "attention": kind,
                    "queries": num_queries,
                    "keys": num_keys,
                    "map_mb": heads * num_queries * num_keys * 4 / 2**20,
                    "whole_ms": 1000 * whole_s,
                    "blocked_ms": 1000 * blocked_s,
                    "speedup": whole_s / blocked_s if blocked_s > 0 else None,
                    "whole_peak_mb": whole_mb,
                    "blocked_peak_mb": blocked_mb,
                    "max_abs_difference": difference,
                }
            )
            del inputs, whole, blocked
    return {
        "measured": (
            f"`attend` at inference, whole map against blocks of at most {ATTENTION_BLOCK_ELEMENTS} map "
            f"elements, {heads} heads of {head_dim} channels, two value branches, random tensors; "
            f"median of {repeats} calls; peak memory: {PeakMemory(device).method}, above the start"
        ),
        "block_elements": ATTENTION_BLOCK_ELEMENTS,
        "rows": rows,
    }
