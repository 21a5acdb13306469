"""Distillation and CRW losses: CKA values and invariances, query-grid resampling, DIST-style relation
losses, pseudo-label CE, the combined objective, and the contrastive random walk."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dvos.lit.losses import (
    DistillationLoss,
    bootstrapped_ce,
    cell_overlaps,
    cka_form,
    cka_loss,
    crw_loss,
    crw_transitions,
    inter_object_loss,
    inter_skipped_share,
    intra_object_loss,
    linear_cka,
    masked_softmax,
    match_query_grid,
    match_sparse_query_grid,
    palindrome_walk_loss,
    pearson,
    pseudo_label_ce,
    resample_grid,
    soft_jaccard_loss,
    teacher_probabilities,
    valid_channels,
)
from dvos.models.backbones.resnet import ResNetEncoder


def random_orthogonal(size: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["feature", "gram"])
def test_cka_of_identical_maps_is_one(form):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, 12, generator=g)
    assert torch.allclose(linear_cka(x, x, form=form), torch.ones(3), atol=1e-6)
    assert linear_cka(x[0], x[0], form=form).shape == ()


@pytest.mark.parametrize("form", ["feature", "gram"])
def test_cka_invariant_to_isotropic_scaling_orthogonal_transforms_and_column_shifts(form):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 6, generator=g), torch.randn(30, 9, generator=g)
    reference = linear_cka(x, y, form=form)
    assert 0.05 < float(reference) < 0.95
    for scale in (1e-4, 0.37, 250.0):
        assert torch.allclose(linear_cka(scale * x, y, form=form), reference, atol=1e-5)
        assert torch.allclose(linear_cka(x, scale * y, form=form), reference, atol=1e-5)
    qx, qy = random_orthogonal(6, g), random_orthogonal(9, g)
    assert torch.allclose(linear_cka(x @ qx, y @ qy, form=form), reference, atol=1e-5)
    shift = torch.randn(1, 6, generator=g) * 10
    assert torch.allclose(linear_cka(x + shift, y, form=form), reference, atol=1e-5)


def test_cka_by_hand_on_three_rows():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([[1.0], [2.0], [4.0]])
    # Column means (2/3, 2/3) and 7/3:
    #   Xc = [[1/3, −2/3], [−2/3, 1/3], [1/3, 1/3]],  Yc = [−4/3, −1/3, 5/3]ᵀ
    #   YcᵀXc = [(−4 + 2 + 5)/9, (8 − 1 + 5)/9] = [1/3, 4/3]          → ‖·‖²_F = 17/9
    #   XcᵀXc = [[2/3, −1/3], [−1/3, 2/3]]                              → ‖·‖_F = √10 / 3
    #   YcᵀYc = (16 + 1 + 25)/9 = 14/3                                  → ‖·‖_F = 14/3
    expected = (17 / 9) / ((math.sqrt(10) / 3) * (14 / 3))  # = 17 / (14 √10) ≈ 0.38399
    for form in ("feature", "gram", "auto"):
        assert linear_cka(x, y, form=form).item() == pytest.approx(expected, abs=1e-6)
        assert linear_cka(y, x, form=form).item() == pytest.approx(expected, abs=1e-6)


def test_cka_with_different_column_counts_both_forms_agree():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(4, 64, 5, generator=g), torch.rand(4, 64, 9, generator=g)
    feature, gram = linear_cka(x, y, form="feature"), linear_cka(x, y, form="gram")
    assert feature.shape == (4,)
    assert torch.allclose(feature, gram, atol=1e-6)
    assert cka_form(64, 5, 9) == "feature"  # N·(P+Q) = 896 > 25 + 81 + 45
    assert cka_form(16, 300, 200) == "gram"  # 8000 < 90000 + 40000 + 60000
    wide_x, wide_y = torch.rand(16, 300, generator=g), torch.rand(16, 200, generator=g)
    assert linear_cka(wide_x, wide_y, form="feature").item() == pytest.approx(
        linear_cka(wide_x, wide_y, form="gram").item(), abs=1e-5
    )


def test_cka_gradients_are_finite_also_for_constant_maps():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20, 5, generator=g, requires_grad=True)
    y = torch.rand(20, 9, generator=g)
    linear_cka(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for value in (0.1, 0.0, 1 / 7):
        for form in ("feature", "gram"):
            constant = torch.full((20, 5), value, requires_grad=True)
            cka = linear_cka(constant, y, form=form)
            cka.backward()
            assert cka.item() == pytest.approx(0.0, abs=1e-6)
            assert torch.isfinite(constant.grad).all()
            assert constant.grad.abs().max() < 1e-3


def test_cka_is_float32_under_autocast():
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 50, 7, generator=g), torch.rand(2, 50, 11, generator=g)
    expected = linear_cka(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cka(x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)


def test_cka_loss_head_reductions():
    g = torch.Generator().manual_seed(5)
    batch, heads, tokens, points = 2, 3, 24, 6
    student = torch.rand(batch, heads, tokens, points, generator=g).softmax(-1)
    teacher = torch.rand(batch, tokens, 40, generator=g).softmax(-1)

    # concat: the student's Gram kernel is the sum of the heads' kernels (written out here).
    def centred(m):
        return m - m.mean(-2, keepdim=True)

    kernel_s = sum(centred(student[:, h]) @ centred(student[:, h]).mT for h in range(heads))
    kernel_t = centred(teacher) @ centred(teacher).mT
    by_hand = (kernel_s * kernel_t).sum((1, 2)) / (kernel_s.norm(dim=(1, 2)) * kernel_t.norm(dim=(1, 2)))
    assert cka_loss(student, teacher, heads="concat").item() == pytest.approx(
        (1 - by_hand).mean().item(), abs=1e-5
    )
    mean_map = 1 - linear_cka(student.mean(1), teacher)
    assert cka_loss(student, teacher, heads="mean").item() == pytest.approx(mean_map.mean().item(), abs=1e-6)
    each = torch.stack([1 - linear_cka(student[:, h], teacher) for h in range(heads)])
    assert cka_loss(student, teacher, heads="each").item() == pytest.approx(each.mean().item(), abs=1e-6)
    # the same map for every head and the teacher: 0 whatever the reduction
    same = teacher.unsqueeze(1).expand(batch, heads, tokens, 40)
    for reduction in ("concat", "mean", "each"):
        assert cka_loss(same, teacher, heads=reduction).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="match_query_grid"):
        cka_loss(student, teacher[:, :10])


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------
def test_match_query_grid_samples_student_cell_centres():
    # Teacher rows that are a linear function of the query position (y, x) at stride 8; a stride-16
    # student cell (i, j) is centred on teacher coordinates (2i + 0.5, 2j + 0.5), where bilinear
    # interpolation of a linear function is exact.
    h_t, w_t, columns = 8, 12, 3
    ys, xs = torch.meshgrid(torch.arange(h_t).float(), torch.arange(w_t).float(), indexing="ij")
    slopes = torch.tensor([[1.0, 0.0, 0.0], [0.5, -2.0, 3.0]])  # (a_m for y, b_m for x) per column
    teacher = (ys.reshape(-1, 1) * slopes[0] + xs.reshape(-1, 1) * slopes[1]).unsqueeze(0)  # 1 × 96 × 3
    out = match_query_grid(teacher, (h_t, w_t), (4, 6))
    si, sj = torch.meshgrid(torch.arange(4).float(), torch.arange(6).float(), indexing="ij")
    expected = (2 * si + 0.5).reshape(-1, 1) * slopes[0] + (2 * sj + 0.5).reshape(-1, 1) * slopes[1]
    assert out.shape == (1, 24, columns)
    assert torch.allclose(out[0], expected, atol=1e-5)
    # odd (ceil-sized) grids: 13 × 17 cells at stride 8 → 7 × 9 at stride 16
    odd = torch.rand(2, 13 * 17, 5).softmax(-1)
    resized = match_query_grid(odd, (13, 17), (7, 9))
    assert resized.shape == (2, 63, 5)
    assert torch.allclose(resized.sum(-1), torch.ones(2, 63), atol=1e-5)
    assert match_query_grid(odd, (13, 17), (13, 17)) is not None


def pixel_averaged_rows(rows, image_size, teacher_stride, teacher_hw, student_hw, pad=(0, 0)):
    """The expected student rows, by counting pixels: image pixel (y, x) lies in teacher cell
    (y // s_t, x // s_t) and in student cell ((y + top) // 16, (x + left) // 16) (the student pads
    `pad` = (top, left) pixels before its stride-16 grid); a student row is the mean of the teacher
    rows of its pixels. rows: N_t × M numpy → N_s × M."""
    height, width = image_size
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    teacher_cell = (ys // teacher_stride) * teacher_hw[1] + xs // teacher_stride
    student_cell = ((ys + pad[0]) // 16) * student_hw[1] + (xs + pad[1]) // 16
    counts = np.zeros((student_hw[0] * student_hw[1], teacher_hw[0] * teacher_hw[1]))
    np.add.at(counts, (student_cell.ravel(), teacher_cell.ravel()), 1.0)
    return counts @ rows / counts.sum(1, keepdims=True)


@pytest.mark.parametrize("teacher_stride", [8, 4])
def test_match_query_grid_averages_the_teacher_rows_of_each_student_cell(teacher_stride):
    # 64 × 96 pixels: a 4 × 6 student grid over 8 × 12 (ratio 2) or 16 × 24 (ratio 4) teacher cells
    g = torch.Generator().manual_seed(21)
    teacher_hw = (64 // teacher_stride, 96 // teacher_stride)
    rows = torch.rand(2, teacher_hw[0] * teacher_hw[1], 7, generator=g).softmax(-1)
    out = match_query_grid(rows, teacher_hw, (4, 6), ratio=16 / teacher_stride)
    for b in range(2):
        expected = pixel_averaged_rows(rows[b].double().numpy(), (64, 96), teacher_stride, teacher_hw, (4, 6))
        assert np.allclose(out[b].numpy(), expected, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(2, 24), atol=1e-5)  # still distributions
    assert torch.allclose(match_query_grid(rows, teacher_hw, (4, 6)), out)  # the ratio is inferred
    # at ratio 4 every one of a cell's 4 × 4 teacher rows counts, not only the central 2 × 2
    corner = torch.zeros_like(rows)
    corner[:, 0, 0] = 1.0  # only teacher cell (0, 0), a corner of student cell (0, 0), has mass
    expected = 1.0 / (16 / teacher_stride) ** 2
    assert match_query_grid(corner, teacher_hw, (4, 6))[:, 0, 0].tolist() == pytest.approx([expected] * 2)
    # the sparse form of a top-k map gives the same rows
    values, indices = rows.topk(3, dim=-1)
    dense = torch.zeros_like(rows).scatter_(-1, indices, values)
    sparse = match_sparse_query_grid(indices, values, 7, teacher_hw, (4, 6), ratio=16 / teacher_stride)
    assert torch.allclose(sparse, match_query_grid(dense, teacher_hw, (4, 6)), atol=1e-6)


@pytest.mark.parametrize("teacher_stride", [8, 4])
def test_match_query_grid_on_a_padded_465_crop(teacher_stride):
    # 465 × 465: the student pads to 480 (7 px above and left, 8 below and right), so student cell i
    # covers image rows [16i − 7, 16i + 9); the teacher's ceil-sized grid starts at pixel 0 and its
    # last cell is partial (465 = 58·8 + 1 = 116·4 + 1)
    image, pad = (465, 465), (7, 7)
    teacher_hw = (-(-465 // teacher_stride),) * 2
    student_hw = (30, 30)
    g = torch.Generator().manual_seed(22)
    columns, k = 40, 5
    indices = torch.randint(0, columns, (1, teacher_hw[0] * teacher_hw[1], k), generator=g)
    weights = torch.rand(1, teacher_hw[0] * teacher_hw[1], k, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    grid = dict(
        ratio=16 / teacher_stride,
        offset=(-7 / teacher_stride, -7 / teacher_stride),
        extent=(465 / teacher_stride, 465 / teacher_stride),
    )
    out = match_sparse_query_grid(indices, weights, columns, teacher_hw, student_hw, **grid)
    dense = torch.zeros(1, teacher_hw[0] * teacher_hw[1], columns).scatter_add_(-1, indices, weights)
    expected = pixel_averaged_rows(
        dense[0].double().numpy(), image, teacher_stride, teacher_hw, student_hw, pad
    )
    assert np.allclose(out[0].numpy(), expected, atol=1e-6)
    assert torch.allclose(match_query_grid(dense, teacher_hw, student_hw, **grid), out, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(1, 900), atol=1e-5)
    # without the offset the rows would be those of cells 7 px away: not the same
    unaligned = match_query_grid(dense, teacher_hw, student_hw, ratio=16 / teacher_stride)
    assert not np.allclose(unaligned[0].numpy(), expected, atol=1e-3)


def test_cell_overlaps_by_hand():
    # output cells of 4 source cells starting 1.75 cells before the source grid, image 9.25 cells long
    weights = cell_overlaps(3, 10, ratio=4.0, offset=-1.75, extent=9.25)
    # cell 0 covers [−1.75, 2.25) → [0, 2.25): cells 0, 1 whole and a quarter of cell 2
    assert weights[0, :3].tolist() == pytest.approx([1 / 2.25, 1 / 2.25, 0.25 / 2.25])
    # cell 1 covers [2.25, 6.25): three quarters of 2, then 3, 4, 5, and a quarter of 6
    assert weights[1, 2:7].tolist() == pytest.approx([0.75 / 4, 0.25, 0.25, 0.25, 0.25 / 4])
    # cell 2 covers [6.25, 10.25) → [6.25, 9.25): the image ends inside cell 9
    assert weights[2, 6:10].tolist() == pytest.approx([0.75 / 3, 1 / 3, 1 / 3, 0.25 / 3])
    assert torch.allclose(weights.sum(1), torch.ones(3))


def test_resample_grid_matches_interpolate_and_stride_alignment():
    g = torch.Generator().manual_seed(6)
    maps = torch.rand(2, 3, 10, 14, generator=g)
    # an explicit size ratio is F.interpolate's align_corners=False bilinear
    expected = F.interpolate(maps, size=(25, 35), mode="bilinear", align_corners=False)
    assert torch.allclose(resample_grid(maps, (25, 35), ratio=None), expected, atol=1e-5)
    # stride 8 → stride 4 on a ceil-sized grid (H = 76: 10 cells at stride 8, 19 at stride 4):
    # pixel-accurate: output cell i reads source (i + 0.5)/2 − 0.5
    up = resample_grid(maps, (19, 27))
    ref = F.interpolate(maps, scale_factor=2, mode="bilinear", align_corners=False)[..., :19, :27]
    assert torch.allclose(up, ref, atol=1e-5)
    # the stride ratio is found also where rounding the size ratio misses it: H = 50 → 7 cells at
    # stride 8 (50/7 ≈ 7.1), W = 70 → 9 cells
    small = torch.rand(1, 2, 7, 9, generator=g)
    assert torch.allclose(resample_grid(small, (50, 70)), resample_grid(small, (50, 70), ratio=1 / 8))
    assert torch.allclose(resample_grid(maps, (5, 7)), resample_grid(maps, (5, 7), ratio=2))


def test_teacher_probabilities_sum_to_one_over_valid_channels():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 6, 8, generator=g)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    probabilities = teacher_probabilities(logits, (24, 32), valid, tau=0.5)
    assert probabilities.shape == (2, 4, 24, 32)
    assert torch.allclose(probabilities.sum(1), torch.ones(2, 24, 32), atol=1e-5)
    assert probabilities[0, 3].abs().max() == 0 and probabilities[1, 2:].abs().max() == 0


# --------------------------------------------------------------------------------------------------
# Relation losses
# --------------------------------------------------------------------------------------------------
def logits_pair(seed: int = 8, batch: int = 2, channels: int = 4, size=(12, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *size, generator=g), torch.randn(batch, channels, *size, generator=g)


def test_relation_losses_are_zero_for_identical_logits():
    z, _ = logits_pair()
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    for tau in (1.0, 4.0):
        assert inter_object_loss(z, z.clone(), tau=tau, valid=valid).item() == pytest.approx(0.0, abs=1e-5)
        assert intra_object_loss(z, z.clone(), tau=tau, valid=valid).item() == pytest.approx(0.0, abs=1e-5)


def test_pearson_against_numpy_and_its_invariances():
    g = torch.Generator().manual_seed(9)
    a, b = torch.rand(5, 30, generator=g), torch.rand(5, 30, generator=g)
    expected = [np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(5)]
    assert np.allclose(pearson(a, b, dim=1).numpy(), expected, atol=1e-5)
    scale = torch.rand(5, 1, generator=g) * 10 + 0.1
    assert torch.allclose(pearson(a * scale + 3.0, b, dim=1), pearson(a, b, dim=1), atol=1e-5)
    # masked entries are ignored
    mask = torch.ones(5, 30, dtype=torch.bool)
    mask[:, 20:] = False
    garbage = a.clone()
    garbage[:, 20:] = 1e3
    assert torch.allclose(
        pearson(garbage, b, dim=1, mask=mask), pearson(a[:, :20], b[:, :20], dim=1), atol=1e-5
    )


def test_inter_object_loss_invariant_to_per_pixel_logit_shift():
    z_s, z_t = logits_pair(10)
    reference = inter_object_loss(z_s, z_t, tau=2.0)
    assert reference.item() > 0.05
    shift = torch.randn(2, 1, 12, 16) * 5
    assert inter_object_loss(z_s + shift, z_t, tau=2.0).item() == pytest.approx(reference.item(), abs=1e-5)
    assert inter_object_loss(z_s, z_t - shift, tau=2.0).item() == pytest.approx(reference.item(), abs=1e-5)


def test_inter_pearson_invariant_to_per_pixel_positive_scaling_of_probabilities():
    z_s, z_t = logits_pair(11)
    valid = torch.ones(2, 4, dtype=torch.bool)
    y_s, y_t = masked_softmax(z_s, valid), masked_softmax(z_t, valid)
    scale = torch.rand(2, 1, 12, 16) * 5 + 0.01
    assert torch.allclose(pearson(y_s * scale, y_t, dim=1), pearson(y_s, y_t, dim=1), atol=1e-5)


def test_masked_channels_do_not_change_the_relation_losses():
    z_s, z_t = logits_pair(12, channels=3)
    garbage_s = torch.cat([z_s, torch.randn(2, 2, 12, 16) * 50], 1)
    garbage_t = torch.cat([z_t, torch.randn(2, 2, 12, 16) * 50], 1)
    valid = torch.tensor([[True, True, True, False, False]] * 2)
    for loss in (inter_object_loss, intra_object_loss):
        clean = loss(z_s, z_t, tau=1.5)
        assert loss(garbage_s, garbage_t, tau=1.5, valid=valid).item() == pytest.approx(
            clean.item(), abs=1e-5
        )
    clean_ce, clean_jaccard = pseudo_label_ce(z_s, z_t)
    garbage_ce, garbage_jaccard = pseudo_label_ce(garbage_s, garbage_t, valid)
    assert garbage_ce.item() == pytest.approx(clean_ce.item(), abs=1e-5)
    assert garbage_jaccard.item() == pytest.approx(clean_jaccard.item(), abs=1e-5)
    # the student's ABSENT logits are found without a mask
    absent_s = torch.cat([z_s, torch.full((2, 2, 12, 16), -1e4)], 1)
    assert valid_channels(absent_s, garbage_t).tolist() == valid.tolist()
    assert inter_object_loss(absent_s, garbage_t).item() == pytest.approx(
        inter_object_loss(z_s, z_t).item(), abs=1e-5
    )


def test_relation_losses_scale_with_tau_squared():
    z_s, z_t = logits_pair(13)
    # softmax(z/τ) with z scaled by τ is the same distribution: only the τ² factor remains
    for loss in (inter_object_loss, intra_object_loss):
        base = loss(z_s, z_t, tau=1.0).item()
        assert loss(3.0 * z_s, 3.0 * z_t, tau=3.0).item() == pytest.approx(9.0 * base, rel=1e-4)


def test_relation_losses_gradients_finite_with_constant_and_single_channels():
    z_s, z_t = logits_pair(14)
    z_s.requires_grad_(True)
    z_t_const = z_t.clone()
    z_t_const[:, 2] = 0.0
    z_t_const[:, :2] = z_t_const[:, :2] * 0 + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)  # constant maps
    valid = torch.tensor([[True, False, False, False], [True, True, True, True]])  # sample 0: background only
    total = inter_object_loss(z_s, z_t_const, valid=valid) + intra_object_loss(z_s, z_t_const, valid=valid)
    total = total + sum(pseudo_label_ce(z_s, z_t_const, valid, jaccard_weight=1.0))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z_s.grad).all()
    # no sample with two valid channels: the inter loss is a graph-connected 0
    only_background = torch.tensor([[True, False, False, False]] * 2)
    zero = inter_object_loss(z_s, z_t, valid=only_background)
    assert zero.item() == 0.0 and zero.requires_grad


def test_inter_object_relation_leaves_out_samples_with_fewer_than_three_channels():
    # background + one object: y = (p, 1 − p) per pixel, and the Pearson of two such pairs is ±1 with
    # no gradient; such a sample is left out of the inter-object mean and counted
    g = torch.Generator().manual_seed(23)
    student = torch.randn(1, 2, 10, 12, generator=g)
    teacher = torch.randn(1, 2, 10, 12, generator=g)
    y_s, y_t = torch.softmax(student, 1), torch.softmax(teacher, 1)
    by_hand = [
        np.corrcoef(y_s[0, :, i, j].numpy(), y_t[0, :, i, j].numpy())[0, 1]
        for i in range(10)
        for j in range(12)
    ]
    assert np.allclose(np.abs(by_hand), 1.0, atol=1e-5)  # why: a sign, nothing to learn
    two = student.clone().requires_grad_(True)
    loss = inter_object_loss(two, teacher)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert two.grad.abs().max().item() == 0.0
    # a batch of a two-channel and a three-channel sample: the mean is the three-channel one's
    z_s, z_t = logits_pair(24, batch=2, channels=3, size=(10, 12))
    valid = torch.tensor([[True, True, False], [True, True, True]])
    alone = inter_object_loss(z_s[1:], z_t[1:])
    assert alone.item() > 0.01
    assert inter_object_loss(z_s, z_t, valid=valid).item() == pytest.approx(alone.item(), abs=1e-6)
    assert inter_skipped_share(valid).item() == 0.5
    assert inter_skipped_share(torch.ones(4, 3, dtype=torch.bool)).item() == 0.0
    assert inter_skipped_share(torch.tensor([[True, False, False], [True, True, False]])).item() == 1.0
    # the intra-object relation still learns from two channels
    intra = intra_object_loss(two, teacher)
    assert intra.item() > 0.01


def test_relation_losses_with_teacher_at_stride_8_and_student_at_stride_4():
    g = torch.Generator().manual_seed(15)
    teacher = torch.randn(2, 3, 7, 9, generator=g) * 3  # H × W = 52 × 70: 7 × 9 cells at stride 8
    valid = torch.ones(2, 3, dtype=torch.bool)
    upsampled = teacher_probabilities(teacher, (13, 18), valid)  # stride 4
    student = upsampled.log()  # the teacher's own prediction, resampled
    assert inter_object_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert intra_object_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert (
        pseudo_label_ce(student, teacher)[0].item()
        < F.cross_entropy(student, student.argmax(1)).item() + 1e-5
    )


def test_pseudo_label_ce_by_hand():
    # Uniform student over 3 valid ids: CE = log 3 whatever the teacher's argmax is.
    student = torch.zeros(1, 4, 4, 4)
    student[:, 3] = 1e4  # masked: must not enter the softmax
    teacher = torch.randn(1, 4, 4, 4)
    teacher[:, 3] = 1e4  # masked: must never be the target
    valid = torch.tensor([[True, True, True, False]])
    assert pseudo_label_ce(student, teacher, valid)[0].item() == pytest.approx(math.log(3), abs=1e-5)
    # the student certain of the teacher's argmax: CE ≈ 0
    target = teacher[:, :3].argmax(1)
    confident = F.one_hot(target, 4).permute(0, 3, 1, 2).float() * 30
    ce, jaccard = pseudo_label_ce(confident, teacher, valid)
    assert ce.item() < 1e-6 and jaccard.item() < 1e-6


def test_bootstrapped_ce_averages_each_samples_hardest_pixels():
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten(1)  # 2 × 20
    assert bootstrapped_ce(logits, target).item() == pytest.approx(per_pixel.mean().item(), rel=1e-6)
    # 25 % of 20 pixels: the 5 largest losses of each sample
    hardest = per_pixel.sort(dim=1, descending=True).values[:, :5]
    assert bootstrapped_ce(logits, target, hard_ratio=0.25).item() == pytest.approx(
        hardest.mean().item(), rel=1e-6
    )
    # a sample that does not count leaves the mean
    usable = torch.tensor([False, True])
    assert bootstrapped_ce(logits, target, hard_ratio=0.25, usable=usable).item() == pytest.approx(
        hardest[1].mean().item(), rel=1e-6
    )
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match="hard_ratio"):
            bootstrapped_ce(logits, target, hard_ratio=ratio)


def test_soft_jaccard_by_hand():
    # 2 ids on 4 pixels, target [0, 0, 1, 1]; the student gives every pixel p(1) = 0.25
    target = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.zeros(1, 2, 1, 4)
    logits[:, 1] = math.log(0.25 / 0.75)
    # id 0: ∩ = 2·0.75 = 1.5, ∪ = 4·0.75 + 2 − 1.5 = 3.5; id 1: ∩ = 0.5, ∪ = 1 + 2 − 0.5 = 2.5
    expected = 0.5 * ((1 - 2.5 / 4.5) + (1 - 1.5 / 3.5))
    assert soft_jaccard_loss(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # a confident, right student: 0; an id that is nowhere (target or prediction) adds 0 to its term
    confident = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    assert soft_jaccard_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    # masked ids leave the average; gradients are finite
    logits.requires_grad_(True)
    wide = torch.cat([logits, torch.full((1, 1, 1, 4), -1e4)], 1)
    loss = soft_jaccard_loss(wide, target, torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# DistillationLoss
# --------------------------------------------------------------------------------------------------
def test_distillation_loss_combines_the_weighted_parts():
    g = torch.Generator().manual_seed(16)
    batch, channels = 2, 4
    student_logits = torch.randn(batch, channels, 64, 96, generator=g, requires_grad=True)  # image size
    teacher_logits = torch.randn(batch, channels, 8, 12, generator=g)  # stride 8
    student_attention = torch.rand(batch, 2, 4 * 6, 10, generator=g, requires_grad=True).softmax(
        -1
    )  # stride 16
    teacher_attention = torch.rand(batch, 8 * 12, 96, generator=g).softmax(-1)
    criterion = DistillationLoss(lambda_att=0.5, lambda_inter=2.0, lambda_intra=0.25, lambda_ce=0.0, tau=2.0)
    total, parts = criterion(
        student_logits,
        teacher_logits,
        num_objects=torch.tensor([2, 3]),
        attention_pairs=[(student_attention, teacher_attention)],
        student_query_shape=(4, 6),
        teacher_query_shape=(8, 12),
    )
    assert set(parts) == {"att", "inter", "intra", "ce", "jaccard"}
    assert all(not value.requires_grad and torch.isfinite(value) for value in parts.values())
    expected = 0.5 * parts["att"] + 2.0 * parts["inter"] + 0.25 * parts["intra"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert parts["inter"].item() == pytest.approx(
        inter_object_loss(student_logits, teacher_logits, tau=2.0, valid=valid).item(), abs=1e-6
    )
    resized = match_query_grid(teacher_attention, (8, 12), (4, 6))
    assert parts["att"].item() == pytest.approx(cka_loss(student_attention, resized).item(), abs=1e-6)
    total.backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0
    # λ = 0 for everything but CE: only CE carries gradients
    ce_only = DistillationLoss(lambda_att=0, lambda_inter=0, lambda_intra=0, lambda_ce=1.0)
    total, parts = ce_only(student_logits.detach().requires_grad_(True), teacher_logits)
    assert total.item() == pytest.approx(parts["ce"].item()) and total.requires_grad
    assert parts["att"].item() == 0.0
    # the Jaccard alone, with the CE over the hardest half of the pixels logged beside it
    jaccard_only = DistillationLoss(
        lambda_att=0, lambda_inter=0, lambda_intra=0, lambda_ce=0, lambda_jaccard=2.0, ce_hard_ratio=0.5
    )
    logits = student_logits.detach().requires_grad_(True)
    total, parts = jaccard_only(logits, teacher_logits, num_objects=torch.tensor([2, 3]))
    target = teacher_probabilities(teacher_logits, (64, 96), valid).argmax(1)
    masked = logits.detach().masked_fill(~valid[:, :, None, None], -1e4)
    assert parts["jaccard"].item() == pytest.approx(soft_jaccard_loss(masked, target, valid).item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(
        bootstrapped_ce(masked, target, hard_ratio=0.5).item(), rel=1e-5
    )
    assert total.item() == pytest.approx(2.0 * parts["jaccard"].item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ce_hard_ratio"):
        DistillationLoss(ce_hard_ratio=0.0)


# --------------------------------------------------------------------------------------------------
# Contrastive random walk
# --------------------------------------------------------------------------------------------------
def test_identity_walk_returns_with_accuracy_one():
    eye = torch.eye(6).expand(2, 6, 6)
    loss, accuracy = palindrome_walk_loss([eye, eye, eye], [eye, eye, eye])
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert accuracy.item() == 1.0
    # orthonormal node features at a low temperature: transitions ≈ identity
    features = torch.eye(16).reshape(16, 4, 4).expand(2, 4, 16, 4, 4)
    loss, accuracy = crw_loss(features, temperature=0.05, edge_dropout=0.0)
    assert accuracy.item() == 1.0
    assert loss.item() < 15 * math.exp(-1 / 0.05) * 1.01 + 1e-6  # −log(1/(1 + 15e^{−20})) ≈ 15e^{−20}


def test_palindrome_walk_by_hand():
    forward = torch.tensor([[[0.8, 0.2], [0.9, 0.1]]])
    backward = torch.tensor([[[0.7, 0.3], [0.1, 0.9]]])
    # W = A Ā = [[0.8·0.7 + 0.2·0.1, ...], [..., 0.9·0.3 + 0.1·0.9]] → diagonal (0.58, 0.36),
    # row 1 returns to node 0 (0.64 > 0.36): accuracy 1/2.
    loss, accuracy = palindrome_walk_loss([forward], [backward])
    assert loss.item() == pytest.approx(-(math.log(0.58) + math.log(0.36)) / 2, abs=1e-6)
    assert accuracy.item() == pytest.approx(0.5)
    # T = 3: the mean of the cycles 0→1→0 and 0→1→2→1→0
    g = torch.Generator().manual_seed(17)
    a = [torch.rand(1, 3, 3, generator=g).softmax(-1) for _ in range(2)]
    b = [torch.rand(1, 3, 3, generator=g).softmax(-1) for _ in range(2)]
    short, long = a[0] @ b[0], a[0] @ a[1] @ b[1] @ b[0]
    expected = -(short.diagonal(dim1=1, dim2=2).log().mean() + long.diagonal(dim1=1, dim2=2).log().mean()) / 2
    assert palindrome_walk_loss(a, b)[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_crw_transitions_are_stochastic_with_edge_dropout():
    g = torch.Generator().manual_seed(18)
    features = torch.randn(2, 3, 8, 4, 5, generator=g)
    forward, backward = crw_transitions(features, temperature=0.1, edge_dropout=0.0)
    assert len(forward) == len(backward) == 2 and forward[0].shape == (2, 20, 20)
    # without dropout the backward matrix is the row-softmax of the transposed affinity
    nodes = F.normalize(features.flatten(3), dim=2).transpose(2, 3)
    affinity = nodes[:, 0] @ nodes[:, 1].mT / 0.1
    assert torch.allclose(forward[0], affinity.softmax(-1), atol=1e-6)
    assert torch.allclose(backward[0], affinity.mT.softmax(-1), atol=1e-6)
    dropped_f, dropped_b = crw_transitions(
        features, temperature=0.1, edge_dropout=0.3, generator=torch.Generator().manual_seed(0)
    )
    zeros = (dropped_f[0] == 0).float().mean().item()
    assert 0.2 < zeros < 0.4
    assert torch.allclose(dropped_f[0].sum(-1), torch.ones(2, 20), atol=1e-5)
    assert torch.allclose(dropped_b[1].sum(-1), torch.ones(2, 20), atol=1e-5)
    again, _ = crw_transitions(
        features, temperature=0.1, edge_dropout=0.3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again[0], dropped_f[0])


def translating_texture_clips(num_clips: int = 2, num_frames: int = 4, size: int = 32, shift: int = 2):
    """Random smooth textures, each seen through a window moving `shift` px right per frame."""
    g = torch.Generator().manual_seed(19)
    width = size + shift * (num_frames - 1)
    coarse = torch.rand(num_clips, 3, size // 3 + 1, width // 3 + 1, generator=g)
    texture = F.interpolate(coarse, size=(size, width), mode="bilinear", align_corners=False)
    texture = (texture + 0.15 * torch.rand(num_clips, 3, size, width, generator=g)).clamp(0, 1)
    return torch.stack([texture[..., shift * t : shift * t + size] for t in range(num_frames)], 1)


def train_crw(clips: torch.Tensor, *, steps: int, edge_dropout: float) -> list[tuple[float, float]]:
    """AdamW on a tiny ResNetEncoder; returns the dropout-free (loss, return accuracy) before each step."""
    torch.manual_seed(0)
    encoder = ResNetEncoder(widths=(16, 32), depths=(1, 1), stem_width=16)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3, weight_decay=1e-4)
    dropout = torch.Generator().manual_seed(1)
    batch, frames = clips.shape[:2]
    curve = []
    for _ in range(steps):
        features = encoder(clips.flatten(0, 1))
        features = features.view(batch, frames, *features.shape[1:])
        with torch.no_grad():
            clean = crw_loss(features, temperature=0.07, edge_dropout=0.0)
        curve.append((clean[0].item(), clean[1].item()))
        loss, _ = crw_loss(features, temperature=0.07, edge_dropout=edge_dropout, generator=dropout)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"CRW curve, dropout {edge_dropout} (loss, return accuracy) every 5 steps:")
    print([tuple(round(v, 3) for v in point) for point in curve[::5]])
    return curve


def test_crw_training_on_a_translating_texture_improves_the_walk():
    clips = translating_texture_clips(num_clips=1)  # 1 × 4 × 3 × 32 × 32, 2 px per frame: 4 × 4 nodes
    curve = train_crw(clips, steps=30, edge_dropout=0.0)
    (first_loss, first_accuracy), (last_loss, last_accuracy) = curve[0], curve[-1]
    assert last_loss < 0.1 * first_loss
    assert last_accuracy > first_accuracy and last_accuracy == 1.0
    assert all(later <= earlier + 0.05 for (earlier, _), (later, _) in zip(curve[5:], curve[6:]))


def test_crw_training_with_edge_dropout_improves_the_clean_walk():
    # Edge dropout 0.1 on 16 nodes blocks the true path too often to learn in a few steps; 8 × 8 nodes.
    clips = translating_texture_clips(num_clips=1, size=64, shift=4)
    curve = train_crw(clips, steps=30, edge_dropout=0.1)
    first_loss, first_accuracy = curve[0]
    last_loss = np.mean([point[0] for point in curve[-5:]])
    last_accuracy = np.mean([point[1] for point in curve[-5:]])
    assert last_loss < 0.5 * first_loss
    assert last_accuracy > first_accuracy + 0.15
