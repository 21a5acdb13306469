"""The streaming inference engine: walk a video frame by frame with memory that does not grow.

    segmenter.start(frame 0, mask, object ids)      → prediction of frame 0 (the given mask)
    for t = 1 .. T−1:
        segmenter.step(frame t)                      → H × W uint8 ids at the frame's original size
        if objects first appear at t:
            segmenter.add_objects(t, frame t, mask t, new ids) → the merged prediction of frame t
        writer.put(prediction)                       (background thread, bounded queue)

Three segmenters share that small interface (`Segmenter`):

- `StudentSegmenter`: the deformable student. Its `Memory` holds two frames, the reference
  (long-term) and the previous frame with its predicted mask (short-term, replaced every step),
  plus at most `max_long_term` − 1 frames where objects first appeared, so its size is bounded by
  the frame size and that count alone.
- `TeacherSegmenter`: the label-propagation teacher; its context queue holds at most 1 + n_recent
  frames (`LabelPropagationTeacher.context_size`).
- `CopySegmenter`: the first-frame-copy baseline (no model).

Object ids: a sequence's ids (DAVIS: 1..K; YouTube-VOS: any ids in 1..254, e.g. 2, 5) are mapped to
contiguous model ids 1..K in order of appearance (`ObjectIdMap`) and mapped back on output; void
(255) and ids that are not objects read as background.

Objects that appear later (YouTube-VOS): the given masks are pasted over the frame's prediction.
- student: that frame with the merged mask (the given masks of the new objects over the
  prediction of the others) joins the long-term memory beside the reference frame, as DeAOT adds
  it to its long-term memory, and becomes the short-term memory too; later frames read every
  long-term frame at once (`DeformableStudent.add_reference`). One long-term slot per such frame,
  at most `max_long_term` (`eval.max_long_term`): beyond it the oldest added frame leaves (the
  reference frame never does), so the memory stays bounded; `max_long_term=1` replaces the
  reference instead (the exported step's single long-term slot).
- teacher: `LabelPropagationTeacher.add_objects` merges the masks into that frame's soft labels in
  its context (its own bounded queue), so later frames propagate them.
- copy: the new masks are pasted into the copied prediction from that frame on.

Sizes: frames are fed at their original size unless `min_size` upsamples a smaller short side or
`max_size` caps the long side (the cap wins; bilinear, antialiased when downscaling; masks by
nearest-exact); the student pads to a multiple of 16 inside and
crops its logits back. Logits (the teacher's: probabilities) are upsampled bilinearly to the
original size before the argmax, so predictions always have the input's size.

Everything runs under `torch.inference_mode()`, in float32.

Peak memory per sequence (`SequenceStats`): on CPU the process's resident set size (VmRSS of
/proc/self/status) is sampled after every frame and the maximum kept. It includes the process's
baseline (Python, torch, the model's weights: several hundred MB before the first frame), which is
also reported (`rss_before_mb`); the growth over a sequence is `peak_rss_mb − rss_before_mb`. On
CUDA, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only, not the
caching allocator's reserve).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from dvos.config import MIN_MODEL_SIZE
from dvos.data.readers import FrameReader
from dvos.data.vos import VOSSequence
from dvos.inference.writer import MaskWriter
from dvos.models.grid import upsample_probabilities
from dvos.models.memory import Memory
from dvos.models.refine import EdgeRefinement
from dvos.models.student import DeformableStudent, labels_to_onehot, reading_problem
from dvos.models.teacher import LabelPropagationTeacher
from dvos.utils.errors import ConfigError, DataError
from dvos.utils.masks import VOID_ID

READ_CHUNK = 8  # frames decoded at once from a video file (bounded: never the whole video)
MAX_LONG_TERM = 4  # the student's long-term frames at most: the reference + 3 where objects appeared


# --------------------------------------------------------------------------------------------------
# Object ids
# --------------------------------------------------------------------------------------------------
def mask_object_ids(mask: np.ndarray) -> list[int]:
    """The object ids of an `H × W` uint8 mask, ascending (0 = background and 255 = void excluded)."""
    return [int(value) for value in np.unique(mask) if value not in (0, VOID_ID)]


class ObjectIdMap:
    """A sequence's object ids ↔ contiguous model ids 1..K, in order of first appearance (append-only)."""

    def __init__(self) -> None:
        self.object_ids: list[int] = []
        self._to_model = np.zeros(256, dtype=np.uint8)
        self._to_sequence = np.zeros(256, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.object_ids)

    def add(self, object_ids: Sequence[int]) -> list[int]:
        """Give new sequence ids the next model ids; returns the model ids of `object_ids`."""
        for object_id in object_ids:
            object_id = int(object_id)
            if not 0 < object_id < VOID_ID:
                raise DataError(f"object id {object_id} is not in 1..254")
            if object_id not in self.object_ids:
                self.object_ids.append(object_id)
                model_id = len(self.object_ids)
                self._to_model[object_id] = model_id
                self._to_sequence[model_id] = object_id
        return [int(self._to_model[int(i)]) for i in object_ids]

    def to_model(self, mask: np.ndarray, *, only: Sequence[int] | None = None) -> np.ndarray:
        """`H × W` sequence ids → model ids (uint8); pixels of other ids (or not in `only`) → 0."""
        ids = self._to_model[mask]
        if only is not None:
            ids = np.where(np.isin(mask, np.asarray(list(only), dtype=mask.dtype)), ids, 0).astype(np.uint8)
        return ids

    def to_sequence(self, model_ids: np.ndarray) -> np.ndarray:
        """`H × W` model ids → sequence ids (uint8)."""
        return self._to_sequence[model_ids]


