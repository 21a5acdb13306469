"""Measuring instruments: the machine's matmul rate, FLOP counts, peak memory, clocks.

Peak memory, and what each number means:

- CPU: the process's resident set size (RSS). Linux keeps its high-water mark (VmHWM) and lets a
  process reset it to the current RSS (`echo 5 > /proc/self/clear_refs`): `reset_peak_rss()` before a
  measurement and `peak_rss_mb()` after give the largest RSS reached *during* it; its growth over the
  RSS at the reset is what the measurement added. RSS counts everything (tensors, allocator caches,
  libraries); it can under-count in a process that has already grown and freed memory (the freed
  pages are reused without raising RSS), which is why the benchmark runs each measurement in a fresh
  process. Where the reset is not available, the lifetime peak (`ru_maxrss`) is used and said so.
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only, not the
  caching allocator's reserve).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


# --------------------------------------------------------------------------------------------------
# Clocks
# --------------------------------------------------------------------------------------------------
def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on CPU), so that a clock read after it is honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when `enabled`; nothing on CPU (bf16 runs at 0.3 GFLOP/s on this CPU)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident set size now, MiB (the lifetime peak where /proc is missing)."""
    kib = _status_kib("VmRSS")
    if kib is None:
        return lifetime_peak_rss_mb()
    return kib / 1024.0


def lifetime_peak_rss_mb() -> float:
    """`ru_maxrss` of this process, MiB (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if os.uname().sysname == "Darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss_mb() -> float:
    """The RSS high-water mark, MiB (since the last `reset_peak_rss`, else since the start)."""
    kib = _status_kib("VmHWM")
    return lifetime_peak_rss_mb() if kib is None else kib / 1024.0


class PeakMemory:
    """Peak memory over a stretch of work on one device.

    Usage: `meter = PeakMemory(device); meter.reset(); ...; meter.peak_mb()`.

    Attributes:
        method: one line saying what is measured (goes into the results).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.before_mb = 0.0
        self.resettable = False
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (tensors), after reset_peak_memory_stats"
        else:
            self.method = "process RSS high-water mark (VmHWM) reset at the start (/proc/self/clear_refs)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        self.resettable = reset_peak_rss()
        if not self.resettable:
            self.method = "process lifetime peak RSS (ru_maxrss; the kernel cannot reset VmHWM here)"
        self.before_mb = rss_mb()

    def peak_mb(self) -> float:
        """Peak since `reset`, MiB (includes what was allocated before it: compare with `before_mb`)."""
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()


# --------------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------------
def matmul_gflops(
    *,
    size: int = 2048,
    seconds: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 50,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The machine's dense matmul rate: the best of timed `size³` products (2·size³ FLOP each),
    repeated for about `seconds` (between `min_repeats` and `max_repeats` times) after a warm-up.

    Returns:
        {"gflops": best GFLOP/s, "median_gflops", "repeats", "size", "dtype", "device", "threads"}.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        torch.matmul(a, b)  # warm-up: allocation, kernel selection
        synchronize(device)
        rates: list[float] = []
        began = time.perf_counter()
        while len(rates) < min_repeats or (
            time.perf_counter() - began < seconds and len(rates) < max_repeats
        ):
            start = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    rates.sort()
    return {
        "gflops": rates[-1],
        "median_gflops": rates[len(rates) // 2],
        "repeats": len(rates),
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """`scaled_dot_product_attention`'s CPU kernel, counted as the counter counts the GPU ones."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The counter has formulas for the GPU attention kernels only; a ViT on the CPU runs this one.
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_flops(fn: Callable[[], Any], *, depth: int = 2) -> tuple[int, dict[str, int], Any]:
    """FLOPs of one call of `fn` by `torch.utils.flop_counter.FlopCounterMode`.

    The counter knows matrix products, convolutions and attention (2 FLOP per multiply-add; the
    fused attention kernels, the CPU one included: `EXTRA_FLOP_FORMULAS`); element-wise work,
    normalisation, softmax, `grid_sample` and resizing are not counted.

    Args:
        fn: the work, called once inside the counter.
        depth: module depth of the breakdown (the counter's own module tracking).

    Returns:
        (total, per module {name: FLOPs} at up to `depth`, what `fn` returned).
    """
    counter = FlopCounterMode(display=False, depth=depth, custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        result = fn()
    per_module = {
        name: int(sum(counts.values()))
        for name, counts in counter.get_flop_counts().items()
        if name != "Global"
    }
    return int(counter.get_total_flops()), per_module, result


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as elapsed: ...` then `elapsed[0]` seconds."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start
