"""The frozen label-propagation teacher (docs/METHOD.md, "Teacher"): DINO's and CRW's video label propagation.

A frozen encoder (a `ResNetEncoder` of stride 8 trained by `dvos pretrain`, a random one, or a DINO
ViT) maps every frame to a feature map; features are L2-normalised per location. The labels of a
query frame are read from a bounded *context*: the reference (first) frame and the `n_recent` most
recent frames, each with SOFT labels, `L = K + 1` per-object probability maps at feature resolution
(the reference frame's come from its mask, averaged over each feature cell; later ones are the
teacher's own soft predictions).

For a query cell q and a context cell c of context frame m:

    a(q, c) = ⟨f_q, f_c⟩ / temperature                       (float32, also under autocast)
    a(q, c) = −∞ unless |y_q − y_c| ≤ radius and |x_q − x_c| ≤ radius     (square window, in cells)
    keep the `topk` largest a(q, ·) over ALL context cells of all frames, softmax over those k
    label(q) = Σ_k weight_k · label(c_k)

The window is square (Chebyshev distance, as DINO's neighbourhood mask); `radius=None` means no
window. Cells outside it get −∞ (weight exactly 0), so they are never picked while k cells of
the window are available.

Chunking and memory: query cells are processed in square tiles of `chunk_size` × `chunk_size` cells
(chunks of rows of the affinity matrix); a tile only compares against the context cells inside its
window, (chunk_size + 2·radius)² cells per context frame. Peak memory of one tile's affinity, in
bytes: 4 · B · chunk_size² · M · (chunk_size + 2·radius)², M = context frames (≤ 1 + n_recent).
Defaults (chunk 16, radius 12, M = 8): 4 · 256 · 8 · 1600 = 13 MB per batch element (plus about
the same for the gathered keys); a 480 × 854 frame (60 × 107 cells) never builds its
6 420 × 51 360 full affinity (1.3 GB). `chunk_size=None` processes the whole map at once. Each call
also holds one channels-last copy of the context's features and labels (as large as the context:
53 MB for the 480p video below), so that a tile gathers its window with a single copy.

Attention output (`TeacherAttention`): the sparse top-k form, `indices` and `weights`, each
B × N_q × k (N_q = h·w query tokens; context token index = m·h·w + y·w + x, slot m = 0 the
reference frame, the last slot the previous frame), 12·k bytes per query token. `dense()` gives
B × N_q × (M·h·w) with zeros outside the top-k (4·B·N_q·M·h·w bytes: 84 MB for a 240 × 432 frame
and M = 8); `frame_columns(m)` gives the B × N_q × h·w block of slot m of that joint map (rows
sum to ≤ 1: a query's k cells may all lie in other frames).

Per-frame maps (with `frame_maps=True`, what the distillation's CKA compares): for each context
frame m alone, the same window, top-k and softmax as if m were the only context frame,

    A_m(q, ·) = softmax over the topk largest a(q, c), c in frame m (within the window)

so every row is a distribution over frame m's tokens, as each of the student's memory reads is.
Stored sparse (`frame_indices`, `frame_weights`: B × N_q × M × k, 12·k·M bytes per query token);
`frame_map(m)` gives B × N_q × h·w, rows summing to 1.

Logits: log(max(p, 1e-6)) of the propagated probabilities p, B × L × h × w; `upsample_logits`
brings them to image size by bilinear interpolation of the probabilities (feature cell (i, j)
stands for pixels [s·i, s·i + s) × [s·j, s·j + s), s = the encoder's stride).

Two ways to run it: a streaming API with bounded memory for the inference engine (`init`, then
`step` per frame; the context keeps at most 1 + n_recent frames) and a clip API for distillation
(`propagate_clip`), which does not touch the streaming state. The streaming context holds
(1 + n_recent) × B × (C + L) × h × w floats: 53 MB for one 480 × 854 video with the default
ResNetEncoder (C = 256, 60 × 107 cells, n_recent = 7), whatever the video's length.

Objects that appear later (YouTube-VOS): `add_objects(frame_index, masks)` after that frame's `step`
merges the given masks into that frame's soft labels (see the method); later frames propagate them.

Pseudo-objects without labels: `cluster_reference` (dvos/models/pseudo_objects.py). Built from a
config by `dvos.models.build.build_teacher`; its encoder read from a file by
`dvos.models.teacher_checkpoint`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.grid import cell_means, upsample_probabilities
from dvos.models.pseudo_objects import cluster_reference
from dvos.utils.errors import ConfigError

PROBABILITY_FLOOR = 1e-6  # logits = log(max(p, floor)), so they lie in [log 1e-6 ≈ −13.8, 0]


# --------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherAttention:
    """The teacher's attention of one query frame over its context, in sparse top-k form.

    Attributes:
        indices: B × N_q × k int64 context token of each kept entry, m·h·w + y·w + x.
        weights: B × N_q × k float32 softmax weights; each row sums to 1 (entries that point
            outside the window, when fewer than k cells were available, have weight 0).
        token_shape: (h, w), the feature grid of the query frame and of every context frame.
        context_frames: frame index of each context slot m; slot 0 is the reference frame, the
            last slot the most recent (previous) frame.
        query_frame: frame index of the query.
        frame_indices: B × N_q × M × k int64, frame m's own top-k tokens (y·w + x in that frame),
            or None when the per-frame maps were not computed (`read_context(frame_maps=False)`).
        frame_weights: B × N_q × M × k float32, their softmax weights; each (query, frame) row
            sums to 1. None with `frame_indices`.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    token_shape: tuple[int, int]
    context_frames: tuple[int, ...]
    query_frame: int
    frame_indices: torch.Tensor | None = None
    frame_weights: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.token_shape[0] * self.token_shape[1]

    @property
    def num_query_tokens(self) -> int:
        return self.indices.shape[1]

    @property
    def num_context_tokens(self) -> int:
        return len(self.context_frames) * self.tokens_per_frame

    def dense(self) -> torch.Tensor:
        """B × N_q × N_ctx attention, N_ctx = M·h·w, zero outside the top-k (rows sum to 1)."""
        batch, queries, _ = self.indices.shape
        out = self.weights.new_zeros(batch, queries, self.num_context_tokens)
        return out.scatter_add_(2, self.indices, self.weights)

    def frame_columns(self, slot: int) -> torch.Tensor:
        """B × N_q × h·w: the columns of context slot `slot` (0 = reference, −1 = previous)."""
        slot = range(len(self.context_frames))[slot]
        start, size = slot * self.tokens_per_frame, self.tokens_per_frame
        inside = (self.indices >= start) & (self.indices < start + size)
        local = (self.indices - start).clamp_(0, size - 1)
        batch, queries, _ = self.indices.shape
        out = self.weights.new_zeros(batch, queries, size)
        return out.scatter_add_(2, local, self.weights * inside)

    def reference_columns(self) -> torch.Tensor:
        """B × N_q × h·w block of the joint map on the reference frame's tokens (rows sum to ≤ 1)."""
        return self.frame_columns(0)

    def previous_columns(self) -> torch.Tensor:
        """B × N_q × h·w block of the joint map on the most recent context frame (rows sum to ≤ 1)."""
        return self.frame_columns(-1)

    def slot_of(self, frame_index: int, *, first: bool = False) -> int | None:
        """The context slot holding frame `frame_index` (the last such slot, or the first with
        `first`: a deformable teacher's long-term and short-term reads both hold frame 0 for query
        frame 1), or None when that frame is not in the context."""
        slots = [m for m, frame in enumerate(self.context_frames) if frame == frame_index]
        if not slots:
            return None
        return slots[0] if first else slots[-1]

    def frame_map(self, slot: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """B × N_q × h·w: the attention over context slot `slot` alone (its own top-k and softmax,
        see the module docstring); every row sums to 1. `rows`: only these query tokens (a 1-D
        int64 tensor R, giving B × R × h·w)."""
        if self.frame_indices is None or self.frame_weights is None:
            raise ValueError("this attention has no per-frame maps: read the context with frame_maps=True")
        slot = range(len(self.context_frames))[slot]
        indices, weights = self.frame_indices[:, :, slot], self.frame_weights[:, :, slot]
        if rows is not None:
            indices, weights = indices[:, rows], weights[:, rows]
        out = weights.new_zeros(indices.shape[0], indices.shape[1], self.tokens_per_frame)
        return out.scatter_add_(2, indices, weights)


# --------------------------------------------------------------------------------------------
# Propagation, as functions
# --------------------------------------------------------------------------------------------


def propagate_labels(
    query_features: torch.Tensor,
    context_features: Sequence[torch.Tensor],
    context_labels: Sequence[torch.Tensor],
    *,
    topk: int,
    radius: int | None,
    temperature: float,
    chunk_size: int | None = None,
    frame_maps: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Top-k, windowed, softmax label propagation from context frames to a query frame.

    Args:
        query_features: B × C × h × w, L2-normalised per location.
        context_features: M tensors B × C × h × w, L2-normalised (slot order defines indices).
        context_labels: M tensors B × L × h × w, soft labels of the context frames.
        topk: entries kept per query over all M·h·w context tokens.
        radius: window half-size in cells (|dy|, |dx| ≤ radius); None = no window.
        temperature: affinities are dot products / temperature.
        chunk_size: side of the square query tiles (cells); None = one tile.
        frame_maps: also return each context frame's own top-k attention (module docstring).

    Returns:
        labels B × L × h × w (float32, convex combinations of context labels),
        indices B × h·w × k (int64, context token m·h·w + y·w + x),
        weights B × h·w × k (float32, rows sum to 1); k = min(topk, M·h·w);
        with `frame_maps`, also frame_indices B × h·w × M × k_f (int64, token y·w + x of frame m)
        and frame_weights B × h·w × M × k_f (float32, each frame's row sums to 1), k_f = min(topk, h·w).
    """
    batch, channels, height, width = query_features.shape
    slots, num_labels = len(context_features), context_labels[0].shape[1]
    for features, labels in zip(context_features, context_labels, strict=True):
        if features.shape != query_features.shape or labels.shape[-2:] != (height, width):
            raise ValueError(
                f"context {tuple(features.shape)} / {tuple(labels.shape)} does not match query {tuple(query_features.shape)}"
            )
    tokens = height * width
    k = min(int(topk), slots * tokens)
    tile = max(height, width) if chunk_size is None else int(chunk_size)
    reach = max(height, width) if radius is None else int(radius)
    device = query_features.device

    out_labels = query_features.new_zeros(batch, height, width, num_labels, dtype=torch.float32)
    out_indices = torch.zeros(batch, height, width, k, dtype=torch.long, device=device)
    out_weights = torch.zeros(batch, height, width, k, dtype=torch.float32, device=device)
    k_frame = min(int(topk), tokens)
    if frame_maps:
        frame_indices = torch.zeros(batch, height, width, slots, k_frame, dtype=torch.long, device=device)
        frame_weights = torch.zeros(batch, height, width, slots, k_frame, dtype=torch.float32, device=device)
    with torch.autocast(device_type=device.type, enabled=False):
        # Channels-last copies made once (B × h × w × C, B × M × h × w × C, B × M × h × w × L): each
        # tile then gathers its window's rows with one copy instead of a stack and a permute.
        all_queries = query_features.float().permute(0, 2, 3, 1).contiguous()
        all_keys = torch.stack(context_features, 1).float().permute(0, 1, 3, 4, 2).contiguous()
        all_labels = torch.stack(context_labels, 1).float().permute(0, 1, 3, 4, 2).contiguous()
        for y0 in range(0, height, tile):
            y1 = min(height, y0 + tile)
            wy0, wy1 = max(0, y0 - reach), min(height, y1 + reach)
            for x0 in range(0, width, tile):
                x1 = min(width, x0 + tile)
                wx0, wx1 = max(0, x0 - reach), min(width, x1 + reach)
                rows, cols, win_rows, win_cols = y1 - y0, x1 - x0, wy1 - wy0, wx1 - wx0
                queries, window = rows * cols, win_rows * win_cols

                query = all_queries[:, y0:y1, x0:x1].reshape(batch, queries, channels)
                query = query / temperature  # scaling the n queries is cheaper than the n × M·window affinity
                keys = all_keys[:, :, wy0:wy1, wx0:wx1].reshape(batch, slots * window, channels)
                affinity = torch.bmm(query, keys.transpose(1, 2))  # B × n × M·window
                if radius is not None:
                    near_y = (
                        torch.arange(y0, y1, device=device)[:, None] - torch.arange(wy0, wy1, device=device)
                    ).abs()
                    near_x = (
                        torch.arange(x0, x1, device=device)[:, None] - torch.arange(wx0, wx1, device=device)
                    ).abs()
                    outside = (near_y[:, None, :, None] > reach) | (near_x[None, :, None, :] > reach)
                    affinity.view(batch, queries, slots, window).masked_fill_(
                        outside.reshape(1, queries, 1, window), float("-inf")
                    )
                kept = min(k, slots * window)
                values, local = affinity.topk(kept, dim=-1)
                weights = torch.softmax(values, dim=-1)  # −∞ entries (tiny maps only) get weight 0

                labels = all_labels[:, :, wy0:wy1, wx0:wx1].reshape(batch, slots * window, num_labels)
                picked = torch.gather(
                    labels, 1, local.reshape(batch, queries * kept, 1).expand(-1, -1, num_labels)
                )
                propagated = (weights.unsqueeze(-1) * picked.view(batch, queries, kept, num_labels)).sum(2)

                slot, cell = local // window, local % window
                token = slot * tokens + (wy0 + cell // win_cols) * width + (wx0 + cell % win_cols)
                out_labels[:, y0:y1, x0:x1] = propagated.view(batch, rows, cols, num_labels)
                out_indices[:, y0:y1, x0:x1, :kept] = token.view(batch, rows, cols, kept)
                out_weights[:, y0:y1, x0:x1, :kept] = weights.view(batch, rows, cols, kept)
                if frame_maps:  # each frame alone: its own top-k and softmax over the same window
                    kept_frame = min(k_frame, window)
                    values, cell = affinity.view(batch, queries, slots, window).topk(kept_frame, dim=-1)
                    token = (wy0 + cell // win_cols) * width + (wx0 + cell % win_cols)
                    shape = (batch, rows, cols, slots, kept_frame)
                    frame_indices[:, y0:y1, x0:x1, :, :kept_frame] = token.view(shape)
                    frame_weights[:, y0:y1, x0:x1, :, :kept_frame] = torch.softmax(values, -1).view(shape)
    labels_out = out_labels.permute(0, 3, 1, 2).contiguous()
    attention = (out_indices.view(batch, tokens, k), out_weights.view(batch, tokens, k))
    if not frame_maps:
        return labels_out, *attention
    per_frame = (
        frame_indices.view(batch, tokens, slots, k_frame),
        frame_weights.view(batch, tokens, slots, k_frame),
    )
    return labels_out, *attention, *per_frame


def labels_to_logits(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels B × L × ... → logits log(max(p, PROBABILITY_FLOOR)), same shape."""
    return labels.clamp_min(PROBABILITY_FLOOR).log()


def masks_to_labels(masks: torch.Tensor, token_shape: tuple[int, int], stride: int) -> torch.Tensor:
    """Image-size masks to soft labels on the feature grid: the mean of each cell's pixels.

    Cell (i, j) covers pixels [s·i, s·i + s) × [s·j, s·j + s) (clipped to the image); pixels past
    the grid are dropped, cells past the image average the pixels they have. Rows whose channels
    sum to 0 (e.g. a one-hot without a void channel) become background; others are normalised.

    Args:
        masks: B × L × H × W one-hot (or probabilities), or B × H × W integer ids (one-hot with
            L = max id + 1; pass one-hot to fix L).
        token_shape: (h, w) of the feature grid.
        stride: pixels per cell, s.

    Returns:
        B × L × h × w float32, channels summing to 1.
    """
    if masks.ndim == 3:
        if masks.dtype.is_floating_point:
            raise ValueError("id masks must be integer tensors; pass one-hot masks as B × L × H × W")
        masks = F.one_hot(masks.long(), int(masks.max()) + 1).permute(0, 3, 1, 2)
    labels = cell_means(masks, token_shape, stride)
    total = labels.sum(1, keepdim=True)
    labels = labels / total.clamp_min(1e-12)
    labels[:, :1] += (total <= 0).float()
    return labels


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------


@dataclass
class ContextEntry:
    """One context frame: frame index, L2-normalised features B × C × h × w, soft labels B × L × h × w."""

    frame_index: int
    features: torch.Tensor
    labels: torch.Tensor


class PropagationMemory:
    """The bounded context: the reference entry plus a queue of at most `n_recent` recent entries."""

    def __init__(self, n_recent: int) -> None:
        self.reference: ContextEntry | None = None
        self.recent: deque[ContextEntry] = deque(maxlen=int(n_recent))

    def reset(self, reference: ContextEntry | None = None) -> None:
        """Forget everything; start again from `reference` (or empty)."""
        self.reference = reference
        self.recent.clear()

    def push(self, entry: ContextEntry) -> None:
        """Add a recent entry; the oldest recent one leaves when the queue is full."""
        self.recent.append(entry)

    def entries(self) -> list[ContextEntry]:
        """Context slots in order: reference, then recent entries from oldest to newest."""
        return ([] if self.reference is None else [self.reference]) + list(self.recent)

    def __len__(self) -> int:
        return len(self.recent) + (self.reference is not None)

    def find(self, frame_index: int) -> ContextEntry | None:
        """The entry of frame `frame_index`, or None when it is not (or no longer) in the context."""
        return next((e for e in reversed(self.entries()) if e.frame_index == frame_index), None)

    def pad_labels(self, num_labels: int) -> None:
        """Give every entry `num_labels` label channels (new objects: probability 0)."""
        for entry in self.entries():
            missing = num_labels - entry.labels.shape[1]
            if missing > 0:
                entry.labels = F.pad(entry.labels, (0, 0, 0, 0, 0, missing))


def merge_object_labels(labels: torch.Tensor, given: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Merge given object masks into soft labels: given objects win, the rest share what is left.

    For the given objects o (present[b, o]), label_o = given_o; every other channel keeps its
    share of the remaining mass 1 − Σ_o given_o, i.e. old_c / Σ_{c not given} old_c · (1 − Σ given),
    so channels still sum to 1 (background takes it all where the old labels were all given).

    Args:
        labels: B × L × h × w soft labels (L ≥ the given channels).
        given: B × L × h × w soft labels of the given masks (`masks_to_labels`).
        present: B × L bool, the channels given (never channel 0, the background).

    Returns:
        B × L × h × w merged soft labels.
    """
    chosen = present[:, :, None, None].float()
    coverage = (given * chosen).sum(1, keepdim=True).clamp(0, 1)
    rest = labels * (1 - chosen)
    rest_total = rest.sum(1, keepdim=True)
    background = torch.zeros_like(rest)
    background[:, 0] = 1
    rest = torch.where(rest_total > 1e-12, rest / rest_total.clamp_min(1e-12), background)
    return given * chosen + (1 - coverage) * rest


class LabelPropagationTeacher(nn.Module):
    """Frozen label-propagation teacher: attention maps and per-object logits for distillation.

    Named steps: `encode` (frames → normalised features), `encode_mask` (masks → soft labels),
    `read_context` (propagation), `init` / `step` / `add_objects` (streaming), `propagate_clip`
    (distillation), `cluster_reference` (pseudo-objects), `upsample_logits` / `predict_ids`.

    Always in eval mode with `requires_grad=False`: `train()` keeps it in eval mode (BatchNorm of
    the encoder uses its running statistics), and every method runs under `torch.no_grad()`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        topk: int = 5,
        radius: int | None = 12,
        temperature: float = 0.07,
        n_recent: int = 7,
        chunk_size: int | None = 16,
    ) -> None:
        """
        Args:
            encoder: frames B × 3 × H × W in [0, 1] → B × C × h × w, with an int attribute `stride`.
            topk: context entries kept per query token (over all context frames).
            radius: square window half-size in feature cells; None = the whole frame.
            temperature: softmax temperature of the affinities (dot products of unit features).
            n_recent: recent frames in the context besides the reference (0 = reference only).
            chunk_size: side in cells of the query tiles (see the module docstring); None = one tile.
        """
        super().__init__()
        if int(topk) < 1:
            raise ConfigError(f"teacher.topk must be ≥ 1, got {topk}")
        if radius is not None and int(radius) < 0:
            raise ConfigError(f"teacher.radius must be ≥ 0 (or null for no window), got {radius}")
        if not float(temperature) > 0:
            raise ConfigError(f"teacher.temperature must be > 0, got {temperature}")
        if int(n_recent) < 0:
            raise ConfigError(f"teacher.n_recent must be ≥ 0, got {n_recent}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigError(f"teacher chunk_size must be ≥ 1 (or None), got {chunk_size}")
        if not hasattr(encoder, "stride"):
            raise TypeError(f"{type(encoder).__name__} has no `stride` attribute (pixels per feature cell)")
        self.encoder = encoder
        self.stride = int(encoder.stride)
        self.topk = int(topk)
        self.radius = None if radius is None else int(radius)
        self.temperature = float(temperature)
        self.n_recent = int(n_recent)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory = PropagationMemory(self.n_recent)
        self._next_frame = 0
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> LabelPropagationTeacher:
        """The teacher is frozen: stays in eval mode whatever `mode` is."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (
            f"stride={self.stride}, topk={self.topk}, radius={self.radius}, temperature={self.temperature}, "
            f"n_recent={self.n_recent}, chunk_size={self.chunk_size}"
        )

    # ---- named steps ------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames B × 3 × H × W in [0, 1] → features B × C × h × w, float32, unit norm per cell."""
        return F.normalize(self.encoder(frames).float(), dim=1)

    def encode_mask(self, masks: torch.Tensor, token_shape: tuple[int, int]) -> torch.Tensor:
        """masks B × L × H × W one-hot (or B × H × W ids) → soft labels B × L × h × w (`masks_to_labels`)."""
        return masks_to_labels(masks, token_shape, self.stride)

    @torch.no_grad()
    def read_context(
        self,
        query_features: torch.Tensor,
        context: Sequence[ContextEntry],
        *,
        query_frame: int = -1,
        frame_maps: bool = False,
    ) -> tuple[torch.Tensor, TeacherAttention]:
        """Propagate the context's labels to a query frame.

        Args:
            query_features: B × C × h × w from `encode`.
            context: the M context entries (slot order: reference first).
            query_frame: frame index recorded in the attention.
            frame_maps: also compute each context frame's own attention (`TeacherAttention.frame_map`).

        Returns:
            probabilities B × L × h × w, and the attention (`TeacherAttention`, N_q = h·w).
        """
        if not context:
            raise RuntimeError("the context is empty: call init() (or give a reference entry) first")
        num_labels = max(entry.labels.shape[1] for entry in context)
        labels = [F.pad(e.labels, (0, 0, 0, 0, 0, num_labels - e.labels.shape[1])) for e in context]
        probabilities, indices, weights, *per_frame = propagate_labels(
            query_features,
            [entry.features for entry in context],
            labels,
            topk=self.topk,
            radius=self.radius,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            frame_maps=frame_maps,
        )
        attention = TeacherAttention(
            indices=indices,
            weights=weights,
            token_shape=(query_features.shape[-2], query_features.shape[-1]),
            context_frames=tuple(entry.frame_index for entry in context),
            query_frame=int(query_frame),
            frame_indices=per_frame[0] if per_frame else None,
            frame_weights=per_frame[1] if per_frame else None,
        )
        return probabilities, attention

    # ---- streaming (inference engine) -------------------------------------------------------

    @property
    def context_size(self) -> int:
        """Context frames held now (≤ 1 + n_recent)."""
        return len(self.memory)

    @property
    def next_frame_index(self) -> int:
        """Index the next `step` gives its frame (the reference frame is 0)."""
        return self._next_frame

    def reset(self) -> None:
        """Forget the streaming state (the context)."""
        self.memory.reset()
        self._next_frame = 0

    @torch.no_grad()
    def init(self, reference_frame: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
        """Start a video: the reference frame (index 0) and its masks become the context.

        Args:
            reference_frame: B × 3 × H × W in [0, 1].
            reference_mask: B × (K+1) × H × W one-hot (channel 0 = background), or B × H × W ids.

        Returns:
            the reference logits B × (K+1) × h × w.
        """
        features = self.encode(reference_frame)
        labels = self.encode_mask(reference_mask.to(features.device), features.shape[-2:])
        self.memory.reset(ContextEntry(0, features, labels))
        self._next_frame = 1
        return labels_to_logits(labels)

    @torch.no_grad()
    def step(self, frame: torch.Tensor) -> tuple[torch.Tensor, TeacherAttention]:
        """Segment the next frame and add it (features, soft prediction) to the context.

        Args:
            frame: B × 3 × H × W in [0, 1].

        Returns:
            logits B × (K+1) × h × w and the frame's `TeacherAttention` over the context it read.
        """
        if self.memory.reference is None:
            raise RuntimeError("LabelPropagationTeacher.step() before init()")
        features = self.encode(frame)
        probabilities, attention = self.read_context(
            features, self.memory.entries(), query_frame=self._next_frame
        )
        self.memory.push(ContextEntry(self._next_frame, features, probabilities))
        self._next_frame += 1
        return labels_to_logits(probabilities), attention

    @torch.no_grad()
    def add_objects(self, frame_index: int, masks: torch.Tensor) -> torch.Tensor:
        """Merge objects given on a frame already in the context (YouTube-VOS: objects appearing late).

        Call it right after `step` of that frame (or after `init` for frame 0). The objects whose
        channel in `masks` is non-empty replace that frame's soft labels where they are given
        (`merge_object_labels`: given objects win, the other channels keep their relative shares
        of the remaining mass); every context entry grows to K'+1 channels (new objects 0
        elsewhere). Later frames read the merged labels while the frame stays in the context
        (n_recent steps), then through their own propagated predictions.

        Args:
            frame_index: the frame the masks belong to (0 = reference, as counted by `step`).
            masks: B × (K'+1) × H × W one-hot at image size (or B × H × W ids), K' ≥ the objects
                so far; channels that are all zero are not given (their labels are kept).

        Returns:
            the merged logits of that frame, B × (K'+1) × h × w (use them as its prediction).
        """
        entry = self.memory.find(frame_index)
        if entry is None:
            frames = [e.frame_index for e in self.memory.entries()]
            raise ValueError(
                f"frame {frame_index} is not in the context (frames {frames}); call add_objects after its step"
            )
        token_shape = (entry.features.shape[-2], entry.features.shape[-1])
        if masks.ndim == 3:
            masks = F.one_hot(masks.long(), max(int(masks.max()) + 1, entry.labels.shape[1])).permute(
                0, 3, 1, 2
            )
        masks = masks.to(entry.labels.device)
        num_labels = max(masks.shape[1], entry.labels.shape[1])
        self.memory.pad_labels(num_labels)
        masks = F.pad(masks.float(), (0, 0, 0, 0, 0, num_labels - masks.shape[1]))
        present = masks.flatten(2).amax(2) > 0
        present[:, 0] = False
        entry.labels = merge_object_labels(entry.labels, self.encode_mask(masks, token_shape), present)
        return labels_to_logits(entry.labels)

    # ---- clips (distillation) ---------------------------------------------------------------

    @torch.no_grad()
    def propagate_clip(
        self,
        frames: torch.Tensor,
        reference_masks: torch.Tensor | None = None,
        *,
        num_segments: int = 4,
        position_weight: float = 0.3,
        colour_weight: float = 0.0,
        feature_weight: float = 1.0,
        components: bool = False,
        min_width: int = 1,
        min_contrast: float = 0.0,
        object_masks: Mapping[int, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Propagate the reference masks through a clip (the streaming state is left untouched).

        Args:
            frames: B × T × 3 × H × W in [0, 1]; frame 0 is the reference.
            reference_masks: B × (K+1) × H × W one-hot of frame 0, or None for pseudo-objects
                (`cluster_reference` of frame 0 into `num_segments` segments, K = num_segments − 1).
            num_segments: segments (background included) when `reference_masks` is None.
            position_weight: weight of the position in that clustering (0: appearance only).
            colour_weight, feature_weight: weights of frame 0's colours and of its features there.
            components: pseudo-objects are the connected pieces of the segments (`split_components`).
            min_width: with `components`, a piece must hold a min_width × min_width block of cells.
            min_contrast: with `components` and colours, a piece's colour must differ from its
                surroundings' by this much (`split_components`).
            object_masks: {t: B × (K'+1) × H × W} objects given on frame t ≥ 1 (`add_objects`).

        Returns:
            dict with
            `logits` B × T × L × h × w (frame 0: the reference labels),
            `probabilities` B × T × L × h × w (soft labels, channels sum to 1),
            `attention` list of T entries, `TeacherAttention` per frame (None for frame 0), with
            the per-frame maps of every context frame (`frame_map`),
            `features` B × T × C × h × w (unit norm per cell),
            `reference_ids` B × H × W int64 (the pseudo-objects or the argmax of the masks),
            `token_shape` (h, w), `stride` s.
        """
        batch, num_frames = frames.shape[:2]
        image_size = (frames.shape[-2], frames.shape[-1])
        object_masks = dict(object_masks or {})
        features = self.encode(frames[:, 0])
        token_shape = (features.shape[-2], features.shape[-1])
        if reference_masks is None:
            feature_ids, reference_ids = self.cluster_reference(
                features,
                num_segments,
                image_size=image_size,
                position_weight=position_weight,
                image=frames[:, 0],
                colour_weight=colour_weight,
                feature_weight=feature_weight,
                components=components,
                min_width=min_width,
                min_contrast=min_contrast,
            )
            labels = F.one_hot(feature_ids, num_segments).permute(0, 3, 1, 2).float()
        else:
            labels = self.encode_mask(reference_masks.to(features.device), token_shape)
            reference_ids = reference_masks.argmax(1) if reference_masks.ndim == 4 else reference_masks.long()
        num_labels = max(
            [labels.shape[1]]
            + [m.shape[1] if m.ndim == 4 else int(m.max()) + 1 for m in object_masks.values()]
        )
        labels = F.pad(labels, (0, 0, 0, 0, 0, num_labels - labels.shape[1]))

        memory = PropagationMemory(self.n_recent)
        memory.reset(ContextEntry(0, features, labels))
        all_features, all_labels, attention = [features], [labels], [None]
        for t in range(1, num_frames):
            query = self.encode(frames[:, t])
            probabilities, frame_attention = self.read_context(
                query, memory.entries(), query_frame=t, frame_maps=True
            )
            entry = ContextEntry(t, query, probabilities)
            if t in object_masks:
                masks = object_masks[t].to(probabilities.device)
                if masks.ndim == 3:
                    masks = F.one_hot(masks.long(), num_labels).permute(0, 3, 1, 2)
                masks = F.pad(masks.float(), (0, 0, 0, 0, 0, num_labels - masks.shape[1]))
                present = masks.flatten(2).amax(2) > 0
                present[:, 0] = False
                entry.labels = merge_object_labels(
                    probabilities, self.encode_mask(masks, token_shape), present
                )
            memory.push(entry)
            all_features.append(query)
            all_labels.append(entry.labels)
            attention.append(frame_attention)
        probabilities = torch.stack(all_labels, 1)
        return {
            "logits": labels_to_logits(probabilities),
            "probabilities": probabilities,
            "attention": attention,
            "features": torch.stack(all_features, 1),
            "reference_ids": reference_ids,
            "token_shape": token_shape,
            "stride": self.stride,
        }

    # ---- pseudo-objects -----------------------------------------------------------------------

    def cluster_reference(
        self, features: torch.Tensor, k: int, **options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-objects of the reference frame on this teacher's grid: `features` B × C × h × w
        (`encode(reference_frame)`) → ids B × h × w and B × H × W (`pseudo_objects.cluster_reference`,
        whose keyword options it takes)."""
        return cluster_reference(features, k, stride=self.stride, **options)

    # ---- outputs at image size --------------------------------------------------------------

    def upsample_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """logits B × L × h × w → B × L × H × W: log of the bilinearly upsampled probabilities."""
        return labels_to_logits(upsample_probabilities(logits.exp(), size, self.stride))

    def predict_ids(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """logits B × L × h × w → object ids B × H × W int64 (argmax at image size)."""
        return upsample_probabilities(logits.exp(), size, self.stride).argmax(1)
