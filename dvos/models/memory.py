"""The student's memory: constant size, the reference frame (long-term) and the previous frame
(short-term), each as keys, visual values and ID values, plus (at inference) a bounded number
of frames where objects first appeared, added to the long-term part (docs/METHOD.md, "Memory").

With stacked propagation layers (`model.num_layers` L) every map holds the L layers' entries side by
side along the channels, layer l in the l-th block (`Memory.layer` cuts one layer's out): the memory
keeps its seven fields, and the exported step its inputs, whatever L."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Memory:
    """Constant-size memory of one clip: the reference frame (long-term) and the previous frame
    (short-term). Every map is B × C × h × w (C = d by default; L layers' blocks side by side).

    Objects that appear later (YouTube-VOS): the frame where they are given joins the long-term
    memory (`add_long_term`, `added_long_term`) up to a bound; the long-term read then samples every
    long-term frame at the same points and attends over all of them at once (`long_term_maps`).

    Attributes:
        reference_key, reference_value: the propagation layer's keys and visual values of the reference
            frame.
        reference_id: ID values of the reference masks (the first layer's, by default: their ID
            embedding itself).
        previous_key, previous_value, previous_id: the same for the previous frame (its predicted mask).
        id_permutation: B × (max_objects + 1) long; object id c is embedded in slot id_permutation[:, c]
            (identity in eval mode; entry 0, the background, is always 0).
        added_long_term: frames added to the long-term memory after the reference frame, oldest
            first, each (key, value, ID values) B × C × h × w; empty in training and in the
            exported step (`tensors`).
    """

    reference_key: torch.Tensor
    reference_value: torch.Tensor
    reference_id: torch.Tensor
    previous_key: torch.Tensor
    previous_value: torch.Tensor
    previous_id: torch.Tensor
    id_permutation: torch.Tensor
    added_long_term: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] = ()

    def replace_short_term(
        self, key: torch.Tensor, value: torch.Tensor, id_embedding: torch.Tensor
    ) -> Memory:
        """A new Memory whose previous frame is (key, value, id_embedding); the long-term part is kept.

        Args:
            key, value, id_embedding: B × C × h × w each, the same shapes as the ones replaced.
        """
        if key.shape != self.previous_key.shape or id_embedding.shape != self.previous_id.shape:
            raise ValueError(
                f"short-term memory shapes change: {tuple(key.shape)} vs {tuple(self.previous_key.shape)}"
            )
        return dataclasses.replace(self, previous_key=key, previous_value=value, previous_id=id_embedding)

    def add_long_term(
        self, key: torch.Tensor, value: torch.Tensor, id_embedding: torch.Tensor, *, max_frames: int
    ) -> Memory:
        """A new Memory whose long-term part also holds (key, value, id_embedding), B × C × h × w
        each. At most `max_frames` long-term frames: the reference frame always stays, the oldest
        added frame leaves first; with `max_frames` = 1 the new frame replaces the reference (one
        long-term slot, as the exported step has)."""
        if int(max_frames) < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if int(max_frames) == 1:
            return dataclasses.replace(
                self, reference_key=key, reference_value=value, reference_id=id_embedding
            )
        added = (*self.added_long_term, (key, value, id_embedding))
        return dataclasses.replace(self, added_long_term=added[max(0, len(added) - (int(max_frames) - 1)) :])

    def long_term_maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, ID embeddings) of the long-term memory: the reference frame's B × C × h × w
        maps, or B × L × d × h × w with L − 1 added frames (reference first)."""
        if not self.added_long_term:
            return self.reference_key, self.reference_value, self.reference_id
        frames = ((self.reference_key, self.reference_value, self.reference_id), *self.added_long_term)
        return tuple(torch.stack(maps, dim=1) for maps in zip(*frames))

    def layer(self, index: int, key_channels: int, value_channels: int) -> Memory:
        """Propagation layer `index`'s memory: every map's `index`-th block of channels (keys
        `key_channels` wide, visual and ID values `value_channels` wide), added long-term frames
        included; the permutation is shared."""

        def block(tensor: torch.Tensor, width: int) -> torch.Tensor:
            return tensor.narrow(-3, index * width, width)

        def frame(key: torch.Tensor, value: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return block(key, key_channels), block(value, value_channels), block(ids, value_channels)

        return Memory(
            *frame(self.reference_key, self.reference_value, self.reference_id),
            *frame(self.previous_key, self.previous_value, self.previous_id),
            self.id_permutation,
            added_long_term=tuple(frame(*added) for added in self.added_long_term),
        )

    def detach(self) -> Memory:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        added = tuple(tuple(t.detach() for t in frame) for frame in self.added_long_term)
        return Memory(*(tensor.detach() for tensor in self.tensors()), added_long_term=added)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The seven fixed fields in declaration order (the explicit inputs of
        `DeformableStudent.forward`); the added long-term frames are not among them."""
        return tuple(
            getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "added_long_term"
        )

    def nbytes(self) -> int:
        """Bytes of every tensor held, the added long-term frames included."""
        held = (*self.tensors(), *(t for frame in self.added_long_term for t in frame))
        return sum(t.numel() * t.element_size() for t in held)
