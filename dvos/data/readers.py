"""One reader interface over video files (decoded by decord) and folders of JPEG/PNG frames.

Every reader gives random access to RGB uint8 frames (`H × W × 3`) by index, batched reads in the
caller's order, the frame names used to name predictions, the frame size and the frame rate.

decord traps handled here (see docs/DESIGN.md, "Data"): `get_batch` is given sorted, unique indices and
the result is put back in the caller's order; a missing, empty or truncated file raises
`RuntimeError` while damaged frame data raises `decord._ffi.base.DECORDError`, which is *not* a
`RuntimeError`, so every decord call is wrapped in `except Exception` and re-raised as a one-line
`DataError` naming the file.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dvos.utils.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Folders that hold annotation masks (DAVIS / YouTube-VOS), not frames: `list_videos` skips them.
MASK_FOLDER_NAMES = ("Annotations",)


def natural_key(name: str) -> list:
    """Sort key that orders `frame2` before `frame10` (zero-padded names sort as plain text)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def is_video_file(path: str | os.PathLike) -> bool:
    """True for a file whose extension is one of `VIDEO_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (`IMAGE_EXTENSIONS`) of a folder, naturally sorted by name; hidden files skipped."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise DataError(f"{folder}: cannot list frame folder ({err.strerror or err})") from err
    files = [
        Path(entry.path)
        for entry in entries
        if not entry.name.startswith(".")
        and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
        and entry.is_file()
    ]
    return sorted(files, key=lambda path: natural_key(path.name))


def read_image(path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a JPEG/PNG frame as RGB uint8 `H × W × 3` (grey and RGBA images are converted).

    Args:
        path: the image file.
        size: optional output (H, W); resized with area interpolation when shrinking.

    Raises:
        DataError: missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    # Decoded from memory, not with cv2.imread: imread fills a truncated JPEG with grey and returns it
    # (printing only "Premature end of JPEG file"); imdecode refuses it, so a cut-off frame is an error.
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err.strerror or err})") from err
    if not data:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot decode image (damaged or truncated file)")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if size is not None and image.shape[:2] != tuple(size):
        image = _resize(image, size)
    return image


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file, from its header only (nothing is decoded)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except Exception as err:  # PIL raises many types for damaged files
        raise DataError(f"{path}: cannot read image header ({type(err).__name__}: {err})") from err
    return height, width


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"decode size must be (H, W) with positive entries, got {size!r}")
    return int(size[0]), int(size[1])


class FrameReader(ABC):
    """Random access to the frames of one video (a video file or a folder of frames).

    Frames are RGB uint8 `H × W × 3`. Use as a context manager, or call `close()`, to release the
    decoder.
    """

    path: Path

    @abstractmethod
    def __len__(self) -> int:
        """Number of frames."""

    @property
    @abstractmethod
    def frame_names(self) -> list[str]:
        """One name per frame: file stems for a folder, zero-padded indices (`00000`) for a video."""

    @property
    @abstractmethod
    def size(self) -> tuple[int, int]:
        """(H, W) of the frames as returned (after the optional decode size)."""

    @property
    @abstractmethod
    def fps(self) -> float | None:
        """Average frame rate of a video file; None for a frame folder."""

    @abstractmethod
    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        """Read sorted, unique, in-range indices: `N × H × W × 3` uint8."""

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Read several frames: `T × H × W × 3` uint8, in the order of `indices` (repeats allowed).

        Raises:
            IndexError: an index outside [-len, len).
            DataError: the frames cannot be decoded.
        """
        count = len(self)
        resolved = []
        for index in indices:
            index = int(index)
            if not -count <= index < count:
                raise IndexError(f"{self.path}: frame index {index} out of range for {count} frames")
            resolved.append(index % count)
        height, width = self.size
        if not resolved:
            return np.empty((0, height, width, 3), dtype=np.uint8)
        unique = sorted(set(resolved))
        frames = self._read_sorted(unique)
        position = {index: row for row, index in enumerate(unique)}
        return frames[[position[index] for index in resolved]]

    def __getitem__(self, index: int) -> np.ndarray:
        """One frame, `H × W × 3` uint8; negative indices count from the end."""
        return self.get_batch([index])[0]

    def close(self) -> None:  # noqa: B027 - optional hook: frame folders hold nothing to release
        """Release the decoder (a no-op for frame folders)."""

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, frames={len(self)})"


