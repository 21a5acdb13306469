"""The dense-memory baseline: the student with ordinary global attention over a growing memory.

What the deformable student is measured against. DeAOT-L / AOT keep every `memory_every`-th frame
(5 by default) in a long-term memory that is never pruned, and read it with global attention: every
query token attends to every token of every memory frame, so memory and compute grow linearly with
the video. This variant is the *same* network as the student, sharing its modules and weights (encoder,
projections, ID embedding, gates, self-propagation, feed-forward, decoder); only the two memory reads
change:

- long-term: global multi-head attention over all tokens of the memory bank (the reference frame,
  then frames 5, 10, 15, ... with their predicted masks), as in AOT's long-term attention;
- short-term: global attention over all tokens of the previous frame (the student reads both
  through deformable sampling of ⌈h/s⌉·⌈w/s⌉ points instead).

The attention is `F.scaled_dot_product_attention` (a fused kernel that never builds the N × M map,
so the bank, not the map, is what grows); the visual and ID values share the keys but are two calls,
because the fused CPU kernel needs value width = key width. With a student checkpoint the baseline
reuses weights trained for deformable reads (it was never trained with dense attention): its J&F is
that of the swapped read-out, its speed and memory are what the comparison is about.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvos.inference.engine import StudentSegmenter
from dvos.models.deformable import merge_heads, split_heads
from dvos.models.student import DeformableStudent, FrameFeatures, memory_masks

MEMORY_EVERY = 5  # DeAOT-L / AOT: a long-term memory frame every 5 frames


@dataclass
class DenseMemory:
    """The growing memory of the dense baseline (every tensor B × heads × tokens × d_head).

    Attributes:
        long_key, long_visual, long_id: the memory bank, `frames` frames of h·w tokens each
            (reference frame first, then every `memory_every`-th frame), keys, visual values, ID values.
        short_key, short_visual, short_id: the previous frame (h·w tokens).
        id_permutation: B × (K + 1) long (identity at inference).
        frames: frames in the bank.
    """

    long_key: torch.Tensor
    long_visual: torch.Tensor
    long_id: torch.Tensor
    short_key: torch.Tensor
    short_visual: torch.Tensor
    short_id: torch.Tensor
    id_permutation: torch.Tensor
    frames: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (
            self.long_key,
            self.long_visual,
            self.long_id,
            self.short_key,
            self.short_visual,
            self.short_id,
            self.id_permutation,
        )

    @property
    def tokens(self) -> int:
        """Memory tokens read per query (bank + previous frame)."""
        return int(self.long_key.shape[2] + self.short_key.shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def replace_short_term(
        self, key: torch.Tensor, visual: torch.Tensor, identity: torch.Tensor
    ) -> DenseMemory:
        return dataclasses.replace(self, short_key=key, short_visual=visual, short_id=identity)

    def append_long_term(
        self, key: torch.Tensor, visual: torch.Tensor, identity: torch.Tensor, *, copies: int = 1
    ) -> DenseMemory:
        """The bank with `copies` more frames (AOT concatenates: the old bank is freed afterwards)."""
        return dataclasses.replace(
            self,
            long_key=torch.cat((self.long_key, *([key] * copies)), dim=2),
            long_visual=torch.cat((self.long_visual, *([visual] * copies)), dim=2),
            long_id=torch.cat((self.long_id, *([identity] * copies)), dim=2),
            frames=self.frames + copies,
        )


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B × d × h × w → B × heads × (h·w) × d/heads, contiguous (what the bank stores)."""
    return split_heads(x.flatten(2).transpose(1, 2), num_heads).contiguous()


