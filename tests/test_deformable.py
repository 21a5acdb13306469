"""Deformable attention: the grid_sample convention, reference grid, sampling, attention, gradients.

Expected values come from constructions (pixel indexing, avg_pool2d, torch's own scaled-dot-product
attention, shifted maps), not from the code under test.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dvos.models.deformable import (
    DeformableAttention,
    OffsetNetwork,
    attend,
    attention_weights,
    deformable_attention,
    normalized_to_pixel,
    pixel_to_normalized,
    reference_points,
    sample_memory,
)


def plain_attention(query_map, key_tokens, value_tokens, num_heads):
    """Multi-head attention with torch's SDPA: query B×C×h×w, keys/values B×M×C → B×N×C."""
    batch, channels = query_map.shape[:2]
    head_dim = channels // num_heads
    q = query_map.flatten(2).transpose(1, 2).reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    k = key_tokens.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    v = value_tokens.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, channels)


def tokens(x):
    """B × C × h × w → B × (h·w) × C."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------- convention
def test_grid_sample_convention_hits_pixel_centres():
    """align_corners=False: x_n = 2(i + 0.5)/W − 1 reads pixel column i exactly; x indexes width."""
    height, width = 3, 5
    image = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width) * 1.5 + 2.0
    for row in range(height):
        for col in range(width):
            x_n = 2 * (col + 0.5) / width - 1
            y_n = 2 * (row + 0.5) / height - 1
            grid = torch.tensor([[[[x_n, y_n]]]])
            value = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            assert value.item() == pytest.approx(image[0, 0, row, col].item(), abs=1e-6)
            # our conversion gives the same normalised point, and back
            point = torch.tensor([float(col), float(row)])
            assert torch.allclose(pixel_to_normalized(point, height, width), torch.tensor([x_n, y_n]))
            assert torch.allclose(
                normalized_to_pixel(torch.tensor([x_n, y_n]), height, width), point, atol=1e-6
            )
    # the map's outer edge is ±1: half a pixel outside the last centre
    assert pixel_to_normalized(torch.tensor([width - 0.5, -0.5]), height, width).tolist() == [1.0, -1.0]


def test_sample_memory_matches_pixels_per_group():
    """Group g's channels are read at group g's points (pixel centres give exact values)."""
    memory = torch.randn(2, 6, 4, 7)
    points_px = torch.tensor([[[1.0, 2.0], [6.0, 0.0]], [[0.0, 3.0], [3.0, 1.0]]])  # G × M × 2 (x, y)
    positions = pixel_to_normalized(points_px, 4, 7)[None].expand(2, -1, -1, -1)
    sampled = sample_memory(memory, positions)  # B × G × C/G × M
    assert sampled.shape == (2, 2, 3, 2)
    for group in range(2):
        for point in range(2):
            x, y = points_px[group, point].long().tolist()
            expected = memory[:, group * 3 : (group + 1) * 3, y, x]
            assert torch.allclose(sampled[:, group, :, point], expected, atol=1e-6)


def test_reference_points_are_cell_centres():
    ref = reference_points(4, 6, 2)
    assert ref.shape == (2, 3, 2)
    assert ref[..., 0].tolist() == [[0.5, 2.5, 4.5]] * 2  # x over columns
    assert ref[..., 1].tolist() == [[0.5] * 3, [2.5] * 3]  # y over rows
    # a truncated last cell keeps its own centre (column 4 alone), stride 1 = the pixels themselves
    assert reference_points(3, 5, 2)[0, :, 0].tolist() == [0.5, 2.5, 4.0]
    assert reference_points(3, 5, 2)[:, 0, 1].tolist() == [0.5, 2.0]
    ref1 = reference_points(3, 4, 1)
    assert ref1[2, 3].tolist() == [3.0, 2.0]


# ---------------------------------------------------------------------------------------- zero offsets
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offsets_equal_plain_attention_over_grid_samples(stride):
    """Zero offsets: s=1 reads exactly the memory tokens, s=2 the mean of each 2×2 block."""
    torch.manual_seed(0)
    batch, channels, heads, groups = 2, 16, 4, 2
    height, width = 6, 8
    query = torch.randn(batch, channels, height, width)
    memory_key = torch.randn(batch, channels, height, width)
    memory_value = torch.randn(batch, channels, height, width)
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    offsets = torch.zeros(batch, groups, *grid, 2)
    outputs, attention, positions_px = deformable_attention(
        query, memory_key, [memory_value], offsets, num_heads=heads, stride=stride
    )
    expected_key = tokens(F.avg_pool2d(memory_key, stride))
    expected_value = tokens(F.avg_pool2d(memory_value, stride))
    expected = plain_attention(query, expected_key, expected_value, heads)
    assert torch.allclose(outputs[0], expected, atol=1e-5)
    assert attention.shape == (batch, heads, height * width, grid[0] * grid[1])
    assert attention.dtype == torch.float32
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_several_memory_frames_are_read_with_one_softmax_over_all_their_points(stride):
    """B × L × C × H × W memory (DeAOT's concatenated long-term frames): zero offsets read each frame
    at its cell centres, and the attention is one softmax over the L·M points, frame-major."""
    torch.manual_seed(5)
    batch, channels, heads, groups, frames = 2, 16, 4, 2, 3
    height, width = 6, 8
    query = torch.randn(batch, channels, height, width)
    keys = torch.randn(batch, frames, channels, height, width)
    values = torch.randn(batch, frames, channels, height, width)
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    offsets = torch.zeros(batch, groups, *grid, 2)
    outputs, attention, _ = deformable_attention(
        query, keys, [values], offsets, num_heads=heads, stride=stride
    )
    key_tokens = torch.cat([tokens(F.avg_pool2d(keys[:, m], stride)) for m in range(frames)], 1)
    value_tokens = torch.cat([tokens(F.avg_pool2d(values[:, m], stride)) for m in range(frames)], 1)
    assert torch.allclose(outputs[0], plain_attention(query, key_tokens, value_tokens, heads), atol=1e-5)
    assert attention.shape == (batch, heads, height * width, frames * grid[0] * grid[1])
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
    # one frame stacked alone is the plain one-frame read
    single, _, _ = deformable_attention(
        query, keys[:, :1], [values[:, :1]], offsets, num_heads=heads, stride=stride
    )
    plain, _, _ = deformable_attention(
        query, keys[:, 0], [values[:, 0]], offsets, num_heads=heads, stride=stride
    )
    assert torch.allclose(single[0], plain[0], atol=1e-6)


def test_fresh_module_samples_the_regular_grid():
    """A new DeformableAttention (zero-initialised offset conv) is plain attention over avg-pooled memory."""
    torch.manual_seed(1)
    module = DeformableAttention(16, num_heads=4, num_groups=2, stride=2, offset_range=3.0, offset_kernel=3)
    query, key, value, id_value = (torch.randn(1, 16, 6, 10) for _ in range(4))
    (out_value, out_id), aux = module(query, key, [value, id_value], return_aux=True)
    for out, source in ((out_value, value), (out_id, id_value)):
        expected = plain_attention(query, tokens(F.avg_pool2d(key, 2)), tokens(F.avg_pool2d(source, 2)), 4)
        assert torch.allclose(out, expected, atol=1e-5)
    assert aux.grid_size == (3, 5)
    assert aux.attention.shape == (1, 4, 60, 15)
    assert aux.positions.shape == aux.positions_px.shape == aux.offsets.shape == (1, 2, 15, 2)
    assert torch.equal(aux.offsets, torch.zeros_like(aux.offsets))
    assert torch.allclose(aux.positions_px[0, 0], aux.reference_px)


# ---------------------------------------------------------------------------------------- shifted memory
@pytest.mark.parametrize("stride", [1, 2])
def test_offsets_equal_to_a_known_shift_align_the_memory(stride):
    """Memory = query features moved 3 cells right and 2 down; offsets (3, 2) read them back aligned."""
    torch.manual_seed(2)
    height, width, shift_x, shift_y = 8, 10, 3, 2
    features = torch.randn(1, 8, height, width)
    memory = torch.zeros_like(features)
    memory[:, :, shift_y:, shift_x:] = features[:, :, : height - shift_y, : width - shift_x]

    grid = (height // stride, width // stride)
    offsets = torch.zeros(1, 2, *grid, 2)
    offsets[..., 0], offsets[..., 1] = shift_x, shift_y
    _, _, positions_px = deformable_attention(
        torch.randn(1, 8, height, width), memory, [memory], offsets, num_heads=2, stride=stride
    )
    sampled = sample_memory(memory, pixel_to_normalized(positions_px, height, width))  # 1 × G × 4 × M
    sampled = sampled.reshape(1, 8, *grid)  # groups back to channels

    aligned = F.avg_pool2d(features, stride)  # what the query sees at each reference cell
    # only cells whose shifted source lies inside the memory map carry the query's features
    inside_y = (height - shift_y) // stride
    inside_x = (width - shift_x) // stride
    assert torch.allclose(sampled[..., :inside_y, :inside_x], aligned[..., :inside_y, :inside_x], atol=1e-5)
    expected_px = reference_points(height, width, stride) + torch.tensor([float(shift_x), float(shift_y)])
    assert torch.allclose(positions_px[0, 1], expected_px.reshape(-1, 2))


# ---------------------------------------------------------------------------------------- gradients
def test_gradcheck_through_offsets_keys_and_values():
    """float64 end to end (attention is computed in at least float32, float64 stays float64)."""
    torch.manual_seed(3)
    query = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    key = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    # bilinear interpolation has kinks at integer pixel coordinates: the reference points sit at
    # k + 0.5, so offsets of (integer − 0.5 + u), u in [0.2, 0.8], put every coordinate at a fraction u
    whole = torch.randint(-1, 2, (1, 2, 2, 2, 2)).double()
    fraction = torch.rand(1, 2, 2, 2, 2, dtype=torch.float64) * 0.6 + 0.2
    offsets = (whole - 0.5 + fraction).requires_grad_(True)
    positions = reference_points(4, 4, 2, dtype=torch.float64) + offsets.detach()
    fractional = positions - positions.floor()
    assert ((fractional > 0.19) & (fractional < 0.81)).all()

    def read_out(key, value, offsets):
        outputs, attention, _ = deformable_attention(query, key, [value], offsets, num_heads=2, stride=2)
        return outputs[0], attention

    assert torch.autograd.gradcheck(read_out, (key, value, offsets), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- offset network
def test_offset_network_starts_at_zero_and_is_bounded():
    torch.manual_seed(4)
    network = OffsetNetwork(8, kernel=5, stride=2, offset_range=4.0)
    query = torch.randn(3, 8, 7, 9)
    offsets = network(query)
    assert offsets.shape == (3, 4, 5, 2)  # ⌈7/2⌉ × ⌈9/2⌉: the reference grid of a 7 × 9 map
    assert reference_points(7, 9, 2).shape[:2] == offsets.shape[1:3]
    assert torch.equal(offsets, torch.zeros_like(offsets))
    with torch.no_grad():
        network.to_offsets.weight.normal_(0, 100.0)
    huge = network(query * 1e6)
    assert huge.abs().max() <= 4.0
    assert huge.abs().max() > 3.9  # saturates: the bound is what limits it


def test_attention_weights_stay_float32_under_autocast():
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 2, 3, 4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        attention = attention_weights(q.bfloat16(), k.bfloat16())
    assert attention.dtype == torch.float32
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-6)


def test_topk_attention_is_the_softmax_over_the_k_most_similar_keys():
    # one head, one query, four keys with affinities 2, -1, 0.5, 1 (q · k / √d with d = 1)
    query = torch.ones(1, 1, 1, 1)
    key = torch.tensor([2.0, -1.0, 0.5, 1.0]).reshape(1, 1, 4, 1)
    attention = attention_weights(query, key, topk=2)[0, 0, 0]
    by_hand = torch.tensor([math.exp(2.0), 0.0, 0.0, math.exp(1.0)]) / (math.exp(2.0) + math.exp(1.0))
    assert torch.allclose(attention, by_hand, atol=1e-6)
    # k of 0 or at least M keeps the dense softmax
    dense = torch.softmax(key.flatten(), dim=0)
    for k in (0, 4, 9):
        assert torch.allclose(attention_weights(query, key, topk=k)[0, 0, 0], dense, atol=1e-6)


def test_topk_deformable_attention_reads_k_points_and_has_finite_gradients():
    torch.manual_seed(0)
    module = DeformableAttention(16, num_heads=4, num_groups=2, stride=2, attention_scale=30.0, topk=3)
    query = torch.randn(2, 16, 6, 8, requires_grad=True)
    memory_key = torch.randn(2, 16, 6, 8, requires_grad=True)
    value = torch.randn(2, 16, 6, 8, requires_grad=True)
    (out,), aux = module(query, memory_key, [value], return_aux=True)
    assert ((aux.attention > 0).sum(-1) == 3).all()  # 12 sampled points, 3 read per query and head
    assert torch.allclose(aux.attention.sum(-1), torch.ones(()), atol=1e-6)
    out.square().sum().backward()
    for tensor in (query, memory_key, value):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="topk"):
        DeformableAttention(16, num_heads=4, topk=-1)


# ---------------------------------------------------------------------------------------- row blocks
def sdpa_heads(query, key, value):
    """B × heads × N × d attention of torch's own SDPA → B × N × heads·d (value width may differ)."""
    out = F.scaled_dot_product_attention(query, key, value)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def test_attention_in_row_blocks_at_inference_matches_torch_attention():
    torch.manual_seed(5)
    query, key = torch.randn(2, 4, 37, 8), torch.randn(2, 4, 11, 8)
    values = [torch.randn(2, 4, 11, 8), torch.randn(2, 4, 11, 3)]  # two widths, one map
    with torch.inference_mode():
        # 2 · 4 · 11 · 5 elements: blocks of 5 query rows, the last one of 2
        blocked, attention = attend(query, key, values, need_weights=False, block_elements=2 * 4 * 11 * 5)
    assert attention is None
    for output, value in zip(blocked, values):
        torch.testing.assert_close(output, sdpa_heads(query, key, value), rtol=1e-5, atol=1e-6)


def test_row_blocks_keep_cosine_and_topk_attention_and_the_whole_map_when_asked():
    torch.manual_seed(6)
    query, key = torch.randn(1, 2, 23, 4), torch.randn(1, 2, 9, 4)
    values = [torch.randn(1, 2, 9, 4)]
    scale = torch.tensor([math.log(30.0), math.log(5.0)])
    with torch.inference_mode():
        whole, attention = attend(query, key, values, scale, topk=3, need_weights=True, block_elements=18)
        blocked, none = attend(query, key, values, scale, topk=3, need_weights=False, block_elements=18)
    assert none is None and attention.shape == (1, 2, 23, 9)
    assert ((attention > 0).sum(-1) == 3).all()
    expected = torch.matmul(attention, values[0]).transpose(1, 2).reshape(1, 23, 8)
    torch.testing.assert_close(whole[0], expected)
    torch.testing.assert_close(blocked[0], whole[0])


def test_row_blocks_only_without_autograd():
    torch.manual_seed(7)
    query = torch.randn(1, 2, 16, 4, requires_grad=True)
    key, value = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    (output,), attention = attend(query, key, [value], need_weights=False, block_elements=16)
    assert attention is None and output.requires_grad  # one product, differentiable
    output.sum().backward()
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0
