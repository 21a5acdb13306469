"""Predicted masks written by a background thread through a bounded queue.

The inference loop hands each frame's `H × W` uint8 id map to `MaskWriter.put` and goes on with the
next frame while a writer thread encodes the palette PNG and renames it into place
(`dvos.utils.masks.write_mask`: temporary name, then rename). The queue is bounded (`maxsize`,
default 16 masks), so a slow disk makes the loop wait instead of letting memory grow with the
video's length: at most `maxsize` + 1 masks are in flight (about 0.4 MB each at 480p).

Layout: `OUT/<sequence>/<frame_name>.png` (DAVIS layout, what `dvos eval-masks` reads), or
`OUT/<frame_name>.png` when the sequence is None (`dvos segment`).

An error in the thread (a full disk, a folder removed under it, a bad mask) is re-raised in the
caller at its next `put` or at `close`; an `OSError` becomes a one-line `DvosError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

from dvos.utils.errors import DvosError
from dvos.utils.io import ensure_writable_dir
from dvos.utils.masks import write_mask

_STOP = object()  # queue sentinel: no more masks
_POLL_SECONDS = 0.1  # how often a blocked put looks at the writer thread's health


class MaskWriter:
    """Writes palette PNGs in a background thread; use as a context manager (or call `close`).

    Args:
        out_dir: output root; created if needed. A folder that cannot be created or written is a
            one-line `DvosError`, raised here, before any frame is processed.
        maxsize: bound of the queue, in masks (≥ 1).

    Attributes:
        written: masks written so far (by the thread).
    """

    def __init__(self, out_dir: str | os.PathLike, *, maxsize: int = 16) -> None:
        if int(maxsize) < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.out_dir = ensure_writable_dir(out_dir)
        self.maxsize = int(maxsize)
        self.written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.maxsize)
        self._palettes: dict[str | None, list[int] | None] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="dvos-mask-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ caller side
    def sequence_dir(self, sequence: str | None) -> Path:
        """The folder a sequence's masks go to: `OUT/<sequence>`, or `OUT` for None."""
        return self.out_dir if sequence is None else self.out_dir / sequence

    def open_sequence(self, sequence: str | None, palette: list[int] | None = None) -> Path:
        """Create (and check) a sequence's folder and remember its palette; call before its first `put`.

        Args:
            sequence: folder name under OUT, or None to write into OUT itself.
            palette: flat RGB list (768 ints) of the sequence's first input mask; None: DAVIS palette.

        Raises:
            DvosError: the folder cannot be created or written (one line naming it).
        """
        self._raise_pending()
        folder = ensure_writable_dir(self.sequence_dir(sequence))
        self._palettes[sequence] = None if palette is None else list(palette)
        return folder

    def put(self, sequence: str | None, frame_name: str, mask: np.ndarray) -> None:
        """Queue `mask` (`H × W` uint8 ids) for `OUT/<sequence>/<frame_name>.png`; waits while the queue is full.

        The array is not copied: do not modify it after handing it over.

        Raises:
            the writer thread's error, if one happened since the last call.
        """
        if self._closed:
            raise RuntimeError("MaskWriter.put() after close()")
        if sequence not in self._palettes:
            self.open_sequence(sequence)
        path = self.sequence_dir(sequence) / f"{frame_name}.png"
        item = (path, mask, self._palettes[sequence])
        while True:
            self._raise_pending()
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write everything still queued, stop the thread, and re-raise its error if it had one."""
        if not self._closed:
            self._closed = True
            while self._thread.is_alive():
                try:
                    self._queue.put(_STOP, timeout=_POLL_SECONDS)
                    break
                except queue.Full:
                    continue
            self._thread.join()
        self._raise_pending()

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The loop failed already: finish the thread, but let the loop's error be the one reported.
        with contextlib.suppress(Exception):
            self.close()

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is None:
            return
        self._closed = True  # the thread has stopped: nothing more can be written
        if isinstance(error, OSError):
            target = error.filename or "a mask"
            raise DvosError(f"cannot write predicted mask {target}: {error.strerror or error}") from error
        raise error

    # ------------------------------------------------------------------------------------------ thread side
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            path, mask, palette = item
            try:
                write_mask(path, mask, palette)
            except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
                if isinstance(err, OSError) and err.filename is None:
                    err.filename = str(path)
                self._error = err
                self._drain()
                return
            self.written += 1

    def _drain(self) -> None:
        """After an error: empty the queue so a producer blocked in `put` wakes up and sees it."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
