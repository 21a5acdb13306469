"""The frozen label-propagation teacher and its ResNet encoder: propagation quality (real J&F),
chunking, top-k / window, bounded context, late objects, pseudo-objects, checkpoints."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from dvos.config import TeacherConfig
from dvos.metrics import evaluate_arrays, region_similarity, summarize
from dvos.models.backbones.resnet import ResNetEncoder, stage_strides
from dvos.models.build import ViTPatchEncoder, build_teacher
from dvos.models.pseudo_objects import cell_colours, kmeans_segments, order_segments, split_components
from dvos.models.teacher import LabelPropagationTeacher, TeacherAttention, masks_to_labels, propagate_labels
from dvos.utils.errors import ConfigError, DvosError

HEIGHT, WIDTH = 96, 160


class PixelEncoder(nn.Module):
    """Raw pixels as features: RGB average-pooled over s × s cells, with its 3 × 3 cell neighbourhood."""

    def __init__(self, stride: int = 4) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(image, self.stride) - 0.5
        patches = F.unfold(F.pad(cells, (1, 1, 1, 1), mode="replicate"), 3)
        return patches.view(image.shape[0], -1, *cells.shape[-2:])


def texture(rng: np.random.Generator, height: int, width: int, colour, grain: int) -> np.ndarray:
    """H × W × 3 float texture: a colour with coarse (grain-pixel) and per-pixel noise."""
    coarse = rng.random((height // grain + 2, width // grain + 2, 3))
    coarse = np.kron(coarse, np.ones((grain, grain, 1)))[:height, :width]
    return np.clip(
        np.asarray(colour) + 0.35 * (coarse - 0.5) + 0.25 * (rng.random((height, width, 3)) - 0.5), 0, 1
    )


def moving_disk_sequence(num_frames: int = 20, *, square_from: int | None = None, seed: int = 0):
    """A textured disk moving 3 px right and 1 px down per frame over a different texture.

    With `square_from`, a second textured object (a square, id 2) appears at that frame.

    Returns:
        frames T × 3 × H × W float32 in [0, 1], ids T × H × W uint8.
    """
    rng = np.random.default_rng(seed)
    background = texture(rng, HEIGHT, WIDTH, (0.25, 0.45, 0.6), 8)
    radius = 22
    disk_texture = texture(rng, 2 * radius + 1, 2 * radius + 1, (0.8, 0.45, 0.2), 4)
    square_texture = texture(rng, 24, 24, (0.3, 0.8, 0.3), 4)
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = yy**2 + xx**2 <= radius**2
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.float32)
    ids = np.zeros((num_frames, HEIGHT, WIDTH), np.uint8)
    for t in range(num_frames):
        frame, cy, cx = background.copy(), 40 + t, 30 + 3 * t
        box = (slice(cy - radius, cy + radius + 1), slice(cx - radius, cx + radius + 1))
        frame[box][disk] = disk_texture[disk]
        ids[t][box][disk] = 1
        if square_from is not None and t >= square_from:
            top, left = 10 + (t - square_from), 124 - 2 * (t - square_from)
            frame[top : top + 24, left : left + 24] = square_texture
            ids[t, top : top + 24, left : left + 24] = 2
        frames[t] = frame
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), ids


def one_hot(ids: np.ndarray, num_labels: int) -> torch.Tensor:
    """H × W ids → 1 × L × H × W float one-hot."""
    return F.one_hot(torch.from_numpy(ids).long(), num_labels).permute(2, 0, 1)[None].float()


def stream(
    teacher: LabelPropagationTeacher, frames: torch.Tensor, reference_ids: np.ndarray, num_labels: int
):
    """Run init + step over a clip; returns predicted ids T × H × W uint8 (frame 0 = the reference)."""
    teacher.init(frames[:1], one_hot(reference_ids, num_labels))
    predictions = [reference_ids]
    for t in range(1, frames.shape[0]):
        logits, _ = teacher.step(frames[t : t + 1])
        predictions.append(teacher.predict_ids(logits, (HEIGHT, WIDTH))[0].numpy().astype(np.uint8))
    return np.stack(predictions)


# --------------------------------------------------------------------------------------------
# Propagation quality through the real J&F code
# --------------------------------------------------------------------------------------------


def test_pixel_feature_propagation_scores_above_0_9_jf():
    frames, ids = moving_disk_sequence()
    teacher = LabelPropagationTeacher(PixelEncoder(stride=4), radius=6)
    predictions = stream(teacher, frames, ids[0], 2)
    scores = summarize(evaluate_arrays(ids, predictions, sequence="disk"))
    assert scores["J&F-Mean"] > 0.9, scores
    assert scores["J-Mean"] > 0.85 and scores["F-Mean"] > 0.85, scores

    # The clip API gives the same labels as the streaming API.
    clip = teacher.propagate_clip(frames[None], one_hot(ids[0], 2))
    assert clip["logits"].shape == (1, 20, 2, HEIGHT // 4, WIDTH // 4)
    assert len(clip["attention"]) == 20 and clip["attention"][0] is None
    clip_predictions = teacher.predict_ids(clip["logits"][0], (HEIGHT, WIDTH)).numpy().astype(np.uint8)
    assert np.array_equal(clip_predictions[1:], predictions[1:])


def test_random_resnet_features_propagate_the_object():
    # Random-conv features at stride 8 on a 96 × 160 clip (12 × 20 cells) are a weak baseline:
    # the object must still be followed (J well above the empty prediction's 0).
    torch.manual_seed(0)
    frames, ids = moving_disk_sequence(num_frames=8)
    teacher = LabelPropagationTeacher(ResNetEncoder(), radius=4, temperature=0.1)
    predictions = stream(teacher, frames, ids[0], 2)
    assert region_similarity(ids[1:-1] == 1, predictions[1:-1] == 1).mean() > 0.4


# --------------------------------------------------------------------------------------------
# The propagation itself
# --------------------------------------------------------------------------------------------


def random_context(batch=2, channels=16, height=11, width=13, slots=3, labels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(batch, channels, height, width, generator=generator), dim=1)  # noqa: E731
    query = unit()
    features = [unit() for _ in range(slots)]
    soft = [
        torch.softmax(torch.randn(batch, labels, height, width, generator=generator), 1) for _ in range(slots)
    ]
    return query, features, soft


def attention_of(indices, weights, height, width, slots):
    return TeacherAttention(indices, weights, (height, width), tuple(range(slots)), slots)


def test_chunked_equals_unchunked():
    query, features, labels = random_context()
    options = {"topk": 7, "radius": 3, "temperature": 0.07}
    full = propagate_labels(query, features, labels, chunk_size=None, **options)
    for chunk in (1, 4, 5):
        tiled = propagate_labels(query, features, labels, chunk_size=chunk, **options)
        torch.testing.assert_close(tiled[0], full[0], atol=1e-6, rtol=0)
        dense_full = attention_of(full[1], full[2], 11, 13, 3).dense()
        dense_tiled = attention_of(tiled[1], tiled[2], 11, 13, 3).dense()
        torch.testing.assert_close(dense_tiled, dense_full, atol=1e-6, rtol=0)


def test_attention_respects_topk_and_radius_and_rows_sum_to_one():
    height, width, slots, radius, topk = 11, 13, 3, 2, 6
    query, features, labels = random_context(height=height, width=width, slots=slots)
    probabilities, indices, weights = propagate_labels(
        query, features, labels, topk=topk, radius=radius, temperature=0.1, chunk_size=4
    )
    attention = attention_of(indices, weights, height, width, slots)
    dense = attention.dense()
    assert dense.shape == (2, height * width, slots * height * width)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, height * width))
    assert int((dense > 0).sum(-1).max()) <= topk

    # Zero outside the square window |dy|, |dx| ≤ radius in every context frame.
    cells = torch.arange(height * width)
    qy, qx = cells // width, cells % width
    cy, cx = (cells // width).repeat(slots), (cells % width).repeat(slots)
    outside = ((qy[:, None] - cy).abs() > radius) | ((qx[:, None] - cx).abs() > radius)
    assert float(dense[:, outside].abs().max()) == 0.0

    # The per-frame blocks are the dense map's columns.
    blocks = torch.cat([attention.frame_columns(m) for m in range(slots)], -1)
    torch.testing.assert_close(blocks, dense)
    torch.testing.assert_close(attention.reference_columns(), dense[..., : height * width])
    torch.testing.assert_close(attention.previous_columns(), dense[..., -height * width :])

    # Labels are the attention-weighted context labels, and stay distributions.
    stacked = torch.cat([lab.flatten(2) for lab in labels], -1)  # B × L × M·h·w
    expected = torch.einsum("bqc,blc->blq", dense, stacked).view_as(probabilities)
    torch.testing.assert_close(probabilities, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, height, width))


def test_per_frame_maps_are_each_frames_own_topk_softmax():
    """Each context frame's map is the top-k softmax over that frame alone (loops over queries and
    frames, from the formula): rows are distributions, where the joint map's block of a frame holds
    anything from 0 to all of a row's mass."""
    height, width, slots, radius, topk, temperature = 5, 6, 3, 2, 4, 0.1
    query, features, labels = random_context(height=height, width=width, slots=slots, seed=3)
    _, indices, weights, frame_indices, frame_weights = propagate_labels(
        query,
        features,
        labels,
        topk=topk,
        radius=radius,
        temperature=temperature,
        chunk_size=3,
        frame_maps=True,
    )
    attention = TeacherAttention(
        indices, weights, (height, width), tuple(range(slots)), slots, frame_indices, frame_weights
    )
    q = query.double().numpy()
    for m in range(slots):
        f = features[m].double().numpy()
        expected = np.zeros((2, height * width, height * width))
        for b in range(2):
            for y in range(height):
                for x in range(width):
                    cells = [
                        (cy, cx)
                        for cy in range(height)
                        for cx in range(width)
                        if abs(cy - y) <= radius and abs(cx - x) <= radius
                    ]
                    scores = np.array([q[b, :, y, x] @ f[b, :, cy, cx] / temperature for cy, cx in cells])
                    kept = np.argsort(-scores)[:topk]
                    soft = np.exp(scores[kept] - scores[kept].max())
                    for index, weight in zip(kept, soft / soft.sum()):
                        cy, cx = cells[index]
                        expected[b, y * width + x, cy * width + cx] = weight
        got = attention.frame_map(m)
        assert np.allclose(got.numpy(), expected, atol=1e-5), m
        torch.testing.assert_close(got.sum(-1), torch.ones(2, height * width))
        rows = torch.tensor([0, 7, 29])
        torch.testing.assert_close(attention.frame_map(m, rows), got[:, rows])
    # the joint map's blocks: each frame's share of a row varies, some rows have none on a frame
    shares = torch.stack([attention.frame_columns(m).sum(-1) for m in range(slots)], -1)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, height * width))
    assert float(shares.min()) == 0.0 and float(shares.max()) > 0.5
    assert attention.slot_of(2) == 2 and attention.slot_of(7) is None
    # without frame_maps the propagation is the same and no per-frame map is kept
    plain = propagate_labels(
        query, features, labels, topk=topk, radius=radius, temperature=temperature, chunk_size=3
    )
    assert len(plain) == 3 and torch.equal(plain[1], indices) and torch.equal(plain[2], weights)
    with pytest.raises(ValueError, match="frame_maps=True"):
        attention_of(indices, weights, height, width, slots).frame_map(0)


