"""DeAOT's propagation module as options of the student's layer (`model.*`): each option changes the
layer as DeAOT's GatedPropagationModule has it (yoxu515/aot-benchmark), checked against formulas
written out here; the local short-term read against a loop over a tiny map; stacked layers."""

import math

import pytest
import torch
from helpers_models import TinyEncoder
from torch import nn

from dvos.config import ModelConfig
from dvos.models.build import build_student, model_problem
from dvos.models.local_attention import LocalAttention
from dvos.models.memory import Memory
from dvos.models.propagation import GatedDeformablePropagation
from dvos.models.student import DeformableStudent, labels_to_onehot
from dvos.utils.errors import ConfigError

D = 16
DEAOT = dict(
    num_heads=1,
    num_groups=1,
    key_dim=8,
    expand_ratio=2.0,
    dw_kernel=5,
    gate_id=False,
    id_norm=True,
    ffn_ratio=0.0,
    attention_scale=0.0,
)


def student(**options) -> DeformableStudent:
    torch.manual_seed(0)
    base = dict(d_model=D, num_heads=2, num_groups=1, max_objects=3, decoder_dim=8, offset_kernel=3)
    return DeformableStudent(TinyEncoder(), **{**base, **options})


def masks(batch: int = 1, height: int = 48, width: int = 64) -> torch.Tensor:
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    labels[:, 8:30, 10:30] = 1
    labels[:, 20:44, 36:60] = 2
    return labels_to_onehot(labels, 4)


def tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------- each option
def test_expand_ratio_makes_silu_values_twice_as_wide():
    plain, expanded = student(), student(expand_ratio=2.0)
    assert plain.propagation.to_value.out_features == D and plain.propagation.to_id_value is None
    layer = expanded.propagation
    assert layer.to_value.out_features == 2 * D and layer.gate_visual.out_features == 2 * D
    assert layer.out_visual.in_features == 2 * D and layer.self_value_id.out_features == 2 * D
    embedding, position = torch.randn(1, D, 3, 4), torch.randn(1, D, 3, 4)
    _, value = layer.key_value(embedding, position)
    normed = nn.functional.layer_norm(tokens(embedding), (D,), layer.norm_input.weight, layer.norm_input.bias)
    linear = normed @ layer.to_value.weight.T + layer.to_value.bias
    torch.testing.assert_close(tokens(value), linear * torch.sigmoid(linear))
    # the ID value: SiLU(W·e + b) of the ID embedding, 2d wide (DeAOT's linear_ID_V)
    id_embedding = torch.randn(1, D, 3, 4)
    fused = tokens(id_embedding) @ layer.to_id_value.weight.T + layer.to_id_value.bias
    torch.testing.assert_close(tokens(layer.id_value(id_embedding)), fused * torch.sigmoid(fused))
    memory = expanded.initialize_memory(expanded.encode_frame(torch.rand(1, 3, 48, 64)), masks())
    assert memory.reference_value.shape[1] == memory.reference_id.shape[1] == 2 * D


def test_key_dim_sets_query_and_key_width():
    layer = student(key_dim=8).propagation
    assert layer.to_query_key.out_features == 8 and layer.self_query_key.out_features == 16
    key, _ = layer.key_value(torch.randn(1, D, 3, 4), torch.randn(1, D, 3, 4))
    assert key.shape == (1, 8, 3, 4)


def test_depthwise_conv_after_gating():
    layer = student(dw_kernel=5).propagation
    for conv in (layer.dw_visual, layer.dw_id, layer.self_dw_visual, layer.self_dw_id):
        assert conv.kernel_size == (5, 5) and conv.groups == D and conv.bias is None
    assert student().propagation.dw_visual is None
    with torch.no_grad():
        for conv in (layer.dw_visual, layer.dw_id):
            conv.weight.normal_()
    embedding = torch.randn(1, D, 4, 6)
    visual_read, id_read = torch.randn(1, 24, D), torch.randn(1, 24, D)
    visual, identity = layer.gate_reads(embedding, visual_read, id_read)
    normed = nn.functional.layer_norm(tokens(embedding), (D,), layer.norm_input.weight, layer.norm_input.bias)

    def by_hand(read, gate, conv, out):
        gated = (read * nn.functional.silu(gate(normed))).transpose(1, 2).reshape(1, D, 4, 6)
        convolved = nn.functional.conv2d(gated, conv.weight, padding=2, groups=D)
        return out(tokens(convolved))

    torch.testing.assert_close(
        visual, tokens(embedding) + by_hand(visual_read, layer.gate_visual, layer.dw_visual, layer.out_visual)
    )
    torch.testing.assert_close(identity, by_hand(id_read, layer.gate_id, layer.dw_id, layer.out_id))


