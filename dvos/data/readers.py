"""One reader interface over video files and folders of JPEG/PNG frames.

Every reader gives random access to RGB uint8 frames (`H × W × 3`) by index, batched reads in the
caller's order, the frame names used to name predictions, the frame size and the frame rate.

Video files are decoded by decord or by PyAV (`open_video(backend=...)`, `data.backend`): auto takes
decord when it imports (it has wheels for x86-64 only), PyAV otherwise. The two give identical
arrays (docs/DESIGN.md, "Data").

decord traps handled here: `get_batch` is given sorted, unique indices and the result is put back
in the caller's order; a missing, empty or truncated file raises `RuntimeError` while damaged frame
data raises `decord._ffi.base.DECORDError`, which is *not* a `RuntimeError` (nor are PyAV's errors),
so every decoder call is wrapped in `except Exception` and re-raised as a one-line `DataError`
naming the file.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from dvos.utils.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Folders that hold annotation masks (DAVIS / YouTube-VOS), not frames: `list_videos` skips them.
MASK_FOLDER_NAMES = ("Annotations",)
VIDEO_BACKENDS = ("auto", "decord", "pyav")


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
    """A video file, decoded by one of the backends below (`open_video` picks it).

    Frames are indexed as decord indexes them: the video stream's packets sorted by presentation
    time, one frame each, so both backends give the same frames at the same indices.

    Args:
        path: the video file (.mp4 .avi .webm .mkv .mov).
        num_threads: decoding threads (0 = as many as FFmpeg wants). Keep 1 inside DataLoader
            workers: the workers already give the parallelism.
        size: optional decode size (H, W), resized while decoding (cheaper than after).

    Raises:
        DataError: the file is missing, empty, truncated or not a decodable video.
    """

    backend = ""

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
        self._num_threads = int(num_threads)
        self._length = self._open()
        if self._length <= 0:
            raise DataError(f"{self.path}: video has no frames")

    @abstractmethod
    def _open(self) -> int:
        """Open the decoder; return the number of frames (DataError when it cannot)."""

    @abstractmethod
    def _decode(self, indices: list[int]) -> np.ndarray:
        """Decode sorted, unique, in-range indices: `N × H × W × 3` uint8 (decoder errors raised as is)."""

    def __len__(self) -> int:
        return self._length

    @property
    def frame_names(self) -> list[str]:
        return [f"{index:05d}" for index in range(self._length)]

    @property
    def size(self) -> tuple[int, int]:
        if self._size is None:
            # Neither decoder reports the size of what it outputs: decode the first frame once.
            self._size = tuple(self._read_sorted([0]).shape[1:3])
        return self._size

    def _read_sorted(self, indices: list[int]) -> np.ndarray:
        self._check_open()
        try:
            frames = self._decode(indices)
        except DataError:
            raise
        except Exception as err:  # decord's DECORDError and PyAV's FFmpegError are not RuntimeErrors
            raise DataError(
                f"{self.path}: cannot decode frames {_describe(indices)} ({_first_line(err)})"
            ) from err
        if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
            raise DataError(f"{self.path}: decoder returned frames of shape {frames.shape}")
        if self._size is None:
            self._size = tuple(frames.shape[1:3])
        return np.ascontiguousarray(frames, dtype=np.uint8)

    @abstractmethod
    def _check_open(self) -> None:
        """ValueError when the reader was closed."""


class DecordVideoReader(VideoFileReader):
    """A video file decoded by decord (the default where it installs: x86-64 wheels only).

    decord fails every read of some output widths (16, 24, 48, 72 px, ...: "The size must exactly
    match", a row-stride bug); the reader then decodes at the next multiple of 32 and resizes with
    OpenCV.
    """

    backend = "decord"

    def _open(self) -> int:
        self._resize_after_decode = False
        self._target_size: tuple[int, int] | None = None
        self._reader = self._open_decoder(self._decode_size)
        try:
            return len(self._reader)
        except Exception as err:
            raise DataError(f"{self.path}: cannot read frame count ({_first_line(err)})") from err

    def _open_decoder(self, size: tuple[int, int] | None):
        import decord  # imported here: only video-file users pay for loading ffmpeg

        height, width = size if size is not None else (-1, -1)
        try:
            return decord.VideoReader(
                str(self.path), ctx=decord.cpu(0), width=width, height=height, num_threads=self._num_threads
            )
        except Exception as err:  # RuntimeError, DECORDError, AssertionError (0 frames)
            raise DataError(f"{self.path}: cannot open video ({_first_line(err)})") from err

    @property
    def fps(self) -> float | None:
        self._check_open()
        try:
            return float(self._reader.get_avg_fps())
        except Exception as err:
            raise DataError(f"{self.path}: cannot read frame rate ({_first_line(err)})") from err

    def _decode(self, indices: list[int]) -> np.ndarray:
        try:
            batch = self._reader.get_batch(indices)
        except Exception as err:
            if _DECORD_STRIDE_BUG in str(err) and not self._resize_after_decode:
                self._use_safe_decode_width()
                return self._decode(indices)
            raise
        frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        if self._resize_after_decode:
            frames = np.stack([_resize(frame, self._target_size) for frame in frames])
        return frames

    def _use_safe_decode_width(self) -> None:
        """Decode at the next width that is a multiple of 32 (not affected by the stride bug) and
        resize back with OpenCV."""
        target = self._decode_size if self._decode_size is not None else _native_size(self.path)
        safe_width = -(-target[1] // 32) * 32
        if safe_width == target[1]:
            safe_width += 32
        self._reader = self._open_decoder((target[0], safe_width))
        self._target_size = target
        self._resize_after_decode = True

    def _check_open(self) -> None:
        if self._reader is None:
            raise ValueError(f"{self.path}: reader is closed")

    def close(self) -> None:
        self._reader = None  # decord frees the decoder when the object is collected


class PyAVVideoReader(VideoFileReader):
    """A video file decoded by PyAV (FFmpeg), frame-exact against decord.

    At open the stream's packets are read to index the frames by presentation time and find the
    keyframes, and the first frame is decoded (so a file whose frames cannot be decoded fails at open,
    as with decord). A read seeks to the last keyframe at or before a wanted frame and decodes
    forward; the decoder's position is kept between reads, so reading forward (a clip, the inference
    engine's frame-by-frame walk) never seeks back. RGB comes from FFmpeg's own conversion, as in
    decord; a decode size goes through the same `scale` filter (bilinear) that decord uses.
    """

    backend = "pyav"

    def _open(self) -> int:
        import av

        self._container = None
        self._frames: Any = None  # the decoder's frame iterator since the last seek
        self._next: int | None = None  # index of the frame that iterator yields next
        self._graph: Any = None
        self._reformatter: Any = None
        try:
            self._container = av.open(str(self.path))
            if not self._container.streams.video:
                raise DataError(f"{self.path}: no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.thread_count = self._num_threads
            if self._num_threads != 1:
                self._stream.thread_type = "AUTO"
            packets = [
                (packet.pts if packet.pts is not None else packet.dts, bool(packet.is_keyframe))
                for packet in self._container.demux(self._stream)
                if packet.size
            ]
        except DataError:
            self.close()
            raise
        except Exception as err:  # av.error.FFmpegError (InvalidDataError, ...), OSError
            self.close()
            raise DataError(f"{self.path}: cannot open video ({_first_line(err)})") from err
        if any(timestamp is None for timestamp, _ in packets):
            # No timestamps to index by (rare containers): frames are counted from the start.
            self._timestamps: list[int] | None = None
            self._keyframes = [0]
        else:
            packets.sort(key=lambda packet: packet[0])
            self._timestamps = [timestamp for timestamp, _ in packets]
            self._keyframes = [index for index, (_, key) in enumerate(packets) if key] or [0]
        self._index_of = {timestamp: index for index, timestamp in enumerate(self._timestamps or [])}
        if packets:
            try:
                self._size = tuple(self._decode([0]).shape[1:3])
            except Exception as err:
                self.close()
                raise DataError(f"{self.path}: cannot open video ({_first_line(err)})") from err
        return len(packets)

    @property
    def fps(self) -> float | None:
        self._check_open()
        rate = self._stream.average_rate or self._stream.guessed_rate
        return float(rate) if rate else None

    def _decode(self, indices: list[int]) -> np.ndarray:
        try:
            return np.stack([self._frame(index) for index in indices])
        except Exception:
            self._next = None  # the decoder's state is unknown: the next read seeks
            raise

    def _frame(self, index: int) -> np.ndarray:
        """Frame `index` as `H × W × 3` uint8, decoding forward or seeking first."""
        keyframe = self._keyframes[bisect.bisect_right(self._keyframes, index) - 1]
        if self._next is None or index < self._next or keyframe > self._next:
            self._seek(keyframe)
        for frame in self._frames:
            position = self._index_of.get(frame.pts, self._next)
            self._next = position + 1
            if position == index:
                return self._to_rgb(frame)
            if position > index:
                break
        raise DataError(f"{self.path}: frame {index} could not be decoded (damaged or truncated file)")

    def _seek(self, keyframe: int) -> None:
        timestamp = self._timestamps[keyframe] if self._timestamps is not None else 0
        self._container.seek(timestamp, stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._next = keyframe

    def _to_rgb(self, frame: Any) -> np.ndarray:
        import av

        if self._decode_size is None:
            # This reader's own converter, on its decoding threads: `frame.to_ndarray` reuses one per
            # thread whose scaler threads, once started in a parent, do not exist in a DataLoader
            # worker forked from it (the worker hangs).
            if self._reformatter is None:
                self._reformatter = av.video.reformatter.VideoReformatter()
            rgb = self._reformatter.reformat(frame, format="rgb24", threads=max(self._num_threads, 1))
            return rgb.to_ndarray()
        if self._graph is None:
            height, width = self._decode_size
            self._graph = av.filter.Graph()
            self._graph.threads = max(self._num_threads, 1)
            source = self._graph.add_buffer(template=self._stream)
            scale = self._graph.add("scale", f"{width}:{height}:flags=bilinear")
            rgb = self._graph.add("format", "rgb24")
            sink = self._graph.add("buffersink")
            source.link_to(scale)
            scale.link_to(rgb)
            rgb.link_to(sink)
            self._graph.configure()
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()

    def _check_open(self) -> None:
        if self._container is None:
            raise ValueError(f"{self.path}: reader is closed")

    def close(self) -> None:
        container, self._container = getattr(self, "_container", None), None
        self._frames = self._graph = self._reformatter = None
        if container is not None:
            container.close()


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


@functools.cache
def decord_available() -> bool:
    """Whether decord imports here (it has no wheel for ARM; a broken install fails with OSError)."""
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


def open_video_file(
    path: str | os.PathLike,
    *,
    num_threads: int = 1,
    size: tuple[int, int] | None = None,
    backend: str = "auto",
) -> VideoFileReader:
    """Open a video file with the decoding `backend`: decord, pyav, or auto (decord when it
    imports, else PyAV).

    Raises:
        ValueError: an unknown backend.
        DataError: decord asked for but not installed, or the file cannot be opened.
    """
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video backend must be one of {', '.join(VIDEO_BACKENDS)}, got '{backend}'")
    if backend == "pyav" or (backend == "auto" and not decord_available()):
        return PyAVVideoReader(path, num_threads=num_threads, size=size)
    if backend == "decord" and not decord_available():
        raise DataError(
            f"{path}: video backend decord is not installed here (pip install 'dvos[decord]', "
            "or data.backend=pyav)"
        )
    return DecordVideoReader(path, num_threads=num_threads, size=size)


def open_video(
    path: str | os.PathLike,
    *,
    num_threads: int = 1,
    size: tuple[int, int] | None = None,
    backend: str = "auto",
) -> FrameReader:
    """Open a video file (by extension) or a folder of frames.

    Args:
        path: a video file (.mp4 .avi .webm .mkv .mov) or a folder of JPEG/PNG frames.
        num_threads: decoding threads for video files.
        size: optional output size (H, W).
        backend: the video decoder, auto | decord | pyav (`open_video_file`).

    Raises:
        DataError: a missing path, an unknown file type, or an unreadable video/folder.
    """
    path = Path(path)
    if path.is_dir():
        return FrameFolderReader(path, size=size)
    if is_video_file(path):
        return open_video_file(path, num_threads=num_threads, size=size, backend=backend)
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
