"""`DistillationModule` with a tiny injected student and teacher: the frozen teacher stays out of the
state, the optimizer and the checkpoint; the loss, its parts and their weights; target-frame labels
never used; warm-up + poly learning rate, EMA and non-finite losses by hand; exact resume."""

import dataclasses
import hashlib
import logging
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers_data import square_and_disc_clip
from helpers_models import tiny_student_and_teacher
from omegaconf import OmegaConf
from torch import nn

from dvos.callbacks.checkpoints import AtomicCheckpointIO, LastCheckpoint
from dvos.config import Config, load_config
from dvos.lit.distill import (
    DistillationModule,
    ema_decay_at,
    magnify,
    paste_occluders,
    swap_objects,
    teacher_frame_targets,
    warmup_poly,
)
from dvos.lit.losses import bootstrapped_ce, objects_to_valid, soft_jaccard_loss
from dvos.models.student import labels_to_onehot
from dvos.models.teacher import TeacherAttention
from dvos.utils.errors import ConfigError

HEIGHT, WIDTH, FRAMES, BATCH = 48, 64, 3, 2
MAX_OBJECTS = 3
LAMBDAS = {"att": 0.5, "inter": 2.0, "intra": 1.5, "ce": 0.25}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tmp_path, *overrides):
    teacher_file = tmp_path / "teacher.pt"
    if not teacher_file.is_file():
        teacher_file.write_bytes(b"stand-in teacher file: only its path and hash are recorded")
    return load_config(
        [
            "experiment=smoke",
            f"paths.data_dir={tmp_path / 'data'}",
            f"teacher.checkpoint={teacher_file}",
            f"model.max_objects={MAX_OBJECTS}",
            "distill.num_segments=3",
            # the paper's pseudo-objects and losses (the root config's embedded recipe is tested by name)
            "distill.feature_weight=1.0",
            "distill.colour_weight=0.0",
            "distill.components=false",
            "distill.refine_iterations=0",
            "distill.lambda_ref=0.0",
            "distill.teacher_scale=1",
            *(f"distill.lambda_{name}={value}" for name, value in LAMBDAS.items()),
            *overrides,
        ]
    )


def make_module(tmp_path, *overrides) -> DistillationModule:
    student, teacher = tiny_student_and_teacher(
        MAX_OBJECTS, batch_norm=True
    )  # BatchNorm: a buffer the EMA must copy
    return DistillationModule(make_config(tmp_path, *overrides), student=student, teacher=teacher)


def make_clip(seed: int = 0) -> torch.Tensor:
    """T × 3 × H × W in [0, 1]: a two-tone noisy background, a red square and a blue disc moving."""
    return square_and_disc_clip(
        FRAMES, HEIGHT, WIDTH, square=(8, 8, 16, 3, 1), disc=(48, 30, 9, -2), seed=seed
    )


