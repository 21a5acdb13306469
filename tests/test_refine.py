"""Edge-aware refinement of soft masks (`dvos.models.refine.bilateral_refine`)."""

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