def test_ungated_id_branch_in_the_first_layer():
    gated, ungated = student(propagation_init=False), student(gate_id=False, propagation_init=False)
    assert gated.propagation.gate_id is not None and ungated.propagation.gate_id is None
    embedding, visual_read, id_read = torch.randn(1, D, 3, 4), torch.randn(1, 12, D), torch.randn(1, 12, D)
    layer = ungated.propagation
    _, identity = layer.gate_reads(embedding, visual_read, id_read)
    torch.testing.assert_close(identity, id_read @ layer.out_id.weight.T + layer.out_id.bias)
    # the visual stream does not reach the ungated ID output; it does reach the gated one
    _, other = layer.gate_reads(embedding * 3 + 1, visual_read, id_read)
    torch.testing.assert_close(other, identity)
    _, first = gated.propagation.gate_reads(embedding, visual_read, id_read)
    _, second = gated.propagation.gate_reads(embedding * 3 + 1, visual_read, id_read)
    assert not torch.allclose(first, second)


def test_id_norm_layer_normalises_the_id_embedding():
    plain, normed = student(propagation_init=False), student(id_norm=True, propagation_init=False)
    reference = masks()
    raw = plain.embed_ids(reference)
    out = normed.embed_ids(reference)
    torch.testing.assert_close(raw, normed.id_embedding(nn.functional.pad(reference, (0, 0, 0, 0))))
    mean = raw.mean(1, keepdim=True)
    var = raw.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(out, (raw - mean) / torch.sqrt(var + 1e-5))


def test_feed_forward_off():
    layer = student(ffn_ratio=0.0).propagation
    assert not hasattr(layer, "ffn_visual") and not any("ffn" in name for name, _ in layer.named_parameters())
    visual, identity = torch.randn(1, 5, D), torch.randn(1, 5, D)
    out = layer.feed_forward(visual, identity)
    assert out[0] is visual and out[1] is identity
    assert hasattr(student().propagation, "ffn_visual")


def test_number_of_heads_is_the_number_of_attention_maps():
    for heads in (1, 2):
        model = student(num_heads=heads, num_groups=1).eval()
        frames = torch.rand(1, 2, 3, 48, 64)
        _, aux = model.segment_clip(frames, masks(), num_objects=2, return_attention=True)
        assert aux[0]["long_term"].attention.shape[1] == heads
        assert aux[0]["short_term"].attention.shape[1] == heads


def test_deaot_t_group_file_builds_deaots_layer():
    from dvos.config import load_config

    cfg = load_config(["model=deaot_t", "model.pretrained=none"])
    model, _ = build_student(cfg.model)
    layer = model.propagation
    assert model.num_layers == 1 and layer.num_heads == 1 and layer.key_dim == 128
    assert layer.to_value.out_features == 512 and layer.to_id_value.out_features == 512
    assert layer.gate_id is None and not layer.ffn and layer.dw_visual.kernel_size == (5, 5)
    assert model.id_norm is not None and layer.long_term.logit_scale is None
    for name, layers in (("deaot_b", 3), ("deaot_l", 3)):
        cfg = load_config([f"model={name}", "model.pretrained=none"])
        assert cfg.model.num_layers == layers


