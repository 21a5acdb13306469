"""The teacher of the student's own kind (`teacher.name=deformable`; docs/METHOD.md, "Teacher"): a
frozen `DeformableStudent`, larger than the student (e.g. DeAOT-L's three layers), itself distilled
without labels from the label-propagation teacher, so that the distillation compares deformable
attention with deformable attention.

It offers the distillation what `LabelPropagationTeacher` offers (`propagate_clip`, with the same
keys), computed by the network itself:

- pseudo-objects: `cluster_reference` of its own reference-frame embedding, resampled onto an
  image-aligned stride-8 grid (`CLUSTER_STRIDE`, the label-propagation ResNet's grid: with colours
  and no feature weight both teachers cut the same pseudo-objects);
- propagation: the network segments the clip from frame 0's masks, feeding back its own soft
  predictions, as the engine does (`DeformableStudent.step`, soft memory);
- attention: per query frame, its last layer's long-term read (over frame 0) and short-term read
  (over frame t − 1), each as a distribution over that frame's memory cells (`token_map`: a
  sampled point's weight goes to the four cells its bilinear read mixes, heads averaged), in
  `TeacherAttention`'s per-frame form (rows sum to 1);
- logits: log of its probabilities averaged over image-aligned stride-4 cells (`LOGIT_STRIDE`), the
  resolution of its decoder.

Its grids start where its padded frame starts (`pad_to_stride`): `propagate_clip` returns that
origin (`origin`, in pixels of the frames it saw) so that the student's rows are matched with the
teacher rows over the same pixels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.deformable import DeformableAttentionAux, pixel_to_normalized
from dvos.models.grid import cell_means
from dvos.models.pseudo_objects import cluster_reference
from dvos.models.student import FEATURE_STRIDE, DeformableStudent, FrameFeatures, labels_to_onehot
from dvos.models.teacher import TeacherAttention, labels_to_logits

CLUSTER_STRIDE = 8  # pixels per cell of the pseudo-object clustering (the label-propagation teacher's)
LOGIT_STRIDE = 4  # pixels per cell of the logits it returns (its decoder's resolution)


def aligned_features(features: FrameFeatures, image_size: tuple[int, int], stride: int) -> torch.Tensor:
    """The embedding (B × d × h × w over the padded frame) resampled bilinearly at the centres of
    an image-aligned grid of `stride`-pixel cells: B × d × ⌈H/s⌉ × ⌈W/s⌉ (cell (i, j) covers image
    pixels [s·i, s·i + s) × [s·j, s·j + s), as the label-propagation teacher's grid)."""
    embedding = features.embedding
    left, _, top, _ = features.pad
    rows, cols = -(-int(image_size[0]) // stride), -(-int(image_size[1]) // stride)
    device = embedding.device
    # cell centres in padded-frame pixels, then in embedding cells (cell k's centre at 16k + 7.5)
    y = (
        torch.arange(rows, device=device) * stride + (stride - 1) / 2 + top - (FEATURE_STRIDE - 1) / 2
    ) / FEATURE_STRIDE
    x = (
        torch.arange(cols, device=device) * stride + (stride - 1) / 2 + left - (FEATURE_STRIDE - 1) / 2
    ) / FEATURE_STRIDE
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    points = pixel_to_normalized(torch.stack((grid_x, grid_y), -1), *embedding.shape[-2:])
    grid = points[None].expand(embedding.shape[0], -1, -1, -1).to(embedding.dtype)
    return F.grid_sample(embedding, grid, mode="bilinear", padding_mode="border", align_corners=False)


def token_map(aux: DeformableAttentionAux, token_shape: tuple[int, int]) -> torch.Tensor:
    """A read's attention as a distribution over the memory frame's cells.

    A sampled point at (x, y) reads the four cells around it with bilinear weights (cells outside
    the map read zeros), so its attention weight goes to those cells in those shares; the heads'
    maps are averaged. Rows are renormalised to sum to 1 (points partly outside the map lose the
    outside share); a row with nothing inside stays 0.

    Args:
        aux: one read's `DeformableAttentionAux` (attention B × heads × N × M, positions_px
            B × G × M × 2, one memory frame).
        token_shape: (h, w) of the memory map.

    Returns:
        B × N × h·w float32.
    """
    attention, positions = aux.attention.float(), aux.positions_px.float()
    batch, heads, queries, points = attention.shape
    groups = positions.shape[1]
    if positions.shape[2] != points:
        raise ValueError(f"{points} attention columns for {positions.shape[2]} points: one memory frame only")
    height, width = token_shape
    per_group = attention.reshape(batch, groups, heads // groups, queries, points).mean(2)
    out = attention.new_zeros(batch, queries, height * width)
    x0, y0 = positions[..., 0].floor(), positions[..., 1].floor()
    fx, fy = positions[..., 0] - x0, positions[..., 1] - y0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        share = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        share = share * ((cx >= 0) & (cx < width) & (cy >= 0) & (cy < height))
        cell = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long()  # B × G × M
        for g in range(groups):
            index = cell[:, g, None, :].expand(-1, queries, -1)
            out.scatter_add_(2, index, per_group[:, g] * share[:, g, None, :] / groups)
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-12), out)


class DeformableTeacher(nn.Module):
    """A frozen `DeformableStudent` as the distillation's teacher (see the module docstring).

    Always in eval mode with `requires_grad=False`; every method runs under `torch.no_grad()`.

    Args:
        network: the trained network (its weights are kept as they are).

    Attributes:
        stride: pixels per cell of its attention grid (16, the propagation map's).
        logit_stride: pixels per cell of its logits (`LOGIT_STRIDE`).
    """

    def __init__(self, network: DeformableStudent) -> None:
        super().__init__()
        self.network = network
        self.stride = FEATURE_STRIDE
        self.logit_stride = LOGIT_STRIDE
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> DeformableTeacher:
        """The teacher is frozen: stays in eval mode whatever `mode` is."""
        return super().train(False)

    @torch.no_grad()
    def cluster_reference(
        self, features: FrameFeatures, image: torch.Tensor, k: int, **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-objects of the reference frame: `pseudo_objects.cluster_reference` of its embedding
        on an image-aligned `CLUSTER_STRIDE` grid (`aligned_features`); image: B × 3 × H × W in [0, 1]
        → (ids B × ⌈H/8⌉ × ⌈W/8⌉, ids B × H × W)."""
        size = (int(image.shape[-2]), int(image.shape[-1]))
        grid = aligned_features(features, size, CLUSTER_STRIDE)
        return cluster_reference(grid, k, stride=CLUSTER_STRIDE, image_size=size, image=image, **options)

    def attention_record(
        self, aux: dict[str, DeformableAttentionAux], frame: int, token_shape: tuple[int, int]
    ) -> TeacherAttention:
        """Frame `frame`'s reads as a `TeacherAttention`: context slot 0 the long-term read (frame 0),
        slot 1 the short-term read (frame − 1), each `token_map` stored whole (k = h·w per row); the
        joint map is their average."""
        maps = [token_map(aux[name], token_shape) for name in ("long_term", "short_term")]
        batch, queries, tokens = maps[0].shape
        cells = torch.arange(tokens, device=maps[0].device)
        frame_indices = cells.expand(batch, queries, 2, tokens)
        joint = torch.cat((cells, cells + tokens)).expand(batch, queries, 2 * tokens)
        return TeacherAttention(
            indices=joint,
            weights=torch.cat(maps, dim=-1) / 2,
            token_shape=token_shape,
            context_frames=(0, frame - 1),
            query_frame=frame,
            frame_indices=frame_indices,
            frame_weights=torch.stack(maps, dim=2),
        )

    @torch.no_grad()
    def propagate_clip(
        self,
        frames: torch.Tensor,
        reference_masks: torch.Tensor | None = None,
        *,
        num_segments: int = 4,
        **cluster_options: Any,
    ) -> dict[str, Any]:
        """Propagate the reference masks through a clip (as `LabelPropagationTeacher.propagate_clip`).

        Args:
            frames: B × T × 3 × H × W in [0, 1]; frame 0 is the reference.
            reference_masks: B × L × H × W one-hot of frame 0, or None for pseudo-objects
                (`cluster_reference` into `num_segments` segments, L = num_segments).
            cluster_options: `pseudo_objects.cluster_reference`'s keyword options (position_weight,
                colour_weight, feature_weight, components, min_width, min_contrast).

        Returns:
            dict with `logits` B × T × L × ⌈H/4⌉ × ⌈W/4⌉ (frame 0: its reference labels),
            `probabilities` (the same, channels summing to 1), `attention` (T entries, None for
            frame 0, then `attention_record`), `reference_ids` B × H × W int64, `token_shape` (h, w)
            of the attention grid, `stride` 16, `logit_stride` 4, `origin` (y, x): the image pixel
            where the attention grid starts (minus the padding above and to the left).
        """
        network = self.network
        size = (int(frames.shape[-2]), int(frames.shape[-1]))
        reference = network.encode_frame(frames[:, 0])
        if reference_masks is None:
            _, reference_ids = self.cluster_reference(
                reference, frames[:, 0], num_segments, **cluster_options
            )
            num_labels = int(num_segments)
        else:
            num_labels = (
                int(reference_masks.shape[1]) if reference_masks.ndim == 4 else int(reference_masks.max()) + 1
            )
            reference_ids = reference_masks.argmax(1) if reference_masks.ndim == 4 else reference_masks.long()
        if num_labels - 1 > network.max_objects:
            raise ValueError(
                f"{num_labels - 1} reference objects; the teacher segments at most {network.max_objects}"
            )
        masks = labels_to_onehot(reference_ids.to(frames.device), network.max_objects + 1)
        memory = network.initialize_memory(reference, masks)
        logit_grid = (-(-size[0] // LOGIT_STRIDE), -(-size[1] // LOGIT_STRIDE))
        probabilities = [cell_means(masks[:, :num_labels], logit_grid, LOGIT_STRIDE)]
        token_shape = (int(reference.embedding.shape[-2]), int(reference.embedding.shape[-1]))
        attention: list[TeacherAttention | None] = [None]
        for t in range(1, frames.shape[1]):
            output = network.step(
                frames[:, t], memory, num_objects=num_labels - 1, return_attention=True, soft_memory=True
            )
            memory = output.memory
            frame_probabilities = torch.softmax(output.logits[:, :num_labels].float(), dim=1)
            probabilities.append(cell_means(frame_probabilities, logit_grid, LOGIT_STRIDE))
            attention.append(self.attention_record(output.aux, t, token_shape))
        stacked = torch.stack(probabilities, 1)
        left, _, top, _ = reference.pad
        return {
            "logits": labels_to_logits(stacked),
            "probabilities": stacked,
            "attention": attention,
            "reference_ids": reference_ids,
            "token_shape": token_shape,
            "stride": self.stride,
            "logit_stride": self.logit_stride,
            "origin": (-float(top), -float(left)),
        }