def make_masks(seed: int = 0) -> torch.Tensor:
    """T × H × W uint8 ids: frame 0 has objects 1 and 2 and a void (255) band; later frames random."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 3, (FRAMES, HEIGHT, WIDTH), generator=generator, dtype=torch.uint8)
    masks[0] = 0
    masks[0, 8:24, 8:24] = 1
    masks[0, 21:39, 39:57] = 2
    masks[0, :, :2] = 255
    return masks


def make_batch(*, masks: bool = False) -> dict:
    batch = {"frames": torch.stack([make_clip(seed) for seed in range(BATCH)])}
    if masks:
        batch["masks"] = torch.stack([make_masks(seed) for seed in range(BATCH)])
    return batch


def train_loader(num_batches: int = 1) -> torch.utils.data.DataLoader:
    clips = [{"frames": make_clip(seed)} for seed in range(BATCH * num_batches)]
    return torch.utils.data.DataLoader(clips, batch_size=BATCH, collate_fn=torch.utils.data.default_collate)


def make_trainer(root, *, max_steps: int, callbacks=(), **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        default_root_dir=str(root),
        logger=False,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        **options,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# ---------------------------------------------------------------------------------------- the teacher
def test_teacher_is_frozen_and_kept_out_of_state_optimizer_and_checkpoint(tmp_path):
    module = make_module(tmp_path)
    teacher = module.teacher
    teacher_before = snapshot(teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    # state_dict = the student and its EMA copy, nothing of the teacher
    student_keys = set(module.student.state_dict())
    expected = {f"student.{k}" for k in student_keys} | {f"student_ema.{k}" for k in student_keys}
    assert set(module.state_dict()) == expected

    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_loader())
    assert not teacher.training  # Lightning's .train() never reached it
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in snapshot(teacher).items():
        assert torch.equal(value, teacher_before[name]), name
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.student.parameters()}

    path = tmp_path / "distill.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects
    teacher_file = tmp_path / "teacher.pt"
    assert checkpoint["dvos_teacher"] == {
        "checkpoint": str(teacher_file),
        "sha256": hashlib.sha256(teacher_file.read_bytes()).hexdigest(),
    }
    assert checkpoint["dvos_config"]["distill"]["lambda_inter"] == LAMBDAS["inter"]
    assert checkpoint["dvos_config"]["model"]["max_objects"] == MAX_OBJECTS
    assert set(checkpoint["state_dict"]) == expected
    stored_params = {
        i for group in checkpoint["optimizer_states"][0]["param_groups"] for i in group["params"]
    }
    assert len(stored_params) == sum(1 for _ in module.student.parameters())


def test_no_gradient_reaches_the_teacher(tmp_path):
    module = make_module(tmp_path)
    module.train()
    loss, _, outputs = module.compute_loss(make_batch())
    assert not outputs.teacher_logits.requires_grad
    assert all(a is None or not a.weights.requires_grad for a in outputs.teacher_attention)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    offsets = [p.grad for n, p in module.student.named_parameters() if "offset" in n]
    assert offsets and all(g is not None and torch.isfinite(g).all() for g in offsets)


# ---------------------------------------------------------------------------------------- the loss
def test_training_step_gives_a_finite_weighted_loss_and_logs_every_part(tmp_path):
    module = make_module(tmp_path)
    module.train()
    loss, parts, outputs = module.compute_loss(make_batch())
    assert set(parts) == set(LAMBDAS) | {"jaccard"}  # logged with weight 0 too
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    assert parts["att"] > 0 and parts["inter"] > 0 and parts["intra"] > 0
    weighted = sum(LAMBDAS[name] * parts[name] for name in LAMBDAS)
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    assert len(outputs.student_logits) == FRAMES - 1
    assert outputs.num_objects.tolist() == [2, 2]  # num_segments − 1 pseudo-objects

    trainer = make_trainer(tmp_path, max_steps=1, log_every_n_steps=1)
    trainer.fit(module, train_loader())
    logged = trainer.callback_metrics
    for name in (
        "train/loss",
        "train/att",
        "train/inter",
        "train/intra",
        "train/ce",
        "train/jaccard",
        "train/objects",
    ):
        assert name in logged and math.isfinite(float(logged[name])), name


def test_reference_reconstruction_loss_reads_frame_0_back(tmp_path):
    module = make_module(tmp_path, "distill.lambda_ref=0.5")
    module.train()
    loss, parts, outputs = module.compute_loss(make_batch())
    assert len(outputs.student_logits) == FRAMES - 1  # frame 0's reading is kept apart
    assert outputs.reference_logits.shape == (2, module.student.max_objects + 1, *make_clip().shape[-2:])
    expected = torch.nn.functional.cross_entropy(outputs.reference_logits, outputs.reference_ids)
    assert parts["ref"].item() == pytest.approx(expected.item(), rel=1e-5)
    weighted = sum(LAMBDAS[name] * parts[name] for name in LAMBDAS) + 0.5 * parts["ref"]
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    loss.backward()
    assert module.student.decoder.head.weight.grad.abs().sum() > 0
    # off by default: no extra step, no part
    _, parts, outputs = make_module(tmp_path).compute_loss(make_batch())
    assert "ref" not in parts and outputs.reference_logits is None


def test_hard_pixel_ce_and_jaccard_reach_both_segmentation_losses(tmp_path):
    module = make_module(
        tmp_path, "distill.lambda_ref=0.5", "distill.ce_hard_ratio=0.25", "distill.lambda_jaccard=2"
    )
    module.train()
    loss, parts, outputs = module.compute_loss(make_batch())
    valid = objects_to_valid(outputs.num_objects, outputs.reference_logits.shape[1], 2)
    masked = outputs.reference_logits.detach().masked_fill(~valid[:, :, None, None], -1e4)
    expected = bootstrapped_ce(masked, outputs.reference_ids, hard_ratio=0.25) + 2 * soft_jaccard_loss(
        masked, outputs.reference_ids, valid
    )
    assert parts["ref"].item() == pytest.approx(expected.item(), rel=1e-5)
    weighted = (
        sum(LAMBDAS[name] * parts[name] for name in LAMBDAS) + 2 * parts["jaccard"] + 0.5 * parts["ref"]
    )
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-5)
    # the same settings for the loss to the teacher's masks (its value: tests/test_losses.py)
    assert module.criterion.ce_hard_ratio == 0.25 and module.criterion.weights["jaccard"] == 2.0


def test_edge_refinement_gives_the_ce_image_sized_targets_of_known_objects(tmp_path):
    module = make_module(tmp_path, "distill.refine_iterations=2")
    plain = make_module(tmp_path)
    batch = make_batch()
    _, parts, outputs = module.compute_loss(batch)
    _, _, unrefined = plain.compute_loss(batch)
    height, width = batch["frames"].shape[-2:]
    assert len(outputs.ce_targets) == FRAMES - 1 and unrefined.ce_targets is None
    for target in outputs.ce_targets:
        assert target.shape == (2, height, width)
        assert int(target.max()) <= int(outputs.num_objects.max())
    # the refined reference keeps every object of the unrefined one
    for refined, original in zip(outputs.reference_ids, unrefined.reference_ids):
        assert set(refined.unique().tolist()) == set(original.unique().tolist())
    assert torch.isfinite(parts["ce"])


@pytest.mark.parametrize("ref_masks", ["pseudo", "annotation"])
def test_target_frame_annotations_change_nothing(tmp_path, ref_masks):
    module = make_module(tmp_path, f"distill.ref_masks={ref_masks}")
    module.train()
    batch = make_batch(masks=True)
    loss, parts, outputs = module.compute_loss(batch)
    scrambled = dict(batch, masks=batch["masks"].clone())
    scrambled["masks"][:, 1:] = torch.randint(0, 4, scrambled["masks"][:, 1:].shape, dtype=torch.uint8)
    scrambled["masks"][:, 1:, :10] = 255
    loss2, parts2, outputs2 = module.compute_loss(scrambled)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(parts[k], parts2[k]) for k in parts)
    assert all(torch.equal(a, b) for a, b in zip(outputs.student_logits, outputs2.student_logits))
    assert torch.equal(outputs.teacher_logits, outputs2.teacher_logits)


def test_annotation_reference_is_frame_0s_annotation(tmp_path, caplog):
    module = make_module(tmp_path, "distill.ref_masks=annotation")
    module.train()
    batch = make_batch(masks=True)
    expected = batch["masks"][:, 0].long()
    expected[expected == 255] = 0  # void counts as background
    _, _, outputs = module.compute_loss(batch)
    assert torch.equal(outputs.reference_ids, expected)
    assert outputs.num_objects.tolist() == [2, 2]
    assert outputs.teacher_logits.shape[2] == 3  # background + the two annotated objects
    # the same annotation given as `reference_ids` (frame 0 only) gives the same reference
    _, _, from_ids = module.compute_loss({"frames": batch["frames"], "reference_ids": batch["masks"][:, 0]})
    assert torch.equal(from_ids.reference_ids, expected)
    # edge refinement leaves an annotation as it is (it only moves the teacher's targets)
    refining = make_module(tmp_path, "distill.ref_masks=annotation", "distill.refine_iterations=2")
    _, _, refined = refining.compute_loss(batch)
    assert torch.equal(refined.reference_ids, expected) and len(refined.ce_targets) == FRAMES - 1
    # ids above model.max_objects are dropped (warned), not merged into another object
    too_many = batch["masks"][:, 0].clone()
    too_many[:, 40:, :8] = MAX_OBJECTS + 2
    with caplog.at_level(logging.WARNING):
        _, _, dropped = module.compute_loss({"frames": batch["frames"], "reference_ids": too_many})
    assert torch.equal(dropped.reference_ids, expected)
    assert "max_objects" in caplog.text
    # pseudo-objects ignore the annotation altogether
    pseudo = make_module(tmp_path, "distill.ref_masks=pseudo")
    _, _, clustered = pseudo.compute_loss(batch)
    assert not torch.equal(clustered.reference_ids, expected)


def test_swap_objects_hands_one_object_to_another_id():
    masks = torch.zeros(3, 4, 2, 2)
    masks[:, 0], masks[:, 1], masks[:, 2], masks[:, 3] = 0.4, 0.3, 0.2, 0.1
    num_objects = torch.tensor([2, 3, 0])
    assert torch.equal(swap_objects(masks, num_objects, probability=0.0), masks)
    swapped = swap_objects(masks, num_objects, probability=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(swapped.sum(1), masks.sum(1))  # mass moved, none made or lost
    assert torch.equal(swapped[2], masks[2])  # a sample without objects is left alone
    for b, count in ((0, 2), (1, 3)):
        changed = [c for c in range(4) if not torch.equal(swapped[b, c], masks[b, c])]
        assert len(changed) == 2  # one object emptied, one other id given its mask
        source = next(c for c in changed if bool((swapped[b, c] == 0).all()))
        target = next(c for c in changed if c != source)
        assert 1 <= source <= count and 0 <= target <= count
        torch.testing.assert_close(swapped[b, target], masks[b, target] + masks[b, source])
    # deterministic by generator; gradients pass through
    again = swap_objects(masks, num_objects, probability=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, swapped)
    leaf = masks.clone().requires_grad_(True)
    swap_objects(
        leaf, num_objects, probability=1.0, generator=torch.Generator().manual_seed(3)
    ).sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_memory_swaps_reach_the_students_short_term_memory_in_training_only(tmp_path):
    module = make_module(tmp_path, "distill.memory_swap_prob=1")
    seen = []
    segment_clip = module.student.segment_clip

    def spy(*args, corrupt_memory=None, **kwargs):
        seen.append(corrupt_memory)
        return segment_clip(*args, corrupt_memory=corrupt_memory, **kwargs)

    module.student.segment_clip = spy
    module.train()
    loss, _, outputs = module.compute_loss(make_batch())
    assert torch.isfinite(loss) and seen[-1] is not None
    masks = labels_to_onehot(outputs.reference_ids, MAX_OBJECTS + 1).float()
    swapped = seen[-1](masks)
    assert not torch.equal(swapped, masks) and torch.equal(swapped.sum(1), masks.sum(1))
    module.eval()
    with torch.no_grad():
        module.forward_clip(make_batch()["frames"])
    assert seen[-1] is None  # validation and pictures read the student's own memory
    assert make_module(tmp_path).config.distill.memory_swap_prob == 0.0  # off by default


def test_paste_occluders_moves_a_piece_of_another_clips_frame_0_across_the_clip():
    # Each clip a flat colour of its own (clip b: value b / 10), so every pasted pixel names its donor.
    batch, length, size = 3, 3, 64
    frames = torch.arange(batch, dtype=torch.float32).div(10).view(batch, 1, 1, 1, 1)
    frames = frames.expand(batch, length, 3, size, size).contiguous()
    assert torch.equal(paste_occluders(frames, probability=0.0), frames)
    pasted = paste_occluders(frames, probability=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(frames, frames.clone())  # the input is left as it was
    for b in range(batch):
        changed = (pasted[b] != frames[b]).any(dim=1)  # T × H × W
        donors = set(pasted[b][:, 0][changed].mul(10).round().int().tolist())
        assert len(donors) == 1 and donors != {b}  # one piece, from another clip
        areas = changed.flatten(1).sum(1).float()
        # an ellipse with axes 25-50 % of the side, whole while its centre is inside the middle half
        assert bool((areas > 0).all()) and float(areas.max()) <= math.pi * (0.25 * size) ** 2 + 1
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        centres = [(ys[changed[t]].float().mean(), xs[changed[t]].float().mean()) for t in range(length)]
        moved = [math.hypot(a[0] - b_[0], a[1] - b_[1]) for a, b_ in zip(centres, centres[1:])]
        assert all(m > 1.0 for m in moved)  # it moves from frame to frame
    again = paste_occluders(frames, probability=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, pasted)  # deterministic by generator (resume draws the same)


def test_occluders_are_pasted_in_training_only(tmp_path):
    module = make_module(tmp_path, "distill.occluder_prob=1")
    seen = []
    forward_clip = module.forward_clip

    def spy(frames, **kwargs):
        seen.append(frames)
        return forward_clip(frames, **kwargs)

    module.forward_clip = spy
    batch = make_batch()
    module.train()
    loss, _, _ = module.compute_loss(batch)
    assert torch.isfinite(loss) and not torch.equal(seen[-1], batch["frames"])
    module.eval()
    module.compute_loss(batch)
    assert torch.equal(seen[-1], batch["frames"])  # validation losses see the clip as it is
    off = make_module(tmp_path, "distill.occluder_prob=0")
    off.forward_clip = spy
    off.train()
    off.compute_loss(batch)
    assert torch.equal(seen[-1], batch["frames"])  # 0 turns it off


# ---------------------------------------------------------------------------------------- attention targets
CROP, CROP_PAD, TEACHER_STRIDE = 465, 7, 8  # the paper's crop: padded to 480 by the student, 7 px above/left
TEACHER_CELLS = -(-CROP // TEACHER_STRIDE)  # 59: a ceil-sized grid from pixel 0, its last cell 1 px wide


def pixel_counts() -> np.ndarray:
    """900 × 59² pixel counts: how many image pixels of each student cell (padded grid) lie in each
    teacher cell (grid from pixel 0), by assigning every pixel of the 465 × 465 crop."""
    ys, xs = np.meshgrid(np.arange(CROP), np.arange(CROP), indexing="ij")
    teacher = (ys // TEACHER_STRIDE) * TEACHER_CELLS + xs // TEACHER_STRIDE
    student = ((ys + CROP_PAD) // 16) * 30 + (xs + CROP_PAD) // 16
    counts = np.zeros((900, TEACHER_CELLS**2))
    np.add.at(counts, (student.ravel(), teacher.ravel()), 1.0)
    return counts


def hand_made_attention() -> TeacherAttention:
    """The attention of query frame 4 over the context frames (0, 2, 3) of a 465 × 465 crop (59 × 59
    teacher cells), with known mass per frame: the joint top-2 map puts 0.2 of every row on frame 0
    (its own cell) and 0.8 on frame 3 (cell 0), none on frame 2; the per-frame maps are frame 0: its
    own cell (weight 1), frame 2: cell 5 (weight 1), frame 3: 0.25 its own cell + 0.75 cell 0."""
    tokens = TEACHER_CELLS**2
    own = torch.arange(tokens)
    indices = torch.stack([own, torch.full_like(own, 2 * tokens)], -1)[None]  # frame 3 is slot 2
    weights = torch.tensor([0.2, 0.8]).expand(1, tokens, 2)
    frame_indices = torch.stack(
        [
            torch.stack([own, own], -1),
            torch.full((tokens, 2), 5),
            torch.stack([own, torch.zeros_like(own)], -1),
        ],
        1,
    )[None]  # 1 × N × 3 frames × 2
    frame_weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.25, 0.75]]).expand(1, tokens, 3, 2)
    return TeacherAttention(
        indices, weights, (TEACHER_CELLS,) * 2, (0, 2, 3), 4, frame_indices.long(), frame_weights.contiguous()
    )


def test_teacher_targets_are_per_frame_distributions_on_the_students_padded_grid():
    attention = hand_made_attention()
    counts = pixel_counts()
    share = counts / counts.sum(1, keepdims=True)  # a student row: the mean over its pixels
    tokens = TEACHER_CELLS**2
    # the joint map's blocks hold 0.2 / 0 / 0.8 of each row: not what a student read's row is
    assert attention.frame_columns(0).sum(-1).unique().tolist() == pytest.approx([0.2])
    assert attention.frame_columns(1).sum(-1).unique().tolist() == [0.0]
    by_hand = {
        0: share,  # each teacher row attends to its own cell
        2: np.tile(np.eye(tokens)[5], (900, 1)),
        3: 0.25 * share + 0.75 * np.eye(tokens)[0][None],
    }
    for frame_index, expected in by_hand.items():
        target = teacher_frame_targets(attention, frame_index, (CROP, CROP), TEACHER_STRIDE)
        assert target.shape == (1, 900, tokens)
        assert np.allclose(target[0].numpy(), expected, atol=1e-6), frame_index
        torch.testing.assert_close(target.sum(-1), torch.ones(1, 900))
    assert teacher_frame_targets(attention, 1, (CROP, CROP), TEACHER_STRIDE) is None  # not in the context
    # student cell (0, 0) covers image pixels [0, 9)²: teacher cell (0, 0) whole, 1 px of its neighbours
    target = teacher_frame_targets(attention, 0, (CROP, CROP), TEACHER_STRIDE)[0, 0]
    assert target[0].item() == pytest.approx(64 / 81) and target[1].item() == pytest.approx(8 / 81)


def test_each_student_read_is_paired_with_the_teachers_map_of_the_same_frame(tmp_path):
    module = make_module(tmp_path)
    attention = hand_made_attention()
    reads = {
        name: SimpleNamespace(attention=torch.rand(1, 2, 900, 8)) for name in ("long_term", "short_term")
    }
    outputs = SimpleNamespace(
        student_aux=[None, None, None, reads],
        teacher_attention=[None] * 4 + [attention],
        teacher_stride=8,
        teacher_origin=(0.0, 0.0),
    )
    pairs = module.attention_pairs(outputs, 4, (CROP, CROP))
    assert [student for student, _ in pairs] == [reads["long_term"].attention, reads["short_term"].attention]
    for (_, target), frame_index in zip(pairs, (0, 3)):  # long-term: frame 0, short-term: frame t − 1 = 3
        assert torch.equal(target, teacher_frame_targets(attention, frame_index, (CROP, CROP), 8))
    # a previous frame the teacher's context no longer holds gives no short-term pair
    gone = dataclasses.replace(attention, context_frames=(0, 1, 2))
    outputs.teacher_attention[4] = gone
    assert len(module.attention_pairs(outputs, 4, (CROP, CROP))) == 1
    # the branches follow distill.att_branches
    short = make_module(tmp_path, "distill.att_branches=short")
    outputs.teacher_attention[4] = attention
    assert [s for s, _ in short.attention_pairs(outputs, 4, (CROP, CROP))] == [reads["short_term"].attention]


def test_padded_clips_train_with_targets_on_the_students_grid(tmp_path):
    # 40 × 56 frames: the student pads to 48 × 64 (3 × 4 query cells), the teacher (stride 8) has 5 × 7
    module = make_module(tmp_path)
    frames = torch.stack([make_clip(seed)[:, :, 4:44, 4:60] for seed in range(BATCH)])
    loss, parts, outputs = module.compute_loss({"frames": frames})
    assert outputs.teacher_token_shape == (5, 7)
    pairs = module.attention_pairs(outputs, FRAMES - 1, (40, 56))
    assert len(pairs) == 2 and all(target.shape == (BATCH, 12, 35) for _, target in pairs)
    assert all(student.shape[-2] == 12 for student, _ in pairs)
    assert torch.isfinite(loss) and parts["att"] > 0
    loss.backward()


def test_single_object_clips_are_counted_as_skipped_by_the_inter_relation(tmp_path):
    module = make_module(tmp_path, "distill.num_segments=2")  # background + one pseudo-object
    trainer = make_trainer(tmp_path, max_steps=1, log_every_n_steps=1)
    trainer.fit(module, train_loader())
    logged = trainer.callback_metrics
    assert float(logged["train/objects"]) == 1.0 and float(logged["train/inter_skipped"]) == 1.0
    assert float(logged["train/inter"]) == 0.0
    module = make_module(tmp_path)  # two pseudo-objects: nothing skipped
    trainer = make_trainer(tmp_path / "two", max_steps=1, log_every_n_steps=1)
    trainer.fit(module, train_loader())
    assert float(trainer.callback_metrics["train/inter_skipped"]) == 0.0


def test_magnify_repeats_each_pixel_into_a_block_for_masks():
    ids = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[[[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]])
    assert torch.equal(magnify(ids, 2, nearest=True), expected)
    # images: bilinear, a constant stays constant, the size is s × s
    image = torch.full((2, 3, 5, 7), 0.25)
    assert torch.allclose(magnify(image, 3), torch.full((2, 3, 15, 21), 0.25))


def test_magnified_teacher_gives_finer_targets_on_the_frames_grid(tmp_path):
    batch = make_batch(masks=True)
    expected = batch["masks"][:, 0].long()
    expected[expected == 255] = 0
    plain = make_module(tmp_path, "distill.ref_masks=annotation")
    magnified = make_module(tmp_path, "distill.ref_masks=annotation", "distill.teacher_scale=2")
    _, _, base = plain.compute_loss(batch)
    loss, parts, outputs = magnified.compute_loss(batch)
    # the teacher's cells cover half as many of the frames' pixels, twice as many cells each way
    assert outputs.teacher_stride * 2 == base.teacher_stride
    assert outputs.teacher_token_shape == (2 * base.teacher_token_shape[0], 2 * base.teacher_token_shape[1])
    assert tuple(outputs.teacher_logits.shape[-2:]) == outputs.teacher_token_shape
    # the reference objects are still the annotation, at the frames' own size
    assert torch.equal(outputs.reference_ids, expected)
    assert all(torch.isfinite(value) for value in parts.values())
    loss.backward()
    # pseudo-objects come back at the frames' size too, and the edge-refined CE targets as well
    pseudo = make_module(tmp_path, "distill.teacher_scale=2", "distill.refine_iterations=1")
    _, _, clustered = pseudo.compute_loss(batch)
    assert clustered.reference_ids.shape == (BATCH, HEIGHT, WIDTH)
    assert all(target.shape == (BATCH, HEIGHT, WIDTH) for target in clustered.ce_targets)


def test_teacher_scale_must_divide_the_teachers_stride(tmp_path):
    with pytest.raises(ConfigError, match=r"distill.teacher_scale=3 must divide the teacher's stride \(8"):
        make_module(tmp_path, "distill.teacher_scale=3")


def test_annotation_reference_without_annotation_is_a_one_line_config_error(tmp_path):
    module = make_module(tmp_path, "distill.ref_masks=annotation")
    with pytest.raises(ConfigError, match="distill.ref_masks=annotation") as info:
        module.compute_loss(make_batch())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("distill.ref_masks=labels", "distill.ref_masks"),
        ("distill.att_branches=all", "distill.att_branches"),
        ("distill.num_segments=9", "distill.num_segments"),
        ("optim.max_non_finite=0", "optim.max_non_finite"),
        ("distill.lambda_ref=-1", "distill.lambda_ref"),
        ("distill.colour_weight=-0.5", "distill.colour_weight"),
        ("eval.min_size=8", "eval.min_size"),
        ("eval.max_size=0", "eval.max_size"),
        ("eval.val_min_size=15", "eval.val_min_size"),
        ("distill.teacher_scale=0", "distill.teacher_scale"),
        ("distill.ce_hard_ratio=0", "distill.ce_hard_ratio"),
        ("distill.ce_hard_ratio=1.5", "distill.ce_hard_ratio"),
        ("distill.lambda_jaccard=-1", "distill.lambda_jaccard"),
        ("distill.memory_swap_prob=1.5", "distill.memory_swap_prob"),
        ("distill.occluder_prob=-0.1", "distill.occluder_prob"),
        ("distill.min_width=0", "distill.min_width"),
        ("distill.min_contrast=-0.1", "distill.min_contrast"),
        ("model.permute_slots=0", "model.permute_slots"),
        ("eval.long_term_weight=-1", "eval.long_term_weight"),
        ("eval.val_refine_iterations=-1", "eval.val_refine_iterations"),
        ("eval.refine_sigma_colour=0", "eval.refine_sigma_colour"),
        ("model.short_term_read=global", "model.short_term_read"),
        ("teacher.name=dino", "teacher.name"),
        ("teacher=deformable teacher.deformable.model.num_layers=0", "teacher.deformable.model.num_layers"),
        ("teacher=deformable teacher.deformable.max_steps=0", "teacher.deformable.max_steps"),
    ],
)
def test_unusable_distill_settings_are_config_errors(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        make_module(tmp_path, *override.split())


@pytest.mark.parametrize(
    "override, key", [("distill.min_width=3", "min_width"), ("distill.min_contrast=0.1", "min_contrast")]
)
def test_piece_filters_without_components_are_config_errors(tmp_path, override, key):
    with pytest.raises(ConfigError, match=f"distill.{key} .*distill.components=true"):
        make_module(tmp_path, "distill.components=false", override)
    make_module(tmp_path, "distill.components=true", override)  # with the pieces they apply


def test_validation_segments_at_the_validation_sizes(tmp_path, monkeypatch):
    from dvos.inference import engine

    class Seen(Exception):
        pass

    def recorder(*args, **kwargs):
        refine = kwargs["refine"]
        raise Seen(kwargs["min_size"], kwargs["max_size"], None if refine is None else refine.iterations)

    monkeypatch.setattr(engine, "StudentSegmenter", recorder)
    sequence = SimpleNamespace(has_full_gt=True)
    module = make_module(
        tmp_path,
        "eval.min_size=600",
        "eval.val_min_size=64",
        "eval.val_max_size=128",
        "eval.refine_iterations=6",
        "eval.val_refine_iterations=2",
    )
    with pytest.raises(Seen) as info:
        module.validation_step(sequence, 0)
    assert info.value.args == (64, 128, 2)
    # the schema's default: the evaluation's own sizes and refinement (the CPU recipe and smoke set their own)
    schema = OmegaConf.structured(Config)
    schema.eval.min_size, schema.eval.max_size, schema.eval.refine_iterations = 200, 300, 4
    assert (schema.eval.val_min_size, schema.eval.val_max_size) == (200, 300)
    assert schema.eval.val_refine_iterations == 4


# ---------------------------------------------------------------------------------------- optimisation
def test_warmup_poly_by_hand():
    def factor(step):
        return warmup_poly(step, warmup_steps=4, total_steps=14, power=0.9, min_ratio=0.1)

    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0  # decay starts at progress 0
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5**0.9)
    assert factor(14) == pytest.approx(0.1)
    assert factor(100) == pytest.approx(0.1)  # clamped past the end
    no_warmup = warmup_poly(0, warmup_steps=0, total_steps=10, power=1.0, min_ratio=0.0)
    assert no_warmup == 1.0


def test_learning_rate_follows_warmup_poly_per_optimizer_step(tmp_path):
    module = make_module(tmp_path, "optim.lr=0.01", "optim.warmup_steps=2", "optim.min_lr_ratio=0.2")
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[Record()])
    trainer.fit(module, train_loader())
    ratio = module.config.optim.encoder_lr_ratio
    for step, (encoder_lr, other_lr) in enumerate(seen):
        factor = warmup_poly(step, warmup_steps=2, total_steps=5, power=0.9, min_ratio=0.2)
        assert other_lr == pytest.approx(0.01 * factor)
        assert encoder_lr == pytest.approx(0.01 * ratio * factor)
    assert len(seen) == 5


def test_ema_update_by_hand(tmp_path):
    module = make_module(tmp_path, "optim.ema_decay=0.99")
    with torch.no_grad():
        for p in module.student.parameters():
            p.fill_(1.0)
        for p in module.student_ema.parameters():
            p.fill_(3.0)
        module.student.encoder.bn4.running_mean.fill_(0.5)
    module.update_ema(0)  # decay min(0.99, 1/10) = 0.1
    assert ema_decay_at(0, 0.99) == pytest.approx(0.1)
    for p in module.student_ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.1 * 3.0 + 0.9 * 1.0))
    assert torch.equal(module.student_ema.encoder.bn4.running_mean, torch.full((4,), 0.5))
    module.update_ema(10_000)  # decay min(0.99, 10001/10010) = 0.99
    assert ema_decay_at(10_000, 0.99) == 0.99
    for p in module.student_ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.99 * 1.2 + 0.01 * 1.0))


def test_ema_follows_each_optimizer_step_not_each_micro_batch(tmp_path):
    module = make_module(tmp_path, "optim.ema_decay=0.99")
    initial = snapshot(module.student)
    trainer = make_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2)
    trainer.fit(module, train_loader(num_batches=2))
    assert trainer.global_step == 1
    trained = snapshot(module.student)
    expected_ema = {
        k: 0.1 * initial[k] + 0.9 * trained[k]
        if initial[k].is_floating_point() and "running" not in k
        else trained[k]
        for k in initial
    }
    changed = [
        k for k in initial if not torch.equal(initial[k], trained[k]) and initial[k].is_floating_point()
    ]
    assert changed  # the student did learn
    for name, value in module.student_ema.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(value, expected_ema[name], atol=1e-6), name


def nan_on(module: DistillationModule, pattern: list[bool]) -> list[bool]:
    """Make the loss of batch i non-finite when pattern[i] (records the calls)."""
    original = module.clip_loss
    calls: list[bool] = []

    def clip_loss(outputs, image_size):
        loss, parts = original(outputs, image_size)
        bad = pattern[len(calls)] if len(calls) < len(pattern) else False
        calls.append(bad)
        return (loss * float("nan") if bad else loss), parts

    module.clip_loss = clip_loss
    return calls


def test_non_finite_loss_is_skipped_with_a_warning(tmp_path, caplog):
    module = make_module(tmp_path, "optim.max_non_finite=2")
    before, ema_before = snapshot(module.student), snapshot(module.student_ema)
    nan_on(module, [True])
    trainer = make_trainer(tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="dvos.lit.distill"):
        trainer.fit(module, train_loader())
    assert "non-finite loss at step 0" in caplog.text
    for name, value in snapshot(module.student).items():
        assert torch.equal(value, before[name]), name  # no update from a skipped batch
    for name, value in snapshot(module.student_ema).items():
        assert torch.equal(value, ema_before[name]), name


def test_training_stops_after_max_non_finite_in_a_row(tmp_path, caplog):
    module = make_module(tmp_path, "optim.max_non_finite=3")
    # a finite loss in between resets the count: the 3rd in a row is the 6th batch
    calls = nan_on(module, [True, True, False, True, True, True, False])
    trainer = make_trainer(tmp_path, max_steps=10)
    with caplog.at_level(logging.WARNING, logger="dvos.lit.distill"), pytest.raises(RuntimeError) as info:
        trainer.fit(module, train_loader())
    assert len(calls) == 6
    message = str(info.value)
    assert "3 non-finite losses in a row" in message and "optim.max_non_finite=3" in message
    assert caplog.text.count("non-finite loss at step") == 5


# ---------------------------------------------------------------------------------------- resume
def test_resumed_fit_equals_uninterrupted_fit(tmp_path):
    """Optimizer, scheduler, EMA and permutation draws restored: stopping at step 2 and resuming from
    its last.ckpt ends with the weights of an uninterrupted run (each epoch is the same one batch)."""
    full = make_module(tmp_path, "optim.warmup_steps=2")
    make_trainer(tmp_path / "full", max_steps=4).fit(full, train_loader())

    class StopAtStep2(pl.Callback):  # an interruption: the schedule still spans 4 steps
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 2

    first = make_module(tmp_path, "optim.warmup_steps=2")
    last = LastCheckpoint(tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path / "first", max_steps=4, callbacks=[last, StopAtStep2()])
    trainer.fit(first, train_loader())
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2

    resumed = make_module(tmp_path, "optim.warmup_steps=2")
    trainer = make_trainer(tmp_path / "resumed", max_steps=4)
    trainer.fit(resumed, train_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 4
    for part in ("student", "student_ema"):
        expected = snapshot(getattr(full, part))
        for name, value in snapshot(getattr(resumed, part)).items():
            assert torch.equal(value, expected[name]), f"{part}.{name}"


def test_last_checkpoint_holds_the_final_step_and_is_written_atomically(tmp_path, monkeypatch):
    module = make_module(tmp_path)
    last = LastCheckpoint(tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[last], plugins=[AtomicCheckpointIO()])
    trainer.fit(module, train_loader())
    path = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 3  # not 2
    # a process killed half-way through writing leaves the previous file whole
    before = path.read_bytes()

    import builtins

    import dvos.utils.io as io_module

    class KilledWhileWriting:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise KeyboardInterrupt

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def open_then_get_killed(*args, **kwargs):
        return KilledWhileWriting(builtins.open(*args, **kwargs))  # noqa: SIM115 (closed by __exit__)

    monkeypatch.setattr(io_module, "open", open_then_get_killed, raising=False)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 4}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------------------------- a deformable teacher
def deformable_module(tmp_path, *overrides) -> DistillationModule:
    """The tiny student with a deformable teacher: a two-layer network of the student's kind whose
    reads sample between cells (non-zero offsets)."""
    from helpers_models import TinyEncoder

    from dvos.models.deformable_teacher import DeformableTeacher
    from dvos.models.student import DeformableStudent

    student, _ = tiny_student_and_teacher(MAX_OBJECTS)
    torch.manual_seed(1)
    network = DeformableStudent(
        TinyEncoder(),
        d_model=16,
        num_heads=2,
        num_groups=2,
        max_objects=MAX_OBJECTS,
        decoder_dim=8,
        offset_kernel=3,
        num_layers=2,
    )
    for layer in network.propagation_stack:
        for read in (layer.long_term, layer.short_term):
            nn.init.normal_(read.offset_network.to_offsets.weight, std=0.3)
    return DistillationModule(
        make_config(tmp_path, *overrides), student=student, teacher=DeformableTeacher(network)
    )


def test_a_deformable_teacher_targets_are_its_own_per_frame_maps(tmp_path):
    """Same frames, same padding: the student's query cells are the teacher's, so each student read's
    target is the teacher's map over that frame (long-term: frame 0, short-term: frame t − 1; at
    t = 1 both hold frame 0 and each read gets its own); its logits give the relations."""
    module = deformable_module(tmp_path)
    frames = torch.stack([make_clip(seed)[:, :, 4:44, 4:60] for seed in range(BATCH)])  # 40 × 56: padded
    loss, parts, outputs = module.compute_loss({"frames": frames})
    assert torch.isfinite(loss) and parts["att"] > 0 and parts["inter"] > 0
    loss.backward()
    assert not any(p.grad is not None for p in module.teacher.parameters())
    assert (outputs.teacher_stride, outputs.logit_stride, outputs.teacher_origin) == (16, 4, (-4.0, -4.0))
    assert outputs.teacher_logits.shape == (BATCH, FRAMES, 3, 10, 14)  # num_segments=3, stride-4 cells
    for t in range(1, FRAMES):
        attention = outputs.teacher_attention[t]
        pairs = module.attention_pairs(outputs, t, (40, 56))
        assert len(pairs) == 2
        for (_, target), slot in zip(pairs, (0, 1)):
            torch.testing.assert_close(target, attention.frame_map(slot))
    first = module.attention_pairs(outputs, 1, (40, 56))
    assert not torch.allclose(first[0][1], first[1][1])


def test_a_magnified_padded_deformable_teacher_is_matched_over_the_image_pixels(tmp_path):
    """36 × 52 frames: the student pads to 48 × 64 (6 px above and to the left), the teacher sees
    them magnified 2x (72 × 104, padded to 80 × 112: 4 magnified px = 2 px of the frame), cells of
    8 px of the frame. A student row is the mean of the teacher rows over its image pixels, by hand."""
    module = deformable_module(tmp_path, "distill.teacher_scale=2")
    frames = torch.stack([make_clip(seed)[:, :, 6:42, 6:58] for seed in range(BATCH)])
    loss, _, outputs = module.compute_loss({"frames": frames})
    assert torch.isfinite(loss)
    assert (outputs.teacher_stride, outputs.logit_stride, outputs.teacher_origin) == (8, 2, (-2.0, -2.0))
    assert outputs.teacher_token_shape == (5, 7)
    ys, xs = np.meshgrid(np.arange(36), np.arange(52), indexing="ij")
    student = ((ys + 6) // 16) * 4 + (xs + 6) // 16
    teacher = ((ys + 2) // 8) * 7 + (xs + 2) // 8
    counts = np.zeros((12, 35))
    np.add.at(counts, (student.ravel(), teacher.ravel()), 1.0)
    share = counts / counts.sum(1, keepdims=True)
    attention = outputs.teacher_attention[2]
    for (_, target), slot in zip(module.attention_pairs(outputs, 2, (36, 52)), (0, 1)):
        expected = share @ attention.frame_map(slot)[1].double().numpy()
        assert np.allclose(target[1].numpy(), expected, atol=1e-6)


def test_a_deformable_teacher_needs_its_weights(tmp_path):
    from dvos.lit.distill import build_distillation_teacher

    with pytest.raises(ConfigError, match="teacher.deformable.checkpoint"):
        build_distillation_teacher(make_config(tmp_path, "teacher=deformable").teacher)