# ---------------------------------------------------------------------------------------- local read
def test_local_read_attends_inside_the_window_as_a_loop_computes_it():
    torch.manual_seed(0)
    height, width, heads, channels, window = 4, 5, 2, 6, 3
    read = LocalAttention(channels, num_heads=heads, window=window)
    with torch.no_grad():
        read.relative_weight.normal_()
        read.relative_bias.normal_()
    query = torch.randn(1, channels, height, width, dtype=torch.float64)
    key = torch.randn(1, channels, height, width, dtype=torch.float64)
    value = torch.randn(1, 4, height, width, dtype=torch.float64)
    (out,), aux = read(query, key, [value], return_aux=True)
    attention = aux.attention[0]
    head_dim, radius = channels // heads, window // 2
    expected = torch.zeros(heads, height * width, height * width, dtype=torch.float64)
    for h in range(heads):
        q = query[0, h * head_dim : (h + 1) * head_dim].reshape(head_dim, -1)
        k = key[0, h * head_dim : (h + 1) * head_dim].reshape(head_dim, -1)
        for n in range(height * width):
            y, x = divmod(n, width)
            cells, logits = [], []
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    if 0 <= y + dy < height and 0 <= x + dx < width:
                        m = (y + dy) * width + (x + dx)
                        r = (dy + radius) * window + (dx + radius)
                        bias = (
                            q[:, n] @ read.relative_weight[h, r].double() + read.relative_bias[h, r].double()
                        )
                        cells.append(m)
                        logits.append(q[:, n] @ k[:, m] / math.sqrt(head_dim) + bias)
            expected[h, n, cells] = torch.softmax(torch.stack(logits), 0)
    torch.testing.assert_close(attention, expected)
    outside = [m for m in range(height * width) if m not in (0, 1, 5, 6)]  # beyond cell (1, 1)
    assert (attention[:, 0, outside] == 0).all() and (attention[:, 0, [0, 1, 5, 6]] > 0).all()
    values = value[0].reshape(2, 2, -1).transpose(1, 2)  # head h: channels [2h, 2h + 2)
    by_hand = torch.cat([expected[h] @ values[h] for h in range(heads)], dim=-1)
    torch.testing.assert_close(out[0], by_hand)
    assert aux.positions_px.shape == (1, 1, height * width, 2) and aux.grid_size == (height, width)


def test_local_short_term_read_in_the_student():
    model = student(short_term_read="local", local_window=3).eval()
    assert isinstance(model.propagation.short_term, LocalAttention)
    frames = torch.rand(1, 3, 3, 48, 64)
    logits, aux = model.segment_clip(frames, masks(), num_objects=2, return_attention=True)
    attention = aux[1]["short_term"].attention
    assert attention.shape == (1, 2, 12, 12)
    assert (attention[0, :, 0].reshape(2, 3, 4)[:, :, 2:] == 0).all()  # beyond the 3 × 3 window
    with model.reading(attention_topk=2):
        _, aux = model.segment_clip(frames, masks(), num_objects=2, return_attention=True)
    assert ((aux[1]["short_term"].attention > 0).sum(-1) <= 2).all()
    assert model.propagation.short_term.topk == 0


# ---------------------------------------------------------------------------------------- stacked layers
def test_stacked_layers_hold_per_layer_memory_entries():
    model = student(num_layers=2, **DEAOT).eval()
    first, second = model.propagation_stack
    assert first.first and not first.last and second.last and not second.first
    assert not hasattr(first, "norm_out_visual") and second.norm_id_input is not None
    assert second.to_id_value.in_features == 2 * D and second.gate_id is not None
    frames = torch.rand(1, 3, 3, 48, 64)
    features = model.encode_frame(frames[:, 0])
    memory = model.initialize_memory(features, masks())
    assert memory.reference_key.shape[1] == 2 * 8 and memory.reference_value.shape[1] == 2 * 2 * D
    # layer 2's entries: the reference frame propagated through layer 1 reading itself
    layer_one = memory.layer(0, 8, 2 * D)
    visual, identity, _, _, _ = first.propagate(features.embedding, features.position, layer_one)
    stream = visual.transpose(1, 2).reshape(1, D, 3, 4)
    key, value = second.key_value(stream, features.position)
    ids = second.id_value(model.embed_ids(masks()), identity.transpose(1, 2).reshape(1, D, 3, 4))
    layer_two = memory.layer(1, 8, 2 * D)
    torch.testing.assert_close(layer_two.reference_key, key)
    torch.testing.assert_close(layer_two.reference_value, value)
    torch.testing.assert_close(layer_two.reference_id, ids)
    output = model.step(frames[:, 1], memory, num_objects=2)
    assert output.id_stream.shape == (1, D, 3, 4)
    assert output.memory.previous_id.shape == memory.previous_id.shape


def test_stacked_layers_train_every_parameter():
    model = student(num_layers=3, **DEAOT).train()
    frames = torch.rand(2, 3, 3, 48, 64)
    logits, _ = model.segment_clip(frames, masks(2), num_objects=2, reconstruct_reference=True)
    sum(frame_logits.logsumexp(1).mean() for frame_logits in logits).backward()
    # offset networks start at zero (their input convs get gradients once the last conv moves)
    missing = [
        name for name, p in model.named_parameters() if p.grad is None and "offset_network" not in name
    ]
    assert not missing