def test_clip_attention_holds_a_map_for_every_context_frame():
    torch.manual_seed(0)
    teacher = LabelPropagationTeacher(PixelEncoder(stride=4), n_recent=2, radius=3)
    frames = torch.rand(1, 5, 3, 24, 32)
    out = teacher.propagate_clip(frames, one_hot(np.zeros((24, 32), np.uint8), 2))
    last = out["attention"][4]
    assert last.context_frames == (0, 2, 3)  # the reference and the two most recent frames
    for frame_index in (0, 2, 3):
        frame_map = last.frame_map(last.slot_of(frame_index))
        assert frame_map.shape == (1, 6 * 8, 6 * 8)
        torch.testing.assert_close(frame_map.sum(-1), torch.ones(1, 48))


def test_window_is_global_without_radius_and_topk_is_clamped():
    query, features, labels = random_context(height=3, width=4, slots=1)
    _, indices, weights = propagate_labels(query, features, labels, topk=50, radius=None, temperature=0.1)
    assert indices.shape == (2, 12, 12)  # k = min(topk, M·h·w)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12))


def test_context_queue_is_bounded_and_holds_the_previous_frame():
    teacher = LabelPropagationTeacher(PixelEncoder(stride=4), n_recent=3, radius=2)
    frames = torch.rand(51, 3, 24, 32)
    ids = np.zeros((24, 32), np.uint8)
    ids[8:16, 8:20] = 1
    teacher.init(frames[:1], one_hot(ids, 2))
    for t in range(1, 51):
        logits, attention = teacher.step(frames[t : t + 1])
        assert teacher.context_size <= 1 + 3
        assert attention.context_frames == (0, *range(max(1, t - 3), t))
        assert attention.query_frame == t
        assert logits.shape == (1, 2, 6, 8)
    assert teacher.context_size == 4


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = LabelPropagationTeacher(ResNetEncoder(widths=(8, 16), depths=(1, 1), stem_width=8))
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert all(not p.requires_grad for p in teacher.parameters())
    frames = torch.rand(1, 2, 3, 32, 48, requires_grad=True)
    out = teacher.propagate_clip(frames, one_hot(np.zeros((32, 48), np.uint8), 2))
    assert not out["logits"].requires_grad


