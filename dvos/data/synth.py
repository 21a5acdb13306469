"""Embedded default data: a procedural generator of videos of textured objects.

Each video is a textured background seen by a slowly panning / zooming camera, with 2–4 textured
objects (ellipses, irregular polygons, stars, radial-noise blobs) that move along smooth bounded
paths, scale, rotate, stretch and deform non-rigidly (a travelling sinusoidal warp of shape *and*
texture) and occlude each other in a fixed depth order. Textures are procedural (multi-octave
value noise, warped stripes, rotated checkers, blobs over noise, noisy colour gradients), always
with fine grain, and the objects' hues are kept away from the background's: objects differ from the
background in colour and texture statistics, never by a flat colour.

The generator writes, under one output folder `OUT`:

- `OUT/train/<name>.mp4`: real H.264 files (libx264, yuv420p, crf 18, 24 fps, B-frames, a keyframe
  every 2 s; byte-identical for a seed, see `write_mp4`), readable by decord;
  `OUT/train/manifest.json` lists names, frame counts and sizes. Training is unlabelled: no masks
  are written for these (`video_scene(...).render(t)` gives them when a test wants them).
- `OUT/val/`: a DAVIS-layout dataset (`JPEGImages/480p/<seq>/00000.jpg` at quality 95,
  `Annotations/480p/<seq>/00000.png` palette PNGs with ids 0..K on every frame,
  `ImageSets/{2016,2017}/val.txt`). Every object is well visible in frame 0 (the first-frame mask
  defines the objects) and never hidden for more than a few frames.
- `OUT/synth.json`, written last: the format version and the parameters. A later call with the same
  parameters returns at once; different parameters rebuild the folder. A build happens in
  `OUT.tmp-<pid>` and is renamed into place, so an interrupted build never looks complete; an
  `fcntl` lock on `.OUT.lock` (beside `OUT`) makes concurrent callers (DDP ranks) wait for one build.
  A folder that is neither empty nor a build of ours is never replaced.

Defaults, chosen so that training on a 2-core CPU is feasible: frames H × W = 240 × 432 (multiples
of 16), 24 training videos of 48 frames, 6 validation sequences of 32 frames, seed 0. The default
dataset (412 files, 11.4 MB) builds in 7–11 s on the 2-core development machine (about half of it
H.264 encoding), ~0.1 ms when cached.

Determinism: video `i` of a split is drawn from a numpy Generator seeded with
`(seed, split, i)`, so it is the same whatever the number of videos asked for; the same parameters
give byte-identical files (JPEG, PNG, JSON and mp4) on the same library versions.

Rendering is also available in memory: `render_sequence(rng, num_frames, size, num_objects)` for a
whole clip, `iter_sequence(...)` for one frame at a time with O(1) memory (objects follow bounded
sinusoidal paths, so a 1000-frame video keeps them in view), and `sample_scene(...)` for the scene
itself (`SyntheticScene.layer_masks` gives the amodal mask of every object, e.g. to test occlusion).
Frames are RGB `uint8`; masks are `uint8` ids, 0 = background, 1..K = objects.
"""

from __future__ import annotations

import colorsys
import contextlib
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dvos.utils.errors import DataError
from dvos.utils.io import atomic_path, ensure_writable_dir, write_json
from dvos.utils.masks import write_mask

FORMAT_VERSION = 1
DEFAULT_SIZE = (240, 432)
DEFAULT_NUM_TRAIN = 24
DEFAULT_NUM_VAL = 6
DEFAULT_TRAIN_FRAMES = 48
DEFAULT_VAL_FRAMES = 32
DEFAULT_SEED = 0
FPS = 24
CRF = 18
JPEG_QUALITY = 95
OBJECTS_PER_VIDEO = (2, 4)
RECORD_NAME = "synth.json"

_SPLIT_CODES = {"train": 0, "val": 1}
_TEXTURE_KINDS = ("noise", "stripes", "checker", "blobs", "gradient")
_SHAPE_KINDS = ("ellipse", "polygon", "star", "blob")
_WAVES = 2  # sinusoidal deformation components per object

# Scene acceptance (see `_visibility_report`): an object counts as hidden below this share of its
# nominal area; it must show at least `_FIRST_FRAME_VISIBLE` of it in frame 0 and may stay hidden
# for at most `_MAX_HIDDEN_RUN` consecutive frames.
_HIDDEN_FRACTION = 0.15
_FIRST_FRAME_VISIBLE = 0.6
_MAX_HIDDEN_RUN = 4
_MAX_ATTEMPTS = 30
_OCCLUSION_ATTEMPTS = 12  # attempts that also insist on one object covering another


# --------------------------------------------------------------------------------------------------
# Textures: built in float32 [0, 1], returned as H × W × 3 uint8 RGB.