# --------------------------------------------------------------------------------------------------
# Segmenters
# --------------------------------------------------------------------------------------------------
@runtime_checkable
class Segmenter(Protocol):
    """What the engine needs from a method. Frames are RGB uint8 `H × W × 3`, masks and predictions
    uint8 `H × W` id maps in the sequence's own ids, always at the frame's original size."""

    name: str

    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        """Begin a video at its first annotated frame; returns that frame's prediction (`H × W` uint8)."""

    def step(self, frame: np.ndarray) -> np.ndarray:
        """Segment the next frame; returns `H × W` uint8 ids."""

    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        """Objects `new_ids` first appear in `frame` (index `index`, just given to `step`) with masks
        `mask_ids == id`; returns the merged prediction of that frame."""

    def memory_bytes(self) -> int:
        """Bytes of the state carried from frame to frame (bounded by construction)."""


def model_size(size: tuple[int, int], max_size: int | None, min_size: int | None = None) -> tuple[int, int]:
    """(H, W) fed to a model: `size`, scaled up so that the short side is `min_size` when it is
    smaller, then scaled down so that the long side is `max_size` when it is larger (the cap wins)."""
    height, width = int(size[0]), int(size[1])
    scale = 1.0
    if min_size is not None and min(height, width) < int(min_size):
        scale = int(min_size) / min(height, width)
    if max_size is not None and max(height, width) * scale > int(max_size):
        scale = int(max_size) / max(height, width)
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


