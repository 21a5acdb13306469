"""Vision Transformer with DINO's parameter names and meanings (Caron et al. 2021).

The official DINO backbone files (`dino_deitsmall16_pretrain.pth`, `dino_deitsmall8_pretrain.pth`,
`dino_vitbase16_pretrain.pth`, ...) load with `strict=True` and no key surgery:

    cls_token                  1 × 1 × D
    pos_embed                  1 × (1 + 14·14) × D        (224-pixel pretraining, 16-pixel patches)
    patch_embed.proj.*         Conv2d(3, D, kernel = stride = patch)
    blocks.N.norm1.*           LayerNorm(D, eps 1e-6)
    blocks.N.attn.qkv.*        Linear(D, 3D)             (query, key, value; with bias)
    blocks.N.attn.proj.*       Linear(D, D)
    blocks.N.norm2.*           LayerNorm(D, eps 1e-6)
    blocks.N.mlp.fc1.*         Linear(D, 4D), GELU
    blocks.N.mlp.fc2.*         Linear(4D, D)
    norm.*                     LayerNorm(D, eps 1e-6)

ViT-S: D = 384, 12 blocks, 6 heads; ViT-B: D = 768, 12 blocks, 12 heads. No classification head.

Input: B × 3 × H × W, ImageNet-normalised (as in DINO; see `imagenet_normalize`), any H and W:
the patch grid is ⌊H/p⌋ × ⌊W/p⌋ (the remainder rows and columns are dropped by the strided conv) and
the position embedding is resized exactly as DINO does (`interpolate_pos_encoding`), so features and
attention maps match the published DINO numbers.

Attention is computed in float32 (also under autocast): softmax(q·kᵀ / √d_head).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dvos.models.state import state_dict_problems
from dvos.utils.errors import DvosError

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6
PRETRAIN_IMAGE_SIZE = 224


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B × ... → same shape; identity in eval mode or when drop_prob is 0."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a conv with kernel = stride = patch size."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W → patch tokens B × (⌊H/p⌋·⌊W/p⌋) × D, row-major over the grid."""
        return self.proj(image).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one `qkv` projection, as in DINO."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, tokens: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend every token to every token.

        Args:
            tokens: B × T × D.
            return_attention: also return the attention probabilities.

        Returns:
            B × T × D; with `return_attention`, also B × heads × T × T (float32, rows sum to 1).
        """
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim)
        compute_dtype = torch.promote_types(qkv.dtype, torch.float32)  # at least float32
        query, key, value = qkv.permute(2, 0, 3, 1, 4).to(compute_dtype).unbind(0)  # B × heads × T × d
        # Affinities and softmax in float32 even under autocast (bf16 probabilities are too coarse).
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            if return_attention:
                attention = (query @ key.transpose(-2, -1) * self.scale).softmax(dim=-1)
                out = attention @ value
            else:
                attention = None
                out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, length, dim).to(tokens.dtype)
        out = self.proj(out)
        return (out, attention) if return_attention else out


class Mlp(nn.Module):
    """fc1 (D → 4D) → GELU → fc2 (4D → D)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: B × T × D → B × T × D."""
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, tokens: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens: B × T × D → B × T × D; with `return_attention` also B × heads × T × T."""
        if return_attention:
            update, attention = self.attn(self.norm1(tokens), return_attention=True)
        else:
            update, attention = self.attn(self.norm1(tokens)), None
        tokens = tokens + self.drop_path(update)
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return (tokens, attention) if return_attention else tokens


