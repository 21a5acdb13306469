"""The student's memory: constant size, the reference frame (long-term) and the previous frame
(short-term), each as keys, visual values and ID embedding (docs/METHOD.md, "Memory")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Memory:
    """Constant-size memory of one clip: the reference frame (long-term) and the previous frame
    (short-term). Every map is B × d × h × w.

    Attributes:
        reference_key, reference_value: the propagation layer's keys and visual values of the reference
            frame.
        reference_id: ID embedding of the reference masks.
        previous_key, previous_value, previous_id: the same for the previous frame (its predicted mask).
        id_permutation: B × (max_objects + 1) long; object id c is embedded in slot id_permutation[:, c]
            (identity in eval mode; entry 0, the background, is always 0).
    """

    reference_key: torch.Tensor
    reference_value: torch.Tensor
    reference_id: torch.Tensor
    previous_key: torch.Tensor
    previous_value: torch.Tensor
    previous_id: torch.Tensor
    id_permutation: torch.Tensor

    def replace_short_term(
        self, key: torch.Tensor, value: torch.Tensor, id_embedding: torch.Tensor
    ) -> Memory:
        """A new Memory whose previous frame is (key, value, id_embedding); the long-term part is kept.

        Args:
            key, value, id_embedding: B × d × h × w each, the same shapes as the ones replaced.
        """
        if key.shape != self.previous_key.shape or id_embedding.shape != self.previous_id.shape:
            raise ValueError(
                f"short-term memory shapes change: {tuple(key.shape)} vs {tuple(self.previous_key.shape)}"
            )
        return dataclasses.replace(self, previous_key=key, previous_value=value, previous_id=id_embedding)

    def detach(self) -> Memory:
        """A copy cut from the autograd graph (truncated back-propagation through time)."""
        return Memory(*(tensor.detach() for tensor in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """All fields in declaration order (the explicit inputs of `DeformableStudent.forward`)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))
