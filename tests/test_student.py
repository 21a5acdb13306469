"""The student end to end with a tiny stand-in encoder: shapes, padding, constant memory, ID
permutation, gradients, the explicit-tensor frame step."""

import copy

import pytest
import torch
from helpers_models import TinyEncoder
from torch import nn

from dvos.models.build import build_student
from dvos.models.layers import LayerNorm2d, pad_to_stride, sine_position_embedding, unpad
from dvos.models.student import ABSENT_LOGIT, DeformableStudent, labels_to_onehot

MAX_OBJECTS = 5


def make_student(**kwargs) -> DeformableStudent:
    torch.manual_seed(0)
    options = dict(
        d_model=32, num_heads=4, num_groups=2, max_objects=MAX_OBJECTS, decoder_dim=16, offset_kernel=3
    )
    options.update(kwargs)
    return DeformableStudent(TinyEncoder(), **options)


def random_masks(batch, height, width, num_objects, seed=0):
    """B × (K+1) × H × W one-hot with objects 1..num_objects as vertical bands."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    band = width // (num_objects + 1)
    for obj in range(1, num_objects + 1):
        labels[:, :, obj * band : (obj + 1) * band] = obj
    noise = torch.rand(batch, height, width, generator=generator) < 0.05
    labels[noise] = 0
    return labels_to_onehot(labels, MAX_OBJECTS + 1)


# ---------------------------------------------------------------------------------------- layers
def test_pad_to_stride_and_unpad_round_trip():
    x = torch.randn(1, 3, 250, 430)
    padded, pad = pad_to_stride(x, 16)
    assert padded.shape[-2:] == (256, 432)
    assert pad == (1, 1, 3, 3)
    assert torch.equal(unpad(padded, pad), x)
    same, pad = pad_to_stride(torch.randn(1, 1, 32, 48), 16)
    assert pad == (0, 0, 0, 0) and same.shape[-2:] == (32, 48)


def test_layer_norm_2d_normalises_channels():
    x = torch.randn(2, 6, 3, 4) * 5 + 3
    out = LayerNorm2d(6)(x)
    expected = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_sine_position_embedding_shape_and_range():
    pos = sine_position_embedding(5, 7, 16)
    assert pos.shape == (1, 16, 5, 7)
    assert pos.abs().max() <= 1.0
    assert torch.equal(pos[0, :8, :, 0], pos[0, :8, :, 6])  # first half: y only
    assert torch.equal(pos[0, 8:, 0, :], pos[0, 8:, 4, :])  # second half: x only


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(("size", "num_objects"), [((240, 432), 2), ((250, 430), 5)])
def test_step_shapes_and_absent_objects(size, num_objects):
    student = make_student().eval()
    height, width = size
    frames = torch.rand(2, 3, height, width)
    memory = student.initialize_memory(
        student.encode_frame(frames), random_masks(2, height, width, num_objects)
    )
    output = student.step(frames, memory, num_objects=num_objects, return_attention=True)
    assert output.logits.shape == (2, MAX_OBJECTS + 1, height, width)
    assert (output.logits[:, num_objects + 1 :] == ABSENT_LOGIT).all()
    assert (output.logits[:, : num_objects + 1] > ABSENT_LOGIT / 2).all()

    h, w = -(-height // 16), -(-width // 16)
    grid = (-(-h // 2), -(-w // 2))
    num_points = grid[0] * grid[1]
    for name in ("long_term", "short_term"):
        aux = output.aux[name]
        assert aux.attention.shape == (2, 4, h * w, num_points)
        assert aux.positions.shape == (2, 2, num_points, 2)
        assert aux.positions_px.shape == (2, 2, num_points, 2)
        assert aux.offsets.shape == (2, 2, num_points, 2)
        assert aux.reference_px.shape == (num_points, 2)
        assert aux.grid_size == grid


def test_per_sample_object_counts():
    student = make_student().eval()
    frames = torch.rand(2, 3, 64, 96)
    memory = student.initialize_memory(student.encode_frame(frames), random_masks(2, 64, 96, 3))
    logits = student.step(frames, memory, num_objects=torch.tensor([1, 3])).logits
    assert (logits[0, 2:] == ABSENT_LOGIT).all() and (logits[0, :2] > ABSENT_LOGIT).all()
    assert (logits[1, 4:] == ABSENT_LOGIT).all() and (logits[1, :4] > ABSENT_LOGIT).all()


def test_memory_is_constant_over_twenty_steps():
    student = make_student().eval()
    frames = torch.rand(1, 3, 48, 80)
    memory = student.initialize_memory(student.encode_frame(frames), random_masks(1, 48, 80, 2))
    shapes = [tuple(t.shape) for t in memory.tensors()]
    reference = memory.reference_key
    with torch.no_grad():
        for index in range(20):
            memory = student.step(torch.rand(1, 3, 48, 80), memory, num_objects=2).memory
            assert [tuple(t.shape) for t in memory.tensors()] == shapes, index
    assert memory.reference_key is reference  # the long-term part is never rewritten
    assert len(memory.tensors()) == 7
    with pytest.raises(ValueError, match="shapes change"):
        memory.replace_short_term(memory.previous_key[..., :1], memory.previous_value, memory.previous_id)


def test_inference_in_attention_blocks_matches_the_whole_maps(monkeypatch):
    import dvos.models.deformable as deformable

    student = make_student().eval()
    frames = torch.rand(1, 3, 64, 96)  # 4 × 6 tokens: blocks of 2 query rows with the budget below
    memory = student.initialize_memory(student.encode_frame(frames), random_masks(1, 64, 96, 2))
    with torch.inference_mode():
        whole = student.step(frames.flip(-1), memory, num_objects=2).logits
        monkeypatch.setattr(deformable, "ATTENTION_BLOCK_ELEMENTS", 4 * 24 * 2)
        rows = []
        softmax = deformable._softmax_of_affinity
        monkeypatch.setattr(
            deformable,
            "_softmax_of_affinity",
            lambda q, k, topk: rows.append(q.shape[2]) or softmax(q, k, topk),
        )
        blocked = student.step(frames.flip(-1), memory, num_objects=2).logits
    assert rows and max(rows) < 24  # every map was computed in blocks of query rows
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-5)


def test_explicit_tensor_forward_matches_step():
    student = make_student().eval()
    frames = torch.rand(2, 3, 50, 70)
    memory = student.initialize_memory(student.encode_frame(frames), random_masks(2, 50, 70, 3))
    with torch.no_grad():
        step = student.step(frames, memory, num_objects=3)
        logits, key, value = student(frames, *memory.tensors(), torch.tensor([3, 3]))
        features = student.encode_frame(frames)
        hard = labels_to_onehot(step.logits.argmax(1), MAX_OBJECTS + 1)
        updated = student.update_memory(memory, features, hard)
    assert torch.allclose(logits, step.logits, atol=1e-6)
    assert torch.allclose(key, step.memory.previous_key, atol=1e-6)
    assert torch.allclose(value, step.memory.previous_value, atol=1e-6)
    assert torch.allclose(updated.previous_id, step.memory.previous_id, atol=1e-6)


def test_export_frame_step():
    """The explicit-tensor step exports with torch.export (fixed input size); the exported program
    follows new frames, memory and object counts."""
    student = make_student().eval()
    frames = torch.rand(1, 3, 48, 64)
    memory = student.initialize_memory(student.encode_frame(frames), random_masks(1, 48, 64, 2))
    # distinct tensors: a fresh memory's short-term maps ARE its long-term maps, and export would
    # merge aliased inputs into one
    example = (frames, *(t.clone() for t in memory.tensors()), torch.tensor([2]))
    program = torch.export.export(student, example)
    with torch.no_grad():
        new_frame = torch.rand(1, 3, 48, 64)
        new_memory = student.step(new_frame, memory, num_objects=4).memory
        inputs = (new_frame, *new_memory.tensors(), torch.tensor([4]))
        expected = student(*inputs)
        got = program.module()(*inputs)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------------- ID permutation
def test_reconstructing_the_reference_leaves_the_clip_alone():
    student = make_student().eval()
    frames = torch.rand(2, 3, 3, 64, 80)
    masks = random_masks(2, 64, 80, 2)
    with torch.no_grad():
        plain, _ = student.segment_clip(frames, masks, num_objects=2)
        with_reference, _ = student.segment_clip(frames, masks, num_objects=2, reconstruct_reference=True)
        memory = student.initialize_memory(student.encode_frame(frames[:, 0]), masks)
        frame_0 = student.step(frames[:, 0], memory, num_objects=2).logits
    assert len(with_reference) == len(plain) + 1
    torch.testing.assert_close(with_reference[0], frame_0)
    for ours, theirs in zip(with_reference[1:], plain):
        torch.testing.assert_close(ours, theirs)  # frame 0's reading did not become the short-term memory


def test_corrupted_memory_enters_the_short_term_memory_only():
    """`corrupt_memory` changes what each frame leaves in the short-term memory (frame 0's masks for
    frame 1, then the predictions), never the long-term one; the identity changes nothing."""
    student = make_student().eval()
    frames = torch.rand(2, 3, 3, 64, 80)
    masks = random_masks(2, 64, 80, 2)
    calls = []

    def to_background(given):
        calls.append(given.shape)
        return torch.cat((given.sum(1, keepdim=True), torch.zeros_like(given[:, 1:])), dim=1)

    with torch.no_grad():
        plain, _ = student.segment_clip(frames, masks, num_objects=2)
        same, _ = student.segment_clip(frames, masks, num_objects=2, corrupt_memory=lambda m: m)
        emptied, _ = student.segment_clip(frames, masks, num_objects=2, corrupt_memory=to_background)
        # frame 1 by hand: the reference in the long-term memory, its emptied masks in the short-term
        memory = student.initialize_memory(student.encode_frame(frames[:, 0]), masks)
        memory = student.remember(memory, memory.reference_key, memory.reference_value, to_background(masks))
        frame_1 = student.step(frames[:, 1], memory, num_objects=2).logits
    for ours, theirs in zip(same, plain):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(emptied[0], frame_1)
    assert not torch.allclose(emptied[0], plain[0])
    assert len(calls) == 1 + 1 + 2  # by hand once; in the clip frame 0's masks and each prediction


def test_permutation_draw_is_reproducible_and_training_only():
    student = make_student().train()
    first = student.sample_id_permutation(4, generator=torch.Generator().manual_seed(7))
    second = student.sample_id_permutation(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    assert (first[:, 0] == 0).all()
    assert (first.sort(dim=1).values == torch.arange(MAX_OBJECTS + 1)).all()
    assert not (first == torch.arange(MAX_OBJECTS + 1)).all()  # seed 7 moves something
    assert torch.equal(student.eval().sample_id_permutation(2), torch.arange(MAX_OBJECTS + 1).expand(2, -1))
    assert torch.equal(
        make_student(permute_ids=False).train().sample_id_permutation(2),
        torch.arange(MAX_OBJECTS + 1).expand(2, -1),
    )


def test_permute_slots_moves_the_first_slots_only():
    student = make_student(permute_slots=3).train()
    draws = student.sample_id_permutation(64, generator=torch.Generator().manual_seed(0))
    assert (draws[:, 0] == 0).all()
    assert (draws[:, 1:4].sort(dim=1).values == torch.tensor([1, 2, 3])).all()  # 1..3 among themselves
    assert (draws[:, 4:] == torch.arange(4, MAX_OBJECTS + 1)).all()  # the others stay put
    assert len({tuple(row.tolist()) for row in draws[:, 1:4]}) == 6  # every arrangement of 3 drawn
    assert torch.equal(student.eval().sample_id_permutation(2), torch.arange(MAX_OBJECTS + 1).expand(2, -1))
    everything = make_student(permute_slots=MAX_OBJECTS + 5).train()  # capped at max_objects
    assert everything.permute_slots == MAX_OBJECTS
    with pytest.raises(ValueError, match="permute_slots"):
        make_student(permute_slots=0)


def test_embed_ids_puts_object_c_in_slot_permutation_c():
    student = make_student()
    masks = random_masks(1, 32, 48, 3)
    permutation = torch.tensor([[0, 3, 5, 1, 2, 4]])
    moved = torch.zeros_like(masks)
    for obj in range(MAX_OBJECTS + 1):
        moved[:, permutation[0, obj]] = masks[:, obj]
    assert torch.allclose(
        student.embed_ids(masks, id_permutation=permutation), student.embed_ids(moved), atol=1e-6
    )


def permuted_weights_copy(student: DeformableStudent, permutation: torch.Tensor) -> DeformableStudent:
    """A student without permutation that computes what `student` computes through `permutation`:
    its ID-embedding input channel c is `student`'s channel permutation[c], and so is its logit c."""
    twin = copy.deepcopy(student)
    twin.permute_ids = False
    with torch.no_grad():
        twin.id_embedding.weight.copy_(student.id_embedding.weight[:, permutation])
        twin.decoder.head.weight.copy_(student.decoder.head.weight[permutation])
        twin.decoder.head.bias.copy_(student.decoder.head.bias[permutation])
    return twin


