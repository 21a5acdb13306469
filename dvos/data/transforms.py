"""Clip augmentation with albumentations: one spatial draw per clip, optional per-frame colour jitter.

A clip is `T × H × W × 3` uint8 frames plus optional `T × H × W` uint8 id masks. The spatial part
(random resized crop, horizontal flip, small affine) draws its parameters ONCE per clip and applies
them to every frame and mask (albumentations 2.0's `Compose(...)(images=..., masks=...)`), so the
masks stay aligned with their frames and the motion between frames is the video's own. The
photometric part (colour jitter) then runs either once per clip or independently per frame
(`per_frame_photometric`), which makes appearance matching harder without moving anything.

Masks are resized with nearest-neighbour interpolation (ids are never blended); pixels that an
affine moves in from outside the frame get the void id 255 in the masks and black in the frames.

Random state: albumentations keeps its own generators inside each `Compose`. A Compose copied
into forked DataLoader workers would draw the same augmentations in every worker, so the clip
dataset hands its own generator to `ClipTransform.set_random_state` in each worker.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for a newer version at import unless this is set (no network here).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import random  # noqa: E402

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dvos.utils.masks import VOID_ID  # noqa: E402

# OpenCV's INTER_NEAREST resize samples source pixel floor(x·s) while INTER_LINEAR (the frames)
# samples around (x + 0.5)·s − 0.5: masks would drift by (s − 1)/2 px against their frames when
# shrinking by s. INTER_NEAREST_EXACT uses the frames' pixel-centre convention.
MASK_RESIZE_INTERPOLATION = cv2.INTER_NEAREST_EXACT


class ClipTransform:
    """Apply a shared spatial transform and a (per-frame or shared) photometric one to a clip.

    Args:
        spatial: albumentations Compose applied with the same parameters to all frames and masks;
            None for no spatial change.
        photometric: albumentations Compose of pixel-level transforms (frames only); None for none.
        per_frame_photometric: draw the photometric parameters independently for each frame (True)
            or once per clip (False).
    """

    def __init__(
        self,
        spatial: A.Compose | None = None,
        photometric: A.Compose | None = None,
        *,
        per_frame_photometric: bool = True,
    ) -> None:
        self.spatial = spatial
        self.photometric = photometric
        self.per_frame_photometric = per_frame_photometric

    def __call__(
        self, frames: np.ndarray, masks: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Transform a clip.

        Args:
            frames: `T × H × W × 3` uint8.
            masks: optional `T × H × W` uint8 id masks aligned with `frames`.

        Returns:
            (frames `T × h × w × 3` uint8, masks `T × h × w` uint8 or None).
        """
        frames = np.ascontiguousarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be T × H × W × 3, got shape {frames.shape}")
        if masks is not None:
            masks = np.ascontiguousarray(masks)
            if masks.shape != frames.shape[:3]:
                raise ValueError(f"masks of shape {masks.shape} do not match frames {frames.shape}")
        if self.spatial is not None:
            if masks is None:
                frames = self.spatial(images=frames)["images"]
            else:
                out = self.spatial(images=frames, masks=masks)
                frames, masks = out["images"], out["masks"]
        if self.photometric is not None:
            if self.per_frame_photometric:
                frames = np.stack([self.photometric(image=frame)["image"] for frame in frames])
            else:
                frames = self.photometric(images=frames)["images"]
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if masks is not None:
            masks = np.ascontiguousarray(masks, dtype=np.uint8)
        return frames, masks

    def set_random_state(self, rng: np.random.Generator) -> None:
        """Drive every random draw of this transform from `rng` (shared, not copied)."""
        py_random = random.Random(int(rng.integers(2**63)))
        for compose in (self.spatial, self.photometric):
            if compose is not None:
                compose.set_random_state(rng, py_random)

    def __repr__(self) -> str:
        return (
            f"ClipTransform(spatial={self.spatial!r}, photometric={self.photometric!r}, "
            f"per_frame_photometric={self.per_frame_photometric})"
        )


