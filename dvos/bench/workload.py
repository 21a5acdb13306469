"""Is data loading the bottleneck of training? Clips per second produced vs consumed.

- produced: training clips (the configured clip length, crop and augmentation) per second from a
  `VideoClipDataModule`, once from H.264 mp4 files through decord and once from JPEG frame folders;
  measured in one process (`num_workers=0`: one worker's rate) and through the configured DataLoader
  (`data.num_workers` processes; its first batch, which pays for starting the workers, is not timed);
- consumed: clips per second of the distillation training step with the configured model, teacher
  and batch (`DistillationModule.training_step` + backward + an AdamW step).

Loading keeps up when the DataLoader's rate is above the step's. On a machine with few cores the
workers and the step share them, so the two rates do not simply add up.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from dvos.bench.measure import autocast, synchronize


def loader_throughput(
    make_datamodule: Callable[[int], Any], *, batches: int, num_workers: int
) -> dict[str, Any]:
    """Clips per second of a training DataLoader.

    Args:
        make_datamodule: `make_datamodule(num_workers)` → a `VideoClipDataModule`.
        batches: batches timed (after one untimed batch when `num_workers > 0`).
        num_workers: DataLoader workers.

    Returns:
        {"clips_per_s", "clips", "seconds", "num_workers", "batch_size", "videos", "clip_shape"}.
    """
    datamodule = make_datamodule(num_workers)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    batch = None
    if num_workers > 0:  # workers start with the first batch
        batch = next(iterator)
    clips, seconds = 0, 0.0
    for _ in range(batches):
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        seconds += time.perf_counter() - start
        clips += int(batch["frames"].shape[0])
    del iterator, loader  # stops persistent workers
    return {
        "clips_per_s": clips / seconds if seconds > 0 else None,
        "clips": clips,
        "seconds": seconds,
        "num_workers": int(num_workers),
        "batch_size": int(datamodule.batch_size),
        "videos": len(datamodule.train_dataset.videos),
        "clip_shape": list(batch["frames"].shape[1:]) if batch is not None else None,
    }


@contextlib.contextmanager
def timed_calls(targets: Mapping[str, tuple[Any, str]], device: torch.device) -> Iterator[dict[str, float]]:
    """Seconds spent in some functions while the block runs: {name: (owner, attribute)} → {name: s}.

    Each `owner.attribute` (a method of an object or a function of a module) is replaced for the
    block by a wrapper that synchronises the device around the call, then put back."""
    spent = dict.fromkeys(targets, 0.0)
    originals = {}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(device)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                spent[name] += time.perf_counter() - start

        return timed

    for name, (owner, attribute) in targets.items():
        originals[name] = (owner, attribute, owner.__dict__.get(attribute), getattr(owner, attribute))
        setattr(owner, attribute, wrap(name, originals[name][3]))
    try:
        yield spent
    finally:
        for owner, attribute, own, _ in originals.values():
            if own is None:
                delattr(owner, attribute)  # a bound method: the class's comes back
            else:
                setattr(owner, attribute, own)


def training_step_throughput(
    module: Any,
    batch: dict[str, Any],
    *,
    steps: int,
    device: torch.device | str,
    amp: bool = False,
    parts: Mapping[str, tuple[Any, str]] | None = None,
) -> dict[str, Any]:
    """Clips per second of the distillation training step (forward of teacher and student, losses,
    backward, AdamW step) on one batch, after one untimed step.

    Args:
        module: a `DistillationModule` (no trainer attached: its `self.log` calls are no-ops).
        batch: a training batch (`frames` B × T × 3 × H × W).
        steps: timed steps.
        device: where to run.
        amp: fp16 autocast (CUDA only).
        parts: functions whose time within the timed steps is reported ({name: (owner, attribute)},
            see `timed_calls`), e.g. the pseudo-objects' clustering.

    Returns:
        {"clips_per_s", "seconds_per_step", "steps", "batch_size", "clip_shape", "skipped_steps",
        "parts": {name: {"seconds_per_step", "share"}}}.
    """
    device = torch.device(device)
    module = module.to(device).train()
    batch = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()
    }
    parameters = [p for p in module.student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    times, skipped, part_seconds = [], 0, dict.fromkeys(parts or {}, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "self.log() without a trainer" and the like
        for index in range(steps + 1):
            probe = timed_calls(parts or {}, device) if index > 0 else contextlib.nullcontext({})
            with probe as spent:
                synchronize(device)
                start = time.perf_counter()
                with autocast(device, amp):
                    loss = module.training_step(batch, index)
                if loss is None:  # a non-finite loss is skipped by the module, as in training
                    skipped += 1
                else:
                    loss.backward()
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
            if index > 0:
                times.append(time.perf_counter() - start)
                for name, value in spent.items():
                    part_seconds[name] += value
    seconds = sum(times) / len(times)
    clips = int(batch["frames"].shape[0])
    return {
        "clips_per_s": clips / seconds if seconds > 0 else None,
        "seconds_per_step": seconds,
        "steps": len(times),
        "batch_size": clips,
        "clip_shape": list(batch["frames"].shape[1:]),
        "skipped_steps": skipped,
        "parts": {
            name: {
                "seconds_per_step": value / len(times),
                "share": value / sum(times) if sum(times) else None,
            }
            for name, value in part_seconds.items()
        },
    }
