"""Clip sampling bounds and determinism; the clip dataset's content and its handling of bad videos."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import make_bad_videos, moving_frames, psnr, write_frame_folder, write_mp4

from dvos.data.clips import (
    ClipSampler,
    SkippedVideoTracker,
    VideoClipDataset,
    collate_clips,
    seed_clip_worker,
)
from dvos.data.transforms import build_clip_transform
from dvos.utils.errors import DataError

NUM_FRAMES, HEIGHT, WIDTH = 12, 64, 96


def _check_clip(indices: np.ndarray, num_frames: int, clip_len: int, max_gap: int) -> None:
    assert indices.dtype == np.int64 and indices.shape == (clip_len,)
    assert indices.min() >= 0 and indices.max() < num_frames
    ordered = indices if indices[-1] >= indices[0] else indices[::-1]
    gaps = np.diff(ordered)
    if num_frames >= clip_len:
        assert np.all(gaps >= 1) and np.all(gaps <= max_gap), indices
    else:  # short video: every frame once, then the last frame repeated
        np.testing.assert_array_equal(ordered, np.minimum(np.arange(clip_len), num_frames - 1))


@pytest.mark.parametrize(
    ("num_frames", "clip_len", "max_gap"),
    [(50, 4, 5), (12, 3, 10), (7, 4, 10), (4, 4, 3), (9, 1, 3), (3, 5, 2), (1, 3, 1), (100, 8, 1)],
)
def test_clip_sampler_bounds(num_frames, clip_len, max_gap):
    sampler = ClipSampler(clip_len, max_gap, reverse_prob=0.5)
    rng = np.random.default_rng(0)
    for _ in range(300):
        _check_clip(sampler.sample(num_frames, rng), num_frames, clip_len, max_gap)


def test_clip_sampler_reduces_gap_and_covers_the_video():
    sampler = ClipSampler(clip_len=4, max_gap=10)
    rng = np.random.default_rng(1)
    clips = np.stack([sampler.sample(7, rng) for _ in range(400)])
    assert np.diff(clips, axis=1).max() == 2  # (7 - 1) // (4 - 1): the clip must fit in 7 frames
    assert clips[:, 0].min() == 0 and clips[:, -1].max() == 6  # first and last frames reachable
    long = np.stack([ClipSampler(3, 5).sample(60, rng) for _ in range(400)])
    assert set(np.diff(long, axis=1).ravel().tolist()) == {1, 2, 3, 4, 5}  # every gap is drawn


def test_clip_sampler_reversal():
    rng = np.random.default_rng(2)
    forward = [ClipSampler(4, 3, reverse_prob=0.0).sample(30, rng) for _ in range(100)]
    assert all(np.all(np.diff(clip) > 0) for clip in forward)
    backward = [ClipSampler(4, 3, reverse_prob=1.0).sample(30, rng) for _ in range(100)]
    assert all(np.all(np.diff(clip) < 0) for clip in backward)
    mixed = [ClipSampler(4, 3, reverse_prob=0.5).sample(30, rng) for _ in range(1000)]
    share = np.mean([clip[1] < clip[0] for clip in mixed])
    assert 0.43 < share < 0.57


def test_clip_sampler_reference_gap_is_next_to_the_reference_both_ways():
    rng = np.random.default_rng(4)
    sampler = ClipSampler(3, 2, reverse_prob=0.5, reference_gap=12)
    clips = np.stack([sampler.sample(48, rng) for _ in range(2000)])
    assert clips.min() >= 0 and clips.max() < 48
    reference_gaps = np.abs(clips[:, 1] - clips[:, 0])
    other_gaps = np.abs(clips[:, 2] - clips[:, 1])
    assert set(reference_gaps.tolist()) == set(range(1, 13))  # every reference gap is drawn
    assert set(other_gaps.tolist()) == {1, 2}  # the target frames keep max_gap
    backwards = clips[:, 1] < clips[:, 0]
    assert 0.45 < backwards.mean() < 0.55
    assert np.all(np.diff(clips[backwards], axis=1) < 0) and np.all(np.diff(clips[~backwards], axis=1) > 0)
    # a video too short for the full gap still gives a clip that fits: 4 frames, clip of 3
    short = np.stack([ClipSampler(3, 1, reference_gap=10).sample(4, rng) for _ in range(200)])
    assert short.max() <= 3 and set(np.diff(short, axis=1)[:, 0].tolist()) == {1, 2}
    with pytest.raises(ValueError, match="reference_gap"):
        ClipSampler(3, 2, reference_gap=0)


def test_clip_sampler_short_videos_policy():
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(ClipSampler(5, 2).sample(3, rng), [0, 1, 2, 2, 2])
    reject = ClipSampler(5, 2, short_videos="reject")
    assert not reject.accepts(4) and reject.accepts(5) and ClipSampler(5, 2).accepts(1)
    with pytest.raises(ValueError, match="fewer than clip_len"):
        reject.sample(4, rng)
    with pytest.raises(ValueError):
        ClipSampler(0, 1)
    with pytest.raises(ValueError):
        ClipSampler(2, 0)
    with pytest.raises(ValueError):
        ClipSampler(2, 1, reverse_prob=1.5)


def test_clip_sampler_is_deterministic_for_a_seed():
    sampler = ClipSampler(6, 4, reverse_prob=0.5)

    def draws(seed):
        rng = np.random.default_rng(seed)
        return np.stack([sampler.sample(40, rng) for _ in range(20)])

    np.testing.assert_array_equal(draws(7), draws(7))
    assert not np.array_equal(draws(7), draws(8))


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for seed in range(3):
        write_mp4(root / f"good{seed}.mp4", moving_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=seed))
    write_frame_folder(root / "frames" / "seq", moving_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=3))
    return root


def test_clip_dataset_items_hold_the_sampled_frames(video_dir):
    dataset = VideoClipDataset(video_dir, clip_len=3, max_gap=3, reverse_prob=0.5, clips_per_video=2, seed=0)
    assert len(dataset) == 8 and dataset.num_frames == [NUM_FRAMES] * 4
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["frames"].shape == (3, 3, HEIGHT, WIDTH) and item["frames"].dtype == torch.float32
        assert item["frames"].min() >= 0.0 and item["frames"].max() <= 1.0
        assert item["indices"].dtype == torch.int64 and item["skipped"] == []
        name = Path(item["video"])
        seed = 3 if name.name == "seq" else int(name.stem[-1])
        reference = moving_frames(NUM_FRAMES, HEIGHT, WIDTH, seed=seed)
        frames = (item["frames"].permute(0, 2, 3, 1) * 255).round().byte().numpy()
        for frame, frame_index in zip(frames, item["indices"].tolist()):
            assert psnr(frame, reference[frame_index]) > 30  # the frames are the ones indexed


def test_clip_dataset_transform_and_determinism(video_dir):
    def make(seed):
        transform = build_clip_transform((32, 48), scale=(0.4, 1.0), photometric_p=0.8)
        return VideoClipDataset(video_dir, clip_len=4, max_gap=2, transform=transform, seed=seed)

    first, again, other = make(5), make(5), make(6)
    items = [first[index] for index in range(4)]
    assert items[0]["frames"].shape == (4, 3, 32, 48)
    for index, item in enumerate(items):
        replay = again[index]
        assert torch.equal(item["indices"], replay["indices"]) and torch.equal(
            item["frames"], replay["frames"]
        )
    assert any(not torch.equal(item["frames"], other[index]["frames"]) for index, item in enumerate(items))
    batch = collate_clips(items)
    assert batch["frames"].shape == (4, 4, 3, 32, 48) and batch["indices"].shape == (4, 4)
    assert batch["skipped"] == [] and len(batch["video"]) == 4


def _loader(dataset, num_workers):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collate_clips,
        worker_init_fn=seed_clip_worker,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_videos_are_skipped_counted_and_warned_once(tmp_path, video_dir, caplog, num_workers):
    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("good0.mp4", "good1.mp4"):
        (root / name).write_bytes((video_dir / name).read_bytes())
    bad = make_bad_videos(root, video_dir / "good0.mp4")
    (root / "missing.mp4").symlink_to(root / "gone.mp4")  # a dangling link: the file is missing

    caplog.set_level(logging.WARNING)
    transform = build_clip_transform((32, 48))
    dataset = VideoClipDataset(root, clip_len=3, max_gap=2, transform=transform, clips_per_video=3, seed=0)
    # Four fail when probed; damaged_decode opens fine and only fails when its frames are decoded.
    assert len(dataset.skipped_at_probe) == 5 and str(bad["damaged_decode"]) in dataset.videos
    tracker = SkippedVideoTracker(dataset.skipped_at_probe)
    seen_videos = []
    for epoch in range(2):
        for batch in _loader(dataset, num_workers):
            assert batch["frames"].shape[1:] == (3, 3, 32, 48)
            tracker.update_from_batch(batch)
            seen_videos += batch["video"]
        assert tracker.count == 6, f"epoch {epoch}: {tracker.paths}"
    assert set(seen_videos) == {str(root / "good0.mp4"), str(root / "good1.mp4")}
    assert set(tracker.paths) == {str(path) for path in bad.values()} | {str(root / "missing.mp4")}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for path in tracker.paths:
        assert sum(path in message for message in warnings) == 1, (path, warnings)


def test_every_video_bad_is_a_clear_error(tmp_path, video_dir):
    bad = make_bad_videos(tmp_path / "bad", video_dir / "good0.mp4")
    bad["damaged_decode"].rename(tmp_path / "decode_fails.mp4")  # this one opens fine
    with pytest.raises(DataError, match=r"no usable video among 4: 4 unreadable.*bad_") as info:
        VideoClipDataset(tmp_path / "bad", clip_len=2)
    assert "\n" not in str(info.value)
    bad["damaged_decode"] = tmp_path / "decode_fails.mp4"
    only_decode_fails = VideoClipDataset([bad["damaged_decode"]], clip_len=2)
    with pytest.raises(DataError, match="every video failed to decode"):
        only_decode_fails[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no videos found"):
        VideoClipDataset(tmp_path / "empty", clip_len=2)


def test_short_videos_repeat_or_are_excluded(tmp_path, caplog):
    write_mp4(tmp_path / "short.mp4", moving_frames(3, 32, 48))
    write_mp4(tmp_path / "long.mp4", moving_frames(8, 32, 48))
    repeat = VideoClipDataset(tmp_path, clip_len=5, max_gap=1)
    short = next(repeat[i] for i in range(len(repeat)) if repeat[i]["video"].endswith("short.mp4"))
    assert short["indices"].tolist() == [0, 1, 2, 2, 2]
    assert torch.equal(short["frames"][2], short["frames"][4])
    caplog.set_level(logging.WARNING)
    reject = VideoClipDataset(tmp_path, clip_len=5, short_videos="reject")
    assert reject.videos == [str(tmp_path / "long.mp4")] and reject.too_short == [str(tmp_path / "short.mp4")]
    assert any("short.mp4: 3 frames" in record.getMessage() for record in caplog.records)
