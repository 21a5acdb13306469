"""DAVIS 2016/2017 and YouTube-VOS sequence records: layout, objects, lazy loading, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_data import box_masks, make_davis_tree, make_youtubevos_tree, moving_frames, psnr
from PIL import Image

from dvos.data.vos import (
    VOSSequence,
    VOSSequenceDataset,
    collate_sequences,
    davis_sequences,
    load_sequence,
    vos_sequences,
    youtubevos_sequences,
)
from dvos.utils.errors import DataError
from dvos.utils.masks import default_palette, read_mask, write_mask

H, W = 48, 64


def _two_object_masks(num_frames: int = 6) -> np.ndarray:
    masks = box_masks(num_frames, H, W, {1: (4, 20, 2, 18), 2: (26, 44, 30, 50)})
    masks[:, 21:24, 10:40] = 255  # a void band, as DAVIS marks uncertain pixels
    return masks


@pytest.fixture()
def davis2017(tmp_path) -> Path:
    root = make_davis_tree(
        tmp_path / "davis",
        {
            "two-objects": (moving_frames(6, H, W, seed=1), _two_object_masks(6)),
            "single": (moving_frames(4, H, W, seed=2), box_masks(4, H, W, {1: (10, 30, 10, 30)})),
        },
        year=2017,
    )
    (root / "ImageSets" / "2017" / "train.txt").write_text("single\n")
    (root / "ImageSets" / "2016").mkdir()
    (root / "ImageSets" / "2016" / "val.txt").write_text("two-objects\nsingle\n")
    return root


def test_davis2016_shared_sample(shared_data):
    root = shared_data / "davis2016-sample"
    records = davis_sequences(root, year=2016, split="val")
    assert [r.name for r in records] == ["blackswan", "car-shadow", "dog", "libby"]
    assert [len(r) for r in records] == [50, 40, 60, 49]
    blackswan = records[0]
    assert blackswan.object_ids == [1] and blackswan.first_frame == {1: 0}
    assert blackswan.size == (480, 854) and blackswan.has_full_gt
    assert blackswan.frame_names[0] == "00000" and blackswan.frame_paths[7].name == "00007.jpg"
    reference, palette = read_mask(root / "Annotations" / "480p" / "blackswan" / "00030.png")
    np.testing.assert_array_equal(blackswan.load_mask(30), reference)
    assert blackswan.palette == palette
    with Image.open(root / "JPEGImages" / "480p" / "blackswan" / "00030.jpg") as image:
        assert psnr(blackswan.load_frame(30), np.array(image)) > 45

    small = load_sequence(davis_sequences(root, year=2016, sequences=["libby"])[0])
    assert small["frames"].shape == (49, 480, 854, 3) and small["frames"].dtype == np.uint8
    assert small["gt"].shape == (49, 480, 854) and set(np.unique(small["gt"])) <= {0, 1}


def test_davis2017_multi_object_with_void(davis2017):
    records = davis_sequences(davis2017, year=2017, split="val")
    assert [r.name for r in records] == ["two-objects", "single"]
    seq = records[0]
    assert seq.object_ids == [1, 2]  # 255 is void, not an object
    assert seq.first_frame == {1: 0, 2: 0} and seq.objects_starting_at(0) == [1, 2]
    assert seq.palette[: 3 * 3] == default_palette()[: 3 * 3]
    assert seq.size == (H, W) and seq.has_full_gt and not seq.merge_objects
    masks = _two_object_masks(6)
    for index in (0, 5):
        np.testing.assert_array_equal(seq.load_mask(index), masks[index])
    assert seq.reference_mask(2).sum() == (masks[0] == 2).sum()
    loaded = load_sequence(seq)
    np.testing.assert_array_equal(loaded["gt"], masks)
    assert loaded["frames"].shape == (6, H, W, 3)
    assert psnr(loaded["frames"][3], moving_frames(6, H, W, seed=1)[3]) > 35


def test_davis2016_mode_merges_objects_keeps_void(davis2017):
    seq = davis_sequences(davis2017, year=2016, split="val")[0]
    assert seq.object_ids == [1] and seq.merge_objects
    merged = seq.load_mask(2)
    original = _two_object_masks(6)[2]
    np.testing.assert_array_equal(merged == 1, (original == 1) | (original == 2))
    np.testing.assert_array_equal(merged == 255, original == 255)
    assert set(np.unique(merged)) == {0, 1, 255}


def test_davis_split_and_sequence_filter(davis2017):
    assert [r.name for r in davis_sequences(davis2017, split="train")] == ["single"]
    picked = davis_sequences(davis2017, sequences=["single", "two-objects"])
    assert [r.name for r in picked] == ["single", "two-objects"]
    with pytest.raises(DataError, match="unknown sequence.*bear") as info:
        davis_sequences(davis2017, sequences=["single", "bear"])
    assert "\n" not in str(info.value)


def test_davis_masks_are_loaded_lazily(davis2017):
    # A damaged later mask does not stop the records from being built; reading it fails clearly.
    bad = davis2017 / "Annotations" / "480p" / "two-objects" / "00004.png"
    bad.write_bytes(b"garbage")
    seq = davis_sequences(davis2017, sequences=["two-objects"])[0]
    assert seq.load_mask(3) is not None
    with pytest.raises(DataError, match="00004.png"):
        seq.load_mask(4)
    # ...and so does a later mask whose size differs from the frames.
    write_mask(bad, np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match="00004.png: mask size 10×10 differs"):
        seq.load_mask(4)


def test_davis_first_frame_only_has_no_full_gt(tmp_path):
    root = make_davis_tree(
        tmp_path / "d",
        {"s": (moving_frames(5, H, W), _two_object_masks(5))},
        annotated="first",
        split="test-dev",
    )
    seq = davis_sequences(root, split="test-dev")[0]
    assert not seq.has_full_gt and seq.annotated_frames == [0] and seq.load_mask(3) is None
    assert load_sequence(seq)["gt"] is None
    assert set(load_sequence(seq)["first_masks"]) == {0}


def test_davis_errors(tmp_path, davis2017):
    with pytest.raises(DataError, match="DAVIS root folder not found"):
        davis_sequences(tmp_path / "nope")
    with pytest.raises(DataError, match=r"ImageSets/2017/test\.txt: split file not found"):
        davis_sequences(davis2017, split="test")
    with (davis2017 / "ImageSets" / "2017" / "val.txt").open("a") as handle:
        handle.write("ghost\n")
    with pytest.raises(DataError, match="ghost: sequence frame folder not found"):
        davis_sequences(davis2017)
    (davis2017 / "JPEGImages" / "480p" / "ghost").mkdir()
    with pytest.raises(DataError, match="ghost: sequence has no frames"):
        davis_sequences(davis2017)
    write_mask(davis2017 / "Annotations" / "480p" / "single" / "00000.png", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(DataError, match="single/00000.png: mask size 48×66 differs"):
        davis_sequences(davis2017, split="train")
    (davis2017 / "Annotations" / "480p" / "single" / "00000.png").unlink()
    with pytest.raises(DataError, match="no first-frame mask 00000.png"):
        davis_sequences(davis2017, split="train")


def _late_object_video(num_frames: int = 15) -> tuple[np.ndarray, np.ndarray]:
    masks = box_masks(num_frames, H, W, {1: (4, 20, 2, 18)})
    masks[10:, 28:44, 30:46] = 2  # object 2 enters at frame 10
    return moving_frames(num_frames, H, W, seed=3), masks


def test_youtubevos_train_late_object_and_sparse_annotations(tmp_path):
    frames, masks = _late_object_video()
    root = make_youtubevos_tree(tmp_path / "ytvos", "train", {"vid_a": (frames, masks)}, annotate_every=5)
    [seq] = youtubevos_sequences(root, split="train")
    assert seq.name == "vid_a" and len(seq) == 15
    assert seq.object_ids == [1, 2] and seq.first_frame == {1: 0, 2: 10}
    assert seq.annotated_frames == [0, 5, 10] and not seq.has_full_gt
    assert seq.objects_starting_at(10) == [2] and seq.objects_starting_at(0) == [1]
    assert seq.load_mask(3) is None
    np.testing.assert_array_equal(seq.load_mask(10), masks[10])
    np.testing.assert_array_equal(seq.reference_mask(2), masks[10] == 2)
    assert seq.palette is not None


def test_youtubevos_valid_has_first_appearance_masks_only(tmp_path):
    frames, masks = _late_object_video()
    root = make_youtubevos_tree(
        tmp_path / "ytvos", "valid", {"vid_b": (frames, masks)}, first_appearance_only=True
    )
    [seq] = vos_sequences(root, format="youtubevos", split="valid")
    assert seq.first_frame == {1: 0, 2: 10}
    assert seq.annotated_frames == [0, 10] and not seq.has_full_gt
    assert set(np.unique(seq.load_mask(10))) == {0, 2}  # only the object that starts there
    loaded = load_sequence(seq)
    assert loaded["gt"] is None and sorted(loaded["first_masks"]) == [0, 10]


def test_youtubevos_errors(tmp_path):
    frames, masks = _late_object_video(12)
    root = make_youtubevos_tree(tmp_path / "y", "valid", {"v1": (frames, masks)}, first_appearance_only=True)
    with pytest.raises(DataError, match="meta.json not found"):
        youtubevos_sequences(root, split="train")
    with pytest.raises(DataError, match="unknown sequence.*v9"):
        youtubevos_sequences(root, sequences=["v9"])
    meta_path = root / "valid" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["videos"]["v1"]["objects"]["3"] = {"category": "x", "frames": ["00099"]}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="object 3 of v1 first appears in frame 00099"):
        youtubevos_sequences(root)
    with pytest.raises(DataError, match="unknown VOS dataset format"):
        vos_sequences(root, format="kinetics")


def test_sequence_dataset_and_collate_keep_records(davis2017):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    dataset = VOSSequenceDataset(davis_sequences(davis2017))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_sequences)
    batches = list(loader)
    assert all(isinstance(batch, VOSSequence) for batch in batches)
    assert [batch.name for batch in batches] == dataset.names == ["two-objects", "single"]
    moved = move_data_to_device(batches[0], torch.device("cpu"))  # what Lightning does to a batch
    assert moved.name == "two-objects" and moved.load_mask(0).shape == (H, W)
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_sequences([batches[0], batches[1]])
