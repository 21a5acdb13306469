"""Video-file and frame-folder readers: real decoded content, batched order, errors, discovery.

Video tests run with both decoding backends (decord, PyAV); the two are compared frame for frame,
array for array, on mp4s the tests write and on the shared DAVIS mp4s.
"""

import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from helpers_data import make_bad_videos, moving_frames, psnr, write_frame_folder, write_mp4
from PIL import Image

from dvos.data import readers
from dvos.data.clips import VideoClipDataset
from dvos.data.readers import (
    DecordVideoReader,
    FrameFolderReader,
    PyAVVideoReader,
    VideoFileReader,
    list_videos,
    open_video,
)
from dvos.utils.errors import DataError

READER_CLASSES = {"decord": DecordVideoReader, "pyav": PyAVVideoReader}


@pytest.fixture(params=["decord", "pyav"])
def backend(request) -> str:
    """Each video test runs once per decoding backend (decord skipped where it is not installed)."""
    if request.param == "decord" and not readers.decord_available():
        pytest.skip("decord is not installed here (no wheel for this platform)")
    return request.param


@pytest.fixture
def needs_decord():
    if not readers.decord_available():
        pytest.skip("decord is not installed here: nothing to compare PyAV with")


@pytest.fixture(scope="module")
def tiny_mp4(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("video") / "tiny.mp4", moving_frames(12, 64, 96))