class DenseMemoryStudent(nn.Module):
    """A `DeformableStudent` whose memory reads are global attention over a growing memory bank.

    Args:
        student: the student whose modules (and weights) are used; it is shared, not copied.
        memory_every: a frame t > 0 joins the long-term memory when t % memory_every == 0.
    """

    def __init__(self, student: DeformableStudent, *, memory_every: int = MEMORY_EVERY) -> None:
        super().__init__()
        if memory_every < 1:
            raise ValueError(f"memory_every must be >= 1, got {memory_every}")
        if student.num_layers != 1:
            raise ValueError(
                f"the dense baseline swaps the reads of one propagation layer; this student has {student.num_layers}"
            )
        self.student = student
        self.memory_every = int(memory_every)
        self.num_heads = student.propagation.num_heads

    @property
    def max_objects(self) -> int:
        return int(self.student.max_objects)

    def encode_frame(self, image: torch.Tensor) -> FrameFeatures:
        """image: B × 3 × H × W in [0, 1] → `FrameFeatures` (the student's encoder)."""
        return self.student.encode_frame(image)

    def memory_entry(
        self, features: FrameFeatures, masks: torch.Tensor, id_permutation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key, visual, ID) of one frame, B × heads × (h·w) × d_head each.

        Args:
            features: the frame's `FrameFeatures`.
            masks: B × (K + 1) × H × W one-hot masks (input size).
            id_permutation: B × (K + 1) long.
        """
        propagation = self.student.propagation
        key, value = propagation.key_value(features.embedding, features.position)
        identity = propagation.id_value(self.student.embed_ids(masks, id_permutation=id_permutation))
        return tuple(_heads(x, self.num_heads) for x in (key, value, identity))  # type: ignore[return-value]

    def initialize_memory(
        self, features: FrameFeatures, masks: torch.Tensor, *, id_permutation: torch.Tensor | None = None
    ) -> DenseMemory:
        """The bank holds the reference frame; the short-term memory starts as the reference too."""
        if id_permutation is None:
            id_permutation = self.student.sample_id_permutation(masks.shape[0], device=masks.device)
        key, visual, identity = self.memory_entry(features, masks, id_permutation)
        return DenseMemory(key, visual, identity, key, visual, identity, id_permutation, frames=1)

    def read_memory(
        self, embedding: torch.Tensor, query: torch.Tensor, memory: DenseMemory
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated global long-term + short-term read-out (the student's gates, convs and projections).

        Args:
            embedding: B × d × h × w, the query frame's embedding (the residual stream).
            query: B × d × h × w, its projected queries.
            memory: the dense memory.

        Returns:
            (visual, identity): B × N × d each (N = h·w).
        """
        propagation = self.student.propagation
        queries = _heads(query, self.num_heads)
        visual_read = merge_heads(
            F.scaled_dot_product_attention(queries, memory.long_key, memory.long_visual)
            + F.scaled_dot_product_attention(queries, memory.short_key, memory.short_visual)
        )
        id_read = merge_heads(
            F.scaled_dot_product_attention(queries, memory.long_key, memory.long_id)
            + F.scaled_dot_product_attention(queries, memory.short_key, memory.short_id)
        )
        return propagation.gate_reads(embedding, visual_read, id_read)

    def step(
        self,
        image: torch.Tensor,
        memory: DenseMemory,
        *,
        frame_index: int,
        num_objects: int,
        soft_memory: bool = True,
    ) -> tuple[torch.Tensor, DenseMemory]:
        """Segment frame `frame_index` (> 0); it becomes the short-term memory and, every
        `memory_every` frames, joins the bank.

        Args:
            image: B × 3 × H × W in [0, 1].
            memory: the dense memory.
            frame_index: the frame's index in the video (the reference frame is 0).
            num_objects: objects of the video (ids above it get the student's absent logit).
            soft_memory: the frame's mask enters the memory as softmax probabilities (as the
                deformable student's `StudentSegmenter` default), else as the argmax one-hot.

        Returns:
            (logits B × (K + 1) × H × W, the next memory).
        """
        student, propagation = self.student, self.student.propagation
        features = student.encode_frame(image)
        height, width = features.embedding.shape[-2:]
        key, value = propagation.key_value(features.embedding, features.position)
        visual, identity = self.read_memory(features.embedding, key, memory)
        visual, identity = propagation.self_propagate(visual, identity, features.position)
        visual, identity = propagation.feed_forward(visual, identity)
        propagated = propagation.output(visual, identity, height, width)
        logits = student.decode(
            propagated, features, num_objects=num_objects, id_permutation=memory.id_permutation
        )
        identity_map = propagation.id_value(
            student.embed_ids(memory_masks(logits, soft=soft_memory), id_permutation=memory.id_permutation)
        )
        entry = (
            _heads(key, self.num_heads),
            _heads(value, self.num_heads),
            _heads(identity_map, self.num_heads),
        )
        memory = memory.replace_short_term(*entry)
        if frame_index % self.memory_every == 0:
            memory = memory.append_long_term(*entry)
        return logits, memory

    def bank_frames_before(self, frame_index: int) -> int:
        """Frames in the bank when frame `frame_index` (≥ 1) is segmented: 1 + ⌊(t − 1)/every⌋."""
        return 1 + (max(1, int(frame_index)) - 1) // self.memory_every