def build_clip_transform(
    crop_size: tuple[int, int] | None = (256, 256),
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    affine_p: float = 0.0,
    affine_scale: tuple[float, float] = (0.9, 1.1),
    affine_rotate: tuple[float, float] = (-10.0, 10.0),
    affine_translate: tuple[float, float] = (-0.05, 0.05),
    photometric_p: float = 0.8,
    per_frame_photometric: bool = True,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    seed: int | None = None,
) -> ClipTransform:
    """The training clip transform.

    Spatial (shared by all frames and masks): random resized crop to `crop_size` (H, W) covering
    `scale` of the area with aspect `ratio` (skipped when `crop_size` is None), horizontal flip
    with `hflip_p`, affine (scale, rotation in degrees, translation as a fraction of the size)
    with `affine_p`. Photometric (frames only): colour jitter with `photometric_p`, per frame
    when `per_frame_photometric`; strengths as in torchvision's ColorJitter (factors
    1 ± brightness/contrast/saturation, hue shift ± `hue` of a full turn).

    Args:
        seed: seed of the albumentations generators (VideoClipDataset reseeds them anyway).
    """
    spatial: list = []
    if crop_size is not None:
        height, width = crop_size
        spatial.append(
            A.RandomResizedCrop(
                size=(int(height), int(width)),
                scale=scale,
                ratio=ratio,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=MASK_RESIZE_INTERPOLATION,
                p=1.0,
            )
        )
    if hflip_p > 0:
        spatial.append(A.HorizontalFlip(p=hflip_p))
    if affine_p > 0:
        spatial.append(
            A.Affine(
                scale=affine_scale,
                rotate=affine_rotate,
                translate_percent={"x": affine_translate, "y": affine_translate},
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=VOID_ID,
                p=affine_p,
            )
        )
    photometric = None
    if photometric_p > 0:
        photometric = A.Compose(
            [
                A.ColorJitter(
                    brightness=(max(0.0, 1 - brightness), 1 + brightness),
                    contrast=(max(0.0, 1 - contrast), 1 + contrast),
                    saturation=(max(0.0, 1 - saturation), 1 + saturation),
                    hue=(-hue, hue),
                    p=photometric_p,
                )
            ],
            seed=seed,
        )
    return ClipTransform(
        A.Compose(spatial, seed=seed) if spatial else None,
        photometric,
        per_frame_photometric=per_frame_photometric,
    )


def build_eval_transform(
    size: tuple[int, int] | int | None = None, *, pad_divisor: int | None = None
) -> ClipTransform:
    """A deterministic transform for evaluation clips.

    Args:
        size: None keeps the frames as they are; (H, W) resizes to exactly that; an int resizes
            the shorter side to it, keeping the aspect ratio.
        pad_divisor: pad bottom/right (frames black, masks void 255) so that H and W become
            multiples of it (e.g. 16 for a stride-16 encoder); None for no padding.
    """
    spatial: list = []
    if isinstance(size, int):
        spatial.append(
            A.SmallestMaxSize(
                max_size=size,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=MASK_RESIZE_INTERPOLATION,
                p=1.0,
            )
        )
    elif size is not None:
        height, width = size
        spatial.append(
            A.Resize(
                int(height),
                int(width),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=MASK_RESIZE_INTERPOLATION,
                p=1.0,
            )
        )
    if pad_divisor:
        spatial.append(
            A.PadIfNeeded(
                min_height=None,
                min_width=None,
                pad_height_divisor=pad_divisor,
                pad_width_divisor=pad_divisor,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=VOID_ID,
                p=1.0,
            )
        )
    return ClipTransform(A.Compose(spatial, seed=0) if spatial else None, None)


def clip_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """`T × H × W × 3` uint8 frames → `T × 3 × H × W` float32 tensor in [0, 1]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be T × H × W × 3, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return tensor.contiguous().float().div_(255.0)


def masks_to_tensor(masks: np.ndarray) -> torch.Tensor:
    """`T × H × W` uint8 id masks → uint8 tensor of the same shape (ids kept, 255 = void)."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype != np.uint8:
        raise ValueError(f"masks must be T × H × W uint8, got {masks.shape} {masks.dtype}")
    return torch.from_numpy(np.ascontiguousarray(masks))