def write_gop_mp4(path: Path, frames: np.ndarray, *, gop: int, b_frames: int, open_gop: bool) -> Path:
    """An H.264 mp4 with a keyframe every `gop` frames and B-frames: reads must seek and reorder."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {
            "crf": "18",
            "preset": "medium",
            "g": str(gop),
            "bf": str(b_frames),
            "x264-params": f"open-gop={int(open_gop)}",
        }
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _jpeg(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def test_blackswan_mp4_matches_davis_jpegs(davis_fixture, backend):
    jpeg_dir = davis_fixture / "JPEGImages" / "480p" / "blackswan"
    with open_video(davis_fixture / "videos" / "blackswan.mp4", backend=backend) as reader:
        assert isinstance(reader, READER_CLASSES[backend]) and isinstance(reader, VideoFileReader)
        assert len(reader) == 50
        assert reader.size == (480, 854)
        assert reader.fps == pytest.approx(30.0)
        assert reader.frame_names[:2] == ["00000", "00001"] and reader.frame_names[-1] == "00049"
        frames = reader.get_batch(range(50))
    assert frames.shape == (50, 480, 854, 3) and frames.dtype == np.uint8
    jpegs = [_jpeg(jpeg_dir / f"{index:05d}.jpg") for index in range(50)]
    scores = [psnr(frames[index], jpegs[index]) for index in range(50)]
    assert min(scores) > 30.0, f"worst frame PSNR {min(scores):.1f} dB"
    # Frame-aligned, not merely similar: the neighbouring JPEG is a clearly worse match.
    for index in (0, 20, 48):
        assert psnr(frames[index], jpegs[index + 1]) < scores[index] - 5


def test_get_batch_returns_callers_order(davis_fixture, backend):
    with open_video(davis_fixture / "videos" / "blackswan.mp4", backend=backend) as reader:
        wanted = [31, 2, 17, 2, 49, 0]
        batch = reader.get_batch(wanted)
        singles = [reader[index] for index in wanted]
        last = reader[-1]
    assert batch.shape == (6, 480, 854, 3)
    for row, single in zip(batch, singles):
        np.testing.assert_array_equal(row, single)  # same decoder, same frame, whatever the order
    np.testing.assert_array_equal(batch[4], last)
    assert psnr(batch[0], batch[2]) < 35  # different frames do differ


def test_tiny_mp4_content_and_decode_size(tiny_mp4, backend):
    reference = moving_frames(12, 64, 96)
    with open_video(tiny_mp4, backend=backend) as reader:
        assert (len(reader), reader.size, reader.fps) == (12, (64, 96), 10.0)
        frames = reader.get_batch([7, 3, 11])
    for frame, index in zip(frames, [7, 3, 11]):
        assert psnr(frame, reference[index]) > 35
    # 32×48 is a size decord's scaled decoding cannot produce: the reader falls back to resizing.
    for size in [(32, 64), (32, 48)]:
        with open_video(tiny_mp4, size=size, num_threads=2, backend=backend) as small:
            assert small.size == size
            batch = small.get_batch([5, 0])
        assert batch.shape == (2, *size, 3)
        expected = cv2.resize(reference[5], size[::-1], interpolation=cv2.INTER_AREA)
        assert psnr(batch[0], expected) > 28


def test_video_width_that_decord_cannot_output(tmp_path, backend):
    # decord 0.6 fails every read of some frame widths (16, 24, 48, 72 px: a row-stride bug); the
    # reader decodes at a safe width and resizes back instead. PyAV has no such bug.
    reference = moving_frames(6, 32, 48)
    with open_video(write_mp4(tmp_path / "narrow.mp4", reference), backend=backend) as reader:
        assert reader.size == (32, 48)
        frames = reader.get_batch([4, 1])
    assert frames.shape == (2, 32, 48, 3)
    assert psnr(frames[0], reference[4]) > 28 and psnr(frames[1], reference[1]) > 28


def test_index_errors_and_empty_batch(tiny_mp4, backend):
    with open_video(tiny_mp4, backend=backend) as reader:
        with pytest.raises(IndexError):
            reader.get_batch([0, 12])
        with pytest.raises(IndexError):
            reader[-13]
        assert reader.get_batch([]).shape == (0, 64, 96, 3)
    with pytest.raises(ValueError, match="closed"):
        reader[0]


def test_frame_folder_reader_on_davis_jpegs(davis_fixture):
    folder = davis_fixture / "JPEGImages" / "480p" / "blackswan"
    with open_video(folder) as reader:
        assert isinstance(reader, FrameFolderReader)
        assert len(reader) == 50 and reader.size == (480, 854) and reader.fps is None
        assert reader.frame_names == [f"{index:05d}" for index in range(50)]
        batch = reader.get_batch([9, 0, 9])
    for row, index in zip(batch, [9, 0, 9]):
        assert psnr(row, _jpeg(folder / f"{index:05d}.jpg")) > 45  # PIL vs OpenCV JPEG decoders


def test_frame_folder_natural_order_and_formats(tmp_path):
    frames = moving_frames(11, 32, 48)
    folder = tmp_path / "clip"
    folder.mkdir()
    for index in range(11):  # unpadded names: plain sorting would put 10 before 2
        Image.fromarray(frames[index]).save(folder / f"frame{index}.png")
    Image.fromarray(frames[0]).convert("L").save(folder / "frame11.png")  # grey frame → RGB
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"")
    with open_video(folder) as reader:
        assert reader.frame_names == [f"frame{index}" for index in range(12)]
        batch = reader.get_batch(range(12))
    np.testing.assert_array_equal(batch[:11], frames)  # PNG is lossless
    assert batch[11].shape == (32, 48, 3)
    with open_video(folder, size=(16, 24)) as small:
        assert small[3].shape == (16, 24, 3)


def test_frame_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no frames"):
        open_video(tmp_path)
    folder = write_frame_folder(tmp_path / "mixed", moving_frames(2, 32, 48), ext=".png")
    Image.fromarray(moving_frames(1, 20, 20)[0]).save(folder / "00002.png")
    (folder / "00003.jpg").write_bytes(b"not a jpeg")
    with open_video(folder) as reader:
        with pytest.raises(DataError, match="00002.png.*differs"):
            reader.get_batch([0, 2])
        with pytest.raises(DataError, match="00003.jpg: cannot decode"):
            reader[3]


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "damaged_open", "damaged_decode"])
def test_bad_video_files_raise_data_error_naming_the_file(tmp_path, tiny_mp4, name, backend):
    path = make_bad_videos(tmp_path, tiny_mp4)[name]
    # never RuntimeError, DECORDError or av.error.FFmpegError
    with pytest.raises(DataError) as info, open_video(path, backend=backend) as reader:
        reader.get_batch([0, 4, 8])
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_open_video_rejects_missing_and_unknown(tmp_path, backend):
    with pytest.raises(DataError, match="missing.mp4: video file not found"):
        open_video(tmp_path / "missing.mp4", backend=backend)
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(DataError, match="not a video file"):
        open_video(notes)


def test_list_videos_finds_files_and_frame_folders(tmp_path, tiny_mp4):
    root = tmp_path / "videos"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "b" / "deep" / "clip.MP4").write_bytes(tiny_mp4.read_bytes())
    (root / "a.webm").write_bytes(b"")  # listed by extension; unreadable files are the reader's job
    write_frame_folder(root / "frames" / "seq1", moving_frames(3, 16, 16))
    (root / "frames" / "seq1" / "sub").mkdir()  # a frame folder is one video: not searched further
    write_frame_folder(root / "frames" / "seq1" / "sub", moving_frames(1, 16, 16))
    write_frame_folder(root / "Annotations" / "seq1", moving_frames(1, 16, 16), ext=".png")  # masks
    (root / ".cache").mkdir()
    (root / ".cache" / "x.mp4").write_bytes(b"")
    (root / "readme.txt").write_text("x")
    found = list_videos(root)
    assert found == [root / "a.webm", root / "b" / "deep" / "clip.MP4", root / "frames" / "seq1"]
    assert list_videos(tiny_mp4) == [tiny_mp4]
    assert list_videos(root / "frames" / "seq1") == [root / "frames" / "seq1"]


def test_list_videos_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_videos(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no videos found"):
        list_videos(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# The two backends against each other
# --------------------------------------------------------------------------------------------------
def _read_both(path: Path, indices, **options) -> tuple[np.ndarray, np.ndarray]:
    with open_video(path, backend="decord", **options) as a, open_video(path, backend="pyav", **options) as b:
        assert (len(a), a.size, a.fps) == (len(b), b.size, b.fps)
        return a.get_batch(indices), b.get_batch(indices)


@pytest.mark.parametrize(("gop", "b_frames", "open_gop"), [(5, 0, False), (7, 3, False), (8, 2, True)])
def test_pyav_frames_identical_to_decord_on_written_mp4(tmp_path, needs_decord, gop, b_frames, open_gop):
    frames = moving_frames(30, 64, 96)
    path = write_gop_mp4(tmp_path / "gop.mp4", frames, gop=gop, b_frames=b_frames, open_gop=open_gop)
    everything, pyav_everything = _read_both(path, range(30))
    np.testing.assert_array_equal(pyav_everything, everything)
    assert min(psnr(everything[index], frames[index]) for index in range(30)) > 30  # the right frames
    rng = np.random.default_rng(0)
    with open_video(path, backend="pyav") as reader:  # one reader: seeks back, forward, across GOPs
        for _ in range(40):
            wanted = rng.integers(0, 30, size=rng.integers(1, 7)).tolist()
            np.testing.assert_array_equal(reader.get_batch(wanted), everything[wanted])
        for index in [29, 0, 1, 2, 14, 13, 28]:
            np.testing.assert_array_equal(reader[index], everything[index])
    for size in [(32, 64), (48, 80)]:  # decoded at a smaller size: the same scaler as decord's
        decord_small, pyav_small = _read_both(path, [17, 0, 9], size=size)
        np.testing.assert_array_equal(pyav_small, decord_small)


def test_pyav_frames_identical_to_decord_on_shared_mp4s(shared_data, needs_decord):
    videos = [shared_data / "videos" / "blackswan.mp4"]
    videos += sorted((shared_data / "davis2016-train-videos").glob("*.mp4"))
    assert len(videos) == 31
    for path in videos:
        with open_video(path, backend="decord") as a, open_video(path, backend="pyav") as b:
            assert (len(a), a.size, a.fps) == (len(b), b.size, b.fps), path.name
            everything = a.get_batch(range(len(a)))
            assert np.array_equal(b.get_batch(range(len(b))), everything), path.name
            wanted = [len(a) - 1, 3, len(a) // 2, 0, 3]  # seeking back on the same reader
            assert np.array_equal(b.get_batch(wanted), everything[wanted]), path.name


def test_auto_backend_and_readers_without_decord(tmp_path, tiny_mp4, monkeypatch):
    # As on a platform without a decord wheel: `import decord` fails.
    monkeypatch.setitem(sys.modules, "decord", None)
    readers.decord_available.cache_clear()
    try:
        assert not readers.decord_available()
        with open_video(tiny_mp4) as reader:
            assert isinstance(reader, PyAVVideoReader)
            frames = reader.get_batch([7, 3])
        reference = moving_frames(12, 64, 96)
        assert psnr(frames[0], reference[7]) > 35 and psnr(frames[1], reference[3]) > 35
        with pytest.raises(
            DataError, match=r"tiny.mp4: video backend decord is not installed.*data.backend=pyav"
        ):
            open_video(tiny_mp4, backend="decord")
        clips = VideoClipDataset([tiny_mp4], clip_len=3, max_gap=2, seed=0)
        assert clips[0]["frames"].shape == (3, 3, 64, 96)
    finally:
        readers.decord_available.cache_clear()


def test_auto_backend_prefers_decord_and_unknown_backend_is_refused(tiny_mp4, needs_decord):
    with open_video(tiny_mp4) as reader:
        assert isinstance(reader, DecordVideoReader)
    with pytest.raises(ValueError, match="video backend must be one of auto, decord, pyav, got 'ffmpeg'"):
        open_video(tiny_mp4, backend="ffmpeg")
    with pytest.raises(ValueError, match="got 'ffmpeg'"):
        VideoClipDataset([tiny_mp4], clip_len=3, backend="ffmpeg")


def test_pyav_clips_in_forked_dataloader_workers(tmp_path, tiny_mp4):
    """PyAV's `frame.to_ndarray` keeps one converter per thread whose scaler threads do not exist in a
    forked DataLoader worker; the reader must not use it (a worker that did hung for good). Run in a
    child process, so that a hang fails the test instead of stopping the suite."""
    script = f"""
import av, torch
from dvos.data.clips import VideoClipDataset, collate_clips
with av.open({str(tiny_mp4)!r}) as container:  # the parent converts a frame the usual way first
    next(container.decode(video=0)).to_ndarray(format="rgb24")
clips = VideoClipDataset([{str(tiny_mp4)!r}] * 2, clip_len=3, max_gap=2, clips_per_video=2, backend="pyav")
clips[0]
loader = torch.utils.data.DataLoader(clips, batch_size=2, num_workers=2, collate_fn=collate_clips)
print(sum(batch["frames"].shape[0] for batch in loader))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "4"