class _TorchSegmenter:
    """Shared by the model segmenters: device, optional resizing, frames and masks to tensors, the
    optional edge refinement of their output (`refine`, `eval.refine_*`)."""

    name = "model"

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        max_size: int | None = None,
        min_size: int | None = None,
        refine: EdgeRefinement | None = None,
    ) -> None:
        if max_size is not None and int(max_size) < MIN_MODEL_SIZE:
            raise DataError(f"max_size must be at least {MIN_MODEL_SIZE} pixels, got {max_size}")
        if min_size is not None and int(min_size) < MIN_MODEL_SIZE:
            raise DataError(f"min_size must be at least {MIN_MODEL_SIZE} pixels, got {min_size}")
        self.device = torch.device(device)
        self.max_size = None if max_size is None else int(max_size)
        self.min_size = None if min_size is None else int(min_size)
        self.refine = refine if refine is not None and refine.enabled else None  # eval.refine_*
        self.ids = ObjectIdMap()
        self.frame_size: tuple[int, int] | None = None  # original (H, W)
        self.input_size: tuple[int, int] | None = None  # (H, W) fed to the model

    def _begin(self, frame: np.ndarray, object_ids: Sequence[int]) -> None:
        self.ids = ObjectIdMap()
        self.ids.add(object_ids)
        self.frame_size = (int(frame.shape[0]), int(frame.shape[1]))
        self.input_size = model_size(self.frame_size, self.max_size, self.min_size)

    def _check_frame(self, frame: np.ndarray) -> None:
        if self.frame_size is None:
            raise RuntimeError(f"{type(self).__name__}.step() before start()")
        if tuple(frame.shape[:2]) != self.frame_size or frame.ndim != 3 or frame.shape[2] != 3:
            raise DataError(
                f"frame of shape {tuple(frame.shape)} in a video of {self.frame_size[0]}×{self.frame_size[1]} frames"
            )

    def _image(self, frame: np.ndarray) -> torch.Tensor:
        """RGB uint8 H × W × 3 → 1 × 3 × H' × W' float in [0, 1] on the device (H' × W' = input size)."""
        self._check_frame(frame)
        image = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device)
        image = image.permute(2, 0, 1)[None].float().div_(255.0)
        if self.input_size != self.frame_size:
            image = F.interpolate(
                image, size=self.input_size, mode="bilinear", antialias=True, align_corners=False
            )
        return image

    def _labels(self, model_ids: np.ndarray) -> torch.Tensor:
        """H × W uint8 model ids → 1 × H' × W' long on the device, at the input size (nearest-exact)."""
        labels = torch.from_numpy(np.ascontiguousarray(model_ids)).to(self.device)[None]
        if self.input_size != self.frame_size:
            resized = F.interpolate(labels[None].float(), size=self.input_size, mode="nearest-exact")
            labels = resized[0].round()
        return labels.long()

    def _refined_at_frame_size(self, probabilities: torch.Tensor, frame: np.ndarray) -> torch.Tensor:
        """1 × L × H' × W' probabilities → 1 × L × H × W at the frame's size, edge-refined by
        `self.refine` guided by the frame itself (`eval.refine_*`)."""
        if tuple(probabilities.shape[-2:]) != self.frame_size:
            probabilities = F.interpolate(
                probabilities.float(), size=self.frame_size, mode="bilinear", align_corners=False
            )
        guide = torch.from_numpy(np.ascontiguousarray(frame)).to(self.device).permute(2, 0, 1)[None]
        return self.refine(probabilities, guide.float().div_(255.0))

    def _ids_at_frame_size(self, scores: torch.Tensor) -> np.ndarray:
        """1 × (K+1) × H' × W' logits or probabilities → H × W uint8 model ids (argmax at frame size)."""
        if tuple(scores.shape[-2:]) != self.frame_size:
            scores = F.interpolate(scores.float(), size=self.frame_size, mode="bilinear", align_corners=False)
        return scores.argmax(1)[0].to(torch.uint8).cpu().numpy()


def reading_options(eval_config: Any, *, validation: bool = False) -> dict[str, Any]:
    """`StudentSegmenter`'s keyword arguments for reading its memory and refining its output, from a
    config's `eval` section (`soft_memory`, `attention_topk`, `long_term_weight`, `refine_*`,
    `refine_soft_memory`; defaults where the section lacks them). `validation`: the refinement passes
    are `eval.val_refine_iterations` (the validation during training) instead of
    `eval.refine_iterations`."""
    get = eval_config.get if hasattr(eval_config, "get") else (lambda key, default: default)
    topk = get("attention_topk", None)
    long_term_weight = get("long_term_weight", None)
    problem = reading_problem(topk, long_term_weight, names=("eval.attention_topk", "eval.long_term_weight"))
    if problem is not None:
        raise ConfigError(problem)
    defaults = EdgeRefinement()
    iterations_key = "val_refine_iterations" if validation else "refine_iterations"
    values = {
        "iterations": get(iterations_key, get("refine_iterations", defaults.iterations)),
        "radius": get("refine_radius", defaults.radius),
        "dilation": get("refine_dilation", defaults.dilation),
        "sigma_space": get("refine_sigma_space", defaults.sigma_space),
        "sigma_colour": get("refine_sigma_colour", defaults.sigma_colour),
    }
    names = {field: f"eval.refine_{field}" for field in values} | {"iterations": f"eval.{iterations_key}"}
    problem = EdgeRefinement.problem(values, names)  # EdgeRefinement's own rules, named by their keys
    if problem is not None:
        raise ConfigError(problem)
    refine = EdgeRefinement(
        iterations=int(values["iterations"]),
        radius=int(values["radius"]),
        dilation=int(values["dilation"]),
        sigma_space=float(values["sigma_space"]),
        sigma_colour=float(values["sigma_colour"]),
    )
    return {
        "soft_memory": bool(get("soft_memory", True)),
        "attention_topk": None if topk is None else int(topk),
        "long_term_weight": None if long_term_weight is None else float(long_term_weight),
        "refine": refine if refine.enabled else None,
        "refine_soft_memory": bool(get("refine_soft_memory", False)),
    }


