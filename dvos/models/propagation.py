"""The student's gated deformable propagation layer (docs/METHOD.md, "Gated deformable propagation"):
deformable long-term and short-term reads of the memory, SiLU-gated as in DeAOT, then gated
self-propagation among the query tokens and a feed-forward, on two streams (visual, ID).

Decisions (where DeAOT, DAT and the paper's summary leave a choice; all are constructor arguments):

- Queries of the current frame and keys of memory frames share one projection (AOT's design: the
  attention is a feature affinity, like the label-propagation teacher's that it is distilled from),
  computed from LayerNorm(embedding) + position; visual values from LayerNorm(embedding); the ID
  branch reads the ID embedding itself (already a learned linear map of the one-hot).
- Memory stores projected keys/values at full memory resolution, once per frame; each query frame
  reads them at ⌈h/s⌉·⌈w/s⌉ points per group (`deform_stride` s = 2 → a quarter of the tokens).
- Long-term and short-term attention have their own offset networks (motion relative to the first
  frame and to the previous frame differ); their outputs are summed per branch, then gated:
  out = W_o((A_long V_long + A_short V_short) ⊙ SiLU(W_u x)).
- The ID stream starts at the gated ID read-out (the query frame has no ID input of its own); the
  self-propagation computes one attention map from the visual stream and applies it to both streams.
- num_groups = 4 by default with 8 heads: 2 heads share each set of sampling points, so the layer
  looks at 4 different point sets per memory frame while each group's offset network still sees
  d/4 = 64 channels (DAT's stage-3 setting is 3–4 heads per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.deformable import DeformableAttention, DeformableAttentionAux, attend, split_heads
from dvos.models.memory import Memory


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """B × C × h × w → B × (h·w) × C (row-major tokens)."""
    return x.flatten(2).transpose(1, 2)


def _tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B × (h·w) × C → B × C × h × w."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


# silu(x) = 1 at x ≈ 1.2785: a gate bias that lets a signal through unchanged.
SILU_ONE = 1.2784645427610738


class GatedDeformablePropagation(nn.Module):
    """DeAOT's gated propagation with deformable long-term and short-term attention.

    Args:
        dim: d.
        num_heads, num_groups, deform_stride, offset_range, offset_kernel: see `DeformableAttention`.
        attention_scale, attention_topk: see `DeformableAttention` (`attention_scale`, `topk`).
        ffn_ratio: hidden width of the feed-forward, in multiples of d.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        num_groups: int = 4,
        deform_stride: int = 2,
        offset_range: float = 4.0,
        offset_kernel: int = 5,
        ffn_ratio: float = 2.0,
        attention_scale: float = 0.0,
        attention_topk: int = 0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        deform = dict(
            num_heads=num_heads,
            num_groups=num_groups,
            stride=deform_stride,
            offset_range=offset_range,
            offset_kernel=offset_kernel,
            attention_scale=attention_scale,
            topk=attention_topk,
        )
        # Reading the memory (long-term + short-term). The ID stream sums the two reads weighted
        # w and 2 − w (`long_term_weight`, 1 in training; an inference-time setting, see
        # `DeformableStudent.reading`), not a parameter: it is not in the state dict.
        self.long_term_weight = 1.0
        self.norm_input = nn.LayerNorm(dim)
        self.to_query_key = nn.Linear(dim, dim)  # shared by the query frame and the memory frames
        self.to_value = nn.Linear(dim, dim)
        self.long_term = DeformableAttention(dim, **deform)
        self.short_term = DeformableAttention(dim, **deform)
        self.gate_visual = nn.Linear(dim, dim)
        self.out_visual = nn.Linear(dim, dim)
        self.gate_id = nn.Linear(dim, dim)
        self.out_id = nn.Linear(dim, dim)
        # Self-propagation among the query tokens.
        self.norm_self_visual = nn.LayerNorm(dim)
        self.norm_self_id = nn.LayerNorm(dim)
        self.self_query_key = nn.Linear(dim, 2 * dim)
        self.self_value_visual = nn.Linear(dim, dim)
        self.self_value_id = nn.Linear(dim, dim)
        self.self_gate_visual = nn.Linear(dim, dim)
        self.self_gate_id = nn.Linear(dim, dim)
        self.self_out_visual = nn.Linear(dim, dim)
        self.self_out_id = nn.Linear(dim, dim)
        # Feed-forward, one per stream.
        hidden = int(round(ffn_ratio * dim))
        self.norm_ffn_visual = nn.LayerNorm(dim)
        self.norm_ffn_id = nn.LayerNorm(dim)
        self.ffn_visual = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ffn_id = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out_visual = nn.LayerNorm(dim)
        self.norm_out_id = nn.LayerNorm(dim)

    @torch.no_grad()
    def init_for_propagation(self) -> None:
        """Start as a label propagator: identity q/k projection (attention = feature similarity +
        position), the ID read passed through unchanged (unit gate, identity output) and the ID
        stream's residual branches (self-propagation, feed-forward) zero, so that a fresh layer
        outputs the attention-weighted ID embedding of the memory. Training refines all of it."""
        nn.init.eye_(self.to_query_key.weight)
        nn.init.zeros_(self.to_query_key.bias)
        nn.init.zeros_(self.gate_id.weight)
        nn.init.constant_(self.gate_id.bias, SILU_ONE)
        nn.init.eye_(self.out_id.weight)
        nn.init.zeros_(self.out_id.bias)
        nn.init.zeros_(self.self_out_id.weight)
        nn.init.zeros_(self.self_out_id.bias)
        nn.init.zeros_(self.ffn_id[-1].weight)
        nn.init.zeros_(self.ffn_id[-1].bias)

    def key_value(self, embedding: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (= queries) and visual values of a frame.

        Args:
            embedding: B × d × h × w.
            position: 1 × d × h × w.

        Returns:
            (key, value): B × d × h × w each.
        """
        height, width = embedding.shape[-2:]
        normed = self.norm_input(_map_to_tokens(embedding))
        key = self.to_query_key(normed + _map_to_tokens(position))
        value = self.to_value(normed)
        return _tokens_to_map(key, height, width), _tokens_to_map(value, height, width)

    def read_memory(
        self,
        embedding: torch.Tensor,
        query: torch.Tensor,
        memory: Memory,
        *,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, DeformableAttentionAux] | None]:
        """Gated deformable long-term + short-term read-out.

        Args:
            embedding: B × d × h × w, the query frame's embedding (the residual stream).
            query: B × d × h × w, its projected queries (`key_value`'s key).
            memory: the clip's memory.

        Returns:
            (visual, identity, aux): visual and ID streams B × N × d (N = h·w); aux or None.
        """
        long_visual_id, long_aux = self.long_term(
            query,
            memory.reference_key,
            (memory.reference_value, memory.reference_id),
            return_aux=return_attention,
        )
        short_visual_id, short_aux = self.short_term(
            query,
            memory.previous_key,
            (memory.previous_value, memory.previous_id),
            return_aux=return_attention,
        )
        tokens = _map_to_tokens(embedding)
        normed = self.norm_input(tokens)
        visual_read = long_visual_id[0] + short_visual_id[0]
        weight = float(self.long_term_weight)  # 1: the trained sum, exactly (× 1.0 is exact)
        id_read = weight * long_visual_id[1] + (2.0 - weight) * short_visual_id[1]
        visual = tokens + self.out_visual(visual_read * F.silu(self.gate_visual(normed)))
        identity = self.out_id(id_read * F.silu(self.gate_id(normed)))
        aux = None
        if return_attention:
            aux = {"long_term": long_aux, "short_term": short_aux}
        return visual, identity, aux

    def self_propagate(
        self, visual: torch.Tensor, identity: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated self-attention among the query tokens; the map comes from the visual stream.

        Args:
            visual, identity: B × N × d.
            position: 1 × d × h × w.

        Returns:
            (visual, identity): B × N × d each, with residuals.
        """
        normed_visual = self.norm_self_visual(visual)
        normed_id = self.norm_self_id(identity)
        query, key = self.self_query_key(normed_visual + _map_to_tokens(position)).chunk(2, dim=-1)
        values = [self.self_value_visual(normed_visual), self.self_value_id(normed_id)]
        visual_read, id_read = attend(
            split_heads(query, self.num_heads),
            split_heads(key, self.num_heads),
            [split_heads(value, self.num_heads) for value in values],
            need_weights=False,
        )[0]
        visual = visual + self.self_out_visual(visual_read * F.silu(self.self_gate_visual(normed_visual)))
        identity = identity + self.self_out_id(id_read * F.silu(self.self_gate_id(normed_id)))
        return visual, identity

    def forward(
        self,
        embedding: torch.Tensor,
        position: torch.Tensor,
        memory: Memory,
        *,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, DeformableAttentionAux] | None]:
        """Propagate the memory to one query frame.

        Args:
            embedding: B × d × h × w, the query frame's embedding.
            position: 1 × d × h × w.
            memory: the clip's memory (maps of the same h × w).

        Returns:
            (propagated, key, value, aux): propagated B × 2d × h × w (channels [0, d) the visual stream,
            [d, 2d) the ID stream); the query frame's key and visual value B × d × h × w (what it
            contributes to the memory); aux or None.
        """
        height, width = embedding.shape[-2:]
        key, value = self.key_value(embedding, position)
        visual, identity, aux = self.read_memory(embedding, key, memory, return_attention=return_attention)
        visual, identity = self.self_propagate(visual, identity, position)
        visual = visual + self.ffn_visual(self.norm_ffn_visual(visual))
        identity = identity + self.ffn_id(self.norm_ffn_id(identity))
        propagated = torch.cat((self.norm_out_visual(visual), self.norm_out_id(identity)), dim=-1)
        return _tokens_to_map(propagated, height, width), key, value, aux
