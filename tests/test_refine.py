"""Edge-aware refinement of soft masks (`dvos.models.refine.bilateral_refine`)."""

import math

import pytest
import torch

from dvos.models.refine import bilateral_refine


def two_colour_image(edge: int, height: int = 24, width: int = 40) -> torch.Tensor:
    """Red left of column `edge`, blue from it on: 1 × 3 × H × W."""
    image = torch.zeros(1, 3, height, width)
    image[:, 0, :, :edge] = 0.8
    image[:, 2, :, edge:] = 0.8
    return image


def split_mask(column: int, height: int = 24, width: int = 40) -> torch.Tensor:
    """One-hot, object 1 from column `column` on: 1 × 2 × H × W."""
    ids = torch.zeros(height, width, dtype=torch.long)
    ids[:, column:] = 1
    return torch.nn.functional.one_hot(ids, 2).permute(2, 0, 1)[None].float()


@pytest.mark.parametrize("mask_edge", [17, 23])
def test_a_boundary_off_the_colour_edge_moves_onto_it(mask_edge):
    image = two_colour_image(20)
    refined = bilateral_refine(split_mask(mask_edge), image, radius=4, iterations=3)
    torch.testing.assert_close(refined.sum(1), torch.ones(1, 24, 40))
    ids = refined.argmax(1)[0]
    assert torch.equal(ids, split_mask(20).argmax(1)[0])  # every row: object 1 exactly from column 20


def test_flat_image_only_smooths_and_zero_iterations_is_identity():
    image = torch.full((1, 3, 24, 40), 0.5)
    mask = split_mask(20)
    refined = bilateral_refine(mask, image, iterations=2)
    assert torch.equal(refined.argmax(1), mask.argmax(1))  # a straight boundary stays (symmetric weights)
    assert 0 < refined[0, 1, 0, 19] < 0.5 < refined[0, 1, 0, 20] < 1  # but it is softened
    assert torch.equal(bilateral_refine(mask, image, iterations=0), mask)
    with pytest.raises(ValueError, match="same B, H, W"):
        bilateral_refine(mask, image[..., :20])


def test_dilated_window_by_hand_and_the_uncached_weights_agree(monkeypatch):
    from dvos.models import refine

    # a flat image: only the spatial term weighs; radius 2, dilation 2 reads x − 2, x, x + 2
    row = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]).view(1, 1, 1, 5)
    probabilities = torch.cat([row, 1 - row], 1)
    image = torch.full((1, 3, 1, 5), 0.5)
    out = bilateral_refine(probabilities, image, radius=2, sigma_space=1.5, iterations=1, dilation=2)
    side = math.exp(-4 / (2 * 1.5**2))  # offsets (0, ±2); the rows above and below replicate the same row
    expected = (side * 0.0 + 0.5 + side * 1.0) / (1 + 2 * side)
    assert out[0, 0, 0, 2].item() == pytest.approx(expected, rel=1e-5)
    # frames too large for the weight cache recompute the weights every pass: the same result
    g = torch.Generator().manual_seed(3)
    probabilities = torch.rand(1, 3, 12, 15, generator=g).softmax(1)
    image = torch.rand(1, 3, 12, 15, generator=g)
    cached = bilateral_refine(probabilities, image, radius=3, iterations=2, dilation=1)
    monkeypatch.setattr(refine, "WEIGHT_CACHE_BYTES", 0)
    torch.testing.assert_close(bilateral_refine(probabilities, image, radius=3, iterations=2), cached)
    with pytest.raises(ValueError, match="dilation"):
        bilateral_refine(probabilities, image, dilation=0)