def _value_noise(
    rng: np.random.Generator, height: int, width: int, period_px: float, octaves: int
) -> np.ndarray:
    """Multi-octave value noise, `H × W` float32 in [0, 1]; `period_px` is the coarsest feature size."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        period = max(period_px / 2**octave, 2.0)
        cells_y = max(2, int(math.ceil(height / period)) + 1)
        cells_x = max(2, int(math.ceil(width / period)) + 1)
        grid = rng.random((cells_y, cells_x), dtype=np.float32)
        total += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        amplitude *= 0.5
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _ramp(values: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map `H × W` values in [0, 1] through a piecewise-linear colour ramp (`palette`: N × 3)."""
    stops = np.linspace(0.0, 1.0, len(palette))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, stops, palette[:, c]) for c in range(3)], axis=-1).astype(np.float32)
    return table[np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)]


def _palette(rng: np.random.Generator, hue: float, count: int, *, saturation: float = 1.0) -> np.ndarray:
    """`count × 3` RGB colours around `hue`, ordered dark to bright (so ramps have contrast)."""
    values = np.linspace(rng.uniform(0.12, 0.4), rng.uniform(0.75, 1.0), count)
    colours = []
    for value in values:
        h = (hue + rng.uniform(-0.05, 0.05)) % 1.0
        s = float(np.clip(rng.uniform(0.35, 0.95) * saturation, 0.0, 1.0))
        colours.append(colorsys.hsv_to_rgb(h, s, float(value)))
    return np.asarray(colours, np.float32)