# ---------------------------------------------------------------------------------------- BatchNorm
def test_freeze_bn_keeps_encoder_batchnorm_in_eval_mode():
    model = DeformableStudent(
        TinyEncoder(batch_norm=True),
        d_model=D,
        num_heads=2,
        num_groups=1,
        max_objects=3,
        decoder_dim=8,
        offset_kernel=3,
        freeze_bn=True,
    )
    model.train()
    norm = model.encoder.bn4
    assert not norm.training and model.propagation.training
    assert not norm.weight.requires_grad and not norm.bias.requires_grad
    before = norm.running_mean.clone()
    model.segment_clip(torch.rand(2, 2, 3, 48, 64), masks(2), num_objects=2)
    assert torch.equal(norm.running_mean, before)
    unfrozen = DeformableStudent(
        TinyEncoder(batch_norm=True),
        d_model=D,
        num_heads=2,
        num_groups=1,
        max_objects=3,
        decoder_dim=8,
        offset_kernel=3,
    ).train()
    unfrozen.segment_clip(torch.rand(2, 2, 3, 48, 64), masks(2), num_objects=2)
    assert not torch.equal(unfrozen.encoder.bn4.running_mean, before)


# ---------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"short_term_read": "global"}, "model.short_term_read must be one of deformable, local, got global"),
        ({"local_window": 4}, "model.local_window must be odd"),
        ({"num_layers": 0}, "model.num_layers must be ≥ 1, got 0"),
        ({"dw_kernel": 4}, "model.dw_kernel must be 0 (none) or an odd kernel size, got 4"),
        ({"key_dim": 30}, "model.key_dim must be ≥ 1 and divisible by model.num_heads=8"),
        ({"ffn_ratio": -1.0}, "model.ffn_ratio must be ≥ 0"),
        ({"expand_ratio": 1.01}, "model.expand_ratio gives values 259 wide"),
    ],
)
def test_bad_propagation_options_fail_in_one_line(options, message):
    cfg = ModelConfig(pretrained="none", **options)
    problem = model_problem(cfg)
    assert problem is not None and problem.startswith(message) and "\n" not in problem
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        build_student(cfg, encoder=TinyEncoder())


def test_memory_layer_blocks():
    maps = [torch.arange(6.0).reshape(1, 6, 1, 1) + 10 * i for i in range(6)]
    memory = Memory(*maps, torch.zeros(1, 2, dtype=torch.long))
    one = memory.layer(1, 2, 1)
    assert one.reference_key.flatten().tolist() == [2.0, 3.0] and one.reference_value.flatten().tolist() == [
        11.0
    ]
    assert one.previous_id.flatten().tolist() == [51.0]


def test_layer_defaults_match_the_dvos_layer():
    layer = GatedDeformablePropagation(D, num_heads=2, num_groups=1, offset_kernel=3)
    assert layer.first and layer.last and layer.ffn and layer.gate_id is not None
    assert layer.to_id_value is None and layer.dw_visual is None and layer.norm_id_input is None


def test_deaot_t_layer_has_deaots_parts_counted_by_hand():
    """DeAOT-T's layer at d = 256 (keys 128, values 512, 5 × 5 depth-wise convs), part by part; the
    offset networks are dvos's (DeAOT's local read has a relative term instead) and the output
    projections are per stream (docs/METHOD.md, "Gated deformable propagation")."""
    from dvos.config import load_config

    model, _ = build_student(load_config(["model=deaot_t", "model.pretrained=none"]).model)
    d, k, v = 256, 128, 512

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    parts = {
        "norm_input": 2 * d,
        "to_query_key": linear(d, k),
        "to_value": linear(d, v),
        "long_term": k * 25 + k + 2 * k + 2 * k,  # depth-wise 5 × 5 + bias, LayerNorm, 1 × 1 to (Δx, Δy)
        "short_term": k * 25 + k + 2 * k + 2 * k,
        "gate_visual": linear(d, v),
        "out_visual": linear(v, d),
        "out_id": linear(v, d),
        "norm_self": 2 * 2 * d,
        "self_query_key": linear(d, 2 * k),
        "self_values_and_gates": 4 * linear(d, v),
        "self_out": 2 * linear(v, d),
        "norm_out": 2 * 2 * d,
        "to_id_value": linear(d, v),
        "depthwise": 4 * v * 25,
    }
    assert sum(p.numel() for p in model.propagation.parameters()) == sum(parts.values()) == 1_606_528