def long_term_bound(eval_config: Any) -> int:
    """`StudentSegmenter`'s `max_long_term` from a config's `eval` section (`eval.max_long_term`,
    `MAX_LONG_TERM` where the section lacks it); a one-line `ConfigError` below 1."""
    get = eval_config.get if hasattr(eval_config, "get") else (lambda key, default: default)
    value = get("max_long_term", MAX_LONG_TERM)
    if value is None or int(value) < 1:
        raise ConfigError(f"eval.max_long_term must be >= 1 (the reference frame), got {value}")
    return int(value)


class StudentSegmenter(_TorchSegmenter):
    """The deformable student, with its bounded `Memory` (two frames, plus frames where objects
    first appeared, at most `max_long_term` long-term frames).

    Args:
        student: a `DeformableStudent` (put in eval mode here: identity id permutation).
        device: where it runs.
        max_size: cap on the long side of frames fed to the model (None: original size).
        min_size: smaller short sides are upsampled to this for the model (None: never upsampled).
        soft_memory: the short-term memory embeds the prediction's softmax probabilities, as in
            training (`eval.soft_memory`); False: its argmax one-hot. The returned masks are the
            argmax either way.
        attention_topk: each deformable read keeps its k most similar sampled points at inference
            (`eval.attention_topk`; 0: all; None: as the student was built, `model.attention_topk`).
        long_term_weight: the ID stream weighs the long-term (reference) read w and the short-term
            (previous frame) read 2 − w (`eval.long_term_weight`; None: 1, as trained); see
            `DeformableStudent.reading`.
        refine: edge refinement of each predicted frame (`eval.refine_*`; None: off): the softmax,
            at the frame's size, is filtered by `EdgeRefinement` guided by the frame; the returned
            mask is its argmax and the short-term memory embeds that mask (resized to the model's
            input) as a one-hot.
        refine_soft_memory: with `refine`, the short-term memory embeds the filtered probabilities
            instead of the refined mask's one-hot (`eval.refine_soft_memory`; only with
            `soft_memory`). Off by default: the filter lowers an object's probabilities where it
            mixes in background, and fed back softly a faint object fades out over the frames.
        max_long_term: long-term frames at most (`eval.max_long_term`): the reference frame plus
            the frames where objects first appeared (`add_objects`), the oldest added one dropped
            beyond it; 1: such a frame replaces the reference.
    """

    name = "student"

    def __init__(
        self,
        student: DeformableStudent,
        *,
        device: str | torch.device = "cpu",
        max_size: int | None = None,
        min_size: int | None = None,
        soft_memory: bool = True,
        attention_topk: int | None = None,
        long_term_weight: float | None = None,
        refine: EdgeRefinement | None = None,
        refine_soft_memory: bool = False,
        max_long_term: int = MAX_LONG_TERM,
    ) -> None:
        super().__init__(device=device, max_size=max_size, min_size=min_size, refine=refine)
        problem = reading_problem(attention_topk, long_term_weight)
        if problem is not None:
            raise DataError(problem)
        if int(max_long_term) < 1:
            raise DataError(f"max_long_term must be >= 1 (the reference frame), got {max_long_term}")
        self.max_long_term = int(max_long_term)
        self.soft_memory = bool(soft_memory)
        self.refine_soft_memory = bool(refine_soft_memory)
        self.attention_topk = None if attention_topk is None else int(attention_topk)
        self.long_term_weight = None if long_term_weight is None else float(long_term_weight)
        self.student = student.to(self.device).eval()
        self.max_objects = int(student.max_objects)
        self.memory: Memory | None = None
        self._previous: np.ndarray | None = None  # last prediction, model ids, H × W

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        return self.student.reading(
            attention_topk=self.attention_topk, long_term_weight=self.long_term_weight
        )

    def _check_count(self) -> None:
        if len(self.ids) > self.max_objects:
            raise DataError(
                f"the video has {len(self.ids)} objects; this student segments at most {self.max_objects} "
                "(model.max_objects)"
            )

    def _one_hot(self, model_ids: np.ndarray) -> torch.Tensor:
        """H × W model ids → 1 × (max_objects + 1) × H' × W' one-hot at the input size."""
        return labels_to_onehot(self._labels(model_ids), self.max_objects + 1)

    @torch.inference_mode()
    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        self._begin(frame, object_ids)
        self._check_count()
        model_ids = self.ids.to_model(mask_ids)
        features = self.student.encode_frame(self._image(frame))
        self.memory = self.student.initialize_memory(features, self._one_hot(model_ids))
        self._previous = model_ids
        return self.ids.to_sequence(model_ids)

    @torch.inference_mode()
    def step(self, frame: np.ndarray) -> np.ndarray:
        if self.memory is None:
            raise RuntimeError("StudentSegmenter.step() before start()")
        num_objects = len(self.ids)
        if self.refine is not None:
            model_ids = self._refined_step(frame, num_objects)
        else:
            with self._reading():
                output = self.student.step(
                    self._image(frame), self.memory, num_objects=num_objects, soft_memory=self.soft_memory
                )
            self.memory = output.memory
            model_ids = self._ids_at_frame_size(output.logits[:, : num_objects + 1])
        self._previous = model_ids
        return self.ids.to_sequence(model_ids)

    def _refined_step(self, frame: np.ndarray, num_objects: int) -> np.ndarray:
        """`step` with the edge refinement: predict, refine at the frame's size, remember the refined
        mask; returns H × W model ids."""
        with self._reading():
            output = self.student.step(
                self._image(frame), self.memory, num_objects=num_objects, update_memory=False
            )
        probabilities = torch.softmax(output.logits[:, : num_objects + 1].float(), dim=1)
        probabilities = self._refined_at_frame_size(probabilities, frame)
        model_ids = probabilities.argmax(1)[0].to(torch.uint8).cpu().numpy()
        if tuple(probabilities.shape[-2:]) != self.input_size:
            probabilities = F.interpolate(
                probabilities, size=self.input_size, mode="bilinear", align_corners=False
            )
        if not (self.soft_memory and self.refine_soft_memory):
            probabilities = labels_to_onehot(probabilities.argmax(1), num_objects + 1).float()
        absent = self.max_objects - num_objects  # ids above the video's count: probability 0
        masks = F.pad(probabilities, (0, 0, 0, 0, 0, absent)).to(output.logits.dtype)
        self.memory = self.student.remember(
            self.memory, output.key, output.value, masks, id_stream=output.id_stream
        )
        return model_ids

    def _merge_new_objects(self, mask_ids: np.ndarray, new_ids: Sequence[int]) -> np.ndarray:
        """Register `new_ids` and paint their given masks over the previous prediction (model ids)."""
        self.ids.add(new_ids)
        self._check_count()
        given = self.ids.to_model(mask_ids, only=new_ids)
        return np.where(given > 0, given, self._previous).astype(np.uint8)

    @torch.inference_mode()
    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        if self.memory is None or self._previous is None:
            raise RuntimeError("StudentSegmenter.add_objects() before start()")
        merged = self._merge_new_objects(mask_ids, new_ids)
        # The frame joins the long-term memory beside the reference (bounded by max_long_term).
        features = self.student.encode_frame(self._image(frame))
        self.memory = self.student.add_reference(
            self.memory, features, self._one_hot(merged), max_long_term=self.max_long_term
        )
        self._previous = merged
        return self.ids.to_sequence(merged)

    def memory_bytes(self) -> int:
        """Bytes of the `Memory` tensors (reference + previous frame + added long-term frames; at
        most `max_long_term` + 1 frames for a frame size)."""
        if self.memory is None:
            return 0
        return self.memory.nbytes()