class VideoFileReader(FrameReader):
    """A video file decoded by decord.

    Args:
        path: the video file (.mp4 .avi .webm .mkv .mov).
        num_threads: decoding threads (decord's `num_threads`; 0 = as many as ffmpeg wants).
            Keep 1 inside DataLoader workers: the workers already give the parallelism.
        size: optional decode size (H, W); decord resizes while decoding (cheaper than after).

    Raises:
        DataError: the file is missing, empty, truncated or not a decodable video.
    """

    def __init__(
        self, path: str | os.PathLike, *, num_threads: int = 1, size: tuple[int, int] | None = None
    ) -> None:
        self.path = Path(path)
        self._decode_size = _check_size(size)
        self._size: tuple[int, int] | None = self._decode_size
        if not self.path.is_file():
            raise DataError(f"{self.path}: video file not found")
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path}: video file is empty (0 bytes)")
        self._num_threads = num_threads
        self._resize_after_decode = False
        self._target_size: tuple[int, int] | None = None
        self._reader = self._open(self._decode_size)
        try:
            self._length = len(self._reader)
        except Exception as err:
            raise DataError(f"{self.path}: cannot read frame count ({_first_line(err)})") from err
        if self._length <= 0:
            raise DataError(f"{self.path}: video has no frames")

    def _open(self, size: tuple[int, int] | None):
        import decord  # imported here: only video-file users pay for loading ffmpeg

        height, width = size if size is not None else (-1, -1)
        try:
            return decord.VideoReader(
                str(self.path), ctx=decord.cpu(0), width=width, height=height, num_threads=self._num_threads
            )
        except Exception as err:  # RuntimeError, DECORDError, AssertionError (0 frames)
            raise DataError(f"{self.path}: cannot open video ({_first_line(err)})") from err

    def __len__(self) -> int:
        return self._length

    @property
    def frame_names(self) -> list[str]:
        return [f"{index:05d}" for index in range(self._length)]

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            # decord has no header-only size query: decode the first frame once.
            self._size = tuple(self._read_sorted([0]).shape[1:3])
        return self._size

    @property
    def fps(self) -> float | None:
        self._check_open()
        try:
            return float(self._reader.get_avg_fps())
        except Exception as err:
            raise DataError(f"{self.path}: cannot read frame rate ({_first_line(err)})") from err

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        self._check_open()
        try:
            frames = self._decode(indices)
        except Exception as err:  # DECORDError for damaged data is not a RuntimeError
            if _DECORD_STRIDE_BUG in str(err) and not self._resize_after_decode:
                self._use_safe_decode_width()
                return self._read_sorted(indices)
            raise DataError(
                f"{self.path}: cannot decode frames {_describe(indices)} ({_first_line(err)})"
            ) from err
        if self._resize_after_decode:
            frames = np.stack([_resize(frame, self._target_size) for frame in frames])
        if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
            raise DataError(f"{self.path}: decoder returned frames of shape {frames.shape}")
        if self._size is None:
            self._size = tuple(frames.shape[1:3])
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def _use_safe_decode_width(self) -> None:
        """Work around a decord bug: some output widths (16, 24, 48, 72 px, ...) make every read
        fail with "The size must exactly match" (a row-stride mismatch). Widths that are multiples
        of 32 are not affected: decode at the next such width and resize with OpenCV."""
        target = self._decode_size if self._decode_size is not None else _native_size(self.path)
        safe_width = -(-target[1] // 32) * 32
        if safe_width == target[1]:
            safe_width += 32
        self._reader = self._open((target[0], safe_width))
        self._target_size = target
        self._resize_after_decode = True

    def _decode(self, indices: list[int]) -> np.ndarray:
        batch = self._reader.get_batch(indices)
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)

    def _check_open(self) -> None:
        if self._reader is None:
            raise ValueError(f"{self.path}: reader is closed")

    def close(self) -> None:
        self._reader = None  # decord frees the decoder when the object is collected