def test_permuted_training_is_consistent_in_object_ids():
    """Training mode with a random permutation = a twin network whose ID channels are permuted
    accordingly, run without permutation; and the identity permutation changes nothing. In float64,
    so that the different channel order of the sums stays far below the tolerance."""
    student = make_student().double().train()
    frames = torch.rand(2, 3, 3, 48, 64, dtype=torch.float64)
    reference = random_masks(2, 48, 64, 4).double()
    generator = torch.Generator().manual_seed(3)
    permutation = student.sample_id_permutation(1, generator=torch.Generator().manual_seed(3))[0]
    assert not torch.equal(permutation, torch.arange(MAX_OBJECTS + 1))
    # one permutation for the batch, so the twin can be one network
    batch_permutation = permutation.expand(2, -1)

    memory = student.initialize_memory(
        student.encode_frame(frames[:, 0]), reference, id_permutation=batch_permutation
    )
    logits = [student.step(frames[:, 1], memory, num_objects=4).logits]
    twin = permuted_weights_copy(student, permutation).train()
    twin_memory = twin.initialize_memory(twin.encode_frame(frames[:, 0]), reference)
    assert torch.equal(twin_memory.id_permutation, torch.arange(MAX_OBJECTS + 1).expand(2, -1))
    twin_logits = [twin.step(frames[:, 1], twin_memory, num_objects=4).logits]
    assert torch.allclose(logits[0], twin_logits[0], atol=1e-9)
    assert torch.equal(logits[0].argmax(1), twin_logits[0].argmax(1))

    # the whole clip, with the permutation drawn from a seeded generator inside segment_clip
    batch_one = frames[:1], reference[:1]
    clip_logits, _ = student.segment_clip(*batch_one, num_objects=4, generator=generator)
    twin_clip, _ = twin.segment_clip(*batch_one, num_objects=4)
    for ours, theirs in zip(clip_logits, twin_clip):
        assert torch.allclose(ours, theirs, atol=1e-9)

    # identity permutation in training mode == no permutation at all
    plain = copy.deepcopy(student)
    plain.permute_ids = False
    identity = torch.arange(MAX_OBJECTS + 1).expand(2, -1)
    memory = student.initialize_memory(student.encode_frame(frames[:, 0]), reference, id_permutation=identity)
    plain_memory = plain.initialize_memory(plain.encode_frame(frames[:, 0]), reference)
    assert torch.equal(
        student.step(frames[:, 1], memory, num_objects=4).logits,
        plain.step(frames[:, 1], plain_memory, num_objects=4).logits,
    )


