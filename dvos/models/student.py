"""The student: a DeAOT-T-style network with gated deformable propagation (one layer by default).

    image ──encode_frame──▶ stride-4/8/16 maps; stride-16 map → 1×1 conv → embedding (d) + sine position
    masks ──embed_ids────▶ ID embedding (d, stride 16): a 17×17 stride-16 conv over the one-hot (AOT),
                           LayerNormed with `id_norm` (DeAOT)
    memory = reference frame (long-term) + previous frame (short-term), each: keys, visual values,
             ID values — constant size, the short-term part is replaced every frame; at
             inference a frame where objects first appear joins the long-term part (bounded)
    propagate: deformable long-term and short-term attention (DAT-style sampling, one attention map
               per head shared by the visual and the ID branch; or a local window for the short-term
               read), SiLU-gated (DeAOT) → gated self-propagation among the query tokens →
               feed-forward; two output streams (visual, ID); `num_layers` such layers stacked, each
               with its own memory entries (`propagate_frame`)
    decode:    FPN with stride-8 and stride-4 skips → per-object logits, bilinear to the input size,
               ids above the clip's object count masked out

Decisions (where DeAOT, DAT and the paper's summary leave a choice; all are constructor arguments;
those of the propagation layer in dvos/models/propagation.py):

- ID permutation (AOT's random identity assignment): in training mode with `permute_ids=True` every
  sample of a clip draws a random permutation of the object slots 1..max_objects (background stays
  0) when its memory is initialised; masks are embedded through it and the logits are mapped back,
  so callers only ever see the objects' own ids. In eval mode the permutation is the identity.
  With `permute_slots` P < max_objects the draw permutes slots 1..P only (the others stay put):
  a short run whose clips hold few objects trains each of those P slots more often.
- Padding: frames whose sides are not multiples of 16 are padded (replicate, split evenly) before
  the encoder and the logits cropped back (`pad_to_stride`, `unpad`).

Its parts have their own modules: the memory (dvos/models/memory.py), the propagation layer
(dvos/models/propagation.py), the decoder (dvos/models/decoder.py). `dvos.models.build` builds the
student from a config.

`forward` is the frame step with explicit tensors in and out (for TorchScript tracing / ONNX export
at a fixed input size); `step`/`segment_clip` are the convenient forms with a `Memory` object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.decoder import FPNDecoder
from dvos.models.deformable import DeformableAttentionAux
from dvos.models.layers import LayerNorm2d, pad_to_stride, sine_position_embedding, unpad
from dvos.models.memory import Memory
from dvos.models.propagation import GatedDeformablePropagation, tokens_to_map

FEATURE_STRIDE = 16  # stride of the propagation map (the encoder's output stride)
ABSENT_LOGIT = -1e4  # logit of ids above a clip's object count: exp() underflows to 0, fp16-safe


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------
class FrameFeatures(NamedTuple):
    """One encoded frame (all maps at the padded size H' × W', multiples of 16).

    Attributes:
        stride4: B × C4 × H'/4 × W'/4 encoder map.
        stride8: B × C8 × H'/8 × W'/8 encoder map.
        stride16: B × C16 × H'/16 × W'/16 encoder map.
        embedding: B × d × h × w, the stride-16 map projected to d (h = H'/16, w = W'/16).
        position: 1 × d × h × w, the sine position embedding.
        pad: (left, right, top, bottom) pixels added to the input (see `pad_to_stride`).
    """

    stride4: torch.Tensor
    stride8: torch.Tensor
    stride16: torch.Tensor
    embedding: torch.Tensor
    position: torch.Tensor
    pad: tuple[int, int, int, int]


class StepOutput(NamedTuple):
    """Result of `DeformableStudent.step`.

    Attributes:
        logits: B × (max_objects + 1) × H × W, per-object logits at the input size, in the objects' own
            ids (ids above the sample's object count at ABSENT_LOGIT).
        memory: the memory for the next frame (short-term part replaced when asked, else the input).
        aux: None, or {"long_term": DeformableAttentionAux, "short_term": DeformableAttentionAux}.
        key, value: B × C × h × w, the frame's own memory entries (`DeformableStudent.remember` makes
            them the short-term memory with a mask of the caller's choosing).
        id_stream: None with one propagation layer; with L layers B × (L − 1)·d × h × w, the frame's
            ID streams entering layers 2..L (their memory's ID values fuse them, `memory_ids`).
    """

    logits: torch.Tensor
    memory: Memory
    aux: dict[str, DeformableAttentionAux] | None
    key: torch.Tensor
    value: torch.Tensor
    id_stream: torch.Tensor | None = None


class PropagationOutput(NamedTuple):
    """Result of `DeformableStudent.propagate_frame`.

    Attributes:
        propagated: B × 2d × h × w, the last layer's normalised streams (visual, ID) for the decoder.
        key, value: B × C × h × w, the frame's memory keys and visual values, every layer's side by side.
        id_stream: see `StepOutput.id_stream`.
        aux: None, or the last layer's {"long_term", "short_term"} `DeformableAttentionAux`.
    """

    propagated: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    id_stream: torch.Tensor | None
    aux: dict[str, DeformableAttentionAux] | None


def memory_masks(logits: torch.Tensor, *, soft: bool) -> torch.Tensor:
    """The masks a predicted frame enters the short-term memory with: B × C × H × W logits → the
    softmax probabilities (soft, as in training) or the argmax one-hot, in the logits' dtype."""
    if soft:
        return torch.softmax(logits.float(), dim=1).to(logits.dtype)
    return labels_to_onehot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)


def reading_problem(
    attention_topk: int | None,
    long_term_weight: float | None,
    names: tuple[str, str] = ("attention_topk", "long_term_weight"),
) -> str | None:
    """What is wrong with inference-time reading settings (`DeformableStudent.reading`), one line
    naming the setting by `names`, or None. None values mean "as trained" and are always valid."""
    if attention_topk is not None and int(attention_topk) < 0:
        return f"{names[0]} must be ≥ 0 (0: all points) or null, got {attention_topk}"
    if long_term_weight is not None and not 0.0 <= float(long_term_weight) <= 2.0:
        return f"{names[1]} must be in [0, 2] (1: as trained) or null, got {long_term_weight}"
    return None


def labels_to_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels: B × H × W long in [0, num_classes) → B × num_classes × H × W float one-hot."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------------------------------
# The student
# --------------------------------------------------------------------------------------------------
def _encoder_channels(encoder: nn.Module, encoder_channels: Sequence[int] | None) -> tuple[int, int, int]:
    """(C4, C8, C16) of an encoder: given, or its `encoder_channels` / `out_channels` attribute."""
    channels = encoder_channels
    if channels is None:
        channels = getattr(encoder, "encoder_channels", None) or getattr(encoder, "out_channels", None)
    if channels is None or len(channels) != 3:
        raise ValueError(
            "the encoder must expose `encoder_channels` (C4, C8, C16), or pass encoder_channels="
        )
    return tuple(int(c) for c in channels)  # type: ignore[return-value]


class DeformableStudent(nn.Module):
    """MobileNet-V2 encoder + ID embedding + gated deformable propagation layer(s) + FPN decoder.

    Args:
        encoder: image encoder, `encoder(B × 3 × H × W in [0, 1]) -> (stride4, stride8, stride16)`;
            default: `MobileNetV2Encoder()` at output stride 16 with random weights (ImageNet weights:
            `dvos.models.build.build_student`).
        encoder_channels: (C4, C8, C16); default: the encoder's `encoder_channels` or `out_channels`.
        d_model: d, channels of the propagation layer (divisible by 4 and by num_heads).
        num_heads: attention heads.
        num_groups: offset groups (divides num_heads); heads of a group share sampling points.
        deform_stride: s, stride of the reference grid over the memory map.
        offset_range: largest offset, in memory-map (stride-16) cells.
        offset_kernel: depth-wise kernel of the offset networks.
        max_objects: K; logits have K + 1 channels (background + K objects).
        decoder_dim: width of the FPN decoder at stride 16.
        ffn_ratio: feed-forward width in multiples of d.
        permute_ids: draw random object-id permutations in training mode (AOT's identity assignment).
        permute_slots: P, the permutation moves slots 1..P only (None or ≥ max_objects: all slots);
            objects of a clip beyond P keep their own slots.
        attention_scale: > 0: cosine attention in the deformable reads with a learned per-head scale
            starting here; 0: scaled dot product (`DeformableAttention`).
        attention_topk: each query token reads only its k most similar sampled points per memory
            frame (0: all of them; `DeformableAttention`).
        propagation_init: start as a label propagator (`init_for_propagation`).
        num_layers: stacked propagation layers (`propagation` is the first, `propagation_layers`
            the others, so a one-layer student's parameters keep their names).
        key_dim, expand_ratio, dw_kernel, gate_id, short_term_read, local_window: the propagation
            layers' form (`GatedDeformablePropagation`).
        id_norm: LayerNorm over the ID embedding's channels (DeAOT).
        freeze_bn: the encoder's BatchNorm layers stay in eval mode with their affine parameters
            frozen, whatever `train()` says (DeAOT's frozen BatchNorm).
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        *,
        encoder_channels: Sequence[int] | None = None,
        d_model: int = 256,
        num_heads: int = 8,
        num_groups: int = 4,
        deform_stride: int = 2,
        offset_range: float = 4.0,
        offset_kernel: int = 5,
        max_objects: int = 10,
        decoder_dim: int = 256,
        ffn_ratio: float = 2.0,
        permute_ids: bool = True,
        permute_slots: int | None = None,
        attention_scale: float = 30.0,
        attention_topk: int = 0,
        propagation_init: bool = True,
        num_layers: int = 1,
        key_dim: int | None = None,
        expand_ratio: float = 0.0,
        dw_kernel: int = 0,
        gate_id: bool = True,
        id_norm: bool = False,
        short_term_read: str = "deformable",
        local_window: int = 15,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if permute_slots is not None and int(permute_slots) < 1:
            raise ValueError(f"permute_slots must be >= 1 (or None: all slots), got {permute_slots}")
        if encoder is None:
            from dvos.models.backbones.mobilenet_v2 import MobileNetV2Encoder

            encoder = MobileNetV2Encoder(output_stride=FEATURE_STRIDE)
        channels = _encoder_channels(encoder, encoder_channels)
        self.encoder = encoder
        self.encoder_channels = channels
        self.d_model = d_model
        self.max_objects = max_objects
        self.permute_ids = permute_ids
        self.permute_slots = max_objects if permute_slots is None else min(int(permute_slots), max_objects)
        self.encoder_projection = nn.Conv2d(channels[2], d_model, 1)
        # AOT's patch-wise ID bank: a 17 × 17 patch around each stride-16 cell.
        self.id_embedding = nn.Conv2d(
            max_objects + 1, d_model, FEATURE_STRIDE + 1, stride=FEATURE_STRIDE, padding=FEATURE_STRIDE // 2
        )
        layer = dict(
            num_heads=num_heads,
            num_groups=num_groups,
            deform_stride=deform_stride,
            offset_range=offset_range,
            offset_kernel=offset_kernel,
            ffn_ratio=ffn_ratio,
            attention_scale=attention_scale,
            attention_topk=attention_topk,
            key_dim=key_dim,
            expand_ratio=expand_ratio,
            dw_kernel=dw_kernel,
            gate_id=gate_id,
            short_term_read=short_term_read,
            local_window=local_window,
        )
        self.num_layers = int(num_layers)
        self.propagation = GatedDeformablePropagation(d_model, **layer, first=True, last=self.num_layers == 1)
        self.decoder = FPNDecoder(2 * d_model, channels[:2], max_objects + 1, hidden=decoder_dim)
        # Layers 2..L after the first (empty for one layer: its state dict keeps its names).
        self.propagation_layers = nn.ModuleList(
            GatedDeformablePropagation(d_model, **layer, first=False, last=index == self.num_layers - 1)
            for index in range(1, self.num_layers)
        )
        self.id_norm = LayerNorm2d(d_model, eps=1e-5) if id_norm else None
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for module in self._encoder_batch_norms():
                module.requires_grad_(False)
        if propagation_init:
            self.init_for_propagation()

    def _encoder_batch_norms(self) -> list[nn.Module]:
        return [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> DeformableStudent:
        """`nn.Module.train`, except that with `freeze_bn` the encoder's BatchNorm layers stay in eval
        mode (running statistics used, never updated)."""
        super().train(mode)
        if self.freeze_bn:
            for module in self._encoder_batch_norms():
                module.eval()
        return self

    @property
    def propagation_stack(self) -> list[GatedDeformablePropagation]:
        """The propagation layers in order (`propagation` first)."""
        return [self.propagation, *self.propagation_layers]

    @torch.no_grad()
    def init_for_propagation(self) -> None:
        """A fresh student that already propagates labels (see `GatedDeformablePropagation.
        init_for_propagation`): the ID embedding starts as the share of each id in the 17 × 17 patch
        of a cell (channel c = slot c), so the ID stream carries soft labels from the first step and
        the decoder only has to learn to read them (docs/METHOD.md, "Identity embedding")."""
        slots = self.max_objects + 1
        if slots > self.d_model:
            raise ValueError(f"propagation_init needs d_model ≥ max_objects + 1, got {self.d_model}")
        weight = self.id_embedding.weight
        weight.zero_()
        kernel = weight.shape[-2] * weight.shape[-1]
        for slot in range(slots):
            weight[slot, slot] = 1.0 / kernel
        nn.init.zeros_(self.id_embedding.bias)
        for layer in self.propagation_stack:
            layer.init_for_propagation()

    # ---------------------------------------------------------------------------------------------- steps
    def encode_frame(self, image: torch.Tensor) -> FrameFeatures:
        """Encode a frame (padded to a multiple of 16 first).

        Args:
            image: B × 3 × H × W float RGB in [0, 1].

        Returns:
            `FrameFeatures` at the padded size.
        """
        padded, pad = pad_to_stride(image, FEATURE_STRIDE, mode="replicate")
        stride4, stride8, stride16 = self.encoder(padded)
        embedding = self.encoder_projection(stride16)
        height, width = embedding.shape[-2:]
        position = sine_position_embedding(
            height, width, self.d_model, device=embedding.device, dtype=embedding.dtype
        )
        return FrameFeatures(stride4, stride8, stride16, embedding, position, pad)

    def sample_id_permutation(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Object-slot permutations for a batch: random in training mode with `permute_ids`, else identity.

        Args:
            batch_size: B.
            generator: a CPU generator for reproducible draws.

        Returns:
            B × (K + 1) long, entry 0 = 0 (background never moves), entries 1..K a permutation of 1..K
            (of 1..P with `permute_slots` P, entries P+1..K then the identity).
        """
        identity = torch.arange(self.max_objects + 1, device=device).expand(batch_size, -1)
        if not (self.training and self.permute_ids):
            return identity.clone()
        slots = self.permute_slots
        fixed = torch.arange(slots + 1, self.max_objects + 1)
        objects = [
            torch.cat((torch.randperm(slots, generator=generator) + 1, fixed)) for _ in range(batch_size)
        ]
        background = torch.zeros(batch_size, 1, dtype=torch.long)
        return torch.cat((background, torch.stack(objects)), dim=1).to(device)

    @contextlib.contextmanager
    def reading(
        self, *, attention_topk: int | None = None, long_term_weight: float | None = None
    ) -> Iterator[None]:
        """Within the block, the student reads its memory with inference-time settings; restored on
        exit (after an error too), so an override never reaches training.

        Args:
            attention_topk: both deformable reads keep each query's k most similar sampled points (0: all
                of them; None: as built, `model.attention_topk`; `eval.attention_topk`).
            long_term_weight: w in [0, 2]: the ID stream sums the long-term (reference frame) read
                times w and the short-term (previous frame) read times 2 − w (None or 1: as trained;
                `eval.long_term_weight`). Above 1 the reference frame outweighs the student's own last
                prediction, whose errors otherwise carry on from frame to frame.
        """
        problem = reading_problem(attention_topk, long_term_weight)
        if problem is not None:
            raise ValueError(problem)
        layers = self.propagation_stack
        reads = [read for layer in layers for read in (layer.long_term, layer.short_term)]
        saved = ([read.topk for read in reads], [layer.long_term_weight for layer in layers])
        if attention_topk is not None:
            for read in reads:
                read.topk = int(attention_topk)
        if long_term_weight is not None:
            for layer in layers:
                layer.long_term_weight = float(long_term_weight)
        try:
            yield
        finally:
            for read, value in zip(reads, saved[0]):
                read.topk = value
            for layer, weight in zip(layers, saved[1]):
                layer.long_term_weight = weight

    def embed_ids(self, masks: torch.Tensor, *, id_permutation: torch.Tensor | None = None) -> torch.Tensor:
        """ID embedding of object masks.

        Args:
            masks: B × (K + 1) × H × W, one-hot (or soft probabilities) over background + objects, at the
                input size (padded here like the image) or already at the padded size.
            id_permutation: B × (K + 1) long (`Memory.id_permutation`); object c is embedded in slot
                id_permutation[:, c]. None: identity.

        Returns:
            B × d × h × w, h = ⌈H/16⌉, w = ⌈W/16⌉.
        """
        masks, _ = pad_to_stride(masks, FEATURE_STRIDE, mode="replicate")
        if id_permutation is not None:
            # slot j holds object inverse[j]
            inverse = torch.argsort(id_permutation, dim=1)
            masks = masks.gather(1, inverse[:, :, None, None].expand_as(masks))
        embedding = self.id_embedding(masks)
        return embedding if self.id_norm is None else self.id_norm(embedding)

    def memory_ids(self, id_embedding: torch.Tensor, id_stream: torch.Tensor | None = None) -> torch.Tensor:
        """A frame's ID values for the memory, every layer's side by side (`GatedDeformablePropagation.
        id_value`): B × d × h × w ID embedding (and, with L > 1 layers, the frame's ID streams
        `StepOutput.id_stream`) → B × C × h × w (the ID embedding itself for a default one-layer student)."""
        if self.num_layers == 1:
            return self.propagation.id_value(id_embedding)
        if id_stream is None:
            raise ValueError(
                f"a student with {self.num_layers} propagation layers needs the frame's ID streams"
            )
        streams = id_stream.chunk(self.num_layers - 1, dim=1)
        values = [self.propagation.id_value(id_embedding)]
        values += [
            layer.id_value(id_embedding, stream) for layer, stream in zip(self.propagation_layers, streams)
        ]
        return torch.cat(values, dim=1)

    def own_entries(
        self, features: FrameFeatures, masks: torch.Tensor, id_permutation: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The memory entries (key, value, ID values; B × C × h × w each) of a frame with given masks
        that is its own memory, as the reference frame is: with L > 1 layers the frame is propagated
        through layers 1..L − 1 reading itself (long-term and short-term), as DeAOT runs its
        reference frame with its own ID embedding, to get the later layers' inputs.

        Args:
            features: the frame's `FrameFeatures`.
            masks: B × (K + 1) × H × W, its masks (one-hot or probabilities), the objects' own ids.
            id_permutation: B × (K + 1) long, or None (identity).
        """
        id_embedding = self.embed_ids(masks, id_permutation=id_permutation)
        if self.num_layers == 1:
            key, value = self.propagation.key_value(features.embedding, features.position)
            return key, value, self.propagation.id_value(id_embedding)
        height, width = features.embedding.shape[-2:]
        permutation = id_permutation
        if permutation is None:
            permutation = torch.arange(self.max_objects + 1, device=masks.device).expand(masks.shape[0], -1)
        stream, identity = features.embedding, None
        keys, values, ids = [], [], []
        for index, layer in enumerate(self.propagation_stack):
            key, value = layer.key_value(stream, features.position)
            id_stream = None if identity is None else tokens_to_map(identity, height, width)
            keys.append(key)
            values.append(value)
            ids.append(layer.id_value(id_embedding, id_stream))
            if index == self.num_layers - 1:
                break
            own = Memory(key, value, ids[-1], key, value, ids[-1], permutation)
            visual, identity, _, _, _ = layer.propagate(stream, features.position, own, identity=identity)
            stream = tokens_to_map(visual, height, width)
        return torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(ids, dim=1)

    def propagate_frame(
        self, features: FrameFeatures, memory: Memory, *, return_attention: bool = False
    ) -> PropagationOutput:
        """The propagation layers on one query frame.

        Args:
            features: the query frame's `FrameFeatures`.
            memory: the clip's memory (every layer's entries, `Memory.layer`).
            return_attention: also return the last layer's attention maps and sampling positions.
        """
        if self.num_layers == 1:
            propagated, key, value, aux = self.propagation(
                features.embedding, features.position, memory, return_attention=return_attention
            )
            return PropagationOutput(propagated, key, value, None, aux)
        height, width = features.embedding.shape[-2:]
        stream, identity, aux = features.embedding, None, None
        keys, values, id_streams = [], [], []
        for index, layer in enumerate(self.propagation_stack):
            if identity is not None:
                id_streams.append(tokens_to_map(identity, height, width))
            visual, identity, key, value, aux = layer.propagate(
                stream,
                features.position,
                memory.layer(index, layer.key_dim, layer.value_dim),
                identity=identity,
                return_attention=return_attention and index == self.num_layers - 1,
            )
            keys.append(key)
            values.append(value)
            stream = tokens_to_map(visual, height, width)
        propagated = self.propagation_stack[-1].output(visual, identity, height, width)
        return PropagationOutput(
            propagated, torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(id_streams, dim=1), aux
        )

    def initialize_memory(
        self,
        features: FrameFeatures,
        masks: torch.Tensor,
        *,
        id_permutation: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Memory:
        """Memory of a clip from its reference frame; the short-term part starts as the reference too.

        Args:
            features: the reference frame's `FrameFeatures`.
            masks: B × (K + 1) × H × W reference masks (one-hot), input size.
            id_permutation: B × (K + 1) long to use; default: `sample_id_permutation` (random in training).
            generator: CPU generator for the permutation draw.
        """
        batch = masks.shape[0]
        if id_permutation is None:
            id_permutation = self.sample_id_permutation(batch, generator=generator, device=masks.device)
        key, value, ids = self.own_entries(features, masks, id_permutation)
        return Memory(key, value, ids, key, value, ids, id_permutation)

    def frame_entries(
        self, features: FrameFeatures, memory: Memory
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A frame's memory keys, visual values and ID streams (`StepOutput`'s key, value, id_stream)
        without decoding it: one layer's come from its features alone; with L > 1 layers the frame is
        propagated through the memory (the later layers' inputs depend on what it reads)."""
        if self.num_layers == 1:
            key, value = self.propagation.key_value(features.embedding, features.position)
            return key, value, None
        output = self.propagate_frame(features, memory)
        return output.key, output.value, output.id_stream

    def update_memory(self, memory: Memory, features: FrameFeatures, masks: torch.Tensor) -> Memory:
        """Replace the short-term memory with a frame and its (predicted) masks.

        Args:
            memory: the clip's memory.
            features: the frame's `FrameFeatures`.
            masks: B × (K + 1) × H × W, its masks (one-hot or probabilities) in the objects' own ids.
        """
        key, value, id_stream = self.frame_entries(features, memory)
        return self.remember(memory, key, value, masks, id_stream=id_stream)

    def remember(
        self,
        memory: Memory,
        key: torch.Tensor,
        value: torch.Tensor,
        masks: torch.Tensor,
        *,
        id_stream: torch.Tensor | None = None,
    ) -> Memory:
        """Replace the short-term memory with a frame's key and value (`StepOutput.key`, `.value`) and
        the ID values of `masks` (B × (K + 1) × H × W, the objects' own ids; `memory_ids`, which with
        L > 1 layers also needs the frame's `StepOutput.id_stream`)."""
        id_embedding = self.embed_ids(masks, id_permutation=memory.id_permutation)
        return memory.replace_short_term(key, value, self.memory_ids(id_embedding, id_stream))

    def add_reference(
        self, memory: Memory, features: FrameFeatures, masks: torch.Tensor, *, max_long_term: int
    ) -> Memory:
        """Add a frame with given masks (objects appearing later) to the long-term memory, keeping
        the reference frame (`Memory.add_long_term`, at most `max_long_term` long-term frames), and
        make it the short-term memory too.

        Args:
            memory: the clip's memory.
            features: the frame's `FrameFeatures`.
            masks: B × (K + 1) × H × W, its masks (the given objects over the prediction of the others).
        """
        key, value, id_stream = self.frame_entries(features, memory)
        id_embedding = self.embed_ids(masks, id_permutation=memory.id_permutation)
        ids = self.memory_ids(id_embedding, id_stream)
        memory = memory.add_long_term(key, value, ids, max_frames=max_long_term)
        return memory.replace_short_term(key, value, ids)

    def propagate(
        self, query: FrameFeatures, memory: Memory, *, return_attention: bool = False
    ) -> tuple[torch.Tensor, dict[str, DeformableAttentionAux] | None]:
        """The gated deformable propagation layer(s) (`propagate_frame` without the memory entries).

        Args:
            query: the query frame's `FrameFeatures`.
            memory: the clip's memory.
            return_attention: also return the attention maps and sampling positions.

        Returns:
            (propagated, aux): B × 2d × h × w (visual stream, ID stream); aux None or
            {"long_term": DeformableAttentionAux, "short_term": DeformableAttentionAux}.
        """
        output = self.propagate_frame(query, memory, return_attention=return_attention)
        return output.propagated, output.aux

    def decode(
        self,
        propagated: torch.Tensor,
        features: FrameFeatures,
        *,
        num_objects: torch.Tensor | int | None = None,
        id_permutation: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-object logits at the input size.

        Args:
            propagated: B × 2d × h × w from `propagate`.
            features: the query frame's `FrameFeatures` (skips and padding).
            num_objects: objects per sample (B long, or an int for all); ids above it get ABSENT_LOGIT.
                None: no masking.
            id_permutation: B × (K + 1) long, the memory's; the logits are mapped back to the objects' ids.

        Returns:
            B × (K + 1) × H × W logits (H × W the unpadded input size).
        """
        logits = self.decoder(propagated, features.stride8, features.stride4)
        padded_size = (logits.shape[-2] * 4, logits.shape[-1] * 4)
        logits = F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=False)
        logits = unpad(logits, features.pad)
        if id_permutation is not None:
            logits = logits.gather(1, id_permutation[:, :, None, None].expand_as(logits))
        if num_objects is not None:
            logits = self.mask_absent_objects(logits, num_objects)
        return logits

    def mask_absent_objects(self, logits: torch.Tensor, num_objects: torch.Tensor | int) -> torch.Tensor:
        """Set the logits of ids above each sample's object count to ABSENT_LOGIT.

        Args:
            logits: B × (K + 1) × H × W.
            num_objects: B long (or an int for the whole batch).
        """
        if not isinstance(num_objects, torch.Tensor):  # an int; a tensor stays a graph input when traced
            num_objects = torch.tensor(num_objects, device=logits.device)
        counts = num_objects.to(logits.device).reshape(-1, 1)
        ids = torch.arange(logits.shape[1], device=logits.device)[None, :]
        absent = (ids > counts)[:, :, None, None]
        return logits.masked_fill(absent, ABSENT_LOGIT)

    # ---------------------------------------------------------------------------------------------- frame step
    def forward(
        self,
        image: torch.Tensor,
        reference_key: torch.Tensor,
        reference_value: torch.Tensor,
        reference_id: torch.Tensor,
        previous_key: torch.Tensor,
        previous_value: torch.Tensor,
        previous_id: torch.Tensor,
        id_permutation: torch.Tensor,
        num_objects: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame with explicit tensors (the export form; fields as in `Memory`).

        Exports with `torch.export.export(student, example_inputs)` for a fixed frame size (the padding
        is computed from the example's size). Pass distinct tensors as example inputs: a fresh
        memory's short-term maps are its long-term maps, and export merges aliased inputs into one.

        Args:
            image: B × 3 × H × W in [0, 1].
            reference_key, reference_value, reference_id, previous_key, previous_value, previous_id:
                B × d × h × w memory maps.
            id_permutation: B × (K + 1) long.
            num_objects: B long.

        Returns:
            (logits, key, value): B × (K + 1) × H × W logits; the frame's key and visual value
            B × C × h × w (with `embed_ids` of the predicted mask, the next short-term memory; with
            L > 1 layers its ID values also need the frame's ID streams: `dvos.inference.export.
            FrameStep` returns them).
        """
        memory = Memory(
            reference_key,
            reference_value,
            reference_id,
            previous_key,
            previous_value,
            previous_id,
            id_permutation,
        )
        features = self.encode_frame(image)
        output = self.propagate_frame(features, memory)
        logits = self.decode(
            output.propagated, features, num_objects=num_objects, id_permutation=id_permutation
        )
        return logits, output.key, output.value

    def step(
        self,
        image: torch.Tensor,
        memory: Memory,
        *,
        num_objects: torch.Tensor | int,
        return_attention: bool = False,
        update_memory: bool = True,
        soft_memory: bool | None = None,
        features: FrameFeatures | None = None,
    ) -> StepOutput:
        """Segment one frame from the memory, then (by default) make it the short-term memory.

        Args:
            image: B × 3 × H × W in [0, 1].
            memory: the clip's memory.
            num_objects: objects per sample (B long or an int).
            return_attention: also return the attention maps and sampling positions.
            update_memory: replace the short-term memory with this frame and its prediction.
            soft_memory: embed the softmax probabilities (differentiable) instead of the argmax one-hot;
                default: soft in training mode, hard in eval mode.
            features: the frame's `encode_frame(image)` when already computed.

        Returns:
            `StepOutput(logits, memory, aux, key, value, id_stream)`.
        """
        if features is None:
            features = self.encode_frame(image)
        output = self.propagate_frame(features, memory, return_attention=return_attention)
        logits = self.decode(
            output.propagated, features, num_objects=num_objects, id_permutation=memory.id_permutation
        )
        if update_memory:
            soft = self.training if soft_memory is None else soft_memory
            masks = memory_masks(logits, soft=soft)
            memory = self.remember(memory, output.key, output.value, masks, id_stream=output.id_stream)
        return StepOutput(logits, memory, output.aux, output.key, output.value, output.id_stream)

    def segment_clip(
        self,
        frames: torch.Tensor,
        reference_masks: torch.Tensor,
        *,
        num_objects: torch.Tensor | int,
        return_attention: bool = False,
        generator: torch.Generator | None = None,
        soft_memory: bool | None = None,
        reconstruct_reference: bool = False,
        corrupt_memory: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[dict[str, DeformableAttentionAux] | None]]:
        """Propagate the reference masks (frame 0) through a clip, one frame at a time.

        Args:
            frames: B × T × 3 × H × W in [0, 1]; frame 0 is the reference.
            reference_masks: B × (K + 1) × H × W one-hot masks of frame 0.
            num_objects: objects per sample (B long or an int).
            reconstruct_reference: also segment frame 0 itself from the fresh memory (first in the
                outputs; the memory is not updated by it): reading a mask back from its own frame
                must return it, the distillation's reference-reconstruction loss.
            corrupt_memory: applied to the masks before they enter the short-term memory (frame 0's,
                read by frame 1 and by the reading of frame 0 itself, then each prediction's); the
                long-term memory keeps frame 0's as given.

        Returns:
            (logits, aux): T − 1 tensors B × (K + 1) × H × W for frames 1..T−1, and their aux (or
            None); with `reconstruct_reference`, T tensors, frame 0's first.
        """
        reference = self.encode_frame(frames[:, 0])
        memory = self.initialize_memory(reference, reference_masks, generator=generator)
        if corrupt_memory is not None and self.num_layers == 1:
            memory = self.remember(
                memory, memory.reference_key, memory.reference_value, corrupt_memory(reference_masks)
            )
        elif corrupt_memory is not None:  # the later layers' entries depend on the masks read
            entries = self.own_entries(reference, corrupt_memory(reference_masks), memory.id_permutation)
            memory = memory.replace_short_term(*entries)
        all_logits, all_aux = [], []
        if reconstruct_reference:
            output = self.step(
                frames[:, 0],
                memory,
                num_objects=num_objects,
                return_attention=return_attention,
                update_memory=False,
                features=reference,
            )
            all_logits.append(output.logits)
            all_aux.append(output.aux)
        for index in range(1, frames.shape[1]):
            output = self.step(
                frames[:, index],
                memory,
                num_objects=num_objects,
                return_attention=return_attention,
                soft_memory=soft_memory,
                update_memory=corrupt_memory is None,
            )
            memory = output.memory
            if corrupt_memory is not None:
                soft = self.training if soft_memory is None else soft_memory
                masks = corrupt_memory(memory_masks(output.logits, soft=soft))
                memory = self.remember(memory, output.key, output.value, masks, id_stream=output.id_stream)
            all_logits.append(output.logits)
            all_aux.append(output.aux)
        return all_logits, all_aux
