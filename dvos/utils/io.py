"""Atomic file output: write to a temporary name beside the target, then rename.

A reader (or a killed run) therefore never sees a half-written file: either the old file or the
complete new one is there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dvos.utils.errors import DvosError

# A write that fails for want of room: the disk, the user's quota, the largest file allowed.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def no_room(err: BaseException) -> bool:
    """True for an OSError that says the disk (or quota) is full."""
    return isinstance(err, OSError) and err.errno in NO_ROOM


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) if needed; raise a one-line error when it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DvosError(f"cannot create output folder {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise DvosError(f"output folder {path} is not writable")
    return path


def check_writable_file(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Check, creating nothing, that the file `path` can be written: it is not a folder, and its
    folder exists and is writable or can be created. A one-line DvosError naming `what` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DvosError(f"{what} {path} is a folder; give a file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DvosError(f"cannot write {what} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DvosError(f"cannot write {what} {path}: folder {folder} is not writable")
    return path


def _default_mode() -> int:
    """The permissions a plain `open(path, "w")` would give (mkstemp's temporaries are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _make_temporary(path: Path, suffix: str) -> str:
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem if suffix != '.tmp' else path.name}.", suffix=suffix, dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp_name, _default_mode())
    return tmp_name


def _temporary_or_error(path: Path, suffix: str) -> str:
    try:
        return _make_temporary(path, suffix)
    except OSError as err:
        raise DvosError(f"cannot write {path}: {err.strerror or err}") from err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`, on error delete it.

    Example:
        with atomic_write(out / "results.json") as f:
            json.dump(results, f)
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_name = _temporary_or_error(path, ".tmp")
    try:
        with open(tmp_name, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if no_room(err):
            raise DvosError(f"cannot write {path}: {err.strerror}") from err  # type: ignore[union-attr]
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for libraries that write by file name; rename on success.

    The temporary name keeps the suffix of `path` so that writers choosing a format from the
    extension (PIL, PyAV) still do the right thing.
    """
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp_name = _temporary_or_error(path, f".tmp{path.suffix}")
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if no_room(err):
            raise DvosError(f"cannot write {path}: {err.strerror}") from err  # type: ignore[union-attr]
        raise


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the hidden temporaries (`.<name>.<random>.tmp*`) of atomic writes that a killed
    process left in `folder`; return them. Only for a folder no other process is writing to."""
    removed = []
    for path in Path(folder).glob(".*.tmp*"):
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` (a temporary of `atomic_path`, say) through Python's file object and
    to the disk (fsync): a full disk is an OSError here, whoever serialised the bytes."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1) -> None:
    """Write `obj` as JSON atomically (full float precision: json uses repr)."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=indent)
        handle.write("\n")