class TeacherSegmenter(_TorchSegmenter):
    """The label-propagation teacher through its streaming API (context ≤ 1 + n_recent frames).

    Args:
        teacher: a `LabelPropagationTeacher` (frozen).
        device: where it runs.
        max_size: cap on the long side of frames fed to the model (None: original size).
        min_size: smaller short sides are upsampled to this for the model (None: never upsampled).
        refine: edge refinement of each returned mask (`eval.refine_*`; None: off), as the student's;
            the teacher's context keeps its own feature-grid labels.
    """

    name = "teacher"

    def __init__(
        self,
        teacher: LabelPropagationTeacher,
        *,
        device: str | torch.device = "cpu",
        max_size: int | None = None,
        min_size: int | None = None,
        refine: EdgeRefinement | None = None,
    ) -> None:
        super().__init__(device=device, max_size=max_size, min_size=min_size, refine=refine)
        self.teacher = teacher.to(self.device).eval()

    @property
    def context_size(self) -> int:
        """Frames in the teacher's context now (≤ 1 + n_recent)."""
        return self.teacher.context_size

    def _predict(self, logits: torch.Tensor, frame: np.ndarray) -> np.ndarray:
        """Feature-grid logits 1 × L × h × w → H × W model ids (probabilities upsampled, refined when
        asked, then argmax)."""
        probabilities = upsample_probabilities(logits.exp(), self.input_size, self.teacher.stride)
        if self.refine is not None:
            probabilities = self._refined_at_frame_size(probabilities, frame)
        return self._ids_at_frame_size(probabilities)

    @torch.inference_mode()
    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        self._begin(frame, object_ids)
        self.teacher.reset()
        model_ids = self.ids.to_model(mask_ids)
        one_hot = labels_to_onehot(self._labels(model_ids), len(self.ids) + 1)
        self.teacher.init(self._image(frame), one_hot)
        return self.ids.to_sequence(model_ids)

    @torch.inference_mode()
    def step(self, frame: np.ndarray) -> np.ndarray:
        logits, _ = self.teacher.step(self._image(frame))
        return self.ids.to_sequence(self._predict(logits, frame))

    @torch.inference_mode()
    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        self._check_frame(frame)
        known = len(self.ids)
        self.ids.add(new_ids)
        given = self.ids.to_model(mask_ids, only=new_ids)
        masks = labels_to_onehot(self._labels(given), len(self.ids) + 1)
        masks[:, 0] = 0  # only the new objects' channels are given; the others keep their labels
        # The frame the teacher just stepped (its own count; equals `index` when the walk began at 0).
        logits = self.teacher.add_objects(self.teacher.next_frame_index - 1, masks)
        # This frame's output: the given masks exactly, the earlier objects from the merged labels
        # (the new channels, blurred to feature cells, are not read outside the given masks).
        merged = np.where(given > 0, given, self._predict(logits[:, : known + 1], frame)).astype(np.uint8)
        return self.ids.to_sequence(merged)

    def memory_bytes(self) -> int:
        """Bytes of the context's features and soft labels (≤ 1 + n_recent frames)."""
        return sum(
            entry.features.numel() * entry.features.element_size()
            + entry.labels.numel() * entry.labels.element_size()
            for entry in self.teacher.memory.entries()
        )


