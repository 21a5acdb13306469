"""Bad input through the commands a user runs: damaged videos and frames, masks that are not what they
should be, single-frame sequences, output folders that cannot be written. Each is a one-line
`dvos: error:` naming the file or value (exit status 2), and no half-written file is left behind.

Cases covered elsewhere and not repeated here: bad video files at the reader
(test_readers.py::test_bad_video_files_raise_data_error_naming_the_file) and in training clips
(test_clips.py::test_bad_videos_are_skipped_counted_and_warned_once); RGB, wrong-size and
id-above-K predictions in `dvos eval-masks` (test_eval_masks.py); a first mask of another size in
`dvos segment` (test_segment_evaluate_cli.py).
"""

from pathlib import Path

import numpy as np
import pytest
from helpers_data import (
    box_masks,
    make_bad_videos,
    make_davis_tree,
    moving_frames,
    write_frame_folder,
    write_mp4,
)
from PIL import Image

from dvos.cli.main import main
from dvos.data.clips import SkippedVideoTracker, VideoClipDataset
from dvos.data.readers import open_video
from dvos.utils.errors import DataError
from dvos.utils.masks import default_palette, read_mask, write_mask

H, W = 64, 96
TINY_STUDENT = [
    "model.d_model=32",
    "model.num_heads=4",
    "model.num_groups=2",
    "model.decoder_dim=16",
    "model.offset_kernel=3",
    "model.max_objects=4",
    "model.pretrained=none",
]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 6-frame H.264 mp4, its frames, and a first mask with objects 1 and 2."""
    folder = tmp_path_factory.mktemp("scene")
    frames = moving_frames(6, H, W)
    video = write_mp4(folder / "video.mp4", frames)
    mask = box_masks(1, H, W, {1: (16, 40, 4, 24), 2: (44, 60, 50, 80)})[0]
    write_mask(folder / "first.png", mask)
    return {"folder": folder, "frames": frames, "video": video, "mask": folder / "first.png", "ids": mask}


@pytest.fixture(autouse=True)
def no_runs_here(tmp_path, monkeypatch):
    """Commands look for the newest run checkpoint under ./runs: an empty temporary folder."""
    monkeypatch.chdir(tmp_path)


def dvos_error(capsys, *args) -> str:
    """Run `dvos ARGS` in this process; it must fail with status 2 and one `dvos: error:` line."""
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("dvos: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


def assert_complete_masks_only(folder: Path) -> None:
    """Every file left is a finished palette PNG: no temporary (`.tmp`) files, nothing half-written."""
    for path in files_under(folder):
        assert ".tmp" not in path.name, f"temporary file left behind: {path}"
        with Image.open(path) as image:
            image.load()
            assert image.mode == "P"


def segment(scene, video, out, *extra):
    return ["segment", "--video", video, "--mask", scene["mask"], "--out", out, "--device", "cpu",
            *extra, *TINY_STUDENT]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Damaged, truncated, empty and missing video files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["empty", "truncated", "random", "damaged_open", "damaged_decode", "missing"]
)
def test_segment_on_a_bad_video_is_one_line_and_writes_no_mask(scene, tmp_path, capsys, name):
    bad = make_bad_videos(tmp_path / "bad", scene["video"])
    video = bad.get(name, tmp_path / "missing.mp4")
    out = tmp_path / "out"
    line = dvos_error(capsys, *segment(scene, video, out))
    assert str(video) in line
    assert files_under(out) == []


# --------------------------------------------------------------------------------------------
# An unreadable JPEG in a frame folder
# --------------------------------------------------------------------------------------------
def damage_jpeg(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 50}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_unreadable_jpeg_is_an_error_naming_the_file(scene, tmp_path, how):
    folder = write_frame_folder(tmp_path / "frames", scene["frames"][:4])
    damage_jpeg(folder / "00002.jpg", how)
    with open_video(folder) as reader:
        with pytest.raises(DataError, match="00002.jpg") as info:
            reader.get_batch([1, 2])  # a truncated JPEG is not decoded into grey: it is an error
        assert "\n" not in str(info.value)
        assert len(reader.get_batch([0, 1, 3])) == 3  # the other frames still read


def test_segment_stops_at_an_unreadable_jpeg_keeping_only_complete_masks(scene, tmp_path, capsys):
    folder = write_frame_folder(tmp_path / "frames", moving_frames(10, H, W))
    damage_jpeg(folder / "00009.jpg", "truncated")
    out = tmp_path / "out"
    line = dvos_error(capsys, *segment(scene, folder, out))
    assert str(folder / "00009.jpg") in line
    # Frames are read 8 at a time: the masks of 0..7 were written before the error, each complete.
    assert [path.name for path in files_under(out)] == [f"{index:05d}.png" for index in range(8)]
    assert_complete_masks_only(out)


def test_training_clips_skip_and_count_a_frame_folder_with_an_unreadable_jpeg(scene, tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "good.mp4").write_bytes(scene["video"].read_bytes())
    folder = write_frame_folder(root / "frames", scene["frames"][:3])
    damage_jpeg(folder / "00001.jpg", "truncated")  # every 3-frame clip of this folder reads it
    dataset = VideoClipDataset(root, clip_len=3, max_gap=1, clips_per_video=2, seed=0)
    assert str(folder) in dataset.videos  # it opens (names and header only): it fails when decoded
    tracker = SkippedVideoTracker(dataset.skipped_at_probe)
    videos = []
    for index in range(len(dataset)):
        item = dataset[index]
        videos.append(item["video"])
        tracker.update(item["skipped"])
    assert set(videos) == {str(root / "good.mp4")}  # its clips came from the usable video instead
    assert tracker.paths == [str(folder)] and tracker.count == 1


# --------------------------------------------------------------------------------------------
# Masks: RGB instead of palette, ids above the object count, all empty
# --------------------------------------------------------------------------------------------
def save_rgb(mask: np.ndarray, path: Path, palette: list[int]) -> Path:
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    Image.fromarray(colours[mask]).save(path)
    return path


def test_segment_reads_an_rgb_first_mask_in_davis_colours_as_ids(scene, tmp_path, capsys):
    rgb = save_rgb(scene["ids"], tmp_path / "first_rgb.png", default_palette())
    out = tmp_path / "out"
    assert main([str(a) for a in segment(scene, scene["video"], out, "--max-frames", "2")]) == 0
    first, palette = read_mask(out / "00000.png")
    assert np.array_equal(first, scene["ids"]) and palette[:768] == default_palette()
    with pytest.raises(DataError, match="mode 'RGB'"):  # ground truth and predictions stay strict
        read_mask(rgb)


def test_segment_rejects_an_rgb_mask_in_other_colours(scene, tmp_path, capsys):
    white = np.where(scene["ids"][..., None] > 0, 255, 0).astype(np.uint8).repeat(3, axis=2)
    path = tmp_path / "white.png"
    Image.fromarray(white).save(path)
    out = tmp_path / "out"
    line = dvos_error(
        capsys, "segment", "--video", scene["video"], "--mask", path, "--out", out, *TINY_STUDENT
    )
    assert str(path) in line and "(255, 255, 255)" in line and "not a DAVIS palette colour" in line
    assert not out.exists()


def test_segment_rejects_an_empty_first_mask_and_writes_nothing(scene, tmp_path, capsys):
    for name, ids in (("empty", 0), ("void", 255)):
        path = tmp_path / f"{name}.png"
        write_mask(path, np.full((H, W), ids, np.uint8))
        out = tmp_path / f"out_{name}"
        line = dvos_error(capsys, "segment", "--video", scene["video"], "--mask", path, "--out", out)
        assert str(path) in line and "holds no object" in line
        assert not out.exists()


def test_segment_with_more_objects_than_the_student_has_ids_writes_nothing(scene, tmp_path, capsys):
    ids = np.zeros((H, W), np.uint8)
    for k in range(5):  # model.max_objects=4
        ids[k * 10 : k * 10 + 8, 10:30] = 2 * k + 1
    path = tmp_path / "five.png"
    write_mask(path, ids)
    out = tmp_path / "out"
    line = dvos_error(
        capsys, "segment", "--video", scene["video"], "--mask", path, "--out", out, *TINY_STUDENT
    )
    assert "5 objects" in line and "at most 4" in line
    assert files_under(out) == []


# --------------------------------------------------------------------------------------------
# Ground truth checked by `dvos evaluate` before any sequence is segmented
# --------------------------------------------------------------------------------------------
def davis_tree(root: Path, frames_b: int = 5) -> Path:
    sequences = {
        "a": (
            moving_frames(5, 48, 64, seed=1),
            box_masks(5, 48, 64, {1: (5, 20, 5, 20), 2: (25, 40, 30, 45)}),
        ),
        "b": (moving_frames(frames_b, 48, 64, seed=2), box_masks(frames_b, 48, 64, {1: (10, 30, 10, 30)})),
    }
    return make_davis_tree(root, sequences)


def evaluate_copy(root: Path, out: Path) -> list:
    return ["evaluate", "--baseline", "copy", "data=davis2017", f"data.root={root}", "data.split=val",
            "--out", out, "--workers", "1"]  # fmt: skip


@pytest.mark.parametrize("problem", ["rgb", "wrong_size", "single_frame"])
def test_evaluate_rejects_bad_ground_truth_before_segmenting(tmp_path, capsys, problem):
    root = davis_tree(tmp_path / "davis", frames_b=1 if problem == "single_frame" else 5)
    bad = root / "Annotations" / "480p" / "b" / "00002.png"
    if problem == "rgb":
        save_rgb(read_mask(bad)[0], bad, default_palette())
    elif problem == "wrong_size":
        write_mask(bad, np.zeros((48, 66), np.uint8))
    out = tmp_path / "out"
    line = dvos_error(capsys, *evaluate_copy(root, out))
    named = bad.parent if problem == "single_frame" else bad
    assert f"{named}:" in line
    assert not out.exists()  # nothing segmented, nothing written
    if problem == "single_frame":  # eval-masks says the same about a sequence it cannot score
        line = dvos_error(capsys, "eval-masks", "--gt", root, "--pred", root / "Annotations" / "480p",
                          "--out", tmp_path / "scores", "--sequences", "b")  # fmt: skip
        assert f"{bad.parent}:" in line and "at least 3" in line


def test_evaluate_scores_a_sequence_with_an_empty_first_ground_truth_as_no_object(tmp_path, capsys):
    root = davis_tree(tmp_path / "davis")
    for index in range(5):  # sequence b never shows an object: fine for ground truth
        write_mask(root / "Annotations" / "480p" / "b" / f"{index:05d}.png", np.zeros((48, 64), np.uint8))
    out = tmp_path / "out"
    assert main([str(a) for a in evaluate_copy(root, out)]) == 0
    rows = (out / "per-sequence_results-val.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["a_1", "a_2"]
    assert read_mask(out / "b" / "00003.png")[0].max() == 0  # its predictions are written all the same
    assert "(2 objects)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A sequence with a single frame
# --------------------------------------------------------------------------------------------
def test_single_frame_video_is_segmented_to_its_given_mask(scene, tmp_path, capsys):
    video = write_mp4(tmp_path / "one.mp4", scene["frames"][:1])
    out = tmp_path / "out"
    assert main([str(a) for a in segment(scene, video, out)]) == 0
    assert [path.name for path in files_under(out)] == ["00000.png"]
    assert np.array_equal(read_mask(out / "00000.png")[0], scene["ids"])

    # In training clips a one-frame video repeats its frame, or is excluded when short videos are rejected.
    clips = VideoClipDataset([video], clip_len=3, max_gap=2)
    assert clips[0]["indices"].tolist() == [0, 0, 0]
    with pytest.raises(DataError, match="no usable video among 1"):
        VideoClipDataset([video], clip_len=3, short_videos="reject", log_skips=False)


# --------------------------------------------------------------------------------------------
# Output folders that cannot be written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["segment", "evaluate", "eval-masks"])
def test_unwritable_output_folder_is_one_line_naming_it(scene, tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    out = blocker / "out"
    if command == "segment":
        args = segment(scene, scene["video"], out)
    else:
        root = davis_tree(tmp_path / "davis")
        if command == "evaluate":
            args = evaluate_copy(root, out)
        else:
            args = ["eval-masks", "--gt", root, "--pred", root / "Annotations" / "480p", "--out", out]
    line = dvos_error(capsys, *args)
    assert str(out) in line
    assert blocker.read_text() == "a file where a folder should be"


# --------------------------------------------------------------------------------------------
# `dvos segment`: an --out with older masks, a checkpoint that fails, an overlay that cannot be written
# --------------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in files_under(folder)}


def older_masks(scene, out: Path) -> dict[str, bytes]:
    """An --out holding an earlier run's masks (and a note), as a snapshot."""
    out.mkdir()
    write_mask(out / "00000.png", scene["ids"])
    write_mask(out / "00099.png", scene["ids"])  # a frame this video does not have
    (out / "notes.txt").write_text("an earlier run")
    return snapshot(out)


