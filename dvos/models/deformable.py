"""Deformable attention of query tokens over one memory frame (DAT-style, Xia et al. 2022).

The student's propagation layer reads each memory frame (the reference frame, the previous frame)
through one `DeformableAttention`:

1. reference points: a regular grid with stride s over the memory map, one point at the centre of
   every s × s cell (`reference_points`);
2. offsets: an offset network run on the *query* frame's projected queries, per group of channels
   (depth-wise k × k conv with stride s, so its output grid is the reference grid → LayerNorm over
   channels → GELU → 1 × 1 conv to (Δx, Δy)), bounded by tanh × offset_range (in memory-map cells);
   the last conv starts at zero, so a fresh network samples the regular grid;
3. sampling: memory keys and values (visual and ID branches) are read at reference + offset with
   bilinear `grid_sample`;
4. attention: softmax(q · kᵀ / √d_head) of each query token over the M sampled points (or over its
   `topk` most similar ones), in float32, one map per head shared by every value branch.

Heads are split into groups; the heads of one group use the group's channels and share its sampling
points (num_groups divides num_heads).

Coordinate conventions (docs/DESIGN.md, "Tensors and images"), used everywhere in dvos:

- pixel coordinates (x, y): x indexes width, y height; pixel i's centre is at i (so a map of width W
  spans [-0.5, W - 0.5]);
- normalised coordinates, as `F.grid_sample(..., align_corners=False)` reads them: x_n = 2(x + 0.5)/W − 1,
  so -1 and 1 are the map's outer edges and pixel i's centre is (2i + 1)/W − 1; points outside read
  zeros (`padding_mode="zeros"`);
- offsets are in memory-map cells (pixels of the memory map, i.e. stride-16 image cells), (Δx, Δy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.layers import LayerNorm2d


# --------------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------------
def reference_points(
    height: int,
    width: int,
    stride: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Centres of the s × s cells tiling an H × W map, in pixel coordinates (x, y).

    Cell (i, j) covers rows [s·i, min(s·i + s, H)) and columns [s·j, min(s·j + s, W)); its centre is the
    mean of its first and last pixel, e.g. s·j + (s − 1)/2 for a full cell (a truncated last cell keeps
    its own centre, so no point sits outside the map).

    Args:
        height, width: H × W of the memory map.
        stride: s, the cell size.

    Returns:
        ⌈H/s⌉ × ⌈W/s⌉ × 2, (x, y) in pixels, row-major (the order of the offset network's output grid).
    """
    rows = torch.arange(0, height, stride, device=device, dtype=dtype)
    cols = torch.arange(0, width, stride, device=device, dtype=dtype)
    y = (rows + torch.clamp(rows + stride, max=height) - 1) / 2
    x = (cols + torch.clamp(cols + stride, max=width) - 1) / 2
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


