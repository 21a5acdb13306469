"""The student's gated deformable propagation layer (docs/METHOD.md, "Gated deformable propagation"):
deformable long-term and short-term reads of the memory, SiLU-gated as in DeAOT, then gated
self-propagation among the query tokens and (optionally) a feed-forward, on two streams (visual, ID).

Decisions (where DeAOT, DAT and the paper's summary leave a choice; all are constructor arguments):

- Queries of the current frame and keys of memory frames share one projection (AOT's design: the
  attention is a feature affinity, like the label-propagation teacher's that it is distilled from),
  computed from LayerNorm(embedding) + position; visual values from LayerNorm(embedding); the first
  layer's ID branch reads the ID embedding itself (already a learned linear map of the one-hot), or,
  with `expand_ratio` > 0, SiLU(linear) of it (DeAOT).
- Memory stores projected keys/values at full memory resolution, once per frame; each query frame
  reads them at ⌈h/s⌉·⌈w/s⌉ points per group (`deform_stride` s = 2 → a quarter of the tokens).
- Long-term and short-term attention have their own offset networks (motion relative to the first
  frame and to the previous frame differ); their outputs are summed per branch, then gated:
  out = W_o(dw((A_long V_long + A_short V_short) ⊙ SiLU(W_u x))) — DeAOT gates and projects each
  read on its own; with one gate U shared by both reads (as DeAOT's) the two differ only in that
  dvos ties the reads' depth-wise conv `dw` (`dw_kernel` > 0, else none) and projection W_o.
- The ID stream starts at the gated ID read-out (the query frame has no ID input of its own); the
  first layer gates it by the visual stream (`gate_id`) or not at all (DeAOT); a later layer gates
  it by its LayerNormed ID stream, and its memory's ID values fuse that stream (of the memory frame)
  with the ID embedding, as DeAOT's layers after the first. The self-propagation computes one
  attention map from the visual stream and applies it to both streams.
- num_groups = 4 by default with 8 heads: 2 heads share each set of sampling points, so the layer
  looks at 4 different point sets per memory frame while each group's offset network still sees
  d/4 = 64 channels (DAT's stage-3 setting is 3–4 heads per group).

Layers stack (`model.num_layers`, `DeformableStudent`): layer l's input is layer l − 1's visual
and ID streams; each layer has its own memory entries (keys, visual values, ID values), and only
the last layer normalises its output for the decoder (DeAOT's final norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.deformable import DeformableAttention, DeformableAttentionAux, attend, split_heads
from dvos.models.local_attention import LocalAttention
from dvos.models.memory import Memory

SHORT_TERM_READS = ("deformable", "local")


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """B × C × h × w → B × (h·w) × C (row-major tokens)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B × (h·w) × C → B × C × h × w."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _depthwise(channels: int, kernel: int) -> nn.Conv2d:
    """DeAOT's depth-wise conv after the gating: k × k, one filter per channel, no bias."""
    return nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)


# silu(x) = 1 at x ≈ 1.2785: a gate bias that lets a signal through unchanged.
SILU_ONE = 1.2784645427610738