def test_segment_refuses_an_out_folder_with_older_masks_unless_overwrite(scene, tmp_path, capsys):
    out = tmp_path / "out"
    before = older_masks(scene, out)
    line = dvos_error(capsys, *segment(scene, scene["video"], out))
    assert line == (
        f"dvos: error: --out {out} is not empty (3 entries): give a new or empty folder, or --overwrite "
        "to delete its contents first"
    )
    assert snapshot(out) == before
    assert main([str(a) for a in segment(scene, scene["video"], out, "--overwrite")]) == 0
    assert [path.name for path in files_under(out)] == [f"{index:05d}.png" for index in range(6)]


def test_segment_with_a_bad_checkpoint_changes_no_output_folder(scene, tmp_path, capsys):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    before = older_masks(scene, out)
    line = dvos_error(capsys, *segment(scene, scene["video"], out, "--overwrite", "--ckpt", garbage))
    assert line.startswith(f"dvos: error: cannot read checkpoint {garbage}: ")
    assert snapshot(out) == before  # --overwrite empties the folder only once the model has loaded
    fresh = tmp_path / "fresh"
    dvos_error(capsys, *segment(scene, scene["video"], fresh, "--ckpt", garbage))
    assert not fresh.exists()  # no empty --out left behind


def test_segment_checks_the_overlay_can_be_written_before_segmenting(scene, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    overlay = blocker / "overlay.mp4"
    out = tmp_path / "out"
    line = dvos_error(capsys, *segment(scene, scene["video"], out, "--overlay", overlay))
    assert line == f"dvos: error: cannot write --overlay {overlay}: {blocker} is not a folder"
    assert not out.exists() and blocker.read_text() == "a file where a folder should be"
