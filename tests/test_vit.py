"""DINO's ViT: checkpoint layout, position-embedding interpolation, DINO's outputs, loading files."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvos.models.backbones import VisionTransformer, load_dino_checkpoint, vit_base, vit_small
from dvos.utils.errors import DvosError


def dino_vit_shapes(dim: int, depth: int, patch: int, grid: int = 14) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of an official DINO backbone file (`dino_deitsmall16_pretrain.pth` & co)."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for n in range(depth):
        shapes |= {
            f"blocks.{n}.norm1.weight": (dim,),
            f"blocks.{n}.norm1.bias": (dim,),
            f"blocks.{n}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{n}.attn.qkv.bias": (3 * dim,),
            f"blocks.{n}.attn.proj.weight": (dim, dim),
            f"blocks.{n}.attn.proj.bias": (dim,),
            f"blocks.{n}.norm2.weight": (dim,),
            f"blocks.{n}.norm2.bias": (dim,),
            f"blocks.{n}.mlp.fc1.weight": (4 * dim, dim),
            f"blocks.{n}.mlp.fc1.bias": (4 * dim,),
            f"blocks.{n}.mlp.fc2.weight": (dim, 4 * dim),
            f"blocks.{n}.mlp.fc2.bias": (dim,),
        }
    shapes |= {"norm.weight": (dim,), "norm.bias": (dim,)}
    return shapes


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def tiny_vit(seed: int = 0, patch_size: int = 16) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(patch_size=patch_size, embed_dim=64, depth=3, num_heads=4).eval()


def test_vit_small_16_is_dino_deitsmall16_layout():
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = vit_small(patch_size=16)
    expected = dino_vit_shapes(384, 12, 16)
    assert expected["pos_embed"] == (1, 197, 384) and expected["patch_embed.proj.weight"] == (384, 3, 16, 16)
    assert len(expected) == 4 + 12 * 12 + 2
    assert shapes_of(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 21_665_664  # DINO's ViT-S/16: 21.7 M
    assert [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)] == [1e-6] * 25
    assert model.blocks[0].attn.num_heads == 6


def test_other_dino_layouts():
    with torch.device("meta"):
        small8, base = vit_small(patch_size=8), vit_base(patch_size=16)
    assert shapes_of(small8) == dino_vit_shapes(384, 12, 8, grid=28)
    assert shapes_of(base) == dino_vit_shapes(768, 12, 16)
    assert base.blocks[0].attn.num_heads == 12
    assert sum(p.numel() for p in base.parameters()) == 85_798_656  # DINO's ViT-B/16: 85.8 M


# ---------------------------------------------------------------- position-embedding interpolation


def pytorch_bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
    """out × in matrix of PyTorch's bicubic resampling (A = −0.75, align_corners=False, borders
    clamped) when a scale factor is given: source = (target + 0.5) / scale_factor − 0.5."""
    a = -0.75
    out_size = math.floor(in_size * scale_factor)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = np.zeros((out_size, in_size))
    for target in range(out_size):
        source = (target + 0.5) / scale_factor - 0.5
        base = math.floor(source)
        t = source - base
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[target, min(max(base + offset, 0), in_size - 1)] += weight
    return matrix


def reference_pos_embed(pos_embed: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """DINO's rule written directly: √N×√N grid, separable bicubic with scale ((H//p+0.1)/√N, ...)."""
    stored = pos_embed.shape[1] - 1
    side = int(math.sqrt(stored))
    grid = pos_embed.detach()[0, 1:].double().numpy().reshape(side, side, -1)
    rows = pytorch_bicubic_matrix(side, (height // patch + 0.1) / side)
    cols = pytorch_bicubic_matrix(side, (width // patch + 0.1) / side)
    resized = np.einsum("ri,ijd,cj->rcd", rows, grid, cols).reshape(-1, grid.shape[-1])
    return torch.cat((pos_embed.detach()[0, :1].double(), torch.from_numpy(resized)))[None]


def test_pos_embed_for_480x854_matches_dino_rule():
    torch.manual_seed(0)
    model = VisionTransformer(patch_size=16, embed_dim=384, depth=1, num_heads=6)  # ViT-S/16's embeddings
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(30 * 53, 480, 854)
    assert pos.shape == (1, 1 + 30 * 53, 384)
    torch.testing.assert_close(
        pos.double(), reference_pos_embed(model.pos_embed.detach(), 16, 480, 854), atol=1e-5, rtol=1e-5
    )
    # Resizing to a size instead of a scale factor samples elsewhere: DINO's numbers need the latter.
    grid = model.pos_embed.detach()[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(30, 53), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 384)
    assert (by_size - pos[:, 1:]).abs().max() > 1e-3

    tokens = model.prepare_tokens(torch.zeros(1, 3, 480, 854))
    assert tokens.shape == (1, 1 + 30 * 53, 384)


def test_pos_embed_used_as_stored_only_for_the_square_pretraining_grid():
    model = tiny_vit()
    assert model.interpolate_pos_encoding(196, 224, 224) is model.pos_embed
    # 224 × 230 has the same 14 × 14 patches but is not square: DINO interpolates (scale 14.1 / 14).
    with torch.no_grad():
        pos = model.interpolate_pos_encoding(196, 224, 230)
        expected = reference_pos_embed(model.pos_embed, 16, 224, 230)
    assert pos.shape == (1, 197, 64) and not torch.equal(pos, model.pos_embed)
    torch.testing.assert_close(pos.double(), expected, atol=1e-5, rtol=1e-5)
    # Patch 8 on 100 × 70 pixels: ⌊100/8⌋ × ⌊70/8⌋ = 12 × 8 patches.
    small8 = tiny_vit(patch_size=8)
    with torch.no_grad():
        pos8 = small8.interpolate_pos_encoding(96, 100, 70)
    torch.testing.assert_close(
        pos8.double(), reference_pos_embed(small8.pos_embed, 8, 100, 70), atol=1e-5, rtol=1e-5
    )


# --------------------------------------------------------------------------------- DINO's outputs


def test_outputs_shapes_and_meanings():
    model = tiny_vit()
    image = torch.randn(2, 3, 70, 100)  # 4 × 6 patches, remainder pixels dropped
    with torch.no_grad():
        cls = model(image)
        layers = model.get_intermediate_layers(image, 3)
        attention = model.get_last_selfattention(image)
        features = model.patch_features(image)
    assert cls.shape == (2, 64)
    assert len(layers) == 3 and all(layer.shape == (2, 1 + 24, 64) for layer in layers)
    torch.testing.assert_close(layers[-1][:, 0], cls)
    assert attention.shape == (2, 4, 25, 25) and attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 4, 25))
    assert features.shape == (2, 64, 4, 6)
    torch.testing.assert_close(features[:, :, 1, 2], layers[-1][:, 1 + 1 * 6 + 2])


def test_get_intermediate_layers_of_a_12_block_vit():
    torch.manual_seed(0)
    model = VisionTransformer(patch_size=16, embed_dim=64, depth=12, num_heads=4).eval()  # ViT-S's depth
    image = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        layers = model.get_intermediate_layers(image, 4)
        cls = model(image)
        tokens = model.prepare_tokens(image)
        for block in model.blocks[:9]:
            tokens = block(tokens)
    assert len(layers) == 4 and all(layer.shape == (1, 1 + 4 * 5, 64) for layer in layers)
    torch.testing.assert_close(layers[-1][:, 0], cls)
    torch.testing.assert_close(layers[0], model.norm(tokens))  # the output of block 9 of 12, normed


def test_efficient_attention_matches_explicit_softmax():
    model = tiny_vit()
    image = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        tokens = model.prepare_tokens(image)
        explicit_tokens = tokens
        for block in model.blocks:
            explicit_tokens, _ = block(explicit_tokens, return_attention=True)
        cls = model(image)  # scaled_dot_product_attention path
        attn = model.blocks[0].attn
        out, probabilities = attn(tokens, return_attention=True)
        q, k, _ = attn.qkv(tokens).reshape(2, tokens.shape[1], 3, 4, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(cls, model.norm(explicit_tokens)[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, attn(tokens), atol=1e-5, rtol=1e-5)
    # Probabilities are softmax(q·kᵀ/√d) over each row (d = 64 / 4 heads = 16), computed by hand here.
    torch.testing.assert_close(probabilities, (q @ k.transpose(-2, -1) / 4.0).softmax(-1))


def test_attention_is_float32_under_autocast():
    model = tiny_vit()
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attention = model.get_last_selfattention(image)
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 4, 7))


# --------------------------------------------------------------------------------- loading files


def test_plain_state_dict_round_trip(tmp_path, caplog):
    source, target = tiny_vit(seed=1), tiny_vit(seed=2)
    path = tmp_path / "dino_tiny_pretrain.pth"
    torch.save(source.state_dict(), path)
    image = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert not torch.allclose(source(image), target(image))
        with caplog.at_level("INFO", logger="dvos.models.backbones.vit"):
            description = load_dino_checkpoint(target, path)
        torch.testing.assert_close(target(image), source(image), rtol=0, atol=0)
    assert description == f"DINO checkpoint {path}" and description in caplog.text


def test_training_checkpoint_with_teacher_and_prefixes(tmp_path):
    teacher, student, target = tiny_vit(seed=1), tiny_vit(seed=3), tiny_vit(seed=2)

    def wrapped(model):  # DINO's checkpoint.pth: DDP's `module.`, MultiCropWrapper's `backbone.` and `head.`
        entries = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
        entries["module.head.last_layer.weight_g"] = torch.ones(10, 1)
        return entries

    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": wrapped(student),
            "teacher": wrapped(teacher),
            "epoch": 3,
            "args": argparse.Namespace(arch="vit_small"),
        },
        path,
    )
    assert load_dino_checkpoint(target, path) == f"DINO checkpoint {path} (teacher)"
    for key, value in teacher.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_bad_files_give_one_line_errors(tmp_path):
    model = tiny_vit()
    with pytest.raises(DvosError, match="not found: .*missing.pth"):
        load_dino_checkpoint(model, tmp_path / "missing.pth")

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\nat all\n")
    with pytest.raises(DvosError, match="notes.pth") as err:
        load_dino_checkpoint(model, text)
    assert "\n" not in str(err.value)

    other_patch = tmp_path / "patch8.pth"  # a ViT of another patch size
    torch.save(tiny_vit(patch_size=8).state_dict(), other_patch)
    with pytest.raises(
        DvosError, match=r"patch8.pth does not fit .*shape mismatch pos_embed \(1, 785, 64\)"
    ) as err:
        load_dino_checkpoint(model, other_patch)
    assert "\n" not in str(err.value)

    incomplete = tmp_path / "incomplete.pth"
    state_dict = model.state_dict()
    del state_dict["norm.weight"]
    state_dict["head.weight"] = torch.zeros(3)
    torch.save(state_dict, incomplete)
    with pytest.raises(
        DvosError, match=r"missing keys \['norm.weight'\].*unexpected keys \['head.weight'\]"
    ) as err:
        load_dino_checkpoint(model, incomplete)
    assert "\n" not in str(err.value)
