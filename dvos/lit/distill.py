"""`DistillationModule`: the student learns to propagate masks the way the frozen teacher does.

Per training clip (frames B × T × 3 × H × W, frame 0 the reference):

1. reference objects: pseudo-objects from clustering the teacher's features of frame 0 into
   `distill.num_segments` segments (id 0 = background), or the first-frame annotation when
   `distill.ref_masks=annotation` and the batch carries one; target frames' labels are never used;
2. the teacher propagates them through the clip (no gradients; magnified `distill.teacher_scale`
   times, so its cells are finer on the clip): per-object logits and, per frame, its attention over
   each context frame alone (that frame's own top-k and softmax: rows are distributions, as the
   student's are);
3. the student propagates the same reference masks, feeding its own previous prediction back as the
   short-term memory (as at test time), and returns its deformable attention maps;
4. loss = λ_att·(1 − CKA) on the attention maps, each student read paired with the teacher's map
   over the same memory frame (long-term: frame 0; short-term: frame t − 1), the teacher's query
   rows area-averaged onto the student's query cells over the same image pixels
   (`teacher_frame_targets`) + λ_inter·L_inter + λ_intra·L_intra on the logits (+ λ_ce·CE to the
   teacher's hard masks).

The teacher is frozen and is NOT a registered sub-module: it is not in the optimizer, not wrapped by
DDP, not in `state_dict()` and so not in checkpoints; the checkpoint records its checkpoint path and
SHA-256 instead (`dvos_teacher`), and the full resolved config (`dvos_config`).

Resuming is exact: the EMA copy is a sub-module (in `state_dict()`), it is updated inside
`optimizer_step` (so a checkpoint written at a step's end already holds that step's average), and
the object-id permutations are drawn from a generator seeded from (seed, rank, step, batch index),
so no random state lives outside the checkpoint.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from dvos.config import MIN_MODEL_SIZE
from dvos.inference.engine import long_term_bound, reading_options
from dvos.lit.losses import (
    DistillationLoss,
    inter_skipped_share,
    match_sparse_query_grid,
    objects_to_valid,
    segmentation_loss,
    teacher_probabilities,
)
from dvos.metrics.evaluation import evaluate_arrays
from dvos.metrics.torchmetric import JFMetric
from dvos.models.build import build_student, build_teacher, model_config, model_problem
from dvos.models.deformable import DeformableAttentionAux
from dvos.models.deformable_teacher import DeformableTeacher
from dvos.models.layers import pad_to_stride
from dvos.models.refine import bilateral_refine
from dvos.models.student import FEATURE_STRIDE, DeformableStudent, labels_to_onehot
from dvos.models.teacher import LabelPropagationTeacher, TeacherAttention
from dvos.utils.errors import ConfigError

log = logging.getLogger(__name__)


class ClipOutputs(NamedTuple):
    """Everything one distillation forward produces (see the module docstring).

    Attributes:
        reference_ids: B × H × W long, reference objects of frame 0 (0 = background).
        num_objects: B long, objects per clip (ids 1..num_objects).
        student_logits: T − 1 tensors B × C × H × W (frames 1..T−1), C = max_objects + 1.
        student_aux: T − 1 dicts {"long_term", "short_term"} of `DeformableAttentionAux` (or None).
        teacher_logits: B × T × L × h_t × w_t (L = num_segments or annotated objects + 1).
        teacher_attention: T entries (entry 0 None), `TeacherAttention` per frame.
        teacher_token_shape: (h_t, w_t).
        teacher_stride: pixels of the clip per teacher attention cell (its stride / `distill.teacher_scale`).
        reference_logits: B × C × H × W, the student's reading of frame 0 from its fresh memory
            (with `distill.lambda_ref` > 0), else None.
        ce_targets: T − 1 tensors B × H × W, the teacher's hard masks of frames 1..T−1 moved onto
            the frames' edges (with `distill.refine_iterations` > 0), else None (plain argmax).
        teacher_logit_stride: pixels of the clip per teacher logit cell when it differs from the
            attention's (a deformable teacher's: 4 / scale), else None.
        teacher_origin: (y, x) the clip pixel where the teacher's grids start: 0 for the
            label-propagation teacher, minus its padding for a deformable teacher.
    """

    reference_ids: torch.Tensor
    num_objects: torch.Tensor
    student_logits: list[torch.Tensor]
    student_aux: list[dict[str, DeformableAttentionAux] | None]
    teacher_logits: torch.Tensor
    teacher_attention: list[TeacherAttention | None]
    teacher_token_shape: tuple[int, int]
    teacher_stride: int
    reference_logits: torch.Tensor | None = None
    ce_targets: list[torch.Tensor] | None = None
    teacher_logit_stride: int | None = None
    teacher_origin: tuple[float, float] = (0.0, 0.0)

    @property
    def logit_stride(self) -> int:
        """Pixels of the clip per teacher logit cell (`teacher_logit_stride`, else `teacher_stride`)."""
        return self.teacher_stride if self.teacher_logit_stride is None else self.teacher_logit_stride


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file (the teacher checkpoint the run depended on), None without a file."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def warmup_poly(step: int, *, warmup_steps: int, total_steps: int, power: float, min_ratio: float) -> float:
    """Learning-rate factor of optimizer step `step` (0-based): linear warm-up, then polynomial decay.

    (step + 1) / warmup_steps while step < warmup_steps; then with
    p = min(1, (step − warmup_steps) / max(1, total_steps − warmup_steps)):
    min_ratio + (1 − min_ratio)·(1 − p)^power.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after optimizer step `step` (0-based): min(decay, (1 + step) / (10 + step)).

    The warm-up of the average (as in common EMA schedules) lets early steps follow the student.
    """
    return min(float(decay), (1 + step) / (10 + step))


def reference_reconstruction_loss(
    logits: torch.Tensor,
    reference_ids: torch.Tensor,
    *,
    num_objects: torch.Tensor | int | None = None,
    hard_ratio: float = 1.0,
    jaccard_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy (over each sample's `hard_ratio` hardest pixels) + `jaccard_weight` × soft
    Jaccard of the student's reading of frame 0 (its memory's own frame) to the reference objects
    it was given, at image resolution: B × C × H × W logits, B × H × W ids → float32 scalar
    (`segmentation_loss`, the same form as the loss to the teacher's masks); with `num_objects`,
    ids above each sample's count are left out (of the softmax and of the Jaccard's average).

    Label-free (the reference objects are the pseudo-objects, or frame 0's annotation): it asks the
    ID embedding and the decoder to give a mask back as sharp as it went in, which the teacher's
    stride-8 targets of later frames cannot (docs/DESIGN.md, "The CPU recipe").
    """
    valid = None
    if num_objects is not None:
        valid = objects_to_valid(num_objects, logits.shape[1], logits.shape[0], device=logits.device)
    ce, jaccard = segmentation_loss(
        logits, reference_ids, valid, hard_ratio=hard_ratio, jaccard_weight=jaccard_weight
    )
    return ce + jaccard_weight * jaccard if jaccard_weight != 0.0 else ce