# --------------------------------------------------------------------------------------------
# Objects appearing late
# --------------------------------------------------------------------------------------------


def test_object_added_at_frame_10_is_propagated_afterwards():
    frames, ids = moving_disk_sequence(num_frames=20, square_from=10)
    teacher = LabelPropagationTeacher(PixelEncoder(stride=4), radius=6)
    teacher.init(frames[:1], one_hot(ids[0], 2))
    predictions = []
    for t in range(1, 20):
        logits, _ = teacher.step(frames[t : t + 1])
        if t == 10:
            new_object = one_hot(ids[10], 3)
            new_object[:, :2] = 0  # only object 2 is given
            logits = teacher.add_objects(10, new_object)
            assert logits.shape[1] == 3
        predictions.append(teacher.predict_ids(logits, (HEIGHT, WIDTH))[0].numpy())
    predictions = np.stack(predictions)  # frames 1..19
    assert not (predictions[:9] == 2).any()  # nothing of object 2 before it was given
    later = slice(10, 19)  # frames 11..19
    assert region_similarity(ids[11:] == 2, predictions[later] == 2).min() > 0.7
    assert region_similarity(ids[11:] == 1, predictions[later] == 1).mean() > 0.85
    assert all(entry.labels.shape[1] == 3 for entry in teacher.memory.entries())

    # The clip API merges the same way.
    clip = teacher.propagate_clip(frames[None], one_hot(ids[0], 2), object_masks={10: new_object})
    clip_ids = teacher.predict_ids(clip["logits"][0, 1:], (HEIGHT, WIDTH)).numpy()
    assert np.array_equal(clip_ids, predictions)
    with pytest.raises(ValueError, match="not in the context"):
        teacher.add_objects(3, new_object)