class CopySegmenter:
    """First-frame copy: every frame is predicted as the reference masks (later objects pasted in)."""

    name = "copy"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self._prediction: np.ndarray | None = None

    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        objects = np.isin(mask_ids, np.asarray(list(object_ids), dtype=np.uint8))
        self._prediction = np.where(objects, mask_ids, 0).astype(np.uint8)
        return self._prediction

    def step(self, frame: np.ndarray) -> np.ndarray:
        if self._prediction is None:
            raise RuntimeError("CopySegmenter.step() before start()")
        return self._prediction

    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        given = np.isin(mask_ids, np.asarray(list(new_ids), dtype=np.uint8))
        self._prediction = np.where(given, mask_ids, self._prediction).astype(np.uint8)
        return self._prediction

    def memory_bytes(self) -> int:
        return 0 if self._prediction is None else int(self._prediction.nbytes)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
@dataclass
class VideoInput:
    """One video to segment, whatever it comes from (`video_input`).

    Attributes:
        name: sequence / video name (the output folder in DAVIS layout).
        frame_names: one per frame; predictions are `<frame_name>.png`.
        size: (H, W) of the frames.
        palette: flat RGB palette of the first input mask (None: DAVIS palette).
        object_starts: frame index → object ids first appearing there (sequence ids).
        read_frames: `read_frames(count)` yields the first `count` frames, `H × W × 3` uint8, in order.
        load_mask: `load_mask(index)` → `H × W` uint8 ids of a frame in `object_starts`.
    """

    name: str
    frame_names: list[str]
    size: tuple[int, int]
    palette: list[int] | None
    object_starts: dict[int, list[int]]
    read_frames: Callable[[int], Iterator[np.ndarray]]
    load_mask: Callable[[int], np.ndarray]

    def __len__(self) -> int:
        return len(self.frame_names)