def pixel_to_normalized(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel (x, y) → `grid_sample` coordinates with align_corners=False: x_n = 2(x + 0.5)/W − 1.

    Args:
        points: ... × 2, (x, y) in pixels of an H × W map.
    """
    size = points.new_tensor([width, height])
    return 2 * (points + 0.5) / size - 1


def normalized_to_pixel(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pixel_to_normalized`: x = (x_n + 1)·W/2 − 0.5. points: ... × 2 (x, y)."""
    size = points.new_tensor([width, height])
    return (points + 1) * size / 2 - 0.5


# --------------------------------------------------------------------------------------------------
# Sampling and attention
# --------------------------------------------------------------------------------------------------
def sample_memory(memory: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Read a memory map at per-group points with bilinear interpolation (zeros outside).

    Args:
        memory: B × C × H × W; channel group g is [g·C/G, (g+1)·C/G).
        positions: B × G × M × 2, normalised (x, y) (align_corners=False convention).

    Returns:
        B × G × C/G × M: group g's channels read at group g's points.
    """
    batch, channels, height, width = memory.shape
    groups, num_points = positions.shape[1], positions.shape[2]
    grouped = memory.reshape(batch * groups, channels // groups, height, width)
    grid = positions.reshape(batch * groups, 1, num_points, 2).to(memory.dtype)
    sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.reshape(batch, groups, channels // groups, num_points)


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B × N × C → B × heads × N × C/heads (head h owns channels [h·C/heads, (h+1)·C/heads))."""
    batch, num_tokens, channels = tokens.shape
    return tokens.reshape(batch, num_tokens, num_heads, channels // num_heads).transpose(1, 2)


def merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """B × heads × N × C/heads → B × N × C (inverse of `split_heads`)."""
    batch, num_heads, num_tokens, head_dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, num_tokens, num_heads * head_dim)


def grouped_points_to_heads(sampled: torch.Tensor, num_heads: int) -> torch.Tensor:
    """B × G × C/G × M (group-sampled) → B × heads × M × C/heads (each head reads its group's points)."""
    batch, groups, group_channels, num_points = sampled.shape
    heads_per_group = num_heads // groups
    per_head = sampled.reshape(batch, groups, heads_per_group, group_channels // heads_per_group, num_points)
    return per_head.reshape(batch, num_heads, group_channels // heads_per_group, num_points).transpose(2, 3)


def _scaled_query_key(
    query: torch.Tensor, key: torch.Tensor, logit_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) in at least float32, scaled so that their product is the affinity: q / √d_head, or
    the cosine form's exp(logit_scale) · q̂ and k̂. Call under autocast disabled."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    if logit_scale is None:
        return query.to(dtype) * (1.0 / math.sqrt(query.shape[-1])), key.to(dtype)
    # cosine attention: unit-length queries and keys, a learned per-head temperature
    scale = logit_scale.to(dtype).exp().reshape(1, -1, 1, 1)
    return F.normalize(query.to(dtype), dim=-1) * scale, F.normalize(key.to(dtype), dim=-1)


def _softmax_of_affinity(query: torch.Tensor, key: torch.Tensor, topk: int) -> torch.Tensor:
    """softmax over the keys of query · keyᵀ (inputs from `_scaled_query_key`), top-k as documented in
    `attention_weights`."""
    affinity = torch.matmul(query, key.transpose(-1, -2))
    if 0 < topk < affinity.shape[-1]:
        kept, index = affinity.topk(topk, dim=-1)
        affinity = torch.full_like(affinity, float("-inf")).scatter(-1, index, kept)
    return torch.softmax(affinity, dim=-1)


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    logit_scale: torch.Tensor | None = None,
    *,
    topk: int = 0,
) -> torch.Tensor:
    """softmax(q · kᵀ / √d_head) over the keys (or, with `logit_scale` (heads,), the cosine form
    softmax(exp(logit_scale) · q̂ · k̂ᵀ)), computed in float32 even under autocast.

    With 0 < topk < M each query keeps only its `topk` largest affinities and the softmax runs over
    those (the others get weight exactly 0), as in the teacher's and STCN's / XMem's top-k memory
    reading.

    Args:
        query: B × heads × N × d_head.
        key: B × heads × M × d_head.
        topk: keys kept per query (0: all).

    Returns:
        B × heads × N × M, float32 (float64 for float64 inputs), rows sum to 1.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        return _softmax_of_affinity(*_scaled_query_key(query, key, logit_scale), topk)


def apply_attention(attention: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """attention: B × heads × N × M (float32), value: B × heads × M × d_head → B × N × heads·d_head.

    The product is taken in the attention's dtype (float32 or float64) and returned in the value's.
    """
    with torch.autocast(device_type=attention.device.type, enabled=False):
        out = torch.matmul(attention, value.to(attention.dtype))
    return merge_heads(out).to(value.dtype)


# At inference on the CPU (no autograd, no map wanted) `attend` computes the map a block of query rows
# at a time, each block at most this many elements (8 MB in float32): the whole map of a 600-px frame's
# self-propagation is 8 × 2546² elements (198 MB, and as much again for its softmax), of a 1080p
# frame's 8 × 8160² (2 GB). The rows of a softmax are independent, so the result is the same up to
# float rounding (the embedded evaluation's masks were identical), and on a CPU the blocks are faster
# too (`make bench`, "attention": docs/LOG.md, "2026-12-06 — Attention in row blocks at inference").
ATTENTION_BLOCK_ELEMENTS = 1 << 21


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    values: Sequence[torch.Tensor],
    logit_scale: torch.Tensor | None = None,
    *,
    topk: int = 0,
    need_weights: bool = True,
    block_elements: int | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """`attention_weights` of the queries over the keys applied to each value (one map shared).

    On the CPU, without autograd and without `need_weights`, the map is never held whole: blocks of
    query rows, each map block at most `block_elements`, are normalised and applied in turn.

    Args:
        query: B × heads × N × d_head.
        key: B × heads × M × d_head.
        values: value tensors B × heads × M × d_v (d_v may differ between them).
        logit_scale, topk: see `attention_weights`.
        need_weights: return the B × heads × N × M map (then computed whole).
        block_elements: the largest map block computed at once without autograd (None:
            `ATTENTION_BLOCK_ELEMENTS`, read at the call).

    Returns:
        (outputs, attention): one B × N × heads·d_v tensor per value (`apply_attention`); the map, or
        None without `need_weights`.
    """
    batch, heads, num_queries, _ = query.shape
    budget = ATTENTION_BLOCK_ELEMENTS if block_elements is None else int(block_elements)
    rows = max(1, budget // max(1, batch * heads * key.shape[2]))
    # The whole map: when it is wanted, under autograd, when it fits one block, on GPUs (where a block
    # is a few kernel launches and the whole map is fast) and in traced or exported graphs
    # (TorchScript, ONNX: no Python loop unrolled into them).
    blocked = not (need_weights or torch.is_grad_enabled() or rows >= num_queries)
    blocked = blocked and query.device.type == "cpu"
    if not blocked or torch.jit.is_tracing() or torch.compiler.is_compiling():
        attention = attention_weights(query, key, logit_scale, topk=topk)
        return [apply_attention(attention, value) for value in values], attention if need_weights else None
    with torch.autocast(device_type=query.device.type, enabled=False):
        query, key = _scaled_query_key(query, key, logit_scale)
        wide = [value.to(query.dtype) for value in values]
        outputs = [value.new_empty(batch, heads, num_queries, value.shape[-1]) for value in wide]
        for start in range(0, num_queries, rows):
            attention = _softmax_of_affinity(query[:, :, start : start + rows], key, topk)
            for output, value in zip(outputs, wide):
                torch.matmul(attention, value, out=output[:, :, start : start + rows])
    return [merge_heads(output).to(value.dtype) for output, value in zip(outputs, values)], None


def deformable_attention(
    query: torch.Tensor,
    memory_key: torch.Tensor,
    memory_values: Sequence[torch.Tensor],
    offsets: torch.Tensor,
    *,
    num_heads: int,
    stride: int,
    logit_scale: torch.Tensor | None = None,
    topk: int = 0,
    need_weights: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Multi-head attention of every query token over memory points read at reference + offset.

    Args:
        query: B × C × h × w, the projected queries (token n = row-major pixel n).
        memory_key: B × C × H × W, the projected keys of one memory frame.
        memory_values: value maps B × C_v × H × W of the same frame (e.g. visual and ID); C_v divisible
            by the number of groups and of heads.
        offsets: B × G × ⌈H/s⌉ × ⌈W/s⌉ × 2, (Δx, Δy) in memory-map cells, one per reference point and group.
        num_heads: heads; G = offsets.shape[1] divides it.
        stride: s of the reference grid.
        logit_scale: per-head log scale of cosine attention (None: scaled dot product).
        topk: sampled points each query attends to, its most similar ones (0: all M).
        need_weights: return the attention map (False: None, and at inference it is computed a block
            of query rows at a time, `attend`).

    Returns:
        (outputs, attention, positions): one B × N × C_v tensor per value map; the attention
        B × heads × N × M (float32, M = ⌈H/s⌉·⌈W/s⌉) or None; the sampling positions B × G × M × 2 in
        pixels of the memory map (x, y).
    """
    batch, _, height, width = memory_key.shape
    groups = offsets.shape[1]
    # positions in at least float32: half precision cannot tell pixel fractions apart on wide maps
    offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
    reference = reference_points(height, width, stride, device=offsets.device, dtype=offsets.dtype)
    positions_px = (reference[None, None] + offsets).reshape(batch, groups, -1, 2)
    positions = pixel_to_normalized(positions_px, height, width)

    queries = split_heads(query.flatten(2).transpose(1, 2), num_heads)
    keys = grouped_points_to_heads(sample_memory(memory_key, positions), num_heads)
    values = [grouped_points_to_heads(sample_memory(value, positions), num_heads) for value in memory_values]
    outputs, attention = attend(queries, keys, values, logit_scale, topk=topk, need_weights=need_weights)
    return outputs, attention, positions_px


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class OffsetNetwork(nn.Module):
    """Query features of one group → bounded 2-D offsets on the stride-s reference grid.

    depth-wise k × k conv (stride s, padding k//2: output ⌈h/s⌉ × ⌈w/s⌉, the reference grid) →
    LayerNorm over channels → GELU → 1 × 1 conv to (Δx, Δy), initialised to zero → tanh × offset_range.

    Args:
        channels: channels of one group (C/G); the network is shared by the groups.
        kernel: k, odd.
        stride: s.
        offset_range: the largest offset, in memory-map cells.
    """

    def __init__(self, channels: int, *, kernel: int = 5, stride: int = 2, offset_range: float = 4.0) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"offset_kernel must be odd, got {kernel}")
        self.depthwise = nn.Conv2d(
            channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels
        )
        self.norm = LayerNorm2d(channels)
        self.activation = nn.GELU()
        self.to_offsets = nn.Conv2d(channels, 2, 1, bias=False)
        nn.init.zeros_(self.to_offsets.weight)  # a fresh network samples the regular grid
        self.offset_range = float(offset_range)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """query: B' × C/G × h × w → offsets B' × ⌈h/s⌉ × ⌈w/s⌉ × 2, (Δx, Δy) in [-range, range] cells."""
        x = self.activation(self.norm(self.depthwise(query)))
        offsets = torch.tanh(self.to_offsets(x)) * self.offset_range
        return offsets.permute(0, 2, 3, 1)


@dataclass
class DeformableAttentionAux:
    """What one deformable attention looked at, for distillation and for pictures.

    Attributes:
        attention: B × heads × N × M, float32 (N = h·w query tokens, M = sampled points per group).
        positions: B × G × M × 2, sampling points, normalised (x, y) in [-1, 1] (align_corners=False).
        positions_px: B × G × M × 2, the same points in memory-map pixels (x, y).
        offsets: B × G × M × 2, (Δx, Δy) from the reference points, in memory-map cells.
        reference_px: M × 2, the reference grid (x, y) in memory-map pixels.
        grid_size: (⌈H/s⌉, ⌈W/s⌉), the layout of the M points (row-major).
    """

    attention: torch.Tensor
    positions: torch.Tensor
    positions_px: torch.Tensor
    offsets: torch.Tensor
    reference_px: torch.Tensor
    grid_size: tuple[int, int]


class DeformableAttention(nn.Module):
    """Deformable multi-head attention of a query frame over one memory frame.

    The q/k/v projections live in the layer that uses this module (they are shared between memory
    frames); this module owns the offset network, the reference grid and the sampling.

    Args:
        dim: C, channels of queries and keys.
        num_heads: attention heads (divides C).
        num_groups: offset groups G (divides num_heads); the heads of a group share sampling points.
        stride: s, the reference-grid stride over the memory map.
        offset_range: the largest offset, in memory-map cells.
        offset_kernel: k of the offset network's depth-wise conv.
        attention_scale: > 0: cosine attention, softmax(scale · q̂·k̂) with a learned per-head scale
            starting here (sharp, correspondence-like maps from the first step); 0: softmax(q·k/√d).
        topk: each query token attends to its `topk` most similar sampled points (0: all of them).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        num_groups: int = 4,
        stride: int = 2,
        offset_range: float = 4.0,
        offset_kernel: int = 5,
        attention_scale: float = 0.0,
        topk: int = 0,
    ) -> None:
        super().__init__()
        if topk < 0:
            raise ValueError(f"topk must be >= 0, got {topk}")
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if num_heads % num_groups != 0:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_groups {num_groups}")
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.stride = stride
        self.topk = int(topk)
        self.offset_network = OffsetNetwork(
            dim // num_groups, kernel=offset_kernel, stride=stride, offset_range=offset_range
        )
        # Cosine attention (unit-length q and k, a learned per-head scale starting at `attention_scale`)
        # when attention_scale > 0; scaled dot product (q·k/√d) otherwise.
        self.logit_scale = None
        if attention_scale > 0:
            self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(attention_scale)))

    def predict_offsets(self, query: torch.Tensor) -> torch.Tensor:
        """query: B × C × h × w (projected queries) → offsets B × G × ⌈h/s⌉ × ⌈w/s⌉ × 2 (cells)."""
        batch, channels, height, width = query.shape
        grouped = query.reshape(batch * self.num_groups, channels // self.num_groups, height, width)
        offsets = self.offset_network(grouped)
        return offsets.reshape(batch, self.num_groups, *offsets.shape[1:])

    def forward(
        self,
        query: torch.Tensor,
        memory_key: torch.Tensor,
        memory_values: Sequence[torch.Tensor],
        *,
        return_aux: bool = False,
    ) -> tuple[list[torch.Tensor], DeformableAttentionAux | None]:
        """Attend from the query frame to one memory frame.

        Args:
            query: B × C × h × w, projected queries of the query frame.
            memory_key: B × C × h × w, projected keys of the memory frame (same size as the query: the
                offset network's output grid is the memory's reference grid).
            memory_values: value maps B × C_v × h × w of the memory frame (visual, ID, ...).
            return_aux: also return a `DeformableAttentionAux`.

        Returns:
            (outputs, aux): one B × N × C_v tensor per value map (N = h·w); aux or None.
        """
        if query.shape[-2:] != memory_key.shape[-2:]:
            raise ValueError(
                f"query map {tuple(query.shape[-2:])} and memory map {tuple(memory_key.shape[-2:])} differ"
            )
        offsets = self.predict_offsets(query)
        outputs, attention, positions_px = deformable_attention(
            query,
            memory_key,
            memory_values,
            offsets,
            num_heads=self.num_heads,
            stride=self.stride,
            logit_scale=self.logit_scale,
            topk=self.topk,
            need_weights=return_aux,
        )
        if not return_aux:
            return outputs, None
        height, width = memory_key.shape[-2:]
        grid_size = (offsets.shape[2], offsets.shape[3])
        aux = DeformableAttentionAux(
            attention=attention,
            positions=pixel_to_normalized(positions_px, height, width),
            positions_px=positions_px,
            offsets=offsets.reshape(offsets.shape[0], self.num_groups, -1, 2),
            reference_px=reference_points(
                height, width, self.stride, device=offsets.device, dtype=offsets.dtype
            ).reshape(-1, 2),
            grid_size=grid_size,
        )
        return outputs, aux
