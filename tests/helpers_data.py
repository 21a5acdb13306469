"""Small test data written on the fly: H.264 mp4s, frame folders, DAVIS / YouTube-VOS trees, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from PIL import Image

from dvos.utils.masks import write_mask


def moving_frames(num_frames: int = 12, height: int = 64, width: int = 96, *, seed: int = 0) -> np.ndarray:
    """`T × H × W × 3` uint8: a smooth background and a bright square moving right one step a frame.

    Smooth content survives H.264 well, so decoded frames stay close to these arrays, and each
    frame differs from the others (the frame index can be read back from the square's position).
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, size=3)
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        for c in range(3):
            frames[t, :, :, c] = (base[c] + 30 * np.sin(xs / 17.0 + c) + 20 * np.cos(ys / 13.0)).clip(0, 255)
        x0 = 4 + 4 * t
        frames[t, 16:40, x0 : x0 + 20] = (250, 250, 250)
    return frames


def square_and_disc_clip(
    num_frames: int,
    height: int,
    width: int,
    *,
    square: tuple[int, int, int, int, int],
    disc: tuple[int, int, int, int],
    seed: int = 0,
):
    """T × 3 × H × W float tensor in [0, 1]: a noisy two-tone background (green left, blue right), a
    red square and a blue disc moving.

    Args:
        square: (x, y, side, dx, dy): top-left corner at (x + t·dx, y + t·dy) in frame t.
        disc: (x, y, radius, dx): centre at (x + t·dx, y).
    """
    import cv2
    import torch

    rng = np.random.default_rng(seed)
    x, y, side, dx, dy = square
    cx, cy, radius, cdx = disc
    frames = []
    for t in range(num_frames):
        image = np.zeros((height, width, 3), np.uint8)
        image[:, : width // 2] = (60, 110, 60)
        image[:, width // 2 :] = (90, 90, 140)
        image = np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)
        corner = (x + dx * t, y + dy * t)
        cv2.rectangle(image, corner, (corner[0] + side, corner[1] + side), (230, 40, 40), -1)
        cv2.circle(image, (cx + cdx * t, cy), radius, (40, 60, 230), -1)
        frames.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    return torch.stack(frames)


def write_mp4(path: str | Path, frames: np.ndarray, *, fps: int = 10) -> Path:
    """Write `T × H × W × 3` uint8 frames as an H.264 (libx264, yuv420p) mp4."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(folder: str | Path, frames: np.ndarray, *, ext: str = ".jpg") -> Path:
    """Write frames as `00000<ext>`, `00001<ext>`, ... (JPEG at quality 95, or PNG)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}{ext}", quality=95)
    return folder


def box_masks(
    num_frames: int, height: int, width: int, boxes: dict[int, tuple[int, int, int, int]]
) -> np.ndarray:
    """`T × H × W` uint8 masks with object `k` in the box (y0, y1, x0, x1) moving right 1 px/frame."""
    masks = np.zeros((num_frames, height, width), dtype=np.uint8)
    for t in range(num_frames):
        for object_id, (y0, y1, x0, x1) in boxes.items():
            masks[t, y0:y1, x0 + t : x1 + t] = object_id
    return masks


def make_davis_tree(
    root: str | Path,
    sequences: dict[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    year: int = 2017,
    split: str = "val",
    resolution: str = "480p",
    annotated: str = "all",
) -> Path:
    """A DAVIS-layout tree: JPEG frames, palette-PNG masks, ImageSets/<year>/<split>.txt.

    Args:
        sequences: name → (frames T×H×W×3, masks T×H×W or None for no annotation folder).
        annotated: "all" writes every mask, "first" only frame 0 (like test-dev).
    """
    root = Path(root)
    for name, (frames, masks) in sequences.items():
        write_frame_folder(root / "JPEGImages" / resolution / name, frames)
        if masks is not None:
            count = len(masks) if annotated == "all" else 1
            for index in range(count):
                write_mask(root / "Annotations" / resolution / name / f"{index:05d}.png", masks[index])
    split_file = root / "ImageSets" / str(year) / f"{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{name}\n" for name in sequences))
    return root


def make_youtubevos_tree(
    root: str | Path,
    split: str,
    videos: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    annotate_every: int = 1,
    first_appearance_only: bool = False,
) -> Path:
    """A YouTube-VOS-layout tree `ROOT/<split>/{JPEGImages,Annotations}/<video>/` + meta.json.

    Args:
        videos: name → (frames T×H×W×3, masks T×H×W with ids; an id absent before frame t first
            appears at t).
        annotate_every: write a mask only every n-th frame (train split: 5).
        first_appearance_only: write masks only at frames where some object first appears, each
            holding only the newly appearing objects (the valid split).
    """
    split_dir = Path(root) / split
    meta: dict = {"videos": {}}
    for name, (frames, masks) in videos.items():
        write_frame_folder(split_dir / "JPEGImages" / name, frames)
        first: dict[int, int] = {}
        for t, mask in enumerate(masks):
            for object_id in np.unique(mask):
                if object_id not in (0, 255):
                    first.setdefault(int(object_id), t)
        objects = {}
        for object_id, t0 in sorted(first.items()):
            present = [t for t in range(len(masks)) if (masks[t] == object_id).any()]
            listed = [
                t for t in present if t == t0 or (not first_appearance_only and t % annotate_every == 0)
            ]
            objects[str(object_id)] = {"category": "thing", "frames": [f"{t:05d}" for t in listed]}
        meta["videos"][name] = {"objects": objects}
        for t, mask in enumerate(masks):
            starting = [k for k, t0 in first.items() if t0 == t]
            if first_appearance_only:
                if not starting:
                    continue
                mask = np.where(np.isin(mask, starting), mask, 0).astype(np.uint8)
            elif t % annotate_every != 0 and not starting:
                continue
            write_mask(split_dir / "Annotations" / name / f"{t:05d}.png", mask)
    (split_dir / "meta.json").write_text(json.dumps(meta))
    return Path(root)


def make_bad_videos(folder: str | Path, good_mp4: str | Path) -> dict[str, Path]:
    """Write the ways an mp4 goes bad, next to nothing else, from a good H.264 mp4.

    Returns name → path for: `empty` (0 bytes), `truncated` (first third of the file: no index),
    `random` (random bytes named .mp4), `damaged_open` (all frame data overwritten: fails when
    opened) and `damaged_decode` (everything after the first frame overwritten: opens and reports
    its frame count, fails when frames are decoded).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(good_mp4).read_bytes()
    rng = np.random.default_rng(1234)
    with av.open(str(good_mp4)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    index_start = data.rfind(b"moov") - 4  # PyAV writes the index (moov) after the frame data
    first_frame_start, second_frame_start = packets[0][0], packets[1][0]

    def damaged(start: int) -> bytes:
        out = bytearray(data)
        out[start:index_start] = rng.bytes(index_start - start)
        return bytes(out)

    files = {
        "empty": b"",
        "truncated": data[: len(data) // 3],
        "random": rng.bytes(4000),
        "damaged_open": damaged(first_frame_start),
        "damaged_decode": damaged(second_frame_start),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"bad_{name}.mp4"
        paths[name].write_bytes(content)
    return paths


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