# --------------------------------------------------------------------------------------------
# Pseudo-objects
# --------------------------------------------------------------------------------------------


def three_region_image(seed: int = 1):
    """96 × 160: textured blue background (id 0), flat red rectangle (1), textured green disk (2)."""
    rng = np.random.default_rng(seed)
    image = texture(rng, HEIGHT, WIDTH, (0.2, 0.3, 0.7), 8)
    regions = np.zeros((HEIGHT, WIDTH), np.uint8)
    regions[16:72, 12:68] = 1
    image[regions == 1] = (0.9, 0.15, 0.1)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    disk = (yy - 50) ** 2 + (xx - 115) ** 2 <= 28**2
    regions[disk] = 2
    image[disk] = texture(rng, HEIGHT, WIDTH, (0.3, 0.8, 0.25), 4)[disk]
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None], regions


def test_cluster_reference_recovers_three_regions():
    image, regions = three_region_image()
    teacher = LabelPropagationTeacher(PixelEncoder(stride=4))
    features = teacher.encode(image)
    feature_ids, image_ids = teacher.cluster_reference(features, 3, image_size=(HEIGHT, WIDTH))
    assert feature_ids.shape == (1, HEIGHT // 4, WIDTH // 4) and image_ids.shape == (1, HEIGHT, WIDTH)
    image_ids = image_ids[0].numpy()
    majorities = []
    for region in range(3):
        values, counts = np.unique(image_ids[regions == region], return_counts=True)
        majorities.append(int(values[counts.argmax()]))
        assert counts.max() / counts.sum() > 0.9, (region, values, counts)
    assert sorted(majorities) == [0, 1, 2]
    assert majorities[0] == 0  # the border-touching region is the background
    again = teacher.cluster_reference(features, 3, image_size=(HEIGHT, WIDTH))[1][0].numpy()
    assert np.array_equal(again, image_ids)  # deterministic

    # Pseudo-objects drive the clip API when no reference mask is given.
    clip = teacher.propagate_clip(image[:, None].expand(1, 3, 3, HEIGHT, WIDTH), num_segments=3)
    assert clip["logits"].shape[2] == 3
    assert np.array_equal(clip["reference_ids"][0].numpy(), image_ids)

    # distill.position_weight reaches the clustering: a heavy position term splits by place, not colour.
    by_place = teacher.cluster_reference(features, 3, image_size=(HEIGHT, WIDTH), position_weight=50.0)[1]
    assert not np.array_equal(by_place[0].numpy(), image_ids)
    clip = teacher.propagate_clip(
        image[:, None].expand(1, 3, 3, HEIGHT, WIDTH), num_segments=3, position_weight=50.0
    )
    assert np.array_equal(clip["reference_ids"][0].numpy(), by_place[0].numpy())


class BorderDistanceEncoder(nn.Module):
    """Features that only say how far a cell is from the frame's border (the shortcut a dense CRW
    encoder with zero padding can learn), blind to colour."""

    stride = 4

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2] // self.stride, image.shape[-1] // self.stride
        ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
        xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
        ring = torch.minimum(torch.minimum(ys, height - 1 - ys), torch.minimum(xs, width - 1 - xs))
        levels = torch.stack([torch.exp(-((ring - c) ** 2) / 2) for c in range(0, 12, 2)])
        return levels[None].expand(image.shape[0], -1, -1, -1)


def test_colour_weight_finds_colour_regions_the_features_cannot():
    image, regions = three_region_image()
    teacher = LabelPropagationTeacher(BorderDistanceEncoder())
    features = teacher.encode(image)

    def purity(image_ids):
        return min(
            np.unique(image_ids[regions == region], return_counts=True)[1].max() / (regions == region).sum()
            for region in range(3)
        )

    by_features = teacher.cluster_reference(features, 3, image_size=(HEIGHT, WIDTH))[1][0].numpy()
    by_colour = teacher.cluster_reference(
        features, 3, image_size=(HEIGHT, WIDTH), image=image, colour_weight=1.0, feature_weight=0.0
    )[1][0].numpy()
    assert purity(by_features) < 0.8  # rings around the border, not the objects
    assert purity(by_colour) > 0.85
    # the weights reach the clustering through the clip API (distill.colour_weight / feature_weight)
    clip = teacher.propagate_clip(
        image[:, None].expand(1, 2, 3, HEIGHT, WIDTH), num_segments=3, colour_weight=1.0, feature_weight=0.0
    )
    assert np.array_equal(clip["reference_ids"][0].numpy(), by_colour)
    with pytest.raises(ValueError, match="reference image"):
        teacher.cluster_reference(features, 3, colour_weight=1.0)
    with pytest.raises(ValueError, match="min_contrast > 0 needs the reference image"):
        teacher.cluster_reference(features, 3, components=True, min_contrast=0.1)