class GatedDeformablePropagation(nn.Module):
    """One layer of DeAOT's gated propagation with deformable long-term and short-term attention.

    Args:
        dim: d.
        num_heads, num_groups, deform_stride, offset_range, offset_kernel: see `DeformableAttention`.
        attention_scale, attention_topk: see `DeformableAttention` (`attention_scale`, `topk`).
        ffn_ratio: hidden width of the feed-forward, in multiples of d (0: no feed-forward, DeAOT).
        key_dim: width of queries and keys (None: d).
        expand_ratio: > 0: values (visual, ID, self-propagation) are SiLU(linear) of width
            expand_ratio·d and the gates as wide (DeAOT: 2); 0: linear values of width d.
        dw_kernel: > 0: a depth-wise k × k conv of each gated read before its output projection.
        gate_id: the first layer gates its ID read by the visual stream (False: ungated, DeAOT).
        short_term_read: "deformable" or "local" (`LocalAttention`, a `local_window`² window).
        local_window: the local read's window side, in memory cells.
        first: the first layer (no ID stream comes in); later layers fuse their ID stream.
        last: the last layer (its output is normalised for the decoder, `output`).
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
        key_dim: int | None = None,
        expand_ratio: float = 0.0,
        dw_kernel: int = 0,
        gate_id: bool = True,
        short_term_read: str = "deformable",
        local_window: int = 15,
        first: bool = True,
        last: bool = True,
    ) -> None:
        super().__init__()
        if short_term_read not in SHORT_TERM_READS:
            raise ValueError(
                f"short_term_read must be one of {', '.join(SHORT_TERM_READS)}, got {short_term_read!r}"
            )
        self.num_heads = num_heads
        self.key_dim = dim if key_dim is None else int(key_dim)
        self.expand = float(expand_ratio) > 0
        self.value_dim = int(round(float(expand_ratio) * dim)) if self.expand else dim
        self.first, self.last = bool(first), bool(last)
        keys, values = self.key_dim, self.value_dim
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
        self.to_query_key = nn.Linear(dim, keys)  # shared by the query frame and the memory frames
        self.to_value = nn.Linear(dim, values)
        self.long_term = DeformableAttention(keys, **deform)
        if short_term_read == "local":
            self.short_term: nn.Module = LocalAttention(
                keys,
                num_heads=num_heads,
                window=local_window,
                attention_scale=attention_scale,
                topk=attention_topk,
            )
        else:
            self.short_term = DeformableAttention(keys, **deform)
        self.gate_visual = nn.Linear(dim, values)
        self.out_visual = nn.Linear(values, dim)
        self.gate_id = nn.Linear(dim, values) if gate_id or not first else None
        self.out_id = nn.Linear(values, dim)
        # Self-propagation among the query tokens.
        self.norm_self_visual = nn.LayerNorm(dim)
        self.norm_self_id = nn.LayerNorm(dim)
        self.self_query_key = nn.Linear(dim, 2 * keys)
        self.self_value_visual = nn.Linear(dim, values)
        self.self_value_id = nn.Linear(dim, values)
        self.self_gate_visual = nn.Linear(dim, values)
        self.self_gate_id = nn.Linear(dim, values)
        self.self_out_visual = nn.Linear(values, dim)
        self.self_out_id = nn.Linear(values, dim)
        # Feed-forward, one per stream.
        self.ffn = float(ffn_ratio) > 0
        if self.ffn:
            hidden = int(round(ffn_ratio * dim))
            self.norm_ffn_visual = nn.LayerNorm(dim)
            self.norm_ffn_id = nn.LayerNorm(dim)
            self.ffn_visual = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            self.ffn_id = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        if self.last:
            self.norm_out_visual = nn.LayerNorm(dim)
            self.norm_out_id = nn.LayerNorm(dim)
        # DeAOT's parts, built after dvos's own (a default layer is built as it always was).
        self.norm_id_input = None if first else nn.LayerNorm(dim)  # DeAOT's id_norm1
        self.to_id_value = None
        if not first:
            self.to_id_value = nn.Linear(2 * dim, values)  # [LN(ID stream), ID embedding] → ID value
        elif self.expand:
            self.to_id_value = nn.Linear(dim, values)
        self.dw_visual = self.dw_id = self.self_dw_visual = self.self_dw_id = None
        if int(dw_kernel) > 0:
            self.dw_visual, self.dw_id = _depthwise(values, dw_kernel), _depthwise(values, dw_kernel)
            self.self_dw_visual, self.self_dw_id = (
                _depthwise(values, dw_kernel),
                _depthwise(values, dw_kernel),
            )

    @torch.no_grad()
    def init_for_propagation(self) -> None:
        """Start as a label propagator: identity q/k projection (attention = feature similarity +
        position), the ID read passed through unchanged (unit gate, identity value, conv and output)
        and the ID stream's residual branches (self-propagation, feed-forward) zero, so that a fresh
        first layer outputs the attention-weighted ID embedding of the memory, and a later one passes
        its ID stream on. Training refines all of it."""
        nn.init.eye_(self.to_query_key.weight)
        nn.init.zeros_(self.to_query_key.bias)
        if self.gate_id is not None:
            nn.init.zeros_(self.gate_id.weight)
            nn.init.constant_(self.gate_id.bias, SILU_ONE)
        if self.first:
            nn.init.eye_(self.out_id.weight)
            nn.init.zeros_(self.out_id.bias)
            if self.to_id_value is not None:
                nn.init.eye_(self.to_id_value.weight)
                nn.init.zeros_(self.to_id_value.bias)
            if self.dw_id is not None:
                nn.init.zeros_(self.dw_id.weight)
                self.dw_id.weight[:, :, self.dw_id.kernel_size[0] // 2, self.dw_id.kernel_size[1] // 2] = 1.0
        else:
            nn.init.zeros_(self.out_id.weight)
            nn.init.zeros_(self.out_id.bias)
        nn.init.zeros_(self.self_out_id.weight)
        nn.init.zeros_(self.self_out_id.bias)
        if self.ffn:
            nn.init.zeros_(self.ffn_id[-1].weight)
            nn.init.zeros_(self.ffn_id[-1].bias)

    def key_value(self, embedding: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (= queries) and visual values of a frame.

        Args:
            embedding: B × d × h × w (the layer's input visual stream).
            position: 1 × d × h × w.

        Returns:
            (key, value): B × key_dim × h × w and B × value_dim × h × w.
        """
        height, width = embedding.shape[-2:]
        normed = self.norm_input(map_to_tokens(embedding))
        key = self.to_query_key(normed + map_to_tokens(position))
        value = self.to_value(normed)
        if self.expand:
            value = F.silu(value)
        return tokens_to_map(key, height, width), tokens_to_map(value, height, width)

    def id_value(self, id_embedding: torch.Tensor, id_stream: torch.Tensor | None = None) -> torch.Tensor:
        """The ID values a memory frame holds for this layer.

        Args:
            id_embedding: B × d × h × w, the ID embedding of the frame's masks.
            id_stream: B × d × h × w, the frame's ID stream entering this layer (later layers only).

        Returns:
            B × value_dim × h × w: the first layer's: the ID embedding itself (`expand_ratio` 0) or
            SiLU(linear) of it; a later layer's: (SiLU of) a linear map of [LN(ID stream), ID embedding].
        """
        if self.to_id_value is None:
            return id_embedding
        height, width = id_embedding.shape[-2:]
        tokens = map_to_tokens(id_embedding)
        if not self.first:
            if id_stream is None:
                raise ValueError("a propagation layer after the first needs the frame's ID stream")
            tokens = torch.cat((self.norm_id_input(map_to_tokens(id_stream)), tokens), dim=-1)
        value = self.to_id_value(tokens)
        if self.expand:
            value = F.silu(value)
        return tokens_to_map(value, height, width)

    def _gated(
        self,
        read: torch.Tensor,
        gate: torch.Tensor | None,
        conv: nn.Module | None,
        size: tuple[int, int],
    ) -> torch.Tensor:
        """read ⊙ gate (read alone without a gate), then the depth-wise conv when there is one:
        B × N × value_dim → B × N × value_dim."""
        gated = read if gate is None else read * gate
        if conv is None:
            return gated
        return map_to_tokens(conv(tokens_to_map(gated, *size)))

    def read_memory(
        self,
        embedding: torch.Tensor,
        query: torch.Tensor,
        memory: Memory,
        *,
        identity: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, DeformableAttentionAux] | None]:
        """Gated long-term + short-term read-out.

        Args:
            embedding: B × d × h × w, the query frame's visual stream (the residual stream).
            query: B × key_dim × h × w, its projected queries (`key_value`'s key).
            memory: this layer's memory (`Memory.layer`).
            identity: B × N × d, the ID stream entering (a later layer), None for the first.

        Returns:
            (visual, identity, aux): visual and ID streams B × N × d (N = h·w); aux or None.
        """
        long_key, long_value, long_id = memory.long_term_maps()  # one frame, or L frames stacked
        long_visual_id, long_aux = self.long_term(
            query, long_key, (long_value, long_id), return_aux=return_attention
        )
        short_visual_id, short_aux = self.short_term(
            query,
            memory.previous_key,
            (memory.previous_value, memory.previous_id),
            return_aux=return_attention,
        )
        visual_read = long_visual_id[0] + short_visual_id[0]
        weight = float(self.long_term_weight)  # 1: the trained sum, exactly (× 1.0 is exact)
        id_read = weight * long_visual_id[1] + (2.0 - weight) * short_visual_id[1]
        visual, identity = self.gate_reads(embedding, visual_read, id_read, identity)
        aux = None
        if return_attention:
            aux = {"long_term": long_aux, "short_term": short_aux}
        return visual, identity, aux

    def gate_reads(
        self,
        embedding: torch.Tensor,
        visual_read: torch.Tensor,
        id_read: torch.Tensor,
        identity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The streams after the memory reads: each read gated, (convolved,) projected, added.

        Args:
            embedding: B × d × h × w, the visual stream entering (the residual).
            visual_read, id_read: B × N × value_dim, the attention-weighted memory values (both reads).
            identity: B × N × d, the ID stream entering (a later layer), None for the first.

        Returns:
            (visual, identity): B × N × d each.
        """
        size = (embedding.shape[-2], embedding.shape[-1])
        tokens = map_to_tokens(embedding)
        normed = self.norm_input(tokens)
        visual_gate = F.silu(self.gate_visual(normed))
        visual = tokens + self.out_visual(self._gated(visual_read, visual_gate, self.dw_visual, size))
        if self.first:
            id_gate = None if self.gate_id is None else F.silu(self.gate_id(normed))
            identity = self.out_id(self._gated(id_read, id_gate, self.dw_id, size))
        else:
            if identity is None:
                raise ValueError("a propagation layer after the first needs the ID stream")
            id_gate = F.silu(self.gate_id(self.norm_id_input(identity)))
            identity = identity + self.out_id(self._gated(id_read, id_gate, self.dw_id, size))
        return visual, identity

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
        size = (position.shape[-2], position.shape[-1])
        normed_visual = self.norm_self_visual(visual)
        normed_id = self.norm_self_id(identity)
        query, key = self.self_query_key(normed_visual + map_to_tokens(position)).chunk(2, dim=-1)
        values = [self.self_value_visual(normed_visual), self.self_value_id(normed_id)]
        if self.expand:
            values = [F.silu(value) for value in values]
        visual_read, id_read = attend(
            split_heads(query, self.num_heads),
            split_heads(key, self.num_heads),
            [split_heads(value, self.num_heads) for value in values],
            need_weights=False,
        )[0]
        visual_gate = F.silu(self.self_gate_visual(normed_visual))
        id_gate = F.silu(self.self_gate_id(normed_id))
        visual = visual + self.self_out_visual(
            self._gated(visual_read, visual_gate, self.self_dw_visual, size)
        )
        identity = identity + self.self_out_id(self._gated(id_read, id_gate, self.self_dw_id, size))
        return visual, identity

    def feed_forward(self, visual: torch.Tensor, identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual feed-forward of each stream (B × N × d each); unchanged without one."""
        if not self.ffn:
            return visual, identity
        visual = visual + self.ffn_visual(self.norm_ffn_visual(visual))
        identity = identity + self.ffn_id(self.norm_ffn_id(identity))
        return visual, identity

    def propagate(
        self,
        embedding: torch.Tensor,
        position: torch.Tensor,
        memory: Memory,
        *,
        identity: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, DeformableAttentionAux] | None
    ]:
        """The layer on one query frame, streams not normalised (the next layer's input).

        Args:
            embedding: B × d × h × w, the visual stream entering (the frame's embedding for the first
                layer).
            position: 1 × d × h × w.
            memory: this layer's memory (`Memory.layer`).
            identity: B × N × d, the ID stream entering (None for the first layer).

        Returns:
            (visual, identity, key, value, aux): the streams B × N × d; the frame's own key and
            visual value for this layer's memory (`key_value`); aux or None.
        """
        key, value = self.key_value(embedding, position)
        visual, identity, aux = self.read_memory(
            embedding, key, memory, identity=identity, return_attention=return_attention
        )
        visual, identity = self.self_propagate(visual, identity, position)
        visual, identity = self.feed_forward(visual, identity)
        return visual, identity, key, value, aux

    def output(self, visual: torch.Tensor, identity: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The last layer's normalised streams as the decoder's input: B × N × d each → B × 2d × h × w
        (channels [0, d) the visual stream, [d, 2d) the ID stream)."""
        propagated = torch.cat((self.norm_out_visual(visual), self.norm_out_id(identity)), dim=-1)
        return tokens_to_map(propagated, height, width)

    def forward(
        self,
        embedding: torch.Tensor,
        position: torch.Tensor,
        memory: Memory,
        *,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, DeformableAttentionAux] | None]:
        """Propagate the memory to one query frame (a single layer: first and last).

        Args:
            embedding: B × d × h × w, the query frame's embedding.
            position: 1 × d × h × w.
            memory: the clip's memory (maps of the same h × w).

        Returns:
            (propagated, key, value, aux): propagated B × 2d × h × w (channels [0, d) the visual stream,
            [d, 2d) the ID stream); the query frame's key and visual value (what it contributes to
            the memory); aux or None.
        """
        height, width = embedding.shape[-2:]
        visual, identity, key, value, aux = self.propagate(
            embedding, position, memory, return_attention=return_attention
        )
        return self.output(visual, identity, height, width), key, value, aux