def _make_texture(
    rng: np.random.Generator, kind: str, height: int, width: int, palette: np.ndarray, feature_px: float
) -> np.ndarray:
    """A procedural texture of `kind` as `H × W × 3` uint8 RGB; `feature_px` sets its scale."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "noise":
        image = _ramp(_value_noise(rng, height, width, feature_px * 2.5, octaves=4), palette)
    elif kind == "stripes":
        angle = rng.uniform(0.0, math.pi)
        period = feature_px * rng.uniform(0.7, 1.6)
        warp = _value_noise(rng, height, width, feature_px * 4.0, octaves=2) * rng.uniform(1.0, 5.0)
        phase = 2.0 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + warp
        values = np.clip((0.5 * np.sin(phase)) * rng.uniform(1.0, 2.5) + 0.5, 0.0, 1.0)
        image = _ramp(values, palette)
    elif kind == "checker":
        angle = rng.uniform(0.0, math.pi / 2)
        cell = feature_px * rng.uniform(0.6, 1.3)
        u = (xs * math.cos(angle) + ys * math.sin(angle)) / cell
        v = (-xs * math.sin(angle) + ys * math.cos(angle)) / cell
        squares = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        squares = cv2.GaussianBlur(squares, (0, 0), 0.7)
        noise = _value_noise(rng, height, width, feature_px * 3.0, octaves=2)
        image = _ramp(0.1 + 0.65 * squares + 0.25 * noise, palette)
    elif kind == "blobs":
        image = _ramp(_value_noise(rng, height, width, feature_px * 3.0, octaves=3) * 0.6, palette)
        count = int(height * width / feature_px**2 * rng.uniform(0.3, 0.7)) + 1
        for _ in range(count):
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            axes = (
                max(1, int(feature_px * rng.uniform(0.25, 0.8))),
                max(1, int(feature_px * rng.uniform(0.25, 0.8))),
            )
            colour = palette[int(rng.integers(len(palette) // 2, len(palette)))] * rng.uniform(0.8, 1.1)
            cv2.ellipse(image, centre, axes, rng.uniform(0, 180), 0, 360, colour.tolist(), -1, cv2.LINE_AA)
        image = cv2.GaussianBlur(image, (0, 0), 0.8)
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        noise = _value_noise(rng, height, width, feature_px * 2.0, octaves=3)
        image = _ramp(np.clip(0.65 * along + 0.35 * noise, 0.0, 1.0), palette)
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    # Fine grain everywhere: no region of any texture is a flat colour.
    grain = _value_noise(rng, height, width, max(feature_px / 3.0, 2.0), octaves=2)
    image = image * (0.82 + 0.36 * grain)[..., None]
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Shapes: closed contours in object units (largest radius 1).


def _shape_contour(rng: np.random.Generator, kind: str) -> np.ndarray:
    """A closed contour, `P × 2` float (x, y) in object units, largest radius exactly 1."""
    if kind == "ellipse":
        theta = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
        points = np.stack([np.cos(theta), rng.uniform(0.45, 1.0) * np.sin(theta)], axis=1)
    elif kind == "polygon":
        sides = int(rng.integers(3, 9))
        theta = np.sort((np.arange(sides) + rng.uniform(-0.3, 0.3, sides)) * 2.0 * math.pi / sides)
        radius = rng.uniform(0.65, 1.0, sides)
        points = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    elif kind == "star":
        tips = int(rng.integers(4, 9))
        theta = np.arange(2 * tips) * math.pi / tips
        radius = np.where(np.arange(2 * tips) % 2 == 0, 1.0, rng.uniform(0.4, 0.7))
        radius = radius * rng.uniform(0.9, 1.0, 2 * tips)
        points = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    elif kind == "blob":
        theta = np.linspace(0.0, 2.0 * math.pi, 128, endpoint=False)
        radius = np.ones_like(theta)
        for harmonic in range(2, 6):
            radius += rng.uniform(0.0, 0.35 / harmonic) * np.cos(
                harmonic * theta + rng.uniform(0, 2 * math.pi)
            )
        points = np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return points / np.linalg.norm(points, axis=1).max()


def _rasterise(contour: np.ndarray, sprite_size: int, sprite_radius: float) -> np.ndarray:
    """Anti-aliased coverage of `contour` on a `S × S` sprite, float32 in [0, 1]."""
    canvas = np.zeros((sprite_size, sprite_size), np.uint8)
    centre = (sprite_size - 1) / 2.0
    points = np.round((contour * sprite_radius + centre) * 16.0).astype(np.int32)
    cv2.fillPoly(canvas, [points], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


# --------------------------------------------------------------------------------------------------
# Scene: motion of the camera and of each object as bounded functions of the frame index t.


@dataclass
class _ObjectLayer:
    """One object: its sprite (texture + coverage) and its motion, all functions of the frame t."""

    object_id: int
    alpha: np.ndarray  # S × S float32 coverage in [0, 1]
    sprite_radius: float  # sprite pixels per object unit
    unit_area: float  # shape area in object units² (for visibility shares)
    radius: float  # nominal radius, frame pixels
    centre_mean: np.ndarray  # (2,) x, y in frame pixels
    centre_wave: np.ndarray  # 2 axes × 2 components × (amplitude px, frequency rad/frame, phase)
    scale_wave: np.ndarray  # (amplitude, frequency, phase): scale = 1 + a·sin(ft + p)
    angle0: float  # radians
    angle_speed: float  # radians / frame
    stretch_wave: np.ndarray  # (amplitude, frequency, phase): area-preserving x/y stretch
    warp_vectors: np.ndarray  # _WAVES × 2 wave vectors (rad per object unit)
    warp_directions: np.ndarray  # _WAVES × 2 unit displacement directions
    warp_waves: np.ndarray  # _WAVES × (amplitude in object units, speed rad/frame, phase)
    texture: np.ndarray | None = None  # S × S × 3 uint8 RGB; set once the scene is accepted

    def pose(self, t: float) -> tuple[float, float, float, float, float]:
        """(centre x, centre y, radius px, angle rad, stretch factor) at frame `t`."""
        w = self.centre_wave
        cx = self.centre_mean[0] + float(np.sum(w[0, :, 0] * np.sin(w[0, :, 1] * t + w[0, :, 2])))
        cy = self.centre_mean[1] + float(np.sum(w[1, :, 0] * np.sin(w[1, :, 1] * t + w[1, :, 2])))
        a, f, p = self.scale_wave
        radius = self.radius * (1.0 + a * math.sin(f * t + p))
        a, f, p = self.stretch_wave
        stretch = 1.0 + a * math.sin(f * t + p)
        return cx, cy, radius, self.angle0 + self.angle_speed * t, stretch

    def nominal_area(self, t: float) -> float:
        """Area in frame pixels² of the whole object at frame `t` (ignoring the frame border)."""
        return self.unit_area * self.pose(t)[2] ** 2

    def bounds(self, t: float) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in frame pixels that contain the object at frame `t`."""
        cx, cy, radius, _, stretch = self.pose(t)
        reach = radius * max(stretch, 1.0 / stretch) * (1.0 + float(self.warp_waves[:, 0].sum())) + 2.0
        return cx - reach, cy - reach, cx + reach, cy + reach

    def sprite_coords(self, t: float, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sprite coordinates to sample for frame pixels (`xs`: 1 × w, `ys`: h × 1) -> two h × w maps."""
        cx, cy, radius, angle, stretch = self.pose(t)
        dx, dy = xs - cx, ys - cy
        cos, sin = math.cos(angle), math.sin(angle)
        # Inverse of: rotate, stretch x by s and y by 1/s, scale by radius.
        u = (cos * dx + sin * dy) / (radius * stretch)
        v = (-sin * dx + cos * dy) * stretch / radius
        # Non-rigid part: travelling sine waves displace shape and texture together.
        for (kx, ky), (ex, ey), (amp, speed, phase) in zip(
            self.warp_vectors, self.warp_directions, self.warp_waves
        ):
            offset = amp * np.sin(kx * u + ky * v + (speed * t + phase))
            u = u - ex * offset
            v = v - ey * offset
        centre = (self.alpha.shape[0] - 1) / 2.0
        map_x = (u * self.sprite_radius + centre).astype(np.float32)
        map_y = (v * self.sprite_radius + centre).astype(np.float32)
        return map_x, map_y


def _grid_range(coords: np.ndarray, low: float, high: float) -> tuple[int, int]:
    """Index range [i0, i1) of sorted grid `coords` that falls inside [low, high]."""
    return int(np.searchsorted(coords, low, "left")), int(np.searchsorted(coords, high, "right"))


class SyntheticScene:
    """A sampled scene: a background, a camera path and objects (back to front), rendered on demand.

    `render(t)` gives frame `t` as (`H × W × 3` uint8 RGB, `H × W` uint8 ids); any `t ≥ 0` works and
    costs the same, so a sequence can be as long as wanted without holding it in memory.
    """

    def __init__(
        self,
        size: tuple[int, int],
        layers: list[_ObjectLayer],
        background: np.ndarray,
        camera: dict[str, np.ndarray],
        gain_wave: np.ndarray,
    ) -> None:
        self.size = size
        self.layers = layers  # back to front
        self.background = background
        self.camera = camera
        self.gain_wave = gain_wave

    @property
    def num_objects(self) -> int:
        return len(self.layers)

    def _camera_matrix(self, t: float) -> np.ndarray:
        """2 × 3 affine map from frame pixels to background-texture pixels at frame `t`."""
        height, width = self.size
        cam = self.camera
        zoom = cam["zoom"][0] + cam["zoom"][1] * math.sin(cam["zoom"][2] * t + cam["zoom"][3])
        roll = cam["roll"][0] * math.sin(cam["roll"][1] * t + cam["roll"][2])
        src_x = cam["pan"][0, 0] + cam["pan"][0, 1] * math.sin(cam["pan"][0, 2] * t + cam["pan"][0, 3])
        src_y = cam["pan"][1, 0] + cam["pan"][1, 1] * math.sin(cam["pan"][1, 2] * t + cam["pan"][1, 3])
        a, b = zoom * math.cos(roll), zoom * math.sin(roll)
        dst_x, dst_y = (width - 1) / 2.0, (height - 1) / 2.0
        return np.array(
            [[a, -b, src_x - a * dst_x + b * dst_y], [b, a, src_y - b * dst_x - a * dst_y]], np.float64
        )

    def render(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame `t`: (`H × W × 3` uint8 RGB image, `H × W` uint8 mask of visible object ids)."""
        height, width = self.size
        frame = cv2.warpAffine(
            self.background,
            self._camera_matrix(t),
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        ).astype(np.float32)
        mask = np.zeros((height, width), np.uint8)
        xs = np.arange(width, dtype=np.float32)
        ys = np.arange(height, dtype=np.float32)
        for layer in self.layers:
            x0, y0, x1, y1 = layer.bounds(t)
            i0, i1 = _grid_range(xs, x0, x1)
            j0, j1 = _grid_range(ys, y0, y1)
            if i0 >= i1 or j0 >= j1:
                continue
            map_x, map_y = layer.sprite_coords(t, xs[None, i0:i1], ys[j0:j1, None])
            texture = cv2.remap(layer.texture, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            alpha = cv2.remap(layer.alpha, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            crop = frame[j0:j1, i0:i1]
            crop += (texture.astype(np.float32) - crop) * alpha[..., None]
            mask[j0:j1, i0:i1][alpha > 0.5] = layer.object_id
        amp, freq, phase = self.gain_wave
        frame *= 1.0 + amp * math.sin(freq * t + phase)
        return np.clip(frame + 0.5, 0, 255).astype(np.uint8), mask

    def layer_masks(self, t: int, *, step: int = 1) -> np.ndarray:
        """Amodal masks at frame `t` (whole objects, occluded parts included): `K × h × w` bool.

        Index k holds object id k + 1. `step > 1` samples every `step`-th pixel centre (cheap checks).
        """
        height, width = self.size
        xs = ((np.arange(math.ceil(width / step)) + 0.5) * step - 0.5).astype(np.float32)
        ys = ((np.arange(math.ceil(height / step)) + 0.5) * step - 0.5).astype(np.float32)
        masks = np.zeros((self.num_objects, len(ys), len(xs)), bool)
        for layer in self.layers:
            x0, y0, x1, y1 = layer.bounds(t)
            i0, i1 = _grid_range(xs, x0, x1)
            j0, j1 = _grid_range(ys, y0, y1)
            if i0 >= i1 or j0 >= j1:
                continue
            map_x, map_y = layer.sprite_coords(t, xs[None, i0:i1], ys[j0:j1, None])
            alpha = cv2.remap(layer.alpha, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            masks[layer.object_id - 1, j0:j1, i0:i1] = alpha > 0.5
        return masks


def _wave(
    rng: np.random.Generator, amplitude: tuple[float, float], frequency: tuple[float, float]
) -> np.ndarray:
    return np.array([rng.uniform(*amplitude), rng.uniform(*frequency), rng.uniform(0.0, 2.0 * math.pi)])


def _sample_layer(rng: np.random.Generator, size: tuple[int, int], object_id: int) -> _ObjectLayer:
    """Shape and motion of one object (its texture is drawn later, once the scene is accepted)."""
    height, width = size
    short = min(height, width)
    radius = short * rng.uniform(0.13, 0.27)
    scale_wave = _wave(rng, (0.0, 0.25), (0.02, 0.08))
    stretch_wave = _wave(rng, (0.0, 0.12), (0.04, 0.15))
    warp_waves = np.stack([_wave(rng, (0.03, 0.11), (0.08, 0.25)) for _ in range(_WAVES)])
    theta = rng.uniform(0.0, 2.0 * math.pi, _WAVES)
    warp_vectors = rng.uniform(1.5, 3.5, (_WAVES, 1)) * np.stack([np.cos(theta), np.sin(theta)], 1)
    theta = rng.uniform(0.0, 2.0 * math.pi, _WAVES)
    warp_directions = np.stack([np.cos(theta), np.sin(theta)], 1)
    # Centre path: a slow sine (crossing the frame) plus a faster, smaller one (wiggle); bounded so
    # that the centre stays inside the middle 84% of the frame for any t.
    centre_mean = np.empty(2)
    centre_wave = np.empty((2, 2, 3))
    for axis, span in enumerate((width, height)):
        mean = rng.uniform(0.2, 0.8)
        room = min(mean - 0.08, 0.92 - mean) * span
        slow = rng.uniform(0.35, 1.0) * room * 0.8
        fast = rng.uniform(0.0, 1.0) * (room - slow) * 0.5
        centre_mean[axis] = mean * span
        centre_wave[axis, 0] = (slow, rng.uniform(0.02, 0.06), rng.uniform(0.0, 2.0 * math.pi))
        centre_wave[axis, 1] = (fast, rng.uniform(0.05, 0.12), rng.uniform(0.0, 2.0 * math.pi))
    # Sprite resolution matches the largest on-screen size, so textures are never magnified much.
    sprite_radius = max(radius * (1.0 + scale_wave[0]), 6.0)
    sprite_size = 2 * int(math.ceil(sprite_radius * 1.05)) + 3
    contour = _shape_contour(rng, _SHAPE_KINDS[int(rng.integers(len(_SHAPE_KINDS)))])
    alpha = _rasterise(contour, sprite_size, sprite_radius)
    return _ObjectLayer(
        object_id=object_id,
        alpha=alpha,
        sprite_radius=sprite_radius,
        unit_area=float(alpha.sum()) / sprite_radius**2,
        radius=radius,
        centre_mean=centre_mean,
        centre_wave=centre_wave,
        scale_wave=scale_wave,
        angle0=rng.uniform(0.0, 2.0 * math.pi),
        angle_speed=rng.uniform(-0.03, 0.03),
        stretch_wave=stretch_wave,
        warp_vectors=warp_vectors,
        warp_directions=warp_directions,
        warp_waves=warp_waves,
    )


@dataclass
class _VisibilityReport:
    first_frame_ok: bool
    longest_hidden_run: int
    occludes: bool  # some object loses ≥ 15% of its in-frame area to one in front at some frame

    @property
    def ok(self) -> bool:
        return self.first_frame_ok and self.longest_hidden_run <= _MAX_HIDDEN_RUN

    def rank(self) -> tuple:
        return (self.first_frame_ok, -self.longest_hidden_run, self.occludes)


def _visibility_report(scene: SyntheticScene, num_frames: int) -> _VisibilityReport:
    """Measure visibility on a coarse grid (about 60 px on the short side) for frames 0..T-1."""
    step = max(1, min(scene.size) // 60)
    hidden_run = [0] * scene.num_objects
    longest = 0
    occludes = False
    first_frame_ok = True
    for t in range(num_frames):
        amodal = scene.layer_masks(t, step=step)
        covered = np.zeros(amodal.shape[1:], bool)
        for layer in reversed(scene.layers):  # front to back
            whole = amodal[layer.object_id - 1]
            visible = whole & ~covered
            covered |= whole
            visible_px, whole_px = int(visible.sum()), int(whole.sum())
            share = visible_px * step * step / layer.nominal_area(t)
            if t == 0 and share < _FIRST_FRAME_VISIBLE:
                first_frame_ok = False
            k = layer.object_id - 1
            hidden_run[k] = hidden_run[k] + 1 if share < _HIDDEN_FRACTION else 0
            longest = max(longest, hidden_run[k])
            if whole_px > 0 and visible_px < 0.85 * whole_px:
                occludes = True
        if not first_frame_ok:
            break
    return _VisibilityReport(first_frame_ok, longest, occludes)


def _sample_colours(rng: np.random.Generator, num_objects: int) -> tuple[float, list[float]]:
    """A background hue and object hues at least 0.15 (of the hue circle) away from it."""
    background_hue = rng.uniform(0.0, 1.0)
    object_hues = [(background_hue + rng.uniform(0.15, 0.85)) % 1.0 for _ in range(num_objects)]
    return background_hue, object_hues


def sample_scene(
    rng: np.random.Generator, size: tuple[int, int], num_objects: int, *, num_frames: int = 48
) -> SyntheticScene:
    """Draw a scene whose objects all show well in frame 0 and are never hidden for long.

    Args:
        rng: the random source (the scene is a pure function of its state).
        size: frame size (H, W) in pixels.
        num_objects: K ≥ 1 objects, ids 1..K (ids are not the depth order).
        num_frames: frames 0..T-1 over which visibility is checked (and, when possible, at least
            one occlusion of an object by another is required).

    Returns:
        The scene; `scene.render(t)` draws frame t.
    """
    height, width = size
    if num_objects < 1:
        raise ValueError(f"num_objects must be ≥ 1, got {num_objects}")
    best: tuple[tuple, list[_ObjectLayer]] | None = None
    for attempt in range(_MAX_ATTEMPTS):
        ids = rng.permutation(num_objects) + 1
        layers = [_sample_layer(rng, size, int(object_id)) for object_id in ids]
        probe = SyntheticScene(size, layers, np.zeros((1, 1, 3), np.uint8), {}, np.zeros(3))
        report = _visibility_report(probe, max(num_frames, 1))
        if best is None or report.rank() > best[0]:
            best = (report.rank(), layers)
        want_occlusion = num_objects > 1 and attempt < _OCCLUSION_ATTEMPTS
        if report.ok and (report.occludes or not want_occlusion):
            break
    layers = best[1]

    # Appearance, drawn once the geometry is accepted.
    background_hue, object_hues = _sample_colours(rng, num_objects)
    background_kind = _TEXTURE_KINDS[int(rng.integers(len(_TEXTURE_KINDS)))]
    bg_height, bg_width = int(math.ceil(height * 1.5)), int(math.ceil(width * 1.5))
    background = _make_texture(
        rng,
        background_kind,
        bg_height,
        bg_width,
        _palette(rng, background_hue, int(rng.integers(2, 5)), saturation=rng.uniform(0.3, 1.0)),
        feature_px=min(height, width) * rng.uniform(0.04, 0.1),
    )
    for layer in sorted(layers, key=lambda item: item.object_id):
        kinds = [kind for kind in _TEXTURE_KINDS if kind != background_kind]
        kind = kinds[int(rng.integers(len(kinds)))]
        sprite = layer.alpha.shape[0]
        layer.texture = _make_texture(
            rng,
            kind,
            sprite,
            sprite,
            _palette(rng, object_hues[layer.object_id - 1], int(rng.integers(2, 5))),
            feature_px=layer.sprite_radius * rng.uniform(0.15, 0.4),
        )

    # Camera: the visible window (zoom × frame, rolled by at most `roll_max`) pans inside the 1.5×
    # background and never leaves it, whatever t.
    zoom_mean, zoom_amp = rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.1)
    roll_max = rng.uniform(0.0, 0.03)
    zoom_max = zoom_mean + zoom_amp
    half_x = zoom_max * (width * math.cos(roll_max) + height * math.sin(roll_max)) / 2.0
    half_y = zoom_max * (width * math.sin(roll_max) + height * math.cos(roll_max)) / 2.0
    room_x = max(bg_width / 2.0 - half_x - 2.0, 0.0)
    room_y = max(bg_height / 2.0 - half_y - 2.0, 0.0)
    pan = [
        [
            (bg_width - 1) / 2.0,
            rng.uniform(0.3, 0.9) * room_x,
            rng.uniform(0.01, 0.04),
            rng.uniform(0, 2 * math.pi),
        ],
        [
            (bg_height - 1) / 2.0,
            rng.uniform(0.3, 0.9) * room_y,
            rng.uniform(0.01, 0.04),
            rng.uniform(0, 2 * math.pi),
        ],
    ]
    camera = {
        "zoom": np.array([zoom_mean, zoom_amp, rng.uniform(0.01, 0.05), rng.uniform(0, 2 * math.pi)]),
        "roll": np.array([roll_max, rng.uniform(0.01, 0.05), rng.uniform(0, 2 * math.pi)]),
        "pan": np.array(pan),
    }
    gain_wave = _wave(rng, (0.0, 0.05), (0.02, 0.1))
    return SyntheticScene(size, layers, background, camera, gain_wave)


def iter_sequence(
    rng: np.random.Generator, num_frames: int, size: tuple[int, int], num_objects: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `num_frames` frames one at a time: (`H × W × 3` uint8 RGB, `H × W` uint8 ids).

    Memory is O(1) in `num_frames`. Visibility is checked over the first min(T, 256) frames; objects
    follow bounded paths, so they stay in view however long the sequence is.
    """
    scene = sample_scene(rng, size, num_objects, num_frames=min(num_frames, 256))
    for t in range(num_frames):
        yield scene.render(t)


def render_sequence(
    rng: np.random.Generator, num_frames: int, size: tuple[int, int], num_objects: int
) -> tuple[np.ndarray, np.ndarray]:
    """A whole clip in memory: (frames `T × H × W × 3` uint8 RGB, masks `T × H × W` uint8 ids)."""
    height, width = size
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.empty((num_frames, height, width), np.uint8)
    for t, (frame, mask) in enumerate(iter_sequence(rng, num_frames, size, num_objects)):
        frames[t], masks[t] = frame, mask
    return frames, masks


# --------------------------------------------------------------------------------------------------
# Files.


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random source of video `index` of `split` ('train' or 'val'): independent of the counts."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(index)]))


def write_mp4(
    path: str | os.PathLike, frames: Iterable[np.ndarray], *, fps: int = FPS, crf: int = CRF
) -> int:
    """Encode RGB uint8 frames (`H × W × 3`, H and W even) as H.264 mp4, atomically; return the count.

    The same frames always give the same bytes: one encoder thread (x264's output depends on its
    thread count) and no macroblock-tree rate control (with B-frames, x264 165's mbtree made the
    output differ from run to run at most widths tried here: 96, 432, 448 px; it reads memory it did
    not initialise). A keyframe every 2 s keeps decord's seeks short.
    """
    import av  # imported here: only writing videos needs PyAV

    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    height, width = first.shape[:2]
    if first.dtype != np.uint8 or first.shape != (height, width, 3) or height % 2 or width % 2:
        raise ValueError(f"frames must be H × W × 3 uint8 with even H and W, got {first.shape} {first.dtype}")
    count = 0
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        options = {"crf": str(crf), "preset": "medium", "g": str(2 * fps), "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.codec_context.thread_count = 1
        stream.codec_context.pix_fmt = "yuv420p"
        stream.codec_context.height, stream.codec_context.width = height, width
        for frame in itertools.chain([first], frames):
            if frame.shape != first.shape:
                raise ValueError(f"frame {count} has shape {frame.shape}, the first had {first.shape}")
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
            count += 1
        for packet in stream.encode():
            container.mux(packet)
    return count


def _write_jpeg(path: Path, frame: np.ndarray) -> None:
    ok, data = cv2.imencode(
        ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    )
    if not ok:
        raise DataError(f"{path}: JPEG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def train_video_name(index: int) -> str:
    return f"synth_train_{index:04d}"


def val_sequence_name(index: int) -> str:
    return f"synth_val_{index:04d}"


def video_scene(
    seed: int, split: str, index: int, *, size: tuple[int, int], num_frames: int
) -> SyntheticScene:
    """The scene of video `index` of `split` in a build with this seed, size and frame count.

    `video_scene(...).render(t)` reproduces frame t of the written file (before compression) and
    gives its ground-truth mask, also for the unlabelled training videos.
    """
    rng = video_rng(seed, split, index)
    low, high = OBJECTS_PER_VIDEO
    num_objects = int(rng.integers(low, high + 1))
    return sample_scene(rng, tuple(size), num_objects, num_frames=num_frames)


def _synth_params(
    *, num_train: int, num_val: int, seed: int, size: tuple[int, int], train_frames: int, val_frames: int
) -> dict:
    """Check and normalise the parameters (these, with FORMAT_VERSION, are the cache key)."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise DataError(f"size must be (height, width), got {size!r}") from err
    if height < 32 or width < 32 or height % 2 or width % 2:
        raise DataError(f"frame size must be even and at least 32×32 (H.264 yuv420p), got {height}×{width}")
    for name, value, low in (
        ("num_train", num_train, 0),
        ("num_val", num_val, 0),
        ("seed", seed, 0),
        ("train_frames", train_frames, 1),
        ("val_frames", val_frames, 1),
    ):
        if int(value) != value or value < low:
            raise DataError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "seed": int(seed),
        "size": [height, width],
        "train_frames": int(train_frames),
        "val_frames": int(val_frames),
        "fps": FPS,
        "crf": CRF,
        "jpeg_quality": JPEG_QUALITY,
    }


def read_synth_record(out_dir: str | os.PathLike) -> dict | None:
    """The `synth.json` record of a complete build in `out_dir`, or None."""
    try:
        record = json.loads((Path(out_dir) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _is_current(out_dir: Path, params: dict) -> bool:
    record = read_synth_record(out_dir)
    return (
        record is not None
        and record.get("format_version") == FORMAT_VERSION
        and record.get("params") == params
        and (out_dir / "train" / "manifest.json").is_file()
        and (out_dir / "val" / "ImageSets" / "2017" / "val.txt").is_file()
    )


def is_synthetic_current(
    out_dir: str | os.PathLike,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    size: tuple[int, int] = DEFAULT_SIZE,
    train_frames: int = DEFAULT_TRAIN_FRAMES,
    val_frames: int = DEFAULT_VAL_FRAMES,
) -> bool:
    """Whether `out_dir` holds a complete build with exactly these parameters."""
    params = _synth_params(
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        size=size,
        train_frames=train_frames,
        val_frames=val_frames,
    )
    return _is_current(Path(out_dir), params)


def _build(root: Path, params: dict, progress: Callable[[str], None] | None) -> dict:
    """Write the whole dataset under `root` (a fresh folder); synth.json last. Returns the record."""
    size = tuple(params["size"])
    height, width = size
    train_dir = ensure_writable_dir(root / "train")
    videos = []
    for index in range(params["num_train"]):
        scene = video_scene(params["seed"], "train", index, size=size, num_frames=params["train_frames"])
        num_objects = scene.num_objects
        name = train_video_name(index)
        frames = (scene.render(t)[0] for t in range(params["train_frames"]))
        count = write_mp4(train_dir / f"{name}.mp4", frames, fps=params["fps"], crf=params["crf"])
        videos.append(
            {"name": name, "file": f"{name}.mp4", "frames": count, "height": height, "width": width,
             "num_objects": num_objects}
        )  # fmt: skip
        if progress:
            progress(f"train {index + 1}/{params['num_train']}: {name}.mp4")
    write_json(
        train_dir / "manifest.json",
        {"format_version": FORMAT_VERSION, "fps": params["fps"], "videos": videos},
    )

    val_root = ensure_writable_dir(root / "val")
    sequences = []
    for index in range(params["num_val"]):
        scene = video_scene(params["seed"], "val", index, size=size, num_frames=params["val_frames"])
        num_objects = scene.num_objects
        name = val_sequence_name(index)
        image_dir = val_root / "JPEGImages" / "480p" / name
        mask_dir = val_root / "Annotations" / "480p" / name
        for t in range(params["val_frames"]):
            frame, mask = scene.render(t)
            _write_jpeg(image_dir / f"{t:05d}.jpg", frame)
            write_mask(mask_dir / f"{t:05d}.png", mask)
        sequences.append({"name": name, "frames": params["val_frames"], "num_objects": num_objects})
        if progress:
            progress(f"val {index + 1}/{params['num_val']}: {name}")
    listing = "".join(f"{item['name']}\n" for item in sequences)
    for year in ("2016", "2017"):
        path = val_root / "ImageSets" / year / "val.txt"
        ensure_writable_dir(path.parent)
        with atomic_path(path) as tmp:
            tmp.write_text(listing)

    record = {
        "format_version": FORMAT_VERSION,
        "generator": "dvos.data.synth",
        "params": params,
        "train": {"dir": "train", "manifest": "train/manifest.json", "videos": len(videos)},
        "val": {"root": "val", "sequences": sequences},
    }
    write_json(root / RECORD_NAME, record)  # last: its presence means the build is complete
    return record


@contextlib.contextmanager
def _build_lock(out_dir: Path) -> Iterator[None]:
    """Serialise builds of the same folder across processes (e.g. DDP ranks starting together)."""
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: builds still go through a private folder and a rename
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete `OUT.tmp-<pid>` / `OUT.old-<pid>` folders left by builds whose process is gone."""
    pattern = re.compile(re.escape(out_dir.name) + r"\.(tmp|old)-(\d+)")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def generate_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_val: int,
    seed: int,
    size: tuple[int, int] = DEFAULT_SIZE,
    train_frames: int = DEFAULT_TRAIN_FRAMES,
    val_frames: int = DEFAULT_VAL_FRAMES,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build the synthetic dataset in `out_dir` unless a build with the same parameters is there.

    Args:
        out_dir: the dataset folder (`train/`, `val/`, `synth.json`). If it exists it must be empty
            or a previous build of this generator: nothing else is ever deleted.
        num_train, num_val: number of training videos (mp4) and validation sequences (DAVIS layout).
        seed: base seed; video i of a split depends only on (seed, split, i) and the frame count.
        size: frame size (H, W), even, at least 32 × 32.
        train_frames, val_frames: frames per training video / validation sequence.
        overwrite: rebuild even when an identical build is present.
        progress: called with one short line after each video.

    Returns:
        `out_dir` as a Path.

    Raises:
        DataError: bad parameters, or `out_dir` holds something that is not a build of ours.
    """
    params = _synth_params(
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        size=size,
        train_frames=train_frames,
        val_frames=val_frames,
    )
    requested = Path(out_dir)
    if not overwrite and _is_current(requested, params):
        return requested
    out = Path(os.path.abspath(requested))  # so that '.' or 'data/' still have a name and a parent
    ensure_writable_dir(out.parent)
    with _build_lock(out):
        if not overwrite and _is_current(out, params):  # another process built it while we waited
            return requested
        if out.exists() and not (
            out.is_dir() and (read_synth_record(out) is not None or not any(out.iterdir()))
        ):
            raise DataError(
                f"{out} exists and is not a dvos synthetic dataset (no {RECORD_NAME}); "
                "choose an empty or new folder"
            )
        _remove_stale_builds(out)
        build_dir = out.parent / f"{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(build_dir, ignore_errors=True)
        try:
            _build(ensure_writable_dir(build_dir), params, progress)
            old_dir = None
            if out.exists():
                old_dir = out.parent / f"{out.name}.old-{os.getpid()}"
                os.replace(out, old_dir)
            os.replace(build_dir, out)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
    return requested


def ensure_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    size: tuple[int, int] = DEFAULT_SIZE,
    train_frames: int = DEFAULT_TRAIN_FRAMES,
    val_frames: int = DEFAULT_VAL_FRAMES,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """`generate_synthetic` with every parameter defaulted: what data modules call before reading.

    Returns at once when `out_dir` already holds this build (the common case).
    """
    return generate_synthetic(
        out_dir,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        size=size,
        train_frames=train_frames,
        val_frames=val_frames,
        overwrite=overwrite,
        progress=progress,
    )