def _check_mask_size(mask: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"{what}: mask must be H × W ids, got shape {mask.shape}")
    if tuple(mask.shape) != tuple(size):
        raise DataError(
            f"{what}: mask size {mask.shape[0]}×{mask.shape[1]} differs from the video's {size[0]}×{size[1]}"
        )
    return mask.astype(np.uint8, copy=False)


def video_input(
    frames_source: VOSSequence | FrameReader | np.ndarray | Sequence[np.ndarray],
    first_masks: np.ndarray | Mapping[int, np.ndarray] | None = None,
    *,
    name: str | None = None,
    palette: list[int] | None = None,
    frame_names: Sequence[str] | None = None,
) -> VideoInput:
    """Wrap a `VOSSequence`, a `FrameReader` or in-memory frames (`T × H × W × 3`) as a `VideoInput`.

    Args:
        frames_source: the frames. A `VOSSequence` brings its own masks, names and palette.
        first_masks: for a reader or arrays: the `H × W` mask of frame 0, or {frame index: mask}
            (objects whose ids first occur in a later mask start there, YouTube-VOS style).
        name: the video's name (default: the sequence's name, the reader's path stem, or "video").
        palette: the palette to write predictions with (a sequence's own by default).
        frame_names: names of the frames (default: the source's, else 00000, 00001, ...).

    Raises:
        DataError: no masks, or a mask whose size differs from the frames'.
    """
    if isinstance(frames_source, VOSSequence):
        sequence = frames_source
        starts: dict[int, list[int]] = {}
        for object_id in sequence.object_ids:
            starts.setdefault(sequence.first_frame[object_id], []).append(object_id)

        def read_sequence(count: int) -> Iterator[np.ndarray]:
            for index in range(count):
                yield sequence.load_frame(index)

        def load_sequence_mask(index: int) -> np.ndarray:
            mask = sequence.load_mask(index)
            if mask is None:
                raise DataError(f"{sequence.name}: no mask for frame {sequence.frame_names[index]}")
            return mask

        return VideoInput(
            name=name or sequence.name,
            frame_names=list(frame_names or sequence.frame_names),
            size=tuple(sequence.size),
            palette=palette if palette is not None else sequence.palette,
            object_starts=dict(sorted(starts.items())),
            read_frames=read_sequence,
            load_mask=load_sequence_mask,
        )

    if first_masks is None:
        raise DataError("a video needs the mask of its first frame (first_masks)")
    masks = dict(first_masks) if isinstance(first_masks, Mapping) else {0: first_masks}
    if isinstance(frames_source, FrameReader):
        reader = frames_source
        size = tuple(reader.size)
        names = list(frame_names or reader.frame_names)
        default_name = reader.path.stem if reader.path.suffix else reader.path.name

        def read_frames(count: int) -> Iterator[np.ndarray]:
            for start in range(0, count, READ_CHUNK):
                yield from reader.get_batch(list(range(start, min(count, start + READ_CHUNK))))

    else:
        frames = frames_source
        if len(frames) == 0:
            raise DataError("the video has no frames")
        size = tuple(np.asarray(frames[0]).shape[:2])
        names = list(frame_names or [f"{index:05d}" for index in range(len(frames))])
        default_name = "video"

        def read_frames(count: int) -> Iterator[np.ndarray]:
            for index in range(count):
                yield np.asarray(frames[index])

    if len(names) == 0:
        raise DataError("the video has no frames")
    checked = {int(i): _check_mask_size(m, size, f"mask of frame {i}") for i, m in sorted(masks.items())}
    starts, seen = {}, set()
    for index, mask in checked.items():
        if not 0 <= index < len(names):
            raise DataError(f"mask given for frame {index}, but the video has {len(names)} frames")
        new = [object_id for object_id in mask_object_ids(mask) if object_id not in seen]
        seen.update(new)
        if new:
            starts[index] = new
    return VideoInput(
        name=name or default_name,
        frame_names=names,
        size=size,  # type: ignore[arg-type]
        palette=palette,
        object_starts=starts,
        read_frames=read_frames,
        load_mask=checked.__getitem__,
    )


# --------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------
def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (VmRSS; the peak so far where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource  # no /proc (macOS): the lifetime peak is the best available

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 * 1024.0)


