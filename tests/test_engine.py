"""The streaming inference engine: constant memory over long videos, object ids, late objects, sizes,
names and palettes of the outputs, the background writer, checkpoints and overlay videos."""

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_data import make_youtubevos_tree, write_frame_folder
from helpers_models import TINY_MODEL, tiny_student
from PIL import Image
from torch import nn

from dvos.data.readers import open_video
from dvos.data.vos import youtubevos_sequences
from dvos.inference.checkpoints import find_latest_checkpoint, load_student
from dvos.inference.engine import (
    CopySegmenter,
    ObjectIdMap,
    StudentSegmenter,
    TeacherSegmenter,
    current_rss_mb,
    long_term_bound,
    model_size,
    reading_options,
    segment_sequence,
)
from dvos.inference.overlay import write_overlay_video
from dvos.inference.writer import MaskWriter
from dvos.models.backbones.resnet import ResNetEncoder
from dvos.models.refine import EdgeRefinement, bilateral_refine
from dvos.models.student import labels_to_onehot
from dvos.models.teacher import LabelPropagationTeacher
from dvos.utils.errors import DataError, DvosError
from dvos.utils.masks import default_palette, read_mask, write_mask


def tiny_teacher(n_recent: int = 3, encoder: nn.Module | None = None) -> LabelPropagationTeacher:
    torch.manual_seed(0)
    encoder = encoder or ResNetEncoder(widths=(8, 16), depths=(1, 1), stem_width=8)
    return LabelPropagationTeacher(encoder, n_recent=n_recent, radius=4, topk=5)


class ColourEncoder(nn.Module):
    """Pixel colours averaged over 4 × 4 cells with their 3 × 3 neighbourhood: a teacher encoder whose
    propagation follows colour, so a test can rely on what it propagates."""

    stride = 4

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(image, self.stride) - 0.5
        patches = F.unfold(F.pad(cells, (1, 1, 1, 1), mode="replicate"), 3)
        return patches.view(image.shape[0], -1, *cells.shape[-2:])


