"""Reading back offline W&B runs (`<dir>/wandb/offline-run-*/run-<id>.wandb`) as a user's sync would
see them: the run's id, name, group, job type, tags, config, summary and logged keys.

The `.wandb` file is W&B's transaction log: a 7-byte header (`:W&B`, magic, version) and then
LevelDB-style records in 32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type: full, first,
middle, last), each payload one `wandb_internal_pb2.Record`. wandb 0.31 has no Python reader of its
own, so this one reads the format directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def _payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # the rest of a block is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _set(tree: dict, item: Any) -> None:
    """Config items are nested (`data` → {...}) or flat; keep the value under its path."""
    tree[_key(item)] = json.loads(item.value_json)


@dataclass
class OfflineRun:
    folder: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)


def read_offline_run(folder: str | Path) -> OfflineRun:
    """The run recorded in one `offline-run-*` folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder)
    for payload in _payloads(log):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info = record.run
            run.run_id, run.name, run.group, run.job_type = (
                info.run_id,
                info.display_name,
                info.run_group,
                info.job_type,
            )
            run.tags = list(info.tags)
            for item in info.config.update:
                _set(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                run.history_keys.add(_key(item))
                run.summary[_key(item)] = json.loads(item.value_json)
    return run


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under `root` (any depth), oldest first."""
    return [read_offline_run(path) for path in sorted(Path(root).rglob("offline-run-*"))]