@dataclass
class SequenceStats:
    """Speed and memory of one segmented video.

    Attributes:
        name: the video's name.
        frames: frames segmented (predictions written).
        seconds: time spent in the segmenter (model, resizing, argmax), summed over frames.
        fps: frames / seconds.
        peak_rss_mb: largest process RSS sampled after each frame (includes the process baseline).
        peak_cuda_mb: `torch.cuda.max_memory_allocated` over the video, MiB (None on CPU).
        wall_seconds: the whole walk, reading frames and queueing the outputs included.
        rss_before_mb: process RSS before the first frame (the baseline in `peak_rss_mb`).
        memory_bytes: the segmenter's carried state after the last frame (`Segmenter.memory_bytes`).
    """

    name: str
    frames: int
    seconds: float
    fps: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    wall_seconds: float
    rss_before_mb: float
    memory_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def segment_sequence(
    segmenter: Segmenter,
    frames_source: VOSSequence | FrameReader | np.ndarray | Sequence[np.ndarray] | VideoInput,
    first_masks: np.ndarray | Mapping[int, np.ndarray] | None = None,
    *,
    writer: MaskWriter | None = None,
    flat: bool = False,
    max_frames: int | None = None,
    on_frame: Callable[[int, np.ndarray], None] | None = None,
    name: str | None = None,
    palette: list[int] | None = None,
) -> SequenceStats:
    """Segment one video frame by frame with bounded memory; optionally write the predictions.

    Frames before the first object appears are predicted as background.

    Args:
        segmenter: a `Segmenter` (student, teacher, copy).
        frames_source: a `VOSSequence`, a `FrameReader`, frames `T × H × W × 3` uint8, or a `VideoInput`.
        first_masks: masks for a reader or arrays (see `video_input`); ignored for a `VOSSequence`.
        writer: where predictions go: `OUT/<name>/<frame>.png`, or `OUT/<frame>.png` with `flat`.
        max_frames: segment only the first `max_frames` frames.
        on_frame: called as `on_frame(index, prediction)` after each frame (prediction `H × W` uint8).
        name, palette: override the video's name and output palette (see `video_input`).

    Returns:
        `SequenceStats`.
    """
    video = (
        frames_source
        if isinstance(frames_source, VideoInput)
        else video_input(frames_source, first_masks, name=name, palette=palette)
    )
    count = len(video) if max_frames is None else max(0, min(len(video), int(max_frames)))
    sequence_dir = None if flat else video.name
    if writer is not None:  # a folder that cannot be written fails here, before any frame
        writer.open_sequence(sequence_dir, video.palette)
    device = getattr(segmenter, "device", torch.device("cpu"))
    on_cuda = isinstance(device, torch.device) and device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    peak_rss = rss_before
    model_seconds = 0.0
    started = False
    walk_start = time.perf_counter()
    frames_done = 0
    for index, frame in enumerate(video.read_frames(count)):
        if tuple(frame.shape[:2]) != tuple(video.size):
            raise DataError(
                f"{video.name}: frame {video.frame_names[index]} is {frame.shape[0]}×{frame.shape[1]}, "
                f"the video's first frame {video.size[0]}×{video.size[1]}"
            )
        new_ids = video.object_starts.get(index, [])
        mask = video.load_mask(index) if new_ids else None
        tick = time.perf_counter()
        if not started and not new_ids:
            prediction = np.zeros(video.size, dtype=np.uint8)
        elif not started:
            prediction = segmenter.start(frame, mask, new_ids)
            started = True
        else:
            prediction = segmenter.step(frame)
            if new_ids:
                prediction = segmenter.add_objects(index, frame, mask, new_ids)
        model_seconds += time.perf_counter() - tick
        if writer is not None:
            writer.put(sequence_dir, video.frame_names[index], prediction)
        if on_frame is not None:
            on_frame(index, prediction)
        peak_rss = max(peak_rss, current_rss_mb())
        frames_done += 1
    wall_seconds = time.perf_counter() - walk_start
    peak_cuda = None
    if on_cuda:
        peak_cuda = torch.cuda.max_memory_allocated(device) / 2**20
    return SequenceStats(
        name=video.name,
        frames=frames_done,
        seconds=model_seconds,
        fps=frames_done / model_seconds if model_seconds > 0 else float("inf"),
        peak_rss_mb=peak_rss,
        peak_cuda_mb=peak_cuda,
        wall_seconds=wall_seconds,
        rss_before_mb=rss_before,
        memory_bytes=int(segmenter.memory_bytes()),
    )
