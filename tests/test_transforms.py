"""Clip transforms: one spatial draw per clip, masks aligned with frames, per-frame colour jitter."""

import cv2
import numpy as np
import pytest
import torch

from dvos.data.transforms import (
    ClipTransform,
    build_clip_transform,
    build_eval_transform,
    clip_to_tensor,
    masks_to_tensor,
)

T, H, W = 5, 60, 80
# Each object id has its own flat colour, so a frame says which id every pixel should have.
COLOURS = np.array([[30, 30, 30], [220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=np.uint8)


def _textured_frame(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _colour_coded_clip() -> tuple[np.ndarray, np.ndarray]:
    """Masks with three objects moving differently per frame; frames painted from the masks."""
    masks = np.zeros((T, H, W), dtype=np.uint8)
    for t in range(T):
        masks[t, 5 + 2 * t : 30 + 2 * t, 5:35] = 1
        masks[t, 30:55, 40 + 3 * t : 60 + 3 * t] = 2
        masks[t, 8:22, 50 - 4 * t : 70 - 4 * t] = 3
    return COLOURS[masks], masks


def _seeded(transform: ClipTransform, seed: int) -> ClipTransform:
    transform.set_random_state(np.random.default_rng(seed))
    return transform


@pytest.mark.parametrize("seed", range(6))
def test_spatial_part_is_shared_by_all_frames(seed):
    frame = _textured_frame(seed)
    clip = np.repeat(frame[None], T, axis=0)
    masks = np.repeat((frame[..., 0] > 128).astype(np.uint8)[None], T, axis=0)
    transform = _seeded(
        build_clip_transform((32, 40), scale=(0.3, 1.0), hflip_p=0.5, affine_p=1.0, photometric_p=0.0), seed
    )
    frames_out, masks_out = transform(clip, masks)
    assert frames_out.shape == (T, 32, 40, 3) and masks_out.shape == (T, 32, 40)
    assert frames_out.dtype == np.uint8 and masks_out.dtype == np.uint8
    for t in range(1, T):
        np.testing.assert_array_equal(frames_out[t], frames_out[0])
        np.testing.assert_array_equal(masks_out[t], masks_out[0])


def _centroid_offsets(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean (dy, dx) in pixels from each object's mask centroid to the centroid of its colour."""
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    offsets = []
    for object_id in (1, 2, 3):
        channel = object_id - 1  # object k is the colour whose channel k-1 is bright
        others = [c for c in range(3) if c != channel]
        for frame, mask in zip(frames.astype(float), masks):
            region = (mask == object_id).astype(float)
            weight = (frame[..., channel] - 35).clip(0) * (frame[..., others].max(-1) < 120)
            if region.sum() < 5 or weight.sum() == 0:
                continue
            offsets.append(
                [
                    (weight * ys).sum() / weight.sum() - (region * ys).sum() / region.sum(),
                    (weight * xs).sum() / weight.sum() - (region * xs).sum() / region.sum(),
                ]
            )
    return np.abs(np.mean(offsets, axis=0))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "options",
    [
        {"crop_size": (40, 48), "scale": (0.5, 1.0), "hflip_p": 0.5, "affine_p": 1.0},
        {"crop_size": (24, 32), "scale": (0.8, 1.0), "hflip_p": 0.0},  # shrinks ~2.5×
    ],
)
def test_masks_stay_aligned_with_their_frames(seed, options):
    frames, masks = _colour_coded_clip()
    transform = _seeded(build_clip_transform(photometric_p=0.0, **options), seed)
    frames_out, masks_out = transform(frames, masks)
    assert set(np.unique(masks_out)) <= {0, 1, 2, 3, 255}  # nearest-neighbour: no blended ids
    distances = np.linalg.norm(frames_out[..., None, :].astype(float) - COLOURS.astype(float), axis=-1)
    colour_id = distances.argmin(-1)  # the id each output pixel's colour says it has
    kernel = np.ones((3, 3), np.uint8)
    edges = np.stack([cv2.dilate(mask, kernel) != cv2.erode(mask, kernel) for mask in masks_out])
    interior = ~edges & (masks_out != 255)
    # Away from object edges every pixel agrees (linear interpolation blends colours only at edges).
    assert (colour_id[interior] == masks_out[interior]).mean() > 0.995
    # No sub-pixel drift either: with OpenCV's plain INTER_NEAREST for the masks, the objects'
    # masks sit 0.25-0.7 px off their colours here; pixel-centre-exact nearest keeps it < 0.15.
    assert np.all(_centroid_offsets(frames_out, masks_out) < 0.2)
    void_inside = np.stack([cv2.erode((mask == 255).astype(np.uint8), kernel) for mask in masks_out])
    np.testing.assert_array_equal(frames_out[void_inside > 0], 0)  # affine fill: black frame, void mask
    assert not np.array_equal(masks_out[0], masks_out[-1])  # the clip's own motion survives


def test_flip_alone_is_an_exact_mirror():
    frames, masks = _colour_coded_clip()
    transform = build_clip_transform(None, hflip_p=1.0, photometric_p=0.0)
    frames_out, masks_out = transform(frames, masks)
    np.testing.assert_array_equal(frames_out, frames[:, :, ::-1])
    np.testing.assert_array_equal(masks_out, masks[:, :, ::-1])


def test_photometric_jitter_per_frame_or_per_clip():
    clip = np.repeat(_textured_frame(3)[None], T, axis=0)
    masks = np.zeros((T, H, W), np.uint8)
    masks[:, 10:20, 10:20] = 1
    per_frame = _seeded(build_clip_transform(None, hflip_p=0.0, photometric_p=1.0), 0)
    frames_out, masks_out = per_frame(clip, masks)
    assert all(not np.array_equal(frames_out[0], frames_out[t]) for t in range(1, T))
    np.testing.assert_array_equal(masks_out, masks)  # colour jitter moves nothing
    shared = _seeded(
        build_clip_transform(None, hflip_p=0.0, photometric_p=1.0, per_frame_photometric=False), 0
    )
    frames_out, _ = shared(clip, masks)
    assert not np.array_equal(frames_out[0], clip[0])
    assert all(np.array_equal(frames_out[0], frames_out[t]) for t in range(1, T))


def test_random_state_makes_it_reproducible():
    frames, masks = _colour_coded_clip()

    def run(seed):
        transform = _seeded(build_clip_transform((32, 32), affine_p=0.5, photometric_p=0.8), seed)
        return [transform(frames, masks) for _ in range(3)]

    first, again, other = run(1), run(1), run(2)
    for (f1, m1), (f2, m2) in zip(first, again):
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(m1, m2)
    assert any(not np.array_equal(f1, f3) for (f1, _), (f3, _) in zip(first, other))


def test_frames_only_and_input_checks():
    frames, masks = _colour_coded_clip()
    transform = build_clip_transform((24, 24))
    out, none = transform(frames)
    assert out.shape == (T, 24, 24, 3) and none is None
    with pytest.raises(ValueError, match="do not match"):
        transform(frames, masks[:, :10])
    with pytest.raises(ValueError, match="T × H × W × 3"):
        transform(frames[0])


def test_eval_transform_resize_short_side_and_padding():
    frames, masks = _colour_coded_clip()
    identity = build_eval_transform()
    same_frames, same_masks = identity(frames, masks)
    np.testing.assert_array_equal(same_frames, frames)
    np.testing.assert_array_equal(same_masks, masks)

    resized_frames, resized_masks = build_eval_transform((30, 40))(frames, masks)
    assert resized_frames.shape == (T, 30, 40, 3)
    # Exact halving: output pixel x covers source pixels 2x and 2x+1 (centre 2x+0.5);
    # pixel-centre nearest picks 2x+1, so masks stay centred on what the frames average.
    np.testing.assert_array_equal(resized_masks, masks[:, 1::2, 1::2])

    padded_frames, padded_masks = build_eval_transform(45, pad_divisor=16)(frames, masks)
    assert padded_frames.shape == (T, 48, 64, 3)  # 45×60 after the short side → padded to /16
    np.testing.assert_array_equal(padded_masks[:, 45:], 255)
    np.testing.assert_array_equal(padded_frames[:, 45:], 0)
    assert set(np.unique(padded_masks[:, :45, :60])) <= {0, 1, 2, 3}


def test_to_tensor():
    frames, masks = _colour_coded_clip()
    tensor = clip_to_tensor(frames)
    assert tensor.shape == (T, 3, H, W) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert torch.allclose(tensor[2, :, 10, 10] * 255, torch.from_numpy(frames[2, 10, 10]).float())
    assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    mask_tensor = masks_to_tensor(masks)
    assert mask_tensor.dtype == torch.uint8 and torch.equal(mask_tensor, torch.from_numpy(masks))
    with pytest.raises(ValueError):
        clip_to_tensor(frames.astype(np.float32))
