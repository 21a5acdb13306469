"""A full disk, simulated in-process: the file `open` of `dvos.utils.io` (through which every
atomic write of dvos goes: checkpoints, configs, JSON, exports) is replaced by one whose file objects
keep half of the first write and then raise `OSError(ENOSPC)`, as a filling disk does."""

import builtins
import errno
import os
from pathlib import Path


class FullDiskFile:
    """A file on a disk that fills up: the first write keeps half its bytes, then ENOSPC."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def fill_disk(monkeypatch, name_part: str) -> None:
    """Writes through dvos.utils.io to files whose name holds `name_part` hit a full disk."""
    import dvos.utils.io as io_module

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDiskFile(handle) if "w" in mode and name_part in Path(file).name else handle

    monkeypatch.setattr(io_module, "open", open_on_a_full_disk, raising=False)