def swap_objects(
    masks: torch.Tensor,
    num_objects: torch.Tensor,
    *,
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per sample, with `probability`, hand one object's mask to another id: masks B × C × H × W
    (one-hot or soft; channel 0 the background, 1..n the sample's objects) → the same with channel k
    added to channel j ≠ k (j in 0..n, drawn uniformly) and channel k zeroed. The distillation's
    `memory_swap_prob`: a short-term memory with one identity wrong, as the student's own predictions
    are when two objects meet."""
    out = masks.clone()
    for b in range(masks.shape[0]):
        count = int(num_objects[b])
        if count < 1 or float(torch.rand((), generator=generator)) >= probability:
            continue
        source = int(torch.randint(1, count + 1, (), generator=generator))
        target = int(torch.randint(0, count, (), generator=generator))
        target = target + 1 if target >= source else target  # any id in 0..n but the source
        out[b, target] = out[b, target] + out[b, source]
        out[b, source] = 0
    return out


def paste_occluders(
    frames: torch.Tensor,
    *,
    probability: float,
    size: tuple[float, float] = (0.25, 0.5),
    speed: tuple[float, float] = (0.05, 0.15),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per clip, with `probability`, an elliptical piece of another clip's frame 0 moves across every
    frame in a straight line (copy-paste): frames B × T × 3 × H × W → the same, pasted.

    The piece's axes are `size` × the crop's side (uniform), its speed `speed` × the side per frame
    (uniform, random direction), its path centred on a random point of the crop's middle half, so it
    passes over whatever is there. The teacher and the student see the same pasted clip (the
    pseudo-objects and the targets are made after it): no label is involved. The distillation's
    `occluder_prob`: short clips of slowly moving crops seldom show an object occluded or two
    objects meeting, where the student loses them at test time (docs/DESIGN.md, "The CPU recipe").
    """
    batch, length, _, height, width = frames.shape
    out = frames.clone()
    side = float(min(height, width))
    ys = torch.arange(height, dtype=torch.float32, device=frames.device).view(height, 1)
    xs = torch.arange(width, dtype=torch.float32, device=frames.device).view(1, width)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    for b in range(batch):
        if float(torch.rand((), generator=generator)) >= probability:
            continue
        donor = (b + 1 + int(torch.randint(0, max(batch - 1, 1), (), generator=generator))) % batch
        radius_y, radius_x = uniform(*size) * side / 2, uniform(*size) * side / 2
        angle = uniform(0.0, 2 * math.pi)
        step = uniform(*speed) * side
        velocity = (step * math.sin(angle), step * math.cos(angle))
        # The source: a random ellipse of the donor's frame 0 (any position inside the crop).
        source_y, source_x = uniform(radius_y, height - radius_y), uniform(radius_x, width - radius_x)
        centre_y, centre_x = uniform(0.25 * height, 0.75 * height), uniform(0.25 * width, 0.75 * width)
        middle = (length - 1) / 2
        for t in range(length):
            y = centre_y + (t - middle) * velocity[0]
            x = centre_x + (t - middle) * velocity[1]
            inside = ((ys - y) / radius_y) ** 2 + ((xs - x) / radius_x) ** 2 <= 1.0
            # pixel (py, px) of the ellipse shows the donor's pixel at the same offset from the source
            # (an H × 1 row index and a 1 × W column index broadcast to the H × W picture)
            src_y = (ys - y + source_y).round().long().clamp(0, height - 1)
            src_x = (xs - x + source_x).round().long().clamp(0, width - 1)
            piece = frames[donor, 0][:, src_y, src_x]
            out[b, t] = torch.where(inside, piece, out[b, t])
    return out


def magnify(images: torch.Tensor, scale: int, *, nearest: bool = False) -> torch.Tensor:
    """N × C × H × W → N × C × sH × sW, bilinear (images) or nearest (masks): pixel (y, x) becomes
    the s × s block at (sy, sx), so a stride-k grid over the result is a stride-k/s grid over the input."""
    if nearest:
        return images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)


def student_query_grid(image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The student's query grid over an H × W frame: ((h_s, w_s), (top, left)), the padded frame's
    cells (`pad_to_stride` to a multiple of 16) and the pixels padded above and to the left, so
    that student cell (i, j) covers image pixels [16·i − top, 16·i + 16 − top) × (the same in x)."""
    height, width = int(image_size[0]), int(image_size[1])
    _, (left, right, top, bottom) = pad_to_stride(torch.zeros(1, 1, height, width), FEATURE_STRIDE)
    return ((height + top + bottom) // FEATURE_STRIDE, (width + left + right) // FEATURE_STRIDE), (top, left)


def teacher_frame_targets(
    attention: TeacherAttention,
    frame_index: int,
    image_size: tuple[int, int],
    teacher_stride: int,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    first: bool = False,
) -> torch.Tensor | None:
    """The teacher's attention over one memory frame alone, on the student's query grid: the CKA
    target of the student's read of that frame.

    Rows: the teacher's per-frame map (`TeacherAttention.frame_map`: that frame's own top-k and
    softmax, rows summing to 1), area-averaged onto the student's query cells over the image pixels
    each covers (`match_sparse_query_grid`): the student pads the frame (`student_query_grid`), the
    label-propagation teacher does not, so student cell i starts at teacher coordinate
    (16·i − pad) / s (a deformable teacher's grid starts at `origin`: (16·i − pad − origin) / s) and
    only the teacher rows of image pixels count, by the image pixels they share with the student
    cell. Rows stay distributions.

    Args:
        attention: the teacher's attention of the query frame (with per-frame maps).
        frame_index: the memory frame (0: the reference frame; t − 1: the previous frame).
        image_size: (H, W) of the clip's frames, in pixels.
        teacher_stride: pixels of the clip per teacher cell (its stride / `distill.teacher_scale`).
        origin: (y, x) the clip pixel where the teacher's grid starts (`ClipOutputs.teacher_origin`).
        first: the first context slot holding the frame (the long-term read's), not the last.

    Returns:
        B × h_s·w_s × h_t·w_t float32, or None when the frame is not in the teacher's context.
    """
    slot = attention.slot_of(frame_index, first=first)
    if slot is None:
        return None
    student_hw, (top, left) = student_query_grid(image_size)
    stride = float(teacher_stride)
    top, left = top + float(origin[0]), left + float(origin[1])
    return match_sparse_query_grid(
        attention.frame_indices[:, :, slot],
        attention.frame_weights[:, :, slot],
        attention.tokens_per_frame,
        attention.token_shape,
        student_hw,
        ratio=FEATURE_STRIDE / stride,
        offset=(-top / stride, -left / stride),
        extent=((image_size[0] - origin[0]) / stride, (image_size[1] - origin[1]) / stride),
        start=(-origin[0] / stride, -origin[1] / stride),
    )


REF_MASKS = ("pseudo", "annotation")
ATT_BRANCHES = ("long", "short", "both")
FINAL_CHECKPOINTS = ("best", "last")


TEACHERS = ("label_propagation", "deformable")


def teacher_file(teacher_cfg: Any) -> str | None:
    """The file the run's teacher is read from: the deformable teacher's weights, or the
    label-propagation teacher's encoder."""
    if teacher_cfg.get("name") == "deformable":
        return (teacher_cfg.get("deformable") or {}).get("checkpoint")
    return teacher_cfg.get("checkpoint")


def build_distillation_teacher(teacher_cfg: Any) -> LabelPropagationTeacher | DeformableTeacher:
    """The frozen teacher of `teacher_cfg` (`cfg.teacher`): the label-propagation teacher
    (`build_teacher`), or with `name: deformable` the network in `teacher.deformable.checkpoint`
    (its architecture from the file's saved config, else `teacher.deformable.model`).

    Raises:
        ConfigError: `name` unknown, or a deformable teacher without a checkpoint.
        DvosError: a checkpoint that cannot be loaded (one line naming the file).
    """
    from dvos.inference.checkpoints import load_student

    name = teacher_cfg.get("name", "label_propagation")
    if name not in TEACHERS:
        raise ConfigError(f"teacher.name must be one of {', '.join(TEACHERS)}, got '{name}'")
    if name == "label_propagation":
        return build_teacher(teacher_cfg)
    checkpoint = teacher_file(teacher_cfg)
    if checkpoint is None:
        raise ConfigError(
            "teacher=deformable needs teacher.deformable.checkpoint (`dvos train` distils it first and sets it)"
        )
    network, description = load_student(checkpoint, teacher_cfg.deformable.model)
    log.info("deformable teacher: %s", description)
    return DeformableTeacher(network)


class DistillationModule(pl.LightningModule):
    """Distils the frozen teacher (label propagation, or a network of the student's kind) into the
    deformable-attention student.

    Args:
        config: the full resolved run config (a DictConfig or a plain dict); uses `model`,
            `teacher`, `distill`, `optim`, `eval`.
        student: inject a student (tests); default `build_student(config.model)`.
        teacher: inject a teacher (tests); default `build_distillation_teacher(config.teacher)`.
    """

    def __init__(
        self,
        config: DictConfig | dict,
        *,
        student: DeformableStudent | None = None,
        teacher: LabelPropagationTeacher | DeformableTeacher | None = None,
    ) -> None:
        super().__init__()
        plain = (
            OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        )
        # In the checkpoint only: the W&B run logs the same config once, nested (WandbLogger(config=...)).
        self.save_hyperparameters({"config": plain}, logger=False)
        self.config = OmegaConf.create(plain)
        if student is None:
            student, self.student_init = build_student(self.config.model)
        else:
            self.student_init = "injected"
        self.student = student
        check_distill_config(self.config, max_objects=int(student.max_objects))
        self.student_ema = None
        if self.config.optim.ema:
            self.student_ema = copy.deepcopy(student).requires_grad_(False).eval()
        # Not registered (object.__setattr__): kept out of state_dict, optimizer and DDP.
        object.__setattr__(
            self,
            "_teacher",
            teacher if teacher is not None else build_distillation_teacher(self.config.teacher),
        )
        self._teacher.requires_grad_(False).eval()
        scale = int(self.config.distill.teacher_scale)
        for what, stride in (("stride", self._teacher.stride), ("logit stride", self._teacher_logit_stride)):
            if int(stride) % scale:
                raise ConfigError(
                    f"distill.teacher_scale={scale} must divide the teacher's {what} ({stride} pixels per cell)"
                )
        d = self.config.distill
        self.criterion = DistillationLoss(
            lambda_att=d.lambda_att,
            lambda_inter=d.lambda_inter,
            lambda_intra=d.lambda_intra,
            lambda_ce=d.lambda_ce,
            lambda_jaccard=d.lambda_jaccard,
            ce_hard_ratio=d.ce_hard_ratio,
            tau=d.tau,
        )
        self.val_metric = JFMetric(year=int(self.config.data.year))
        self.val_sequence_results: list[dict[str, Any]] = []
        self._clip_generator = torch.Generator()
        self._non_finite = 0  # non-finite losses in a row
        self._last_step_finite = True  # whether the batch just run gave a loss (EMA follows only then)
        self._warned_dropped_ids = False

    # ------------------------------------------------------------------------------------------ parts
    @property
    def _teacher_logit_stride(self) -> int:
        return int(getattr(self._teacher, "logit_stride", self._teacher.stride))

    @property
    def teacher(self) -> LabelPropagationTeacher | DeformableTeacher:
        """The frozen teacher, moved to this module's device on first use there."""
        device = self.device
        if next(self._teacher.parameters(), torch.empty(0)).device != device:
            self._teacher.to(device)
        return self._teacher

    @property
    def eval_student(self) -> DeformableStudent:
        """The student used for validation and saved for inference: the EMA copy when enabled."""
        return self.student_ema if self.student_ema is not None else self.student

    @staticmethod
    def batch_annotation(batch: dict[str, Any]) -> torch.Tensor | None:
        """Frame 0's annotation in a training batch, if it carries one, else None.

        `batch["reference_ids"]` (B × H × W ids of frame 0) or, for clip datasets that carry the
        masks of every frame, `batch["masks"][:, 0]` (B × T × H × W): only frame 0 is ever read; the
        labels of target frames never reach the training.
        """
        annotation = batch.get("reference_ids")
        if annotation is None and batch.get("masks") is not None:
            annotation = batch["masks"][:, 0]
        return annotation

    def reference_objects(
        self, frames: torch.Tensor, annotation: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The one-hot reference masks to give the teacher and their ids (None, None: it clusters
        pseudo-objects of frame 0).

        With `distill.ref_masks=annotation`: void (255) counts as background, as in the DAVIS
        semi-supervised rules, and ids above `model.max_objects` are dropped (warned once), so the
        teacher and the student see the same objects.

        Raises:
            ConfigError: `ref_masks=annotation` and the batch carries no first-frame annotation.
        """
        if self.config.distill.ref_masks != "annotation":
            return None, None
        if annotation is None:
            raise ConfigError(
                "distill.ref_masks=annotation, but the training clips carry no first-frame annotation "
                "(batch key 'reference_ids' or 'masks'); unlabelled videos need distill.ref_masks=pseudo"
            )
        ids = annotation.to(frames.device).long()
        ids = torch.where(ids == 255, torch.zeros_like(ids), ids)
        max_objects = int(self.student.max_objects)
        if bool((ids > max_objects).any()):
            if not self._warned_dropped_ids:
                log.warning(
                    "first-frame annotation has ids above model.max_objects=%d: those objects are ignored",
                    max_objects,
                )
                self._warned_dropped_ids = True
            ids = torch.where(ids > max_objects, torch.zeros_like(ids), ids)
        num_labels = int(ids.max().item()) + 1
        return labels_to_onehot(ids, num_labels), ids

    def forward_clip(
        self, frames: torch.Tensor, *, annotation: torch.Tensor | None = None, return_attention: bool = True
    ) -> ClipOutputs:
        """Teacher and student on one batch of clips.

        Args:
            frames: B × T × 3 × H × W in [0, 1].
            annotation: optional B × H × W ids of frame 0 (used with `distill.ref_masks=annotation`).
            return_attention: also return the student's attention maps and sampling positions.
        """
        teacher_masks, _ = self.reference_objects(frames, annotation)
        scale = int(self.config.distill.teacher_scale)
        with torch.no_grad():  # the teacher is frozen: nothing it computes carries gradients
            teacher_frames = frames
            if scale > 1:
                teacher_frames = magnify(frames.flatten(0, 1), scale).unflatten(0, frames.shape[:2])
                if teacher_masks is not None:
                    teacher_masks = magnify(teacher_masks, scale, nearest=True)
            teacher_out = self.teacher.propagate_clip(
                teacher_frames,
                teacher_masks,
                num_segments=int(self.config.distill.num_segments),
                position_weight=float(self.config.distill.position_weight),
                colour_weight=float(self.config.distill.colour_weight),
                feature_weight=float(self.config.distill.feature_weight),
                components=bool(self.config.distill.components),
                min_width=int(self.config.distill.min_width),
                min_contrast=float(self.config.distill.min_contrast),
            )
        if scale > 1:  # back to the frames' pixels (one per magnified block); a cell covers stride / scale
            ids = teacher_out["reference_ids"][:, ::scale, ::scale]
            teacher_out = {**teacher_out, "reference_ids": ids, "stride": teacher_out["stride"] // scale}
            if "logit_stride" in teacher_out:
                teacher_out["logit_stride"] = teacher_out["logit_stride"] // scale
            if "origin" in teacher_out:
                teacher_out["origin"] = tuple(float(o) / scale for o in teacher_out["origin"])
        reference_ids = teacher_out["reference_ids"].to(frames.device)
        max_objects = int(self.student.max_objects)
        reference_ids = reference_ids.clamp(max=max_objects)
        num_objects = reference_ids.flatten(1).amax(dim=1)
        ce_targets = None
        if int(self.config.distill.refine_iterations) > 0:
            reference_ids, ce_targets = self.refine_to_edges(frames, reference_ids, teacher_out, num_objects)
        reference_masks = labels_to_onehot(reference_ids, max_objects + 1)
        reconstruct = float(self.config.distill.lambda_ref) > 0
        swap_prob = float(self.config.distill.memory_swap_prob)
        corrupt = None
        if self.training and swap_prob > 0:
            corrupt = functools.partial(
                swap_objects, num_objects=num_objects, probability=swap_prob, generator=self._clip_generator
            )
        logits, aux = self.student.segment_clip(
            frames,
            reference_masks,
            num_objects=num_objects,
            return_attention=return_attention,
            generator=self._clip_generator if self.training else None,
            reconstruct_reference=reconstruct,
            corrupt_memory=corrupt,
        )
        reference_logits = None
        if reconstruct:
            reference_logits, logits, aux = logits[0], logits[1:], aux[1:]
        return ClipOutputs(
            reference_ids=reference_ids,
            num_objects=num_objects,
            student_logits=logits,
            student_aux=aux,
            teacher_logits=teacher_out["logits"],
            teacher_attention=teacher_out["attention"],
            teacher_token_shape=tuple(teacher_out["token_shape"]),
            teacher_stride=int(teacher_out["stride"]),
            reference_logits=reference_logits,
            ce_targets=ce_targets,
            teacher_logit_stride=teacher_out.get("logit_stride"),
            teacher_origin=tuple(teacher_out.get("origin", (0.0, 0.0))),
        )

    @torch.no_grad()
    def refine_to_edges(
        self,
        frames: torch.Tensor,
        reference_ids: torch.Tensor,
        teacher_out: dict[str, Any],
        num_objects: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Move the reference objects and the teacher's hard masks onto the frames' colour edges
        (`bilateral_refine`, `distill.refine_iterations` passes): the student is then asked for
        edges that are in the image, not the bilinear curves of a stride-8 grid. An object the
        filter would erase from frame 0 keeps its unrefined mask; a first-frame annotation
        (`ref_masks=annotation`) is exact already and is left alone.

        Returns:
            (reference ids B × H × W, CE targets: T − 1 tensors B × H × W, or None when
            `distill.lambda_ce` is 0: the logged CE then reads the plain argmax).
        """
        iterations = int(self.config.distill.refine_iterations)
        num_labels = int(teacher_out["logits"].shape[2])
        if self.config.distill.ref_masks == "pseudo":
            labels = max(num_labels, int(reference_ids.max()) + 1)
            one_hot = labels_to_onehot(reference_ids, labels).float()
            refined = bilateral_refine(one_hot, frames[:, 0], iterations=iterations).argmax(1)
            kept = torch.stack(
                [
                    torch.isin(reference_ids[b].unique(), refined[b].unique()).all()
                    for b in range(len(refined))
                ]
            )
            reference_ids = torch.where(kept[:, None, None], refined, reference_ids)
        if float(self.config.distill.lambda_ce) == 0.0:
            return reference_ids, None
        valid = objects_to_valid(num_objects, num_labels, frames.shape[0], device=frames.device)
        stride = int(teacher_out.get("logit_stride", teacher_out["stride"]))
        targets = []
        for t in range(1, frames.shape[1]):
            probabilities = teacher_probabilities(
                teacher_out["logits"][:, t].to(frames.device),
                tuple(frames.shape[-2:]),
                valid,
                ratio=1.0 / stride,
            )
            targets.append(bilateral_refine(probabilities, frames[:, t], iterations=iterations).argmax(1))
        return reference_ids, targets

    def clip_loss(
        self, outputs: ClipOutputs, image_size: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distillation loss of one batch, averaged over the target frames 1..T−1."""
        total = None
        parts_sum: dict[str, torch.Tensor] = {}
        num_labels = outputs.teacher_logits.shape[2]
        for index, student_logits in enumerate(outputs.student_logits):
            t = index + 1
            loss, parts = self.criterion(
                student_logits=student_logits[:, :num_labels],
                teacher_logits=outputs.teacher_logits[:, t],
                num_objects=outputs.num_objects,
                attention_pairs=self.attention_pairs(outputs, t, image_size),
                logit_ratio=1.0 / outputs.logit_stride,
                ce_target=None if outputs.ce_targets is None else outputs.ce_targets[index],
            )
            total = loss if total is None else total + loss
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value.detach()
        count = len(outputs.student_logits)
        total = total / count
        parts = {name: value / count for name, value in parts_sum.items()}
        if outputs.reference_logits is not None:
            weight = float(self.config.distill.lambda_ref)
            reference = reference_reconstruction_loss(
                outputs.reference_logits,
                outputs.reference_ids,
                num_objects=outputs.num_objects,
                hard_ratio=float(self.config.distill.ce_hard_ratio),
                jaccard_weight=float(self.config.distill.lambda_jaccard),
            )
            total = total + weight * reference
            parts["ref"] = reference.detach()
        return total, parts

    def attention_pairs(
        self, outputs: ClipOutputs, t: int, image_size: tuple[int, int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student map, teacher target) pairs of query frame t (`distill.att_branches`): the
        student's long-term read (frame 0) and short-term read (frame t − 1), each with the
        teacher's map over that same frame on the student's query grid (`teacher_frame_targets`).
        A frame the teacher's context no longer holds (`teacher.n_recent` = 0 and t ≥ 2) has no
        target and no pair."""
        aux, attention = outputs.student_aux[t - 1], outputs.teacher_attention[t]
        if aux is None or attention is None:
            return []
        branches = self.config.distill.att_branches
        reads = [("long_term", 0)] if branches in ("long", "both") else []
        reads += [("short_term", t - 1)] if branches in ("short", "both") else []
        pairs = []
        for name, frame_index in reads:
            target = teacher_frame_targets(
                attention,
                frame_index,
                image_size,
                outputs.teacher_stride,
                origin=outputs.teacher_origin,
                first=name == "long_term",
            )
            if target is not None:
                pairs.append((aux[name].attention, target))
        return pairs

    # ------------------------------------------------------------------------------------------ training
    def seed_clip_generator(self, batch_idx: int) -> None:
        """Seed the id-permutation generator from (seed, rank, step, batch index): draws differ per
        rank and step, and a resumed run draws what the uninterrupted run drew."""
        rank = self.global_rank if self._trainer is not None else 0
        entropy = [int(self.config.seed), int(rank), int(self.global_step), int(batch_idx)]
        self._clip_generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))

    def compute_loss(
        self, batch: dict[str, Any], batch_idx: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], ClipOutputs]:
        """The distillation loss of a training batch, its unweighted parts and the forward outputs."""
        frames = batch["frames"]
        self.seed_clip_generator(batch_idx)
        occluder_prob = float(self.config.distill.occluder_prob)
        if self.training and occluder_prob > 0:
            frames = paste_occluders(frames, probability=occluder_prob, generator=self._clip_generator)
        outputs = self.forward_clip(frames, annotation=self.batch_annotation(batch), return_attention=True)
        loss, parts = self.clip_loss(outputs, (frames.shape[-2], frames.shape[-1]))
        return loss, parts, outputs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # A skipped batch must leave no trace: its forward already moved the BatchNorm statistics.
        buffers = [buffer.clone() for buffer in self.student.buffers()]
        loss, parts, outputs = self.compute_loss(batch, batch_idx)
        finite = bool(torch.isfinite(loss).item())
        if self._trainer is not None:
            # Every DDP rank must skip together (a rank skipping backward alone would hang the others).
            finite = bool(self.trainer.strategy.reduce_boolean_decision(finite, all=True))
        self._last_step_finite = finite
        if not finite:
            with torch.no_grad():
                for buffer, saved in zip(self.student.buffers(), buffers):
                    buffer.copy_(saved)
            self._non_finite += 1
            limit = int(self.config.optim.max_non_finite)
            log.warning(
                "non-finite loss at step %d: batch skipped (%d in a row, stopping at optim.max_non_finite=%d)",
                self.global_step,
                self._non_finite,
                limit,
            )
            if self._non_finite >= limit:
                raise RuntimeError(
                    f"training stopped at step {self.global_step}: {self._non_finite} non-finite losses in a "
                    f"row (optim.max_non_finite={limit}); lower optim.lr or check the data"
                )
            return None
        self._non_finite = 0
        batch_size = batch["frames"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/objects", outputs.num_objects.float().mean(), batch_size=batch_size)
        # The share of clips the inter-object relation leaves out (fewer than two objects).
        valid = objects_to_valid(outputs.num_objects, int(outputs.num_objects.max()) + 1, batch_size)
        self.log("train/inter_skipped", inter_skipped_share(valid), batch_size=batch_size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each real optimizer step here, not in `on_train_batch_end`: callbacks (the
        # checkpoint) run before the module's batch-end hook, so a checkpoint would miss the step's
        # average; and with gradient accumulation the batch-end hook runs for every micro-batch.
        step = self.global_step  # 0-based index of this optimizer step (incremented after it)
        super().optimizer_step(*args, **kwargs)
        if self._last_step_finite:
            self.update_ema(step)

    def update_ema(self, step: int) -> None:
        """ema ← d·ema + (1 − d)·student with d = `ema_decay_at(step, optim.ema_decay)`; buffers
        (BatchNorm statistics) are copied."""
        if self.student_ema is None:
            return
        decay = ema_decay_at(step, float(self.config.optim.ema_decay))
        with torch.no_grad():
            for ema_param, param in zip(self.student_ema.parameters(), self.student.parameters()):
                ema_param.lerp_(param.detach(), 1.0 - decay)
            for ema_buffer, buffer in zip(self.student_ema.buffers(), self.student.buffers()):
                ema_buffer.copy_(buffer)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.config.optim
        encoder_params = list(self.student.encoder.parameters())
        encoder_ids = {id(p) for p in encoder_params}
        other_params = [p for p in self.student.parameters() if id(p) not in encoder_ids]
        groups = [
            {
                "params": [p for p in encoder_params if p.requires_grad],
                "lr": optim.lr * optim.encoder_lr_ratio,
            },
            {"params": [p for p in other_params if p.requires_grad], "lr": optim.lr},
        ]
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_poly(
                step,
                warmup_steps=int(optim.warmup_steps),
                total_steps=total_steps,
                power=float(optim.poly_power),
                min_ratio=float(optim.min_lr_ratio),
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_metric.reset()
        self.val_sequence_results = []

    def is_repeated_sequence(self, batch_idx: int) -> bool:
        """Whether validation item `batch_idx` of this rank is a repeat that Lightning's
        `DistributedSampler` appended so that every rank gets as many items (N sequences on W ranks:
        padded to ⌈N/W⌉·W by repeating the first ones). Scoring it would count a sequence twice in the
        synced J&F. With shuffle off, item k of rank r is position r + k·W of the padded list."""
        from torch.utils.data import DistributedSampler

        if self._trainer is None or self.trainer.world_size == 1:
            return False
        loaders = self.trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, DistributedSampler) or sampler.shuffle or sampler.drop_last:
            return False
        return sampler.rank + batch_idx * sampler.num_replicas >= len(sampler.dataset)

    def validation_step(self, sequence: Any, batch_idx: int) -> None:
        from dvos.inference.engine import StudentSegmenter, segment_sequence

        if not sequence.has_full_gt or self.is_repeated_sequence(batch_idx):
            return
        segmenter = StudentSegmenter(
            self.eval_student,
            device=self.device,
            max_size=self.config.eval.val_max_size,
            min_size=self.config.eval.val_min_size,
            max_long_term=long_term_bound(self.config.eval),
            **reading_options(self.config.eval, validation=True),
        )
        predictions: list[np.ndarray] = []
        stats = segment_sequence(segmenter, sequence, on_frame=lambda index, mask: predictions.append(mask))
        ground_truth = np.stack([sequence.load_mask(index) for index in range(len(sequence))])
        prediction = np.stack(predictions)
        objects = evaluate_arrays(
            ground_truth,
            prediction,
            sequence=sequence.name,
            year=self.val_metric.year,
            frame_ids=sequence.frame_names,
        )
        self.val_metric.update(objects=objects)
        j = float(np.mean([o["J-Mean"] for o in objects.values()]))
        f = float(np.mean([o["F-Mean"] for o in objects.values()]))
        picks = sorted({len(sequence) // 3, 2 * len(sequence) // 3, len(sequence) - 2})
        self.val_sequence_results.append(
            {
                "sequence": sequence.name,
                "J": j,
                "F": f,
                "J&F": (j + f) / 2,
                "num_objects": len(objects),
                "fps": stats.fps,
                "samples": [
                    {
                        "frame_index": t,
                        "image": sequence.load_frame(t),
                        "prediction": prediction[t],
                        "ground_truth": ground_truth[t],
                    }
                    for t in picks
                    if 0 < t < len(sequence)
                ],
            }
        )

    def on_validation_epoch_end(self) -> None:
        scores = self.val_metric.compute()  # synced across ranks by torchmetrics
        if scores is None:
            return
        # Already the same on every rank (torchmetrics gathered all objects); sync_dist averages equal
        # values, a no-op that keeps Lightning from warning about epoch-level logs under DDP.
        for key, name in (("J&F", "val/J&F"), ("J", "val/J"), ("F", "val/F")):
            self.log(name, scores[key].float(), sync_dist=True, prog_bar=key == "J&F")

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        teacher_path = teacher_file(self.config.teacher)
        checkpoint["dvos_config"] = OmegaConf.to_container(self.config, resolve=True)
        checkpoint["dvos_teacher"] = {"checkpoint": teacher_path, "sha256": file_sha256(teacher_path)}
        checkpoint["dvos_student_init"] = self.student_init

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = (checkpoint.get("dvos_teacher") or {}).get("sha256")
        current = file_sha256(teacher_file(self.config.teacher))
        if recorded and current and recorded != current:
            log.warning(
                "the teacher checkpoint %s changed since this run was saved (sha256 %s… → %s…)",
                teacher_file(self.config.teacher),
                recorded[:12],
                current[:12],
            )

    def teacher_logits_at(self, outputs: ClipOutputs, t: int, size: tuple[int, int]) -> torch.Tensor:
        """The teacher's logits of frame t upsampled to `size` (for pictures and tests)."""
        probabilities = torch.softmax(outputs.teacher_logits[:, t].float(), dim=1)
        return torch.log(
            F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False).clamp_min(1e-6)
        )


def check_training_crops(data: DictConfig) -> None:
    """One-line `ConfigError`s for `data.crop_size` (H, W) and `data.scale` (share of a frame's area)."""
    crop = data.crop_size
    if crop is None or len(crop) != 2 or any(int(side) < MIN_MODEL_SIZE for side in crop):
        raise ConfigError(
            f"data.crop_size must be [height, width] of at least {MIN_MODEL_SIZE} pixels each, got {crop}"
        )
    scale = data.scale
    if scale is None or len(scale) != 2 or not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0:
        raise ConfigError(
            f"data.scale must be [low, high] with 0 < low <= high <= 1 of a frame's area, got {scale}"
        )


def check_model_configs(config: DictConfig) -> None:
    """One-line `ConfigError`s for the student's network (`model.*`) and the teacher's
    (`teacher.name`, `teacher.deformable.*`)."""
    if config.get("model") is not None:
        problem = model_problem(model_config(config.model))
        if problem is not None:
            raise ConfigError(problem)
    teacher = config.get("teacher") or {}
    name = teacher.get("name", "label_propagation")
    if name not in TEACHERS:
        raise ConfigError(f"teacher.name must be one of {', '.join(TEACHERS)}, got '{name}'")
    if name == "deformable":
        deformable = teacher.get("deformable") or {}
        problem = model_problem(model_config(deformable.get("model") or {}), "teacher.deformable.model")
        if problem is not None:
            raise ConfigError(problem)
        steps = deformable.get("max_steps")
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"teacher.deformable.max_steps must be ≥ 1 (or null), got {steps}")


def check_distill_config(config: DictConfig, *, max_objects: int) -> None:
    """One-line `ConfigError`s for distillation settings that cannot work."""
    d, optim = config.distill, config.optim
    if d.ref_masks not in REF_MASKS:
        raise ConfigError(f"distill.ref_masks must be one of {', '.join(REF_MASKS)}, got '{d.ref_masks}'")
    if d.att_branches not in ATT_BRANCHES:
        raise ConfigError(
            f"distill.att_branches must be one of {', '.join(ATT_BRANCHES)}, got '{d.att_branches}'"
        )
    max_labels = int(max_objects) + 1
    if not 2 <= int(d.num_segments) <= max_labels:
        raise ConfigError(
            f"distill.num_segments must be in [2, model.max_objects + 1 = {max_labels}], got {d.num_segments}"
        )
    if not 0.0 < float(d.ce_hard_ratio) <= 1.0:
        raise ConfigError(f"distill.ce_hard_ratio must be in (0, 1], got {d.ce_hard_ratio}")
    if not 0.0 <= float(d.memory_swap_prob) <= 1.0:
        raise ConfigError(f"distill.memory_swap_prob must be in [0, 1], got {d.memory_swap_prob}")
    if not 0.0 <= float(d.occluder_prob) <= 1.0:
        raise ConfigError(f"distill.occluder_prob must be in [0, 1], got {d.occluder_prob}")
    if int(d.min_width) < 1:
        raise ConfigError(f"distill.min_width must be ≥ 1 (1: any piece), got {d.min_width}")
    # The two filters act on connected pieces: without them they would be silently ignored.
    if not d.components and (int(d.min_width) > 1 or float(d.min_contrast) > 0):
        key = "distill.min_width" if int(d.min_width) > 1 else "distill.min_contrast"
        raise ConfigError(f"{key} filters connected pieces: it needs distill.components=true")
    for key in (
        "lambda_ref",
        "lambda_jaccard",
        "colour_weight",
        "feature_weight",
        "position_weight",
        "refine_iterations",
        "min_contrast",
    ):
        if float(d[key]) < 0:
            raise ConfigError(f"distill.{key} must be ≥ 0, got {d[key]}")
    final = config.eval.get("final_checkpoint", "best")
    if final not in FINAL_CHECKPOINTS:
        raise ConfigError(
            f"eval.final_checkpoint must be one of {', '.join(FINAL_CHECKPOINTS)}, got '{final}'"
        )
    for key in ("max_size", "min_size", "val_max_size", "val_min_size"):  # else refused only when first used
        value = config.eval[key]
        if value is not None and int(value) < MIN_MODEL_SIZE:
            raise ConfigError(f"eval.{key} must be at least {MIN_MODEL_SIZE} pixels (or null), got {value}")
    slots = (config.get("model") or {}).get("permute_slots")
    if slots is not None and int(slots) < 1:
        raise ConfigError(f"model.permute_slots must be ≥ 1 (null: all model.max_objects slots), got {slots}")
    topk = (config.get("model") or {}).get("attention_topk", 0)
    if int(topk) < 0:
        raise ConfigError(f"model.attention_topk must be ≥ 0 (0: all points), got {topk}")
    check_model_configs(config)
    # eval.attention_topk and eval.refine_*: one-line errors now, not at the first validation
    reading_options(config.eval)
    reading_options(config.eval, validation=True)
    long_term_bound(config.eval)
    check_training_crops(config.data)
    reference_gap = (config.get("data") or {}).get("reference_gap")
    if reference_gap is not None and int(reference_gap) < 1:
        raise ConfigError(f"data.reference_gap must be ≥ 1 (or null), got {reference_gap}")
    if int(d.teacher_scale) < 1:
        raise ConfigError(f"distill.teacher_scale must be ≥ 1, got {d.teacher_scale}")
    if int(optim.max_non_finite) < 1:
        raise ConfigError(f"optim.max_non_finite must be >= 1, got {optim.max_non_finite}")
    if optim.ema and not 0.0 <= float(optim.ema_decay) < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {optim.ema_decay}")