class DenseMemorySegmenter(StudentSegmenter):
    """The dense-memory baseline behind the engine's `Segmenter` interface.

    Args:
        student: the `DeformableStudent` whose weights the baseline uses.
        memory_every: long-term memory period (5: DeAOT-L / AOT).
        device, max_size, soft_memory: as for `StudentSegmenter`.
    """

    name = "dense"

    def __init__(
        self,
        student: DeformableStudent,
        *,
        memory_every: int = MEMORY_EVERY,
        device: str | torch.device = "cpu",
        max_size: int | None = None,
        soft_memory: bool = True,
    ) -> None:
        super().__init__(student, device=device, max_size=max_size, soft_memory=soft_memory)
        self.model = DenseMemoryStudent(self.student, memory_every=memory_every).eval()
        self.dense_memory: DenseMemory | None = None
        self.frame_index = 0  # index of the last frame segmented

    @torch.inference_mode()
    def start(self, frame: np.ndarray, mask_ids: np.ndarray, object_ids: Sequence[int]) -> np.ndarray:
        self._begin(frame, object_ids)
        self._check_count()
        model_ids = self.ids.to_model(mask_ids)
        features = self.model.encode_frame(self._image(frame))
        self.dense_memory = self.model.initialize_memory(features, self._one_hot(model_ids))
        self._previous = model_ids
        self.frame_index = 0
        return self.ids.to_sequence(model_ids)

    @torch.inference_mode()
    def step(self, frame: np.ndarray) -> np.ndarray:
        if self.dense_memory is None:
            raise RuntimeError("DenseMemorySegmenter.step() before start()")
        self.frame_index += 1
        num_objects = len(self.ids)
        logits, self.dense_memory = self.model.step(
            self._image(frame),
            self.dense_memory,
            frame_index=self.frame_index,
            num_objects=num_objects,
            soft_memory=self.soft_memory,
        )
        model_ids = self._ids_at_frame_size(logits[:, : num_objects + 1])
        self._previous = model_ids
        return self.ids.to_sequence(model_ids)

    @torch.inference_mode()
    def add_objects(
        self, index: int, frame: np.ndarray, mask_ids: np.ndarray, new_ids: Sequence[int]
    ) -> np.ndarray:
        """New objects: the merged mask of this frame joins the bank (AOT adds such frames to memory)."""
        if self.dense_memory is None or self._previous is None:
            raise RuntimeError("DenseMemorySegmenter.add_objects() before start()")
        merged = self._merge_new_objects(mask_ids, new_ids)
        features = self.model.encode_frame(self._image(frame))
        entry = self.model.memory_entry(features, self._one_hot(merged), self.dense_memory.id_permutation)
        self.dense_memory = self.dense_memory.replace_short_term(*entry).append_long_term(*entry)
        self._previous = merged
        return self.ids.to_sequence(merged)

    @torch.inference_mode()
    def fast_forward(self, frame_index: int) -> None:
        """Grow the memory to its size just before frame `frame_index` without segmenting the frames
        in between (the bank is padded with copies of the reference frame's entry: the cost of
        attention does not depend on what the tokens hold). For benchmarks of long videos."""
        if self.dense_memory is None:
            raise RuntimeError("DenseMemorySegmenter.fast_forward() before start()")
        missing = self.model.bank_frames_before(frame_index) - self.dense_memory.frames
        if missing > 0:
            memory = self.dense_memory
            entry = (memory.short_key, memory.short_visual, memory.short_id)
            self.dense_memory = memory.append_long_term(*entry, copies=missing)
        self.frame_index = max(self.frame_index, int(frame_index) - 1)

    @property
    def memory_frames(self) -> int:
        """Frames held in memory (bank + previous frame)."""
        return 0 if self.dense_memory is None else self.dense_memory.frames + 1

    @property
    def memory_tokens(self) -> int:
        return 0 if self.dense_memory is None else self.dense_memory.tokens

    def memory_bytes(self) -> int:
        """Bytes of the dense memory (grows by one frame every `memory_every` frames)."""
        return 0 if self.dense_memory is None else self.dense_memory.nbytes()
