"""J, F, the boundary map, the disk and the statistics on tiny hand-made masks (expected values by hand)."""

import math

import cv2
import numpy as np
import pytest

from dvos.metrics.jf import (
    boundary_accuracy,
    boundary_map,
    boundary_radius,
    decay_bin_edges,
    dilate_disk,
    disk,
    disk_rectangles,
    region_and_boundary,
    region_similarity,
    statistics,
)


def square(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# ---------------------------------------------------------------- J


def test_region_similarity_by_hand():
    gt = square((6, 8), (1, 2), (1, 4))  # 2 × 4 = 8 px
    pred = square((6, 8), (1, 2), (3, 6))  # 2 × 4 = 8 px, 2 × 2 shared
    assert region_similarity(gt, pred) == pytest.approx(4 / 12, abs=1e-15)
    assert region_similarity(gt, gt) == 1.0


def test_both_empty_scores_one_and_one_empty_scores_zero():
    empty = np.zeros((2, 10, 12), dtype=bool)
    full = np.zeros_like(empty)
    full[:, 3:6, 4:9] = True
    np.testing.assert_array_equal(region_similarity(empty, empty), [1.0, 1.0])
    np.testing.assert_array_equal(boundary_accuracy(empty, empty), [1.0, 1.0])
    # Prediction empty: J = 0; F: precision 1, recall 0 → 0.  GT empty: precision 0, recall 1 → 0.
    np.testing.assert_array_equal(region_similarity(full, empty), [0.0, 0.0])
    np.testing.assert_array_equal(boundary_accuracy(full, empty), [0.0, 0.0])
    np.testing.assert_array_equal(region_similarity(empty, full), [0.0, 0.0])
    np.testing.assert_array_equal(boundary_accuracy(empty, full), [0.0, 0.0])
    # One frame in, one frame out: shapes () and (T,).
    assert boundary_accuracy(empty[0], empty[0]).shape == ()
    assert region_similarity(full, full).shape == (2,)


# ---------------------------------------------------------------- boundary map and disk


def test_boundary_map_of_a_square_is_the_one_sided_ring():
    mask = square((6, 6), (1, 3), (1, 3))
    expected = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(boundary_map(mask), expected)


def test_boundary_map_edge_rules_in_the_last_row_and_column():
    # Object in the bottom-right corner: the last row only compares with the right neighbour,
    # the last column only with the one below, and the corner pixel is 0.
    mask = square((4, 4), (2, 3), (2, 3))
    expected = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 1, 1],
            [0, 1, 0, 0],
            [0, 1, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(boundary_map(mask), expected)
    # Stacks are handled frame by frame.
    np.testing.assert_array_equal(boundary_map(np.stack([mask, mask]))[1], expected)


def test_disk():
    expected = np.array(
        [
            [0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(disk(2), expected)
    assert disk(2).dtype == np.uint8
    # r = 8: rows of half-width floor(sqrt(64 − dy²)) = 8, 7, 7, 7, 6, 6, 5, 3, 0 → 17 + 2·90 pixels.
    assert disk(8).shape == (17, 17) and int(disk(8).sum()) == 197


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 8, 13])
def test_disk_dilation_by_rectangles_is_the_disk_dilation(radius):
    # The union of the centred rectangles is the disk itself ...
    size = 2 * radius + 1
    union = np.zeros((size, size), dtype=np.uint8)
    for rectangle in disk_rectangles(radius):
        h, w = rectangle.shape
        union[radius - h // 2 : radius + h // 2 + 1, radius - w // 2 : radius + w // 2 + 1] = 1
    np.testing.assert_array_equal(union, disk(radius))
    # ... so dilating with them is OpenCV's dilation with the disk, borders included.
    mask = np.random.default_rng(radius).random((37, 53)) > 0.97
    mask[0, 0] = mask[-1, -1] = mask[0, -1] = True
    expected = cv2.dilate(mask.astype(np.uint8), disk(radius)) > 0
    np.testing.assert_array_equal(dilate_disk(mask, radius), expected)


def test_boundary_radius():
    assert boundary_radius(480, 854) == 8  # ceil(0.008 · 979.65)
    assert boundary_radius(100, 100) == 2  # ceil(1.13)
    assert boundary_radius(48, 64) == 1  # ceil(0.64)
    assert boundary_radius(480, 854, bound_th=3) == 3  # >= 1: pixels


# ---------------------------------------------------------------- F tolerance


@pytest.mark.parametrize(("height", "width", "radius"), [(100, 100, 2), (480, 854, 8)])
def test_boundary_tolerance_is_exactly_the_radius(height, width, radius):
    # GT = columns 0..c−1: its boundary is column c−1. A prediction reaching s columns further has
    # its boundary s pixels away: fully matched up to s = radius, not at all at radius + 1.
    c = width // 3
    gt = np.zeros((2, height, width), dtype=bool)
    gt[:, :, :c] = True
    pred = np.zeros_like(gt)
    pred[0, :, : c + radius] = True
    pred[1, :, : c + radius + 1] = True
    np.testing.assert_array_equal(boundary_accuracy(gt, pred), [1.0, 0.0])
    region, boundary = region_and_boundary(gt, pred)
    np.testing.assert_allclose(region, [c / (c + radius), c / (c + radius + 1)], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(boundary, [1.0, 0.0])


def test_boundary_accuracy_by_hand():
    # 48 × 64 → radius 1 (a plus-shaped disk). GT 10 × 10 square; prediction twice as tall.
    # GT ring 40 px, prediction ring 60 px; matched within 1 px: 33 of 60 and 33 of 40.
    gt = square((48, 64), (10, 19), (40, 49))
    pred = square((48, 64), (10, 29), (40, 49))
    precision, recall = 33 / 60, 33 / 40
    expected = 2 * precision * recall / (precision + recall)
    assert expected == pytest.approx(0.66, abs=1e-12)
    assert boundary_accuracy(gt, pred) == pytest.approx(expected, abs=1e-15)
    assert region_similarity(gt, pred) == pytest.approx(0.5, abs=1e-15)


def _full_frame_f(gt, pred, radius):
    """F written straight from the definition on the whole frame (no crop), for comparison."""

    def ring(m):
        e = np.zeros_like(m)
        s = np.zeros_like(m)
        se = np.zeros_like(m)
        e[:, :-1] = m[:, 1:]
        s[:-1, :] = m[1:, :]
        se[:-1, :-1] = m[1:, 1:]
        b = (m ^ e) | (m ^ s) | (m ^ se)
        b[-1, :] = m[-1, :] ^ e[-1, :]
        b[:, -1] = m[:, -1] ^ s[:, -1]
        b[-1, -1] = False
        return b

    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    footprint = (x**2 + y**2 <= radius**2).astype(np.uint8)
    pb, gb = ring(pred), ring(gt)
    pd = cv2.dilate(pb.astype(np.uint8), footprint) > 0
    gd = cv2.dilate(gb.astype(np.uint8), footprint) > 0
    n_p, n_g = pb.sum(), gb.sum()
    if n_p == 0 and n_g > 0:
        p, r = 1, 0
    elif n_p > 0 and n_g == 0:
        p, r = 0, 1
    elif n_p == 0 and n_g == 0:
        p, r = 1, 1
    else:
        p, r = (pb & gd).sum() / float(n_p), (gb & pd).sum() / float(n_g)
    return 0 if p + r == 0 else 2 * p * r / (p + r)


def test_cropped_f_equals_the_full_frame_definition_at_image_borders():
    # Blobs that touch every border and corner, where the crop and the edge rules meet.
    rng = np.random.default_rng(0)
    height, width = 60, 90
    radius = boundary_radius(height, width)
    gt = np.zeros((24, height, width), dtype=bool)
    pred = np.zeros_like(gt)
    for t in range(24):
        for stack in (gt, pred):
            for _ in range(rng.integers(0, 4)):
                y, x = rng.integers(-5, height), rng.integers(-5, width)
                h, w = rng.integers(1, 25, size=2)
                stack[t, max(y, 0) : y + h, max(x, 0) : x + w] ^= True
    gt[0, -3:, -3:] = True  # the bottom-right corner itself
    pred[1, :, :] = True  # a full frame
    expected = [_full_frame_f(gt[t], pred[t], radius) for t in range(24)]
    np.testing.assert_allclose(boundary_accuracy(gt, pred), expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- statistics


def test_statistics_ten_frames_by_hand():
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # linspace(1, 10, 5) = 1, 3.25, 5.5, 7.75, 10 → round → 1, 3, 6, 8, 10 → −1.
    np.testing.assert_array_equal(decay_bin_edges(10), [0, 2, 5, 7, 9])
    mean, recall, decay = statistics(values)
    assert mean == pytest.approx(0.55, abs=1e-15)
    assert recall == 0.5  # 0.5 itself is not > 0.5
    # first bin v[0:3] → 0.9, last bin v[7:10] → 0.2
    assert decay == pytest.approx(0.7, abs=1e-15)


def test_statistics_three_hundred_frames_do_not_wrap():
    values = np.arange(300, dtype=np.float64)
    # linspace(1, 300, 5) = 1, 75.75, 150.5, 225.25, 300 → 1, 76, 151, 225, 300 → −1.
    # (The toolkit's uint8 cast turns 299 into 43 and the last bin into an empty slice: NaN.)
    np.testing.assert_array_equal(decay_bin_edges(300), [0, 75, 150, 224, 299])
    mean, recall, decay = statistics(values)
    assert mean == 149.5
    assert recall == 299 / 300
    first, last = np.mean(np.arange(0, 76)), np.mean(np.arange(224, 300))  # 37.5 and 261.5
    assert math.isfinite(decay)
    assert decay == first - last == -224.0


def test_statistics_single_frame_and_types():
    mean, recall, decay = statistics([0.75])
    assert (mean, recall, decay) == (0.75, 1.0, 0.0)
    assert all(type(value) is float for value in (mean, recall, decay))