class VisionTransformer(nn.Module):
    """DINO's ViT backbone: class token + patch tokens, pre-norm blocks, final LayerNorm, no head.

    Args:
        patch_size: 16 or 8 pixels (any positive integer works).
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the MLP over D.
        qkv_bias: bias in the qkv projection (True in DINO).
        drop_path_rate: stochastic depth, growing linearly to this rate over the blocks.
        img_size: pretraining image size; sets the stored position grid (224 → 14×14 at p = 16).
        in_chans: input channels.
    """

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        img_size: int = PRETRAIN_IMAGE_SIZE,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        drop_rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]  # linear, as DINO
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
            for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """DINO's initialisation: truncated normal (std 0.02) for embeddings and linear weights."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Position embedding for an image of height × width pixels, exactly as DINO computes it.

        Used as stored when the image has as many patches as the stored grid and is square; else
        the stored N patch positions, as a √N × √N grid, are resized by bicubic interpolation with
        `scale_factor` = ((⌊H/p⌋ + 0.1) / √N, (⌊W/p⌋ + 0.1) / √N), align_corners=False. The +0.1
        guards the output size against floor errors; passing a scale factor (not a size) also sets
        PyTorch's sampling coordinates (source = (target + 0.5) / scale − 0.5), which is DINO's.

        Args:
            num_patches: number of patch tokens of the image, ⌊H/p⌋·⌊W/p⌋.
            height, width: image size in pixels.

        Returns:
            1 × (1 + ⌊H/p⌋·⌊W/p⌋) × D: class position first, then the patch grid row-major.
        """
        stored = self.pos_embed.shape[1] - 1
        if num_patches == stored and height == width:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, :1]
        side = math.sqrt(stored)
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), self.embed_dim).permute(0, 3, 1, 2)
        rows = height // self.patch_size + 0.1
        cols = width // self.patch_size + 0.1
        grid = F.interpolate(grid, scale_factor=(rows / side, cols / side), mode="bicubic")
        if grid.shape[-2:] != (int(rows), int(cols)):
            raise RuntimeError(
                f"position grid resized to {tuple(grid.shape[-2:])}, not {(int(rows), int(cols))}"
            )
        patch_pos_embed = grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def prepare_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W → tokens B × (1 + ⌊H/p⌋·⌊W/p⌋) × D (class token first, positions added)."""
        batch, _, height, width = image.shape
        patches = self.patch_embed(image)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), patches), dim=1)
        return tokens + self.interpolate_pos_encoding(patches.shape[1], height, width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: B × 3 × H × W (ImageNet-normalised) → the normed class token, B × D."""
        tokens = self.prepare_tokens(image)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def get_last_selfattention(self, image: torch.Tensor) -> torch.Tensor:
        """The last block's attention probabilities, B × heads × (1 + N) × (1 + N), float32.

        Token 0 is the class token; tokens 1..N are the patches, row-major over ⌊H/p⌋ × ⌊W/p⌋.
        """
        tokens = self.prepare_tokens(image)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        _, attention = self.blocks[-1](tokens, return_attention=True)
        return attention

    def get_intermediate_layers(self, image: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The outputs of the last `n` blocks, each through the final LayerNorm: n × [B × (1 + N) × D]."""
        tokens = self.prepare_tokens(image)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if len(self.blocks) - index <= n:
                outputs.append(self.norm(tokens))
        return outputs

    def patch_features(self, image: torch.Tensor) -> torch.Tensor:
        """The normed last-layer patch tokens as a map: B × D × ⌊H/p⌋ × ⌊W/p⌋."""
        tokens = self.get_intermediate_layers(image, n=1)[0][:, 1:]
        rows, cols = image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(image.shape[0], self.embed_dim, rows, cols)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-S/p (DINO's `vit_small`, DeiT-S): D = 384, 12 blocks, 6 heads, MLP ratio 4."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    """ViT-B/p (DINO's `vit_base`): D = 768, 12 blocks, 12 heads, MLP ratio 4."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, **kwargs)


# Entries of a training checkpoint that may hold the backbone, in the order they are tried
# (DINO's `checkpoint.pth` has both `teacher` and `student`; DINO evaluates the teacher).
CHECKPOINT_ENTRIES = ("teacher", "student", "state_dict", "model")


def load_dino_checkpoint(model: VisionTransformer, path: str | os.PathLike) -> str:
    """Load a DINO backbone file into `model`, strictly; returns (and logs) a one-line description.

    Accepted files: a plain state dict (the official `dino_*_pretrain.pth`), or a dict with a
    `teacher`, `student`, `state_dict` or `model` entry (tried in that order), whose keys lose a
    `module.` and a `backbone.` prefix and whose DINO projection head (`head.*`) is dropped. Only
    tensors and `argparse.Namespace` (DINO's `args`) are unpickled. Nothing is downloaded.

    Raises:
        DvosError: one line naming the file, for a missing or unreadable file, or for keys or
            shapes that do not fit `model` (the first missing / unexpected keys are named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DvosError(f"DINO checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and runtime errors alike for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DvosError(f"cannot read DINO checkpoint {path}: {reason}") from err
    if not isinstance(checkpoint, Mapping):
        raise DvosError(f"DINO checkpoint {path} is a {type(checkpoint).__name__}, not a state dict")

    entry = next((name for name in CHECKPOINT_ENTRIES if isinstance(checkpoint.get(name), Mapping)), None)
    if entry is None:
        state_dict = dict(checkpoint)
    else:
        state_dict = {}
        for key, value in checkpoint[entry].items():
            key = key.removeprefix("module.").removeprefix("backbone.")
            if not key.startswith("head."):
                state_dict[key] = value

    own = model.state_dict()
    problems = state_dict_problems(own, state_dict)
    if problems:
        architecture = f"ViT (patch {model.patch_size}, dim {model.embed_dim}, depth {len(model.blocks)})"
        raise DvosError(f"DINO checkpoint {path} does not fit {architecture}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    description = f"DINO checkpoint {path}" + (f" ({entry})" if entry else "")
    logger.info("ViT initialisation: %s", description)
    return description