# ---------------------------------------------------------------------------------------- gradients
def test_backward_reaches_the_offset_networks():
    student = make_student().train()
    frames = torch.rand(2, 3, 3, 48, 64)
    reference = random_masks(2, 48, 64, 3)
    logits, _ = student.segment_clip(frames, reference, num_objects=3)
    labels = reference.argmax(1)
    loss = sum(nn.functional.cross_entropy(frame_logits, labels) for frame_logits in logits)
    loss.backward()
    for branch in (student.propagation.long_term, student.propagation.short_term):
        grad = branch.offset_network.to_offsets.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert student.encoder.to4.weight.grad.abs().sum() > 0
    assert student.id_embedding.weight.grad.abs().sum() > 0

    # once the last offset conv is non-zero, gradients flow into the rest of the offset network
    student.zero_grad()
    with torch.no_grad():
        student.propagation.long_term.offset_network.to_offsets.weight.normal_(0, 0.1)
    logits, _ = student.segment_clip(frames, reference, num_objects=3)
    logits[-1].logsumexp(1).mean().backward()
    assert student.propagation.long_term.offset_network.depthwise.weight.grad.abs().sum() > 0


def test_build_student_from_config_with_injected_encoder():
    from dvos.config import ModelConfig

    sizes = dict(d_model=32, num_heads=4, max_objects=3)
    cfg = ModelConfig(**sizes, deform_stride=1, offset_range=2.0, offset_kernel=3, attention_topk=5)
    student, init = build_student(cfg, encoder=TinyEncoder())
    assert "injected" in init
    assert student.max_objects == 3 and student.d_model == 32
    assert student.propagation.long_term.stride == 1
    assert student.propagation.long_term.topk == student.propagation.short_term.topk == 5


