"""Local attention of query tokens over a window of one memory frame (DeAOT's short-term read).

`model.short_term_read=local`: query token n at cell (y, x) attends to the memory frame's cells
(y + dy, x + dx) with |dy|, |dx| ≤ r, a (2r + 1)² window (DeAOT: 15 × 15, r = 7); cells past the
map's edge are left out (DeAOT masks them the same way). The affinity of a pair is the attention's
q·k (scaled dot product, or the cosine form of `DeformableAttention`) plus a relative position
bias that depends on the query and on the offset (dy, dx), as DeAOT's `relative_emb_k` (a 1 × 1
conv of the queries with one output per head and window position):

    a(n, m) = q_n·k_m / √d_head + w_{h, (dy, dx)}·q_n + b_{h, (dy, dx)}     (m inside n's window)
    A(n, ·) = softmax over the window of a(n, ·)

The bias weights start at zero (no positional preference), so a fresh read is plain windowed
attention. The map is computed as a full N × N map with −∞ outside the windows (N = h·w tokens:
4 bytes · heads · N² per map, 10 MB for a 480p frame's 30 × 54 cells and one head), which exports
and runs on any device without a correlation kernel; `LocalAttention.forward` returns it in the
same form as a deformable read's (`DeformableAttentionAux`, every memory cell a sampling point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dvos.models.deformable import (
    DeformableAttentionAux,
    _scaled_query_key,
    apply_attention,
    pixel_to_normalized,
    reference_points,
    split_heads,
)


def window_layout(
    height: int, width: int, radius: int, *, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which memory tokens lie in each query token's window, and where.

    Args:
        height, width: h × w of the query map and of the memory map (tokens row-major).
        radius: r; the window is (2r + 1) × (2r + 1) cells centred on the query's cell.

    Returns:
        (inside, index): N × N bool, memory token m is in query token n's window; N × N int64, the
        window position (dy + r)·(2r + 1) + (dx + r) of m seen from n, (dy, dx) = m's cell − n's
        cell (0 where not inside).
    """
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    dy = rows[None, :] - rows[:, None]
    dx = cols[None, :] - cols[:, None]
    inside = (dy.abs() <= radius) & (dx.abs() <= radius)
    index = (dy + radius) * (2 * radius + 1) + (dx + radius)
    return inside, torch.where(inside, index, torch.zeros_like(index))


class LocalAttention(nn.Module):
    """Multi-head attention of a query frame over a window of one memory frame (see the module).

    Takes the same arguments as `DeformableAttention.forward` and returns the same outputs, so the
    propagation layer reads its short-term memory through either.

    Args:
        dim: C, channels of queries and keys (divisible by num_heads).
        num_heads: attention heads.
        window: side of the window in memory cells (odd; DeAOT 15).
        attention_scale: > 0: cosine attention with a learned per-head scale starting here; 0:
            softmax(q·k/√d_head) (as `DeformableAttention`).
        topk: each query keeps its `topk` largest affinities in the window (0: all of them).
    """

    def __init__(
        self, dim: int, *, num_heads: int = 8, window: int = 15, attention_scale: float = 0.0, topk: int = 0
    ) -> None:
        super().__init__()
        if window < 1 or window % 2 != 1:
            raise ValueError(f"local_window must be odd and ≥ 1, got {window}")
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}")
        self.num_heads = num_heads
        self.window = int(window)
        self.radius = self.window // 2
        self.topk = int(topk)
        positions = self.window * self.window
        # the relative position bias: a linear map of each head's query to one logit per window cell
        self.relative_weight = nn.Parameter(torch.zeros(num_heads, positions, dim // num_heads))
        self.relative_bias = nn.Parameter(torch.zeros(num_heads, positions))
        self.logit_scale = None
        if attention_scale > 0:
            self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(attention_scale)))

    def attention_map(self, query: torch.Tensor, key: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """query, key: B × heads × N × d_head (N = h·w) → B × heads × N × N float32 (float64 for
        float64 inputs), each row a distribution over the query's window."""
        with torch.autocast(device_type=query.device.type, enabled=False):
            dtype = torch.promote_types(query.dtype, torch.float32)
            scaled_query, scaled_key = _scaled_query_key(query, key, self.logit_scale)
            affinity = torch.matmul(scaled_query, scaled_key.transpose(-1, -2))
            relative = torch.einsum("bhnc,hrc->bhnr", query.to(dtype), self.relative_weight.to(dtype))
            relative = relative + self.relative_bias.to(dtype)[None, :, None, :]
            inside, index = window_layout(height, width, self.radius, device=query.device)
            batch, heads, tokens = affinity.shape[:3]
            bias = relative.gather(-1, index.expand(batch, heads, tokens, tokens))
            affinity = (affinity + bias).masked_fill(~inside, float("-inf"))
            if 0 < self.topk < self.window * self.window:
                kept, picked = affinity.topk(min(self.topk, tokens), dim=-1)
                affinity = torch.full_like(affinity, float("-inf")).scatter(-1, picked, kept)
            return torch.softmax(affinity, dim=-1)

    def forward(
        self,
        query: torch.Tensor,
        memory_key: torch.Tensor,
        memory_values: Sequence[torch.Tensor],
        *,
        return_aux: bool = False,
    ) -> tuple[list[torch.Tensor], DeformableAttentionAux | None]:
        """Attend from the query frame to a window of the memory frame around each query cell.

        Args:
            query: B × C × h × w, projected queries of the query frame.
            memory_key: B × C × h × w, projected keys of the memory frame (the same h × w).
            memory_values: value maps B × C_v × h × w (C_v divisible by the heads).
            return_aux: also return the map, every memory cell as a sampling point.

        Returns:
            (outputs, aux): one B × N × C_v tensor per value map; aux or None.
        """
        if query.shape[-2:] != memory_key.shape[-2:] or memory_key.ndim != 4:
            raise ValueError(
                f"the local read needs one memory map of the query's size, got {tuple(memory_key.shape)} "
                f"for a query of {tuple(query.shape)}"
            )
        height, width = query.shape[-2:]
        queries = split_heads(query.flatten(2).transpose(1, 2), self.num_heads)
        keys = split_heads(memory_key.flatten(2).transpose(1, 2), self.num_heads)
        attention = self.attention_map(queries, keys, height, width)
        values = [split_heads(value.flatten(2).transpose(1, 2), self.num_heads) for value in memory_values]
        outputs = [apply_attention(attention, value) for value in values]
        if not return_aux:
            return outputs, None
        cells = reference_points(height, width, 1, device=query.device).reshape(-1, 2)
        positions_px = cells[None, None].expand(query.shape[0], 1, -1, -1)
        aux = DeformableAttentionAux(
            attention=attention,
            positions=pixel_to_normalized(positions_px, height, width),
            positions_px=positions_px,
            offsets=torch.zeros_like(positions_px),
            reference_px=cells,
            grid_size=(height, width),
        )
        return outputs, aux