def moving_scene(num_frames, height=64, width=96, *, object_ids=(1, 2, 3), late=None, seed=0):
    """Frames `T × H × W × 3` uint8 and masks `T × H × W` uint8: flat-coloured boxes moving over a
    textured background, one id each; `late=(id, t)` adds a box with that id from frame t on."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
    colours = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)]
    frames = np.repeat(background[None], num_frames, axis=0)
    masks = np.zeros((num_frames, height, width), np.uint8)
    box_h, box_w = height // 4, width // 6
    for t in range(num_frames):
        shift = int(round(3 * np.sin(t / 7.0)))
        for k, object_id in enumerate(object_ids):
            top, left = 4 + k * (box_h + 2), 6 + k * (box_w + 4) + shift
            frames[t, top : top + box_h, left : left + box_w] = colours[k]
            masks[t, top : top + box_h, left : left + box_w] = object_id
        if late is not None and t >= late[1]:
            top, left = height - box_h - 4, width - box_w - 6 + shift
            frames[t, top : top + box_h, left : left + box_w] = colours[3]
            masks[t, top : top + box_h, left : left + box_w] = late[0]
    return frames, masks


# --------------------------------------------------------------------------------------------
# Constant memory
# --------------------------------------------------------------------------------------------
def test_student_memory_is_constant_over_200_frames():
    frames, masks = moving_scene(200)
    segmenter = StudentSegmenter(tiny_student())
    sizes, rss = [], {}

    def watch(index, prediction):
        sizes.append(segmenter.memory_bytes())
        if index in (20, 199):
            rss[index] = current_rss_mb()

    stats = segment_sequence(segmenter, frames, masks[0], on_frame=watch)
    assert stats.frames == 200 and stats.fps > 0 and stats.peak_cuda_mb is None
    assert len(set(sizes)) == 1 and sizes[0] > 0  # the Memory holds two frames, always
    assert rss[199] - rss[20] < 30, f"RSS grew by {rss[199] - rss[20]:.1f} MB over 180 frames"
    assert stats.peak_rss_mb >= stats.rss_before_mb > 0


# --------------------------------------------------------------------------------------------
# How the student reads its memory (eval.soft_memory, eval.attention_topk)
# --------------------------------------------------------------------------------------------
def test_student_short_term_memory_is_soft_or_hard_as_asked():
    frames, masks = moving_scene(3)
    student = tiny_student().eval()
    for soft in (True, False):
        segmenter = StudentSegmenter(student, soft_memory=soft)
        segmenter.start(frames[0], masks[0], [1, 2, 3])
        memory = segmenter.memory
        segmenter.step(frames[1])
        with torch.inference_mode():  # the same step by hand: the logits, then the embedded masks
            logits = student.step(
                segmenter._image(frames[1]), memory, num_objects=3, update_memory=False
            ).logits
            probabilities = torch.softmax(logits, dim=1)
            one_hot = F.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float()
            expected = student.embed_ids(probabilities if soft else one_hot)
            other = student.embed_ids(one_hot if soft else probabilities)
        torch.testing.assert_close(segmenter.memory.previous_id, expected)
        assert not torch.allclose(segmenter.memory.previous_id, other)  # the two readings differ here


def test_inference_topk_override_reads_like_a_topk_student_and_leaves_the_model_alone():
    frames, masks = moving_scene(4)
    dense = tiny_student().eval()
    for read in (dense.propagation.long_term, dense.propagation.short_term):  # non-grid samples
        torch.nn.init.normal_(read.offset_network.to_offsets.weight, std=0.5)
    built_sharp = tiny_student(attention_topk=2).eval()
    built_sharp.load_state_dict(dense.state_dict())
    runs = {}
    for name, model, topk in (("override", dense, 2), ("built", built_sharp, None), ("dense", dense, None)):
        segmenter = StudentSegmenter(model, attention_topk=topk)
        logits = []

        def record(*args, _step=model.step, _logits=logits, **kwargs):
            output = _step(*args, **kwargs)
            _logits.append(output.logits)
            return output

        model.step = record
        try:
            segment_sequence(segmenter, frames, masks[0])
        finally:
            del model.step
        runs[name] = torch.stack(logits)
    torch.testing.assert_close(runs["override"], runs["built"])
    assert not torch.allclose(runs["override"], runs["dense"])
    assert dense.propagation.long_term.topk == dense.propagation.short_term.topk == 0  # restored
    with pytest.raises(RuntimeError), dense.reading(attention_topk=3):  # restored after an error too
        raise RuntimeError("inside")
    assert dense.propagation.short_term.topk == 0


def test_reading_options_come_from_the_eval_config():
    from omegaconf import OmegaConf

    from dvos.config import load_config
    from dvos.utils.errors import ConfigError

    overrides = ["experiment=cpu", "eval.refine_iterations=0", "eval.val_refine_iterations=0"]
    plain = reading_options(load_config(overrides).eval)
    # the CPU recipe's reading: soft memory, top-k as trained, the reference weighed 1.3
    assert plain == {
        "soft_memory": True,
        "attention_topk": None,
        "long_term_weight": 1.3,
        "refine": None,
        "refine_soft_memory": False,
    }
    assert reading_options(OmegaConf.create({}))["long_term_weight"] is None  # schema: as trained
    cfg = load_config(
        [
            "eval.soft_memory=false",
            "eval.attention_topk=1",
            "eval.long_term_weight=1.25",
            "eval.refine_iterations=3",
            "eval.val_refine_iterations=0",
            "eval.refine_radius=6",
            "eval.refine_soft_memory=true",
        ]
    )
    assert reading_options(cfg.eval) == {
        "soft_memory": False,
        "attention_topk": 1,
        "long_term_weight": 1.25,
        "refine": EdgeRefinement(iterations=3, radius=6, dilation=3, sigma_space=8.0, sigma_colour=0.1),
        "refine_soft_memory": True,
    }
    assert reading_options(cfg.eval, validation=True)["refine"] is None
    # a section without the validation key refines validation like the rest
    assert (
        reading_options(OmegaConf.create({"refine_iterations": 2}), validation=True)["refine"].iterations == 2
    )
    with pytest.raises(ConfigError, match=r"eval\.attention_topk .* got -1"):
        reading_options(OmegaConf.create({"attention_topk": -1}))
    with pytest.raises(DataError, match="attention_topk"):
        StudentSegmenter(tiny_student(), attention_topk=-2)
    for bad in (-0.5, 2.5, float("nan")):
        with pytest.raises(ConfigError, match=rf"eval\.long_term_weight must be in \[0, 2\] .* got {bad}"):
            reading_options(OmegaConf.create({"long_term_weight": bad}))
        with pytest.raises(DataError, match="long_term_weight"):
            StudentSegmenter(tiny_student(), long_term_weight=bad)


def test_long_term_weight_weighs_the_two_id_reads_and_leaves_the_model_alone():
    """The ID stream of `read_memory` with w is out_id((w·long + (2 − w)·short) ⊙ silu(gate)),
    computed here from the two reads; w = 1 is the trained sum; the setting is restored on exit."""
    student = tiny_student().eval()
    propagation = student.propagation
    for layer in (propagation.gate_id, propagation.out_id):  # not the identity init: a real mix
        torch.nn.init.normal_(layer.weight, std=0.2)
    frames, masks = moving_scene(2)
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    reference = labels_to_onehot(torch.from_numpy(masks[:1]).long(), student.max_objects + 1)
    with torch.no_grad():
        memory = student.initialize_memory(student.encode_frame(images[:1]), reference)
        features = student.encode_frame(images[1:])
        # a previous frame that disagrees with the reference: its mask mirrored
        memory = student.update_memory(memory, features, reference.flip(-1))
        query, _ = propagation.key_value(features.embedding, features.position)
        (_, long_id), _ = propagation.long_term(
            query, memory.reference_key, (memory.reference_value, memory.reference_id)
        )
        (_, short_id), _ = propagation.short_term(
            query, memory.previous_key, (memory.previous_value, memory.previous_id)
        )
        gate = torch.nn.functional.silu(
            propagation.gate_id(propagation.norm_input(features.embedding.flatten(2).transpose(1, 2)))
        )
        read = {}
        for weight in (None, 1.0, 1.5, 2.0):
            with student.reading(long_term_weight=weight):
                read[weight] = propagation.read_memory(features.embedding, query, memory)[1]
        assert propagation.long_term_weight == 1.0
        for weight in (1.0, 1.5, 2.0):
            expected = propagation.out_id((weight * long_id + (2 - weight) * short_id) * gate)
            torch.testing.assert_close(read[weight], expected)
    torch.testing.assert_close(read[None], read[1.0])
    assert not torch.allclose(read[1.5], read[1.0])
    with pytest.raises(RuntimeError), student.reading(long_term_weight=0.5):  # restored after an error
        raise RuntimeError("inside")
    assert propagation.long_term_weight == 1.0
    with (
        pytest.raises(ValueError, match="long_term_weight must be in"),
        student.reading(long_term_weight=2.5),
    ):
        pass


@pytest.mark.parametrize(
    "key, value, validation",
    [
        ("refine_iterations", -1, False),
        ("val_refine_iterations", -2, True),
        ("refine_radius", 0, False),
        ("refine_dilation", 0, False),
        ("refine_sigma_space", 0.0, False),
        ("refine_sigma_colour", -0.1, False),
    ],
)
def test_bad_refinement_settings_are_one_line_config_errors(key, value, validation):
    from omegaconf import OmegaConf

    from dvos.utils.errors import ConfigError

    section = OmegaConf.create({"refine_iterations": 1, key: value})
    with pytest.raises(ConfigError, match=rf"eval\.{key} must be .* got {value}"):
        reading_options(section, validation=validation)
    wider = OmegaConf.create({"refine_iterations": 1, "refine_radius": 4, "refine_dilation": 5})
    with pytest.raises(ConfigError, match=r"eval\.refine_dilation must be ≤ eval\.refine_radius = 4, got 5"):
        reading_options(wider)
    with pytest.raises(ValueError, match="dilation"):
        EdgeRefinement(iterations=1, radius=2, dilation=3)


@pytest.mark.parametrize(
    ("soft", "refine_soft", "remembered_soft"),
    [(True, False, False), (True, True, True), (False, False, False), (False, True, False)],
)
def test_student_output_is_edge_refined_and_remembered_refined(soft, refine_soft, remembered_soft):
    """The refined mask is returned and enters the short-term memory: as a one-hot by default
    (`eval.refine_soft_memory=false`), as the filtered probabilities only with both soft options."""
    frames, masks = moving_scene(2)
    student = tiny_student().eval()
    refine = EdgeRefinement(iterations=2, radius=2, dilation=1, sigma_space=2.0, sigma_colour=0.2)
    # magnified 1.5× for the model: the refinement runs at the frame's size, the memory at the model's
    segmenter = StudentSegmenter(
        student, min_size=96, refine=refine, soft_memory=soft, refine_soft_memory=refine_soft
    )
    segmenter.start(frames[0], masks[0], [1, 2, 3])
    memory = segmenter.memory
    prediction = segmenter.step(frames[1])
    with torch.inference_mode():  # the same step by hand
        image = segmenter._image(frames[1])
        logits = student.step(image, memory, num_objects=3, update_memory=False).logits
        probabilities = F.interpolate(torch.softmax(logits[:, :4], 1), size=(64, 96), mode="bilinear")
        guide = torch.from_numpy(frames[1]).permute(2, 0, 1)[None].float() / 255
        refined = bilateral_refine(
            probabilities, guide, radius=2, sigma_space=2.0, sigma_colour=0.2, iterations=2
        )
        remembered = F.interpolate(refined, size=image.shape[-2:], mode="bilinear")
        if not remembered_soft:
            remembered = F.one_hot(remembered.argmax(1), 4).permute(0, 3, 1, 2).float()
        remembered = torch.cat([remembered, torch.zeros(1, student.max_objects - 3, *image.shape[-2:])], 1)
        expected_memory = student.embed_ids(remembered)
    np.testing.assert_array_equal(prediction, refined.argmax(1)[0].numpy())
    assert (prediction != probabilities.argmax(1)[0].numpy()).any()  # the filter moved some pixels
    torch.testing.assert_close(segmenter.memory.previous_id, expected_memory)
    # off: the plain step
    plain = StudentSegmenter(student, min_size=96, refine=EdgeRefinement(iterations=0), soft_memory=soft)
    plain.start(frames[0], masks[0], [1, 2, 3])
    unrefined = StudentSegmenter(student, min_size=96, soft_memory=soft)
    unrefined.start(frames[0], masks[0], [1, 2, 3])
    np.testing.assert_array_equal(plain.step(frames[1]), unrefined.step(frames[1]))


def test_teacher_output_is_edge_refined_when_asked():
    from dvos.models.grid import upsample_probabilities

    frames, masks = moving_scene(2)
    teacher = tiny_teacher()
    refine = EdgeRefinement(iterations=2, radius=2, dilation=1, sigma_space=2.0, sigma_colour=0.2)
    segmenter = TeacherSegmenter(teacher, min_size=96, refine=refine)
    recorded = []

    def record(image, _step=teacher.step):
        output = _step(image)
        recorded.append(output[0])
        return output

    teacher.step = record
    try:
        segmenter.start(frames[0], masks[0], [1, 2, 3])
        prediction = segmenter.step(frames[1])
    finally:
        del teacher.step
    probabilities = upsample_probabilities(recorded[0].exp(), segmenter.input_size, teacher.stride)
    probabilities = F.interpolate(probabilities.float(), size=(64, 96), mode="bilinear", align_corners=False)
    guide = torch.from_numpy(frames[1]).permute(2, 0, 1)[None].float() / 255
    refined = bilateral_refine(
        probabilities, guide, radius=2, sigma_space=2.0, sigma_colour=0.2, iterations=2
    )
    np.testing.assert_array_equal(prediction, refined.argmax(1)[0].numpy())
    assert (prediction != probabilities.argmax(1)[0].numpy()).any()  # the filter moved some pixels


def test_teacher_context_is_bounded_over_200_frames():
    frames, masks = moving_scene(200)
    segmenter = TeacherSegmenter(tiny_teacher(n_recent=3))
    contexts, sizes, rss = [], [], {}

    def watch(index, prediction):
        contexts.append(segmenter.context_size)
        sizes.append(segmenter.memory_bytes())
        if index in (20, 199):
            rss[index] = current_rss_mb()

    segment_sequence(segmenter, frames, masks[0], on_frame=watch)
    assert max(contexts) == 1 + 3 and contexts[-1] == 4
    assert len(set(sizes[4:])) == 1  # full context from frame 3 on: constant
    assert rss[199] - rss[20] < 30, f"RSS grew by {rss[199] - rss[20]:.1f} MB over 180 frames"


# --------------------------------------------------------------------------------------------
# Object ids
# --------------------------------------------------------------------------------------------
def test_object_id_map_is_contiguous_and_round_trips():
    ids = ObjectIdMap()
    assert ids.add([2, 5]) == [1, 2]
    assert ids.add([7, 2]) == [3, 1]
    mask = np.array([[0, 2, 5], [7, 255, 9]], np.uint8)
    model = ids.to_model(mask)
    assert model.tolist() == [[0, 1, 2], [3, 0, 0]]
    assert ids.to_sequence(model).tolist() == [[0, 2, 5], [7, 0, 0]]
    assert ids.to_model(mask, only=[7]).tolist() == [[0, 0, 0], [3, 0, 0]]
    with pytest.raises(DvosError):
        ids.add([255])


@pytest.mark.parametrize("kind", ["student", "teacher", "copy"])
def test_three_objects_with_sparse_ids_give_only_valid_ids(kind):
    frames, masks = moving_scene(6, object_ids=(2, 5, 7))
    masks[0, :2, :2] = 255  # void in the first mask is not an object
    segmenter = {
        "student": lambda: StudentSegmenter(tiny_student()),
        "teacher": lambda: TeacherSegmenter(tiny_teacher()),
        "copy": CopySegmenter,
    }[kind]()
    predictions = []
    segment_sequence(segmenter, frames, masks[0], on_frame=lambda i, p: predictions.append(p.copy()))
    assert len(predictions) == 6
    for prediction in predictions:
        assert prediction.shape == (64, 96) and prediction.dtype == np.uint8
        assert set(np.unique(prediction)) <= {0, 2, 5, 7}
    assert set(np.unique(predictions[0])) == {0, 2, 5, 7}


def test_too_many_objects_for_the_student_is_a_one_line_error():
    frames, masks = moving_scene(2, object_ids=(1, 2, 3))
    with pytest.raises(DvosError, match="at most 2"):
        segment_sequence(StudentSegmenter(tiny_student(max_objects=2)), frames, masks[0])


# --------------------------------------------------------------------------------------------
# Objects appearing later (YouTube-VOS)
# --------------------------------------------------------------------------------------------
def youtubevos_tree(root: Path, num_frames: int = 16, late_from: int = 10) -> Path:
    """A YouTube-VOS valid-style tree: object 2 from frame 0, object 4 from frame `late_from`; masks
    only where objects first appear, holding only those objects."""
    frames, masks = moving_scene(num_frames, object_ids=(2,), late=(4, late_from))
    split = root / "valid"
    write_frame_folder(split / "JPEGImages" / "clip", frames, ext=".png")
    meta = {
        "videos": {"clip": {"objects": {"2": {"frames": ["00000"]}, "4": {"frames": [f"{late_from:05d}"]}}}}
    }
    write_mask(split / "Annotations" / "clip" / "00000.png", np.where(masks[0] == 2, 2, 0).astype(np.uint8))
    write_mask(
        split / "Annotations" / "clip" / f"{late_from:05d}.png",
        np.where(masks[late_from] == 4, 4, 0).astype(np.uint8),
    )
    (split / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("kind", ["copy", "teacher", "student"])
def test_object_appearing_at_frame_10_is_segmented_from_then_on(tmp_path, kind):
    (sequence,) = youtubevos_sequences(youtubevos_tree(tmp_path / "ytvos"), split="valid")
    assert sequence.first_frame == {2: 0, 4: 10}
    segmenter = {
        "copy": CopySegmenter,
        "teacher": lambda: TeacherSegmenter(tiny_teacher(encoder=ColourEncoder())),
        "student": lambda: StudentSegmenter(tiny_student()),
    }[kind]()
    predictions = []
    sizes = []

    def watch(index, prediction):
        predictions.append(prediction.copy())
        sizes.append(segmenter.memory_bytes())

    with MaskWriter(tmp_path / "out") as writer:
        stats = segment_sequence(segmenter, sequence, writer=writer, on_frame=watch)
    assert stats.frames == 16
    assert not any((p == 4).any() for p in predictions[:10])
    assert (predictions[10] == 4).sum() == (sequence.load_mask(10) == 4).sum()  # given mask pasted
    if kind != "student":  # a random student need not propagate it, but must take it in
        assert all((p == 4).any() for p in predictions[10:])
        assert all((p == 2).any() for p in predictions)
    if kind == "student":  # frame 10 joins the long-term memory: three maps more, then constant
        frame_bytes = 3 * segmenter.memory.reference_key.numel() * 4
        assert set(sizes[:10]) == {sizes[0]} and set(sizes[10:]) == {sizes[0] + frame_bytes}
    written = sorted(path.name for path in (tmp_path / "out" / "clip").iterdir())
    assert written == [f"{t:05d}.png" for t in range(16)]


def late_objects_tree(root: Path, appearances: dict[int, int], num_frames: int) -> Path:
    """A YouTube-VOS valid-layout tree of one video: object 1 from frame 0 and object `id` from
    frame `appearances[id]` on (a box of its own colour each), masks only where objects first
    appear."""
    frames, masks = moving_scene(num_frames, object_ids=(1,), seed=3)
    rng = np.random.default_rng(4)
    for number, (object_id, first) in enumerate(sorted(appearances.items())):
        top, left = 36, 4 + 22 * number
        colour = rng.integers(120, 255, size=3).astype(np.uint8)
        frames[first:, top : top + 12, left : left + 16] = colour
        masks[first:, top : top + 12, left : left + 16] = object_id
    return make_youtubevos_tree(root, "valid", {"clip": (frames, masks)}, first_appearance_only=True)


def test_late_object_joins_the_long_term_memory_beside_the_reference(tmp_path):
    (sequence,) = youtubevos_sequences(late_objects_tree(tmp_path / "ytvos", {2: 4}, 7), split="valid")
    assert sequence.first_frame == {1: 0, 2: 4}
    student = tiny_student()
    segmenter = StudentSegmenter(student, max_long_term=3)
    memories = {}
    segment_sequence(
        segmenter, sequence, on_frame=lambda index, p: memories.setdefault(index, segmenter.memory)
    )
    reference = memories[0]
    for index in range(4, 7):  # after frame 4: the annotated reference of object 1 is still held
        memory = memories[index]
        assert memory.reference_key is reference.reference_key
        assert memory.reference_id is reference.reference_id
        assert len(memory.added_long_term) == 1
    assert all(not memories[index].added_long_term for index in range(4))
    # ... and read: the next frame's prediction depends on the reference frame's ID embedding, and
    # its long-term read attends over the points of both long-term frames at once.
    memory = memories[6]
    image = torch.from_numpy(sequence.load_frame(6)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        kept = student.step(image, memory, num_objects=2, return_attention=True)
        blanked = dataclasses.replace(memory, reference_id=torch.zeros_like(memory.reference_id))
        without = student.step(image, blanked, num_objects=2)
    assert (kept.logits - without.logits).abs().max() > 1e-3
    points = kept.aux["short_term"].attention.shape[-1]
    assert kept.aux["long_term"].attention.shape[-1] == 2 * points
    torch.testing.assert_close(
        kept.aux["long_term"].attention.sum(-1), torch.ones_like(kept.aux["long_term"].attention[..., 0])
    )


def test_long_term_memory_stays_bounded_dropping_the_oldest_added_frame(tmp_path):
    appearances = {2: 2, 3: 4, 4: 6}
    (sequence,) = youtubevos_sequences(late_objects_tree(tmp_path / "ytvos", appearances, 9), split="valid")
    segmenter = StudentSegmenter(tiny_student(), max_long_term=3)
    added, sizes = {}, {}

    def watch(index, prediction):
        memory = segmenter.memory
        added[index] = [frame[0] for frame in memory.added_long_term]  # the added frames' keys
        sizes[index] = segmenter.memory_bytes()

    segment_sequence(segmenter, sequence, on_frame=watch)
    assert [len(added[t]) for t in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    # at frame 6 the frame of frame 2 (oldest added) left; those of frames 4 and 6 stay
    assert added[6][0] is added[4][1] and added[6][1] is not added[4][0]
    # the memory never holds more than the reference, max_long_term − 1 added frames and the previous
    # frame: 4 frames of three d × h × w maps, plus the id permutation
    memory = segmenter.memory
    frame_bytes = 3 * memory.reference_key.numel() * 4
    permutation_bytes = memory.id_permutation.numel() * memory.id_permutation.element_size()
    assert max(sizes.values()) == 4 * frame_bytes + permutation_bytes
    with pytest.raises(DvosError, match="max_long_term"):
        StudentSegmenter(tiny_student(), max_long_term=0)
    from omegaconf import OmegaConf

    from dvos.config import load_config
    from dvos.utils.errors import ConfigError

    assert long_term_bound(load_config([]).eval) == long_term_bound(OmegaConf.create({})) == 4
    assert long_term_bound(load_config(["eval.max_long_term=2"]).eval) == 2
    with pytest.raises(ConfigError, match=r"eval\.max_long_term must be >= 1 .* got 0"):
        long_term_bound(OmegaConf.create({"max_long_term": 0}))


def test_max_long_term_one_replaces_the_reference(tmp_path):
    (sequence,) = youtubevos_sequences(late_objects_tree(tmp_path / "ytvos", {2: 3}, 5), split="valid")
    segmenter = StudentSegmenter(tiny_student(), max_long_term=1)
    memories = {}
    segment_sequence(
        segmenter, sequence, on_frame=lambda index, p: memories.setdefault(index, segmenter.memory)
    )
    assert memories[3].reference_key is not memories[0].reference_key  # the one slot moved to frame 3
    assert memories[3].reference_key is memories[3].previous_key and not memories[4].added_long_term


def test_frames_before_the_first_object_are_background(tmp_path):
    frames, masks = moving_scene(5, object_ids=(3,))
    predictions = []
    segment_sequence(
        CopySegmenter(), frames, {2: masks[2]}, on_frame=lambda i, p: predictions.append(p.copy())
    )
    assert not predictions[0].any() and not predictions[1].any()
    assert (predictions[2] == 3).any() and (predictions[4] == 3).any()


# --------------------------------------------------------------------------------------------
# Names, sizes, palettes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_size, min_size", [(None, None), (48, None), (None, 96)])
def test_outputs_are_named_and_sized_like_the_inputs_with_the_first_palette(tmp_path, max_size, min_size):
    frames, masks = moving_scene(5, height=70, width=98)
    folder = tmp_path / "frames"
    folder.mkdir()
    names = [f"img_{7 + 3 * t:04d}" for t in range(5)]
    for name, frame in zip(names, frames):
        Image.fromarray(frame).save(folder / f"{name}.png")
    palette = list(np.random.default_rng(3).integers(0, 256, 768))
    write_mask(tmp_path / "first.png", masks[0], palette)
    first, first_palette = read_mask(tmp_path / "first.png")
    reader = open_video(folder)
    segmenter = StudentSegmenter(tiny_student(), max_size=max_size, min_size=min_size)
    with MaskWriter(tmp_path / "out") as writer:
        segment_sequence(segmenter, reader, first, writer=writer, flat=True, palette=first_palette)
    assert segmenter.input_size == {None: (70, 98), 48: (34, 48)}[max_size] if min_size is None else (96, 134)
    for name in names:
        with Image.open(tmp_path / "out" / f"{name}.png") as image:
            assert image.mode == "P" and image.size == (98, 70)
            assert image.getpalette()[:768] == palette
    assert sorted(p.stem for p in (tmp_path / "out").iterdir()) == names


def test_model_size_caps_the_long_side():
    assert model_size((480, 854), None) == (480, 854)
    assert model_size((480, 854), 240) == (135, 240)
    assert model_size((854, 480), 240) == (240, 135)
    assert model_size((100, 120), 240) == (100, 120)


def test_model_size_upsamples_a_short_side_below_min_size_and_the_cap_wins():
    assert model_size((240, 432), None, 360) == (360, 648)
    assert model_size((432, 240), None, 360) == (648, 360)
    assert model_size((480, 854), None, 360) == (480, 854)  # already large enough
    assert model_size((240, 432), 540, 360) == (300, 540)  # both: the long-side cap wins
    with pytest.raises(DataError, match="min_size"):
        StudentSegmenter(tiny_student(), min_size=8)


def test_mask_of_another_size_is_a_one_line_error():
    frames, masks = moving_scene(3)
    with pytest.raises(DvosError, match="64×96") as info:
        segment_sequence(CopySegmenter(), frames, masks[0][:, :50])
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------
def test_writer_writes_palette_pngs_atomically(tmp_path):
    palette = default_palette()
    with MaskWriter(tmp_path / "out", maxsize=2) as writer:
        writer.open_sequence("seq", palette)
        for t in range(10):
            writer.put("seq", f"{t:05d}", np.full((8, 12), t % 3, np.uint8))
    assert writer.written == 10
    files = sorted(os.listdir(tmp_path / "out" / "seq"))
    assert files == [f"{t:05d}.png" for t in range(10)]  # no temporary names left
    mask, read_palette = read_mask(tmp_path / "out" / "seq" / "00004.png")
    assert (mask == 1).all() and read_palette[:768] == palette


def test_writer_reraises_its_threads_error(tmp_path):
    writer = MaskWriter(tmp_path / "out", maxsize=1)
    writer.put(None, "bad", np.zeros((2, 3, 4), np.uint8))  # not H × W: fails in the thread
    with pytest.raises(ValueError, match="H × W"):
        for t in range(50):
            writer.put(None, f"{t:05d}", np.zeros((4, 4), np.uint8))
            time.sleep(0.01)
    writer.close()  # the error was reported once; closing is clean

    writer = MaskWriter(tmp_path / "out2")
    writer.put(None, "bad", np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="H × W"):
        writer.close()


def test_unwritable_output_is_a_one_line_error_before_any_frame(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DvosError) as info:
        MaskWriter(blocker / "out")
    assert "\n" not in str(info.value) and "out" in str(info.value)

    frames, masks = moving_scene(3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "video").write_text("a file where the sequence folder goes")
    seen = []
    with MaskWriter(tmp_path / "out") as writer, pytest.raises(DvosError) as info:
        segment_sequence(
            CopySegmenter(), frames, masks[0], writer=writer, on_frame=lambda i, p: seen.append(i)
        )
    assert not seen and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def test_load_student_from_a_lightning_checkpoint_prefers_ema_and_its_config(tmp_path):
    trained = tiny_student(d_model=16, decoder_dim=8)
    ema = tiny_student(d_model=16, decoder_dim=8)
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.add_(1.0)
    state = {f"student.{k}": v for k, v in trained.state_dict().items()}
    state.update({f"student_ema.{k}": v for k, v in ema.state_dict().items()})
    config = {"model": {**TINY_MODEL, "d_model": 16, "decoder_dim": 8}, "seed": 0}
    path = tmp_path / "runs" / "r1" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "dvos_config": config, "epoch": 3, "global_step": 12}, path)

    # The model config given says d_model=32: the checkpoint's own config wins.
    student, description = load_student(path, TINY_MODEL)
    assert student.d_model == 16 and not student.training
    assert "student_ema" in description and "global_step 12" in description
    for key, value in ema.state_dict().items():
        assert torch.equal(student.state_dict()[key], value)
    assert find_latest_checkpoint(tmp_path / "runs") == path

    plain = tmp_path / "plain.pt"
    torch.save(trained.state_dict(), plain)
    student, description = load_student(plain, {**TINY_MODEL, "d_model": 16, "decoder_dim": 8})
    assert torch.equal(student.id_embedding.weight, trained.id_embedding.weight)


def test_newest_run_checkpoint_is_found_by_mtime(tmp_path):
    assert find_latest_checkpoint(tmp_path / "nothing") is None
    paths = []
    for index, name in enumerate(["b-run", "a-run"]):
        path = tmp_path / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + index, 1000 + index))
        paths.append(path)
    assert find_latest_checkpoint(tmp_path) == paths[1]


def test_no_checkpoint_means_a_random_student_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        student, description = load_student(None, TINY_MODEL, runs_dir=tmp_path / "runs")
    assert "randomly initialised" in description
    assert (
        "no trained checkpoint found under" in caplog.text
        and "predictions will be meaningless" in caplog.text
    )


def test_bad_checkpoint_files_are_one_line_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, other)
    wrong = tmp_path / "wrong.pt"
    torch.save({"encoder.nothing": torch.zeros(2)}, wrong)
    for path in (garbage, other, wrong, tmp_path / "missing.ckpt"):
        with pytest.raises(DvosError) as info:
            load_student(path, TINY_MODEL)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Overlay
# --------------------------------------------------------------------------------------------
def test_overlay_video_has_every_frame_and_even_size(tmp_path):
    from dvos.data.readers import open_video

    frames, masks = moving_scene(7, height=65, width=97)
    path = tmp_path / "overlay.mp4"
    count = write_overlay_video(path, iter(frames), iter(masks), default_palette(), fps=10)
    assert count == 7
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.mp4"]  # no temporary file left
    with open_video(path) as video:
        assert len(video) == 7
        first = video[0]
    assert first.shape == (66, 98, 3)
    # objects are tinted: the first object's box is redder than the raw frame's background
    assert first[:65, :97][masks[0] == 1][:, 0].mean() > 150


DEAOT_LAYERS = dict(
    num_layers=2,
    num_heads=1,
    num_groups=1,
    key_dim=16,
    expand_ratio=2.0,
    dw_kernel=3,
    gate_id=False,
    id_norm=True,
    ffn_ratio=0.0,
    short_term_read="local",
    local_window=3,
)


def test_stacked_deaot_layers_run_through_the_engine_with_a_late_object(tmp_path):
    """Two DeAOT-form layers (local short-term read): the engine walks a YouTube-VOS clip whose
    object 2 appears at frame 4; the memory holds both layers' entries and stays bounded."""
    (sequence,) = youtubevos_sequences(late_objects_tree(tmp_path / "ytvos", {2: 4}, 7), split="valid")
    student = tiny_student(**DEAOT_LAYERS)
    segmenter = StudentSegmenter(student, max_long_term=3)
    predictions, sizes = [], []

    def watch(index, prediction):
        predictions.append(prediction)
        sizes.append(segmenter.memory_bytes())

    stats = segment_sequence(segmenter, sequence, on_frame=watch)
    assert stats.frames == 7 and np.array_equal(predictions[0], sequence.load_mask(0))
    assert (predictions[4] == 2).sum() == (sequence.load_mask(4) == 2).sum()  # given mask pasted
    memory = segmenter.memory
    assert memory.reference_key.shape[1] == 2 * 16 and memory.reference_id.shape[1] == 2 * 64
    assert len(memory.added_long_term) == 1
    assert set(sizes[:4]) == {sizes[0]} and len(set(sizes[4:])) == 1 and sizes[4] > sizes[0]