def test_default_mobilenet_v2_encoder_is_wired():
    """Without an injected encoder the student builds MobileNet-V2 (stride 16, 24/32/320 channels)."""
    torch.manual_seed(0)
    student = DeformableStudent(d_model=32, num_heads=4, num_groups=2, max_objects=3, decoder_dim=16).eval()
    assert student.encoder_channels == (24, 32, 320)
    frames = torch.rand(1, 3, 70, 100)
    with torch.no_grad():
        features = student.encode_frame(frames)
        assert features.embedding.shape == (1, 32, 5, 7)
        assert features.stride4.shape[-2:] == (20, 28) and features.stride8.shape[-2:] == (10, 14)
        memory = student.initialize_memory(features, labels_to_onehot(torch.zeros(1, 70, 100), 4))
        assert student.step(frames, memory, num_objects=1).logits.shape == (1, 4, 70, 100)


# ---------------------------------------------------------------------------------------- initialisation
def test_cosine_attention_by_hand_and_invariant_to_vector_lengths():
    from dvos.models.deformable import attention_weights

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 5, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(1, 2, 7, 8, generator=generator, dtype=torch.float64)
    log_scale = torch.tensor([0.0, 3.0], dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(query[:, :, :, None], key[:, :, None], dim=-1)
    expected = torch.softmax(log_scale.exp()[None, :, None, None] * cosine, dim=-1)
    torch.testing.assert_close(attention_weights(query, key, log_scale), expected)
    lengths = torch.rand(1, 2, 5, 1, generator=generator, dtype=torch.float64) + 0.5
    torch.testing.assert_close(attention_weights(query * lengths, key * 3.0, log_scale), expected)


def test_propagation_init_reads_soft_labels_of_the_memory():
    """A fresh student with propagation_init: the ID embedding of a mask is each id's share of the
    17 × 17 patch of a cell (channel c = id c), and the ID stream of the memory read is exactly the
    attention-weighted sum of the memory's ID embeddings (unit gate, identity output)."""
    student = make_student(propagation_init=True, permute_ids=False).eval()
    masks = random_masks(1, 64, 96, 3)
    embedded = student.embed_ids(masks)
    shares = embedded[:, : MAX_OBJECTS + 1]
    interior = shares[..., 1:-1, 1:-1]  # cells whose 17 × 17 patch lies inside the frame
    torch.testing.assert_close(interior.sum(1), torch.ones_like(interior[:, 0]))
    patch = masks[0, :, 16 - 8 : 16 + 9, 32 - 8 : 32 + 9].mean(dim=(-1, -2))  # cell (1, 2)
    torch.testing.assert_close(shares[0, :, 1, 2], patch)
    assert embedded[:, MAX_OBJECTS + 1 :].abs().max() == 0

    image = torch.rand(1, 3, 64, 96)
    features = student.encode_frame(image)
    memory = student.initialize_memory(features, masks)
    layer = student.propagation
    query, _ = layer.key_value(features.embedding, features.position)
    with torch.no_grad():
        _, identity, _ = layer.read_memory(features.embedding, query, memory)
        long_read, _ = layer.long_term(
            query, memory.reference_key, (memory.reference_value, memory.reference_id)
        )
        short_read, _ = layer.short_term(
            query, memory.previous_key, (memory.previous_value, memory.previous_id)
        )
    torch.testing.assert_close(identity, long_read[1] + short_read[1])


def test_without_propagation_init_the_id_path_is_random():
    student = make_student(propagation_init=False, attention_scale=0.0)
    assert student.propagation.long_term.logit_scale is None
    shares = student.embed_ids(random_masks(1, 64, 96, 3))[:, : MAX_OBJECTS + 1, 1:-1, 1:-1]
    assert not torch.allclose(shares.sum(1), torch.ones_like(shares[:, 0]))
