"""Video-file and frame-folder readers: real decoded content, batched order, errors, discovery."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers_data import make_bad_videos, moving_frames, psnr, write_frame_folder, write_mp4
from PIL import Image

from dvos.data.readers import (
    FrameFolderReader,
    VideoFileReader,
    list_videos,
    open_video,
)
from dvos.utils.errors import DataError


@pytest.fixture(scope="module")
def tiny_mp4(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("video") / "tiny.mp4", moving_frames(12, 64, 96))


def _jpeg(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def test_blackswan_mp4_matches_davis_jpegs(davis_fixture):
    jpeg_dir = davis_fixture / "JPEGImages" / "480p" / "blackswan"
    with open_video(davis_fixture / "videos" / "blackswan.mp4") as reader:
        assert isinstance(reader, VideoFileReader)
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


def test_get_batch_returns_callers_order(davis_fixture):
    with open_video(davis_fixture / "videos" / "blackswan.mp4") as reader:
        wanted = [31, 2, 17, 2, 49, 0]
        batch = reader.get_batch(wanted)
        singles = [reader[index] for index in wanted]
        last = reader[-1]
    assert batch.shape == (6, 480, 854, 3)
    for row, single in zip(batch, singles):
        assert psnr(row, single) > 50  # same decoder, same frame (bit-exact in practice)
    assert psnr(batch[4], last) > 50
    assert psnr(batch[0], batch[2]) < 35  # different frames do differ


def test_tiny_mp4_content_and_decode_size(tiny_mp4):
    reference = moving_frames(12, 64, 96)
    with open_video(tiny_mp4) as reader:
        assert (len(reader), reader.size, reader.fps) == (12, (64, 96), 10.0)
        frames = reader.get_batch([7, 3, 11])
    for frame, index in zip(frames, [7, 3, 11]):
        assert psnr(frame, reference[index]) > 35
    # 32×48 is a size decord's scaled decoding cannot produce: the reader falls back to resizing.
    for size in [(32, 64), (32, 48)]:
        with open_video(tiny_mp4, size=size, num_threads=2) as small:
            assert small.size == size
            batch = small.get_batch([5, 0])
        assert batch.shape == (2, *size, 3)
        expected = cv2.resize(reference[5], size[::-1], interpolation=cv2.INTER_AREA)
        assert psnr(batch[0], expected) > 28


def test_video_width_that_decord_cannot_output(tmp_path):
    # decord 0.6 fails every read of some frame widths (16, 24, 48, 72 px: a row-stride bug); the
    # reader decodes at a safe width and resizes back instead.
    reference = moving_frames(6, 32, 48)
    with open_video(write_mp4(tmp_path / "narrow.mp4", reference)) as reader:
        assert reader.size == (32, 48)
        frames = reader.get_batch([4, 1])
    assert frames.shape == (2, 32, 48, 3)
    assert psnr(frames[0], reference[4]) > 28 and psnr(frames[1], reference[1]) > 28


def test_index_errors_and_empty_batch(tiny_mp4):
    with open_video(tiny_mp4) as reader:
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
def test_bad_video_files_raise_data_error_naming_the_file(tmp_path, tiny_mp4, name):
    path = make_bad_videos(tmp_path, tiny_mp4)[name]
    with pytest.raises(DataError) as info, open_video(path) as reader:  # never RuntimeError/DECORDError
        reader.get_batch([0, 4, 8])
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_open_video_rejects_missing_and_unknown(tmp_path):
    with pytest.raises(DataError, match="missing.mp4: video file not found"):
        open_video(tmp_path / "missing.mp4")
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