def reference_kmeans_segments(
    features,
    k,
    *,
    position_weight=0.3,
    colours=None,
    colour_weight=0.0,
    feature_weight=1.0,
    restarts=3,
    seed=0,
):
    """k-means one sample at a time on the CPU, as written before the batched version (the
    reference): k-means++ seeding with `torch.multinomial`, a fresh generator of `seed` per sample,
    Lloyd with `index_add_`, the background and the area order by Python sorting."""
    batch, _, height, width = features.shape
    points = F.normalize(features.float(), dim=1) * feature_weight
    if colour_weight > 0:
        points = torch.cat([points, colour_weight * colours.float()], 1)
    points = points.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    position = torch.stack([ys, xs], -1).reshape(-1, 2).float() / max(max(height, width) - 1, 1)
    out = []
    for index in range(batch):
        cloud = torch.cat([points[index], position_weight * position], 1)
        generator = torch.Generator().manual_seed(seed)
        best = None
        for _ in range(restarts):
            centres = [cloud[torch.randint(cloud.shape[0], (1,), generator=generator)[0]]]
            nearest = ((cloud - centres[0]) ** 2).sum(1)
            for _ in range(1, k):
                centres.append(cloud[torch.multinomial(nearest, 1, generator=generator)[0]])
                nearest = torch.minimum(nearest, ((cloud - centres[-1]) ** 2).sum(1))
            centres = torch.stack(centres)
            for _ in range(10):
                assignment = torch.cdist(cloud, centres).argmin(1)
                sums = torch.zeros_like(centres).index_add_(0, assignment, cloud)
                counts = torch.bincount(assignment, minlength=k).unsqueeze(1)
                centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            distances = torch.cdist(cloud, centres)
            assignment = distances.argmin(1)
            inertia = float((distances.gather(1, assignment[:, None]) ** 2).sum())
            if best is None or inertia < best[1]:
                best = (assignment.view(height, width), inertia)
        segments = best[0]
        areas = torch.bincount(segments.reshape(-1), minlength=k)
        ring = torch.cat([segments[0], segments[-1], segments[1:-1, 0], segments[1:-1, -1]])
        border = torch.bincount(ring, minlength=k)
        background = int(torch.argmax(border * (height * width + 1) + areas))
        others = sorted((s for s in range(k) if s != background), key=lambda s: (-int(areas[s]), s))
        mapping = torch.empty(k, dtype=torch.long)
        mapping[background] = 0
        for new_id, old_id in enumerate(others, start=1):
            mapping[old_id] = new_id
        out.append(mapping[segments])
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 3])
def test_batched_kmeans_gives_the_per_sample_segments(seed):
    """All samples and restarts at once on the tensors' device give what one sample at a time did."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 16, 12, 14, generator=generator)
    colours = torch.rand(3, 3, 12, 14, generator=generator) - 0.5
    for options in (
        {},
        {"colours": colours, "colour_weight": 1.0},
        {"colours": colours, "colour_weight": 1.0, "feature_weight": 0.0},  # the CPU recipe's clustering
        {"position_weight": 2.0, "restarts": 1},
    ):
        expected = reference_kmeans_segments(features, 5, seed=seed, **options)
        got = kmeans_segments(features, 5, seed=seed, **options)
        assert torch.equal(got, expected), options
    # the colour pseudo-objects of a real-looking frame, batched with a copy of itself
    image, _ = three_region_image()
    frame_colours = cell_colours(image, (HEIGHT // 8, WIDTH // 8), 8).expand(2, -1, -1, -1)
    blank = torch.zeros(2, 4, HEIGHT // 8, WIDTH // 8)
    options = {"colours": frame_colours, "colour_weight": 1.0, "feature_weight": 0.0, "seed": seed}
    assert torch.equal(kmeans_segments(blank, 6, **options), reference_kmeans_segments(blank, 6, **options))


def test_order_segments_puts_the_border_segment_first_then_by_area():
    segments = torch.tensor([[2, 2, 2, 2], [2, 0, 0, 2], [2, 1, 0, 2], [2, 2, 2, 2]])
    # segment 2 holds the border: background; then 0 (3 cells), then 1 (1 cell); 3 is empty (last id)
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 2, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(order_segments(segments, 4), expected)
    assert torch.equal(
        order_segments(torch.stack([segments, expected]), 4), torch.stack([expected, expected])
    )


def test_split_components_makes_each_piece_an_object_and_drops_specks_and_backgrounds():
    segments = torch.zeros(1, 10, 10, dtype=torch.long)
    segments[0, 0:2, 0:3] = 1  # segment 1, piece of 6 cells
    segments[0, 6:9, 6:9] = 1  # segment 1 again, 9 cells: another object
    segments[0, 4, 4] = 2  # a speck
    segments[0, 5:10, 0:5] = 3  # 25 cells, a quarter of the map: still an object
    assert int((segments == 3).sum()) == 25
    out = split_components(segments, 4, min_cells=2, max_share=0.25)[0]
    assert out[7, 2] == 1 and out[7, 7] == 2 and out[0, 0] == 3  # by decreasing area
    assert out[4, 4] == 0  # the speck is background
    assert set(out.unique().tolist()) == {0, 1, 2, 3}
    assert int((split_components(segments, 3, min_cells=2)[0] > 0).sum()) == 25 + 9  # at most k − 1
    big = segments.clone()
    big[0, 5:10, 0:6] = 3  # 30 cells > a quarter: a background, not an object
    assert int(split_components(big, 4, min_cells=2)[0][7, 2]) == 0


def test_split_components_drops_thin_pieces_with_min_width():
    segments = torch.zeros(1, 12, 12, dtype=torch.long)
    segments[0, 1, 0:12] = 1  # a stripe one cell wide along the top border, 12 cells
    segments[0, 6:9, 2:5] = 1  # a 3 × 3 block
    segments[0, 6:8, 7:12] = 2  # 2 cells wide, touching the right border
    out = split_components(segments, 6, min_cells=2, min_width=3)[0]
    assert int(out[7, 3]) == 1  # the block stays, now the only object
    assert int(out[1, 5]) == 0 and int(out[7, 9]) == 0  # thinner than 3 (the border does not widen it)
    assert set(out.unique().tolist()) == {0, 1}
    both = split_components(segments, 6, min_cells=2, min_width=2)[0]
    assert int(both[7, 9]) > 0 and int(both[1, 5]) == 0
    assert torch.equal(
        split_components(segments, 6, min_cells=2, min_width=1), split_components(segments, 6, min_cells=2)
    )
    with pytest.raises(ValueError, match="min_width"):
        split_components(segments, 6, min_width=0)


def test_split_components_drops_pieces_of_the_surroundings_colour_with_min_contrast():
    segments = torch.zeros(1, 12, 12, dtype=torch.long)
    segments[0, 2:6, 2:6] = 1  # a red square on grey: an object
    segments[0, 7:11, 6:10] = 2  # a piece cut out of the grey (position only): no object
    colours = torch.full((1, 3, 12, 12), 0.5)
    colours[0, :, 2:6, 2:6] = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    colours[0, :, 7:11, 6:10] += 0.01  # the same grey, but for noise
    out = split_components(segments, 4, min_cells=2, colours=colours, min_contrast=0.1)[0]
    assert int(out[3, 3]) == 1 and int(out[8, 8]) == 0
    # contrast ≈ 0.66 for the red square's 4 × 4 cells against the grey ring around them
    assert int(split_components(segments, 4, min_cells=2, colours=colours, min_contrast=0.7)[0][3, 3]) == 0
    assert int(split_components(segments, 4, min_cells=2)[0][8, 8]) > 0  # off by default
    with pytest.raises(ValueError, match="colours"):
        split_components(segments, 4, min_contrast=0.1)


def test_cell_colours_average_texture_and_centre_per_image():
    stripes = torch.zeros(1, 3, 32, 48)
    stripes[:, 0, :, ::2] = 1.0  # red / black columns, 1 pixel wide
    colours = cell_colours(stripes, (8, 12), 4)
    assert colours.shape == (1, 3, 8, 12)
    torch.testing.assert_close(colours, torch.zeros_like(colours))  # uniform on average, centred
    halves = torch.zeros(1, 3, 32, 48)
    halves[:, 1, :, 24:] = 1.0
    green = cell_colours(halves, (8, 12), 4)[0, 1]
    assert green[:, 0].max() < 0 < green[:, -1].min()  # left darker than the mean, right brighter


# --------------------------------------------------------------------------------------------
# Masks ↔ feature grid
# --------------------------------------------------------------------------------------------


def test_grid_aligned_masks_round_trip_and_soft_cells_average():
    ids = np.zeros((40, 56), np.uint8)
    ids[8:24, 16:40] = 1
    teacher = LabelPropagationTeacher(ResNetEncoder(widths=(8, 16), depths=(1, 1), stem_width=8))
    labels = masks_to_labels(one_hot(ids, 2), (5, 7), 8)
    torch.testing.assert_close(labels.sum(1), torch.ones(1, 5, 7))
    predicted = teacher.predict_ids(labels.clamp_min(1e-6).log(), (40, 56))[0].numpy()
    # Bilinear upsampling keeps straight edges on the cell boundaries and only rounds corners.
    assert np.array_equal(predicted[:, 28], ids[:, 28]) and np.array_equal(predicted[16], ids[16])
    assert region_similarity(ids[None] == 1, predicted[None] == 1)[0] > 0.93
    half = np.zeros((16, 16), np.uint8)
    half[:, :4] = 1
    assert masks_to_labels(one_hot(half, 2), (2, 2), 8)[0, 1, 0, 0] == pytest.approx(0.5)
    # A grid larger than the image (ceil sizes): edge cells average the pixels they have.
    odd = masks_to_labels(torch.ones(1, 1, 10, 10), (2, 2), 8)
    torch.testing.assert_close(odd, torch.ones(1, 1, 2, 2))


# --------------------------------------------------------------------------------------------
# The ResNet encoder and checkpoints
# --------------------------------------------------------------------------------------------


def test_resnet_encoder_shape_and_stride():
    encoder = ResNetEncoder().eval()
    assert encoder.stride == 8 and encoder.out_channels == 256
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 96, 160)).shape == (2, 256, 12, 20)
        assert encoder(torch.rand(1, 3, 50, 70)).shape == (1, 256, 7, 9)  # ceil(H/8) × ceil(W/8)
    assert stage_strides(3, 8) == [1, 2, 1] and stage_strides(4, 16) == [1, 2, 2, 1]
    small = ResNetEncoder(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=8, output_stride=16).eval()
    with torch.no_grad():
        assert small(torch.rand(1, 3, 64, 64)).shape == (1, 32, 4, 4)
    with pytest.raises(ValueError):
        ResNetEncoder(widths=(8,), depths=(1,), output_stride=8)


def small_encoder() -> ResNetEncoder:
    torch.manual_seed(3)
    encoder = ResNetEncoder(widths=(8, 16, 24), depths=(1, 2, 1), stem_width=8)
    for module in encoder.modules():  # non-trivial BN statistics, so that buffers matter too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


@pytest.mark.parametrize("layout", ["state_dict", "lightning_teacher", "lightning_encoder"])
def test_resnet_checkpoint_round_trip(tmp_path, layout):
    encoder = small_encoder()
    state = encoder.state_dict()
    if layout == "state_dict":
        content = state
    elif layout == "lightning_teacher":
        content = {
            "state_dict": {
                **{f"teacher.encoder.{k}": v for k, v in state.items()},
                "student.head.weight": torch.ones(2),
            },
            "hyper_parameters": OmegaConf.create({"lr": 0.1}),  # not tensors-only
            "epoch": 3,
        }
    else:
        content = {"state_dict": {f"encoder.{k}": v for k, v in state.items()}, "global_step": 10}
    path = tmp_path / "teacher.ckpt"
    torch.save(content, path)
    teacher = build_teacher(TeacherConfig(checkpoint=str(path)), n_recent=2)
    loaded = teacher.encoder
    assert isinstance(loaded, ResNetEncoder) and loaded.config == encoder.config
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), encoder(image))
    assert teacher.n_recent == 2 and teacher.topk == 5 and teacher.radius == 12


def test_bad_checkpoints_raise_one_line_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    wrong = tmp_path / "wrong.pth"
    torch.save(
        {"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, wrong
    )
    other = tmp_path / "other.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)}, other)
    for path in (garbage, wrong, other, tmp_path / "missing.ckpt"):
        with pytest.raises(DvosError) as error:
            build_teacher(encoder="resnet", checkpoint=str(path))
        message = str(error.value)
        assert str(path) in message and "\n" not in message, message


def test_build_teacher_random_resnet_warns_and_validates(caplog):
    with caplog.at_level(logging.WARNING, logger="dvos.models.build"):
        teacher = build_teacher({"encoder": "resnet", "checkpoint": None, "topk": 3, "radius": 4})
    assert "RANDOM" in caplog.text
    assert isinstance(teacher.encoder, ResNetEncoder) and teacher.topk == 3 and teacher.radius == 4
    with pytest.raises(ConfigError, match="teacher.encoder"):
        build_teacher(encoder="vgg")
    with pytest.raises(ConfigError, match="checkpoint"):
        build_teacher(encoder="vit_small")
    with pytest.raises(ConfigError, match="unknown teacher option"):
        build_teacher(top_k=3)
    with pytest.raises(ConfigError, match="topk"):
        build_teacher(topk=0)


def test_vit_small_teacher_from_a_dino_layout_file(tmp_path):
    from dvos.models.backbones.vit import vit_small

    torch.manual_seed(0)
    vit = vit_small(patch_size=16).eval()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(vit.state_dict(), path)
    teacher = build_teacher(encoder="vit_small", patch_size=16, checkpoint=str(path), radius=2)
    assert isinstance(teacher.encoder, ViTPatchEncoder) and teacher.stride == 16
    frames = torch.rand(1, 3, 3, 64, 100)  # 4 × 6 patches (remainder columns dropped)
    ids = np.zeros((64, 100), np.uint8)
    ids[16:48, 16:64] = 1
    out = teacher.propagate_clip(frames, one_hot(ids, 2))
    assert out["logits"].shape == (1, 3, 2, 4, 6) and out["features"].shape == (1, 3, 384, 4, 6)
    assert teacher.upsample_logits(out["logits"][:, 1], (64, 100)).shape == (1, 2, 64, 100)


# ---------------------------------------------------------------------------------------- deformable teacher
def tiny_network(**options):
    """A small `DeformableStudent` (the stand-in encoder) as a deformable teacher's network, with
    non-zero offsets so that its reads sample between cells."""
    from helpers_models import TinyEncoder

    from dvos.models.student import DeformableStudent

    torch.manual_seed(0)
    base = dict(d_model=16, num_heads=2, num_groups=2, max_objects=4, decoder_dim=8, offset_kernel=3)
    network = DeformableStudent(TinyEncoder(), **{**base, **options})
    for layer in network.propagation_stack:
        nn.init.normal_(layer.long_term.offset_network.to_offsets.weight, std=0.3)
        nn.init.normal_(layer.short_term.offset_network.to_offsets.weight, std=0.3)
    return network.eval()


def test_deformable_teacher_map_is_each_memory_cells_share_of_the_read():
    """`token_map`: a point's weight goes to the cells its bilinear read mixes. Reading a value map
    that holds, per group, the one-hot of each memory cell gives exactly those shares."""
    from dvos.models.deformable import DeformableAttention
    from dvos.models.deformable_teacher import token_map

    torch.manual_seed(0)
    height, width, heads = 4, 6, 2
    read = DeformableAttention(
        8, num_heads=heads, num_groups=heads, stride=2, offset_range=1.5, offset_kernel=3
    )
    nn.init.normal_(read.offset_network.to_offsets.weight, std=0.5)
    query, key = torch.randn(1, 8, height, width), torch.randn(1, 8, height, width)
    cells = height * width
    one_hot = torch.eye(cells).reshape(cells, height, width)
    values = torch.cat([one_hot] * heads)[None]  # group g's channels: the one-hot of every cell
    (out,), aux = read(query, key, [values], return_aux=True)
    assert (aux.positions_px.abs() % 1 > 0.01).any()  # points between cells
    shares = out[0].reshape(cells, heads, cells).mean(1)  # the heads' maps averaged
    expected = shares / shares.sum(-1, keepdim=True)  # points partly outside lose their outside share
    torch.testing.assert_close(token_map(aux, (height, width))[0], expected)
    # every cell reads itself: with offsets 0 a stride-1 read's map is its attention, heads averaged
    grid = DeformableAttention(8, num_heads=heads, num_groups=heads, stride=1, offset_kernel=3)
    _, aux = grid(query, key, [values], return_aux=True)
    torch.testing.assert_close(token_map(aux, (height, width)), aux.attention.mean(1))


def test_deformable_teacher_offers_the_label_propagation_teachers_clip_interface():
    from dvos.models.deformable_teacher import DeformableTeacher

    teacher = DeformableTeacher(tiny_network(num_layers=2))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.network.training
    frames = torch.rand(2, 3, 3, 40, 56)  # padded to 48 × 64: 3 × 4 attention cells
    out = teacher.propagate_clip(frames, num_segments=3, colour_weight=1.0, feature_weight=0.0)
    assert out["logits"].shape == (2, 3, 3, 10, 14) and out["stride"] == 16 and out["logit_stride"] == 4
    torch.testing.assert_close(out["probabilities"].sum(2), torch.ones(2, 3, 10, 14))
    assert out["reference_ids"].shape == (2, 40, 56) and out["token_shape"] == (3, 4)
    assert out["origin"] == (-4.0, -4.0)  # the padding above and to the left
    assert out["attention"][0] is None
    first, second = out["attention"][1], out["attention"][2]
    assert first.context_frames == (0, 0) and second.context_frames == (0, 1)
    assert first.slot_of(0, first=True) == 0 and first.slot_of(0) == 1  # long-term, short-term
    for attention in (first, second):
        for slot in (0, 1):
            rows = attention.frame_map(slot)
            assert rows.shape == (2, 12, 12)
            torch.testing.assert_close(rows.sum(-1), torch.ones(2, 12))
        torch.testing.assert_close(attention.dense().sum(-1), torch.ones(2, 12))
    # given masks instead of pseudo-objects: their ids and channels
    masks = torch.zeros(2, 40, 56, dtype=torch.long)
    masks[:, 10:30, 10:30] = 1
    given = teacher.propagate_clip(frames, F.one_hot(masks, 2).permute(0, 3, 1, 2).float())
    assert torch.equal(given["reference_ids"], masks) and given["logits"].shape[2] == 2


def test_deformable_and_label_propagation_teachers_cut_the_same_colour_pseudo_objects():
    """With colours and no feature weight, the clustering sees the same stride-8 grid from pixel 0
    in both teachers, so both cut the same pseudo-objects."""
    from dvos.models.deformable_teacher import DeformableTeacher

    frames, _ = moving_disk_sequence(2)
    frames = frames[:, :, :90, :150]  # not multiples of 16: the deformable teacher pads
    propagation = LabelPropagationTeacher(ResNetEncoder(widths=(8, 8, 8), depths=(1, 1, 1), stem_width=8))
    deformable = DeformableTeacher(tiny_network())
    options = dict(num_segments=4, colour_weight=1.0, feature_weight=0.0, components=True)
    ids = propagation.propagate_clip(frames[None], **options)["reference_ids"]
    assert len(ids.unique()) >= 2
    assert torch.equal(deformable.propagate_clip(frames[None], **options)["reference_ids"], ids)