class FrameFolderReader(FrameReader):
    """A folder of JPEG/PNG frames, in natural name order (`00000.jpg`, `00001.jpg`, ...).

    Args:
        path: the folder.
        size: optional output size (H, W); frames are resized after decoding.

    Raises:
        DataError: the folder is missing or holds no image files.
    """

    def __init__(self, path: str | os.PathLike, *, size: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: frame folder not found")
        self._files = list_frame_files(self.path)
        if not self._files:
            raise DataError(f"{self.path}: no frames ({'/'.join(IMAGE_EXTENSIONS)} files) in folder")
        self._output_size = _check_size(size)
        self._size = self._output_size

    @property
    def files(self) -> list[Path]:
        """The frame files, in reading order."""
        return list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    @property
    def frame_names(self) -> list[str]:
        return [path.stem for path in self._files]

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = image_size(self._files[0])
        return self._size

    @property
    def fps(self) -> float | None:
        return None

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        frames = [read_image(self._files[index], size=self._output_size) for index in indices]
        expected = self.size
        for index, frame in zip(indices, frames):
            if frame.shape[:2] != tuple(expected):
                raise DataError(
                    f"{self._files[index]}: frame size {frame.shape[0]}×{frame.shape[1]} differs from "
                    f"the first frame's {expected[0]}×{expected[1]}"
                )
        return np.stack(frames)


def open_video(
    path: str | os.PathLike, *, num_threads: int = 1, size: tuple[int, int] | None = None
) -> FrameReader:
    """Open a video file (by extension) or a folder of frames.

    Args:
        path: a video file (.mp4 .avi .webm .mkv .mov) or a folder of JPEG/PNG frames.
        num_threads: decoding threads for video files.
        size: optional output size (H, W).

    Raises:
        DataError: a missing path, an unknown file type, or an unreadable video/folder.
    """
    path = Path(path)
    if path.is_dir():
        return FrameFolderReader(path, size=size)
    if is_video_file(path):
        return VideoFileReader(path, num_threads=num_threads, size=size)
    if not path.exists():
        raise DataError(f"{path}: no such video file or frame folder")
    raise DataError(f"{path}: not a video file ({' '.join(VIDEO_EXTENSIONS)}) nor a folder of frames")


def list_videos(root: str | os.PathLike) -> list[Path]:
    """Find the videos under `root`: video files (recursively) and folders of frames, sorted.

    A folder that holds at least one image counts as one video (its subfolders are not searched).
    Hidden entries and folders named like mask folders (`Annotations`) are skipped. `root` itself
    may be a video file or a frame folder.

    Raises:
        DataError: `root` does not exist or holds no video.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: video folder not found")
    if root.is_file():
        if is_video_file(root):
            return [root]
        raise DataError(f"{root}: not a video file ({' '.join(VIDEO_EXTENSIONS)})")
    videos: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            subfolders[:] = []
            continue
        seen.add(real)
        visible = [name for name in files if not name.startswith(".")]
        if any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name in visible):
            videos.append(Path(folder))
            subfolders[:] = []
            continue
        videos.extend(Path(folder) / name for name in visible if is_video_file(name))
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and name not in MASK_FOLDER_NAMES
        ]
    if not videos:
        raise DataError(
            f"{root}: no videos found (looked for {' '.join(VIDEO_EXTENSIONS)} files and folders of "
            f"{'/'.join(IMAGE_EXTENSIONS)} frames)"
        )
    return sorted(videos, key=lambda path: natural_key(str(path.relative_to(root))))


_DECORD_STRIDE_BUG = "The size must exactly match"


def _native_size(path: Path) -> tuple[int, int]:
    """(H, W) of a video's first video stream, from the container header (PyAV)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.height), int(stream.codec_context.width)
    except Exception as err:
        raise DataError(f"{path}: cannot read video size ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    """A one-line description of a decoder error (decord's messages span many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # decord prefixes messages with a timestamp and a source location: keep the message itself.
    text = re.sub(r"^(\[[\d:]+\]\s*\S+:\d+:\s*)+", "", text)
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _describe(indices: list[int]) -> str:
    if len(indices) <= 6:
        return ",".join(str(index) for index in indices)
    return f"{indices[0]}..{indices[-1]} ({len(indices)} frames)"
