"""The W&B / on-disk picture callbacks: drawing helpers, the attention pictures of a tiny real student
and teacher inside a Lightning fit, the validation table and overlays, and failures that only warn."""

import dataclasses
import io
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers_data import square_and_disc_clip
from helpers_models import tiny_student_and_teacher
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import nn

import dvos.callbacks.attention as attention_module
import dvos.callbacks.vos_results as vos_module
from dvos.callbacks import AttentionPictures, PictureWarning, VOSResults, render
from dvos.callbacks.attention import (
    choose_queries,
    eval_mode,
    group_weights,
    memory_to_image,
    render_attention,
    student_padding,
    teacher_target_rows,
)
from dvos.callbacks.vos_results import gather_objects, render_overlays, table_row
from dvos.models.student import DeformableStudent, labels_to_onehot

HEIGHT, WIDTH, FRAMES = 88, 120, 3  # not multiples of 16: the student pads (4 px each side)
MAX_OBJECTS = 3


# ---------------------------------------------------------------------------------------- fixtures
class ClipOutputs(NamedTuple):
    """The fields of `dvos.lit.distill.ClipOutputs` the callbacks read."""

    reference_ids: torch.Tensor
    num_objects: torch.Tensor
    student_logits: list
    student_aux: list
    teacher_logits: torch.Tensor
    teacher_attention: list
    teacher_token_shape: tuple
    teacher_stride: int


class TinyDistill(pl.LightningModule):
    """The LightningModule interface the callbacks code against, with a tiny real student and teacher.

    `forward_clip` really runs both (pseudo-objects from the teacher's clustering, as the distillation
    module does); the learning rate is 0 so pictures at different steps see the same weights.
    """

    def __init__(self, *, num_segments: int = 3) -> None:
        super().__init__()
        self.student, teacher = tiny_student_and_teacher(MAX_OBJECTS)
        object.__setattr__(self, "teacher", teacher)  # frozen, not a sub-module (as in DistillationModule)
        self.num_segments = num_segments
        self.val_sequence_results: list[dict[str, Any]] = []
        self.modes: list[bool] = []  # student.training at every forward_clip call

    def forward_clip(self, frames: torch.Tensor, *, return_attention: bool = True) -> ClipOutputs:
        self.modes.append(self.student.training)
        with torch.no_grad():
            teacher_out = self.teacher.propagate_clip(frames, None, num_segments=self.num_segments)
        reference_ids = teacher_out["reference_ids"].clamp(max=MAX_OBJECTS)
        num_objects = reference_ids.flatten(1).amax(dim=1)
        logits, aux = self.student.segment_clip(
            frames,
            labels_to_onehot(reference_ids, MAX_OBJECTS + 1),
            num_objects=num_objects,
            return_attention=return_attention,
        )
        return ClipOutputs(
            reference_ids,
            num_objects,
            logits,
            aux,
            teacher_out["logits"],
            teacher_out["attention"],
            tuple(teacher_out["token_shape"]),
            int(teacher_out["stride"]),
        )

    def training_step(self, batch, batch_idx):
        outputs = self.forward_clip(batch["frames"])
        return sum(logits.float().square().mean() for logits in outputs.student_logits) * 1e-3

    def on_validation_epoch_start(self) -> None:
        self.val_sequence_results = []

    def validation_step(self, batch, batch_idx):
        self.val_sequence_results.append(
            sequence_result(f"seq{int(batch['index'][0])}", seed=int(batch["index"][0]))
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def make_clip(seed: int = 0) -> torch.Tensor:
    """T × 3 × H × W in [0, 1]: a noisy two-tone background, a red square and a blue disc moving."""
    return square_and_disc_clip(
        FRAMES, HEIGHT, WIDTH, square=(20, 20, 30, 4, 2), disc=(90, 60, 14, -3), seed=seed
    )


def sequence_result(name: str, *, seed: int = 0) -> dict[str, Any]:
    """A `val_sequence_results` entry with two sample frames (square object 1, GT shifted by 3 px)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in (3, 7):
        image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        prediction = np.zeros((60, 80), np.uint8)
        prediction[10:40, 20:50] = 1
        truth = np.zeros((60, 80), np.uint8)
        truth[13:43, 23:53] = 1
        samples.append(
            {"frame_index": index, "image": image, "prediction": prediction, "ground_truth": truth}
        )
    return {
        "sequence": name,
        "J": 0.5,
        "F": 0.7,
        "J&F": 0.6,
        "num_objects": 1,
        "fps": float("inf"),
        "samples": samples,
    }


def loaders():
    train = [{"frames": make_clip(seed)} for seed in range(4)]
    val = [{"index": index} for index in range(3)]
    collate = torch.utils.data.default_collate
    return (
        torch.utils.data.DataLoader(train, batch_size=2, collate_fn=collate),
        torch.utils.data.DataLoader(val, batch_size=1, collate_fn=collate),
    )


def make_trainer(root: Path, callbacks, logger) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        default_root_dir=str(root),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )


def set_offsets(
    student: DeformableStudent, long_term: tuple[float, float], short_term: tuple[float, float]
) -> None:
    """Make both offset networks output a constant (Δx, Δy) in cells: a zero 1 × 1 conv plus a bias."""
    for branch, target in (
        (student.propagation.long_term, long_term),
        (student.propagation.short_term, short_term),
    ):
        network = branch.offset_network
        old = network.to_offsets
        conv = nn.Conv2d(old.in_channels, 2, 1, bias=True)
        nn.init.zeros_(conv.weight)
        with torch.no_grad():
            conv.bias.copy_(torch.atanh(torch.tensor(target) / network.offset_range))
        network.to_offsets = conv


def run_clip(module: TinyDistill, clip: torch.Tensor) -> ClipOutputs:
    with eval_mode(module), torch.no_grad():
        return module.forward_clip(clip[None])


def pixel(image: np.ndarray, point) -> np.ndarray:
    return image[int(round(point[1])), int(round(point[0]))].astype(int)


# ---------------------------------------------------------------------------------------- render helpers
def test_colorize_and_overlay_use_the_palette():
    ids = np.array([[0, 1], [2, 255]], np.uint8)
    colours = render.colorize_ids(ids)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert colours[0, 1].tolist() == [128, 0, 0] and colours[1, 0].tolist() == [0, 128, 0]  # DAVIS colours
    image = np.full((2, 2, 3), 100, np.uint8)
    tinted = render.overlay_ids(image, ids, alpha=0.5)
    assert tinted[0, 0].tolist() == [100, 100, 100]  # background untouched
    assert tinted[0, 1].tolist() == [114, 50, 50]


def test_outlines_follow_the_object_border():
    ids = np.zeros((40, 40), np.uint8)
    ids[10:30, 10:30] = 2
    out = render.draw_outlines(np.zeros((40, 40, 3), np.uint8), ids, color=(255, 255, 255))
    assert out[10, 20].sum() > 0 and out[29, 20].sum() > 0  # border pixels
    assert out[20, 20].sum() == 0 and out[2, 2].sum() == 0  # inside and outside stay


def test_dots_are_centred_where_asked_with_opacity():
    canvas = np.zeros((30, 40, 3), np.uint8)
    out = render.draw_dots(
        canvas,
        np.array([[10.25, 5.0], [30.0, 20.0]]),
        [(255, 0, 0), (0, 255, 0)],
        radii=3,
        opacities=[1.0, 0.5],
    )
    assert out[5, 10].tolist() == [255, 0, 0]
    assert out[20, 30].tolist() == [0, 128, 0]
    assert out[5, 20].sum() == 0 and canvas.sum() == 0  # input untouched
    # points outside the image are skipped, not errors
    render.draw_dots(canvas, np.array([[-50.0, -50.0], [np.nan, 3.0]]), (1, 2, 3))


def test_arrows_heatmap_and_colormap():
    canvas = np.zeros((40, 60, 3), np.uint8)
    out = render.draw_arrows(canvas, np.array([[10.0, 20.0]]), np.array([[50.0, 20.0]]), [(0, 255, 255)])
    assert out[20, 30, 0] == 0 and out[20, 30, 1:].min() > 200  # along the (anti-aliased) shaft
    still = render.draw_arrows(canvas, np.array([[10.0, 20.0]]), np.array([[10.0, 20.0]]), [(0, 255, 255)])
    assert still[20, 10].sum() > 0 and still[20, 30].sum() == 0  # zero length: only the start dot
    colours = render.colormap_colors(np.array([0.0, 1.0, 2.0]))
    expected = cv2.applyColorMap(np.array([[0], [128], [255]], np.uint8), render.COLORMAP)[:, 0, ::-1]
    assert np.abs(colours.astype(int) - expected.astype(int)).max() <= 2
    # empty inputs: OpenCV's applyColorMap would kill the process with SIGFPE
    assert render.colormap_colors(np.zeros(0)).shape == (0, 3)
    assert render.heatmap(np.zeros((1, 0))).shape == (1, 0, 3)
    heat = render.heatmap(np.array([[0.0, 1.0]]), size=(4, 8))
    assert heat.shape == (4, 8, 3) and heat[0, 0].tolist() != heat[0, 7].tolist()
    blended = render.blend_heatmap(
        np.full((4, 8, 3), 50, np.uint8), np.repeat(np.array([[0.0] * 4 + [1.0] * 4]), 4, 0)
    )
    assert blended[0, 0].tolist() == [50, 50, 50]  # zero attention leaves the frame clear
    assert blended[0, 7].tolist() != [50, 50, 50]


def test_tile_layout_and_titles():
    panels = [
        [np.full((10, 20, 3), 200, np.uint8), np.full((8, 20, 3), 100, np.uint8)],
        [None, np.full((10, 16, 3), 50, np.uint8)],
    ]
    grid = render.tile(panels, [["a", "b"], ["c", "a very long title that does not fit"]], header="head")
    gap, title = render.GAP, render.TITLE_HEIGHT
    assert grid.shape == (title + gap + 2 * (title + 10 + gap), gap + 2 * (20 + gap), 3)
    x, y = render.panel_origin(1, 1, (10, 20), header=True)
    assert grid[y, x].tolist() == [50, 50, 50] and grid[y - 1, x].tolist() != [50, 50, 50]
    assert (grid[:title] != render.BACKGROUND).any()  # the header's letters


def test_save_png_is_atomic_and_round_trips(tmp_path):
    picture = np.random.default_rng(0).integers(0, 255, (7, 9, 3), dtype=np.uint8)
    path = render.save_png(tmp_path / "sub" / "p.png", picture)
    assert np.array_equal(np.array(Image.open(path)), picture)
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.png"]


# ---------------------------------------------------------------------------------------- geometry
def test_memory_to_image_and_query_choice():
    pad, grid = student_padding((HEIGHT, WIDTH))
    assert pad == (4, 4, 4, 4) and grid == (6, 8)
    assert memory_to_image(np.array([0.0, 0.0]), pad).tolist() == [3.5, 3.5]
    assert memory_to_image(np.array([2.0, 1.0]), pad).tolist() == [35.5, 19.5]
    ids = np.zeros((HEIGHT, WIDTH), np.uint8)
    ids[20:50, 20:50] = 2  # largest object
    ids[60:70, 90:100] = 1
    queries = choose_queries(ids, 3, pad, grid)
    assert [q.label for q in queries] == ["object 2", "object 1", "background"]
    assert queries[0].cell == ((35 + 4) // 16, (35 + 4) // 16)
    assert ids[int(queries[2].point[1]), int(queries[2].point[0])] == 0
    assert len({q.token for q in choose_queries(np.zeros_like(ids), 5, pad, grid)}) == 5  # fillers, distinct


# ---------------------------------------------------------------------------------------- attention pictures
def test_dots_and_offset_arrows_follow_the_sampling_positions():
    module = TinyDistill()
    clip = make_clip(0)
    zero = render_attention(clip, run_clip(module, clip), num_queries=2)
    long_shift, short_shift = (1.5, -1.0), (-0.5, 2.0)
    set_offsets(module.student, long_shift, short_shift)
    outputs = run_clip(module, clip)
    rendering = render_attention(clip, outputs, num_queries=2)
    aux = outputs.student_aux[-1]
    for name, shift in (("long_term", long_shift), ("short_term", short_shift)):
        branch = aux[name]
        expected = branch.reference_px[None, None] + torch.tensor(shift)
        assert torch.allclose(branch.positions_px, expected.expand_as(branch.positions_px), atol=1e-4)

    # Layout: 2 rows × 5 columns under a header line.
    panel_h, panel_w = rendering.panel_size
    gap, title = render.GAP, render.TITLE_HEIGHT
    assert panel_w == (1600 - 6 * gap) // 5 and panel_h == round(HEIGHT * panel_w / WIDTH)
    assert rendering.grid.shape == (title + gap + 2 * (title + panel_h + gap), gap + 5 * (panel_w + gap), 3)
    assert rendering.grid.shape[1] <= 1600

    # The heaviest point of query 0 is drawn on top, in its group's colour, where positions_px says.
    query = rendering.queries[0]
    for col, name in ((1, "long_term"), (2, "short_term")):
        branch = aux[name]
        weights = group_weights(branch.attention[0], query.token, branch.positions_px.shape[1])
        group, point = np.unravel_index(int(np.argmax(weights)), weights.shape)
        position = memory_to_image(branch.positions_px[0, group, point].numpy(), rendering.pad)
        where = rendering.grid_point(0, col, tuple(position))
        assert pixel(rendering.grid, where).tolist() == list(render.GROUP_COLORS[group])

    # The teacher panels show the CKA targets of the student's reads: per frame, rows summing to 1.
    for frame_index in (0, FRAMES - 2):
        rows = teacher_target_rows(
            outputs.teacher_attention[-1], frame_index, (HEIGHT, WIDTH), outputs.teacher_stride, 0
        )
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]))
    # A teacher row with no weight draws no heat (and does not crash OpenCV, whose applyColorMap dies
    # of SIGFPE on empty input).
    silent = [None] + [
        dataclasses.replace(a, frame_weights=torch.zeros_like(a.frame_weights))
        for a in outputs.teacher_attention[1:]
    ]
    quiet = render_attention(clip, outputs._replace(teacher_attention=silent), num_queries=2)
    x0, y0 = (round(v) for v in quiet.grid_point(0, 3, (-0.5, -0.5)))
    teacher_quiet = quiet.grid[y0 : y0 + panel_h, x0 : x0 + panel_w].astype(int)
    teacher_loud = rendering.grid[y0 : y0 + panel_h, x0 : x0 + panel_w].astype(int)
    changed = np.abs(teacher_quiet - teacher_loud).sum(-1) > 0
    assert changed.any()  # the heat and its rings are gone
    # the frame itself is the same (the target row averages the teacher rows of a whole student cell:
    # a wider heat than one teacher row's)
    assert changed.mean() < 0.5

    # Offset arrows: zero offsets draw only the grid dots; known offsets draw shafts to positions_px.
    assert zero.offsets.shape == rendering.offsets.shape
    assert not np.array_equal(zero.offsets, rendering.offsets)
    branch = aux["long_term"]
    start = memory_to_image(branch.reference_px[0].numpy(), rendering.pad)
    end = memory_to_image(branch.positions_px[0, 0, 0].numpy(), rendering.pad)
    middle = rendering.offsets_point(0, tuple((start + end) / 2))
    # one scale for both panels: 0 .. the longest offset (the short-term one)
    lengths = np.array([math.hypot(*long_shift), math.hypot(*short_shift)])
    arrow = render.colormap_colors(lengths, vmax=lengths.max(), levels=render.LINE_LEVELS)[0].astype(int)
    assert np.abs(pixel(rendering.offsets, middle) - arrow).max() < 40
    assert np.abs(pixel(zero.offsets, middle) - arrow).max() > 80


def test_fit_with_wandb_writes_and_logs_pictures(tmp_path):
    import wandb

    module = TinyDistill()
    pictures = AttentionPictures(every_n_steps=2, num_queries=3)
    results = VOSResults(num_overlays=2)
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), project="dvos-test")
    trainer = make_trainer(tmp_path, [pictures, results], logger)
    train, val = loaders()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PictureWarning)  # any drawing failure fails the test
            trainer.fit(module, train, val)
        run_dir = Path(logger.experiment.dir)
    finally:
        wandb.finish()
    assert trainer.global_step == 2
    # train at step 1 (training mode), picture at the first batch (eval), train, picture at step 2
    assert module.modes[:4] == [True, False, True, False]
    assert module.student.training and not module.teacher.training

    folder = tmp_path / "pictures"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "attention-offsets-step000001.png",
        "attention-offsets-step000002.png",
        "attention-step000001.png",
        "attention-step000002.png",
        "val-step000002.png",  # not for the sanity check at step 0
    ]
    grid = np.array(Image.open(folder / "attention-step000002.png"))
    panel_w = (1600 - 6 * render.GAP) // 5
    panel_h = round(HEIGHT * panel_w / WIDTH)
    assert grid.shape == (
        render.TITLE_HEIGHT + render.GAP + 3 * (render.TITLE_HEIGHT + panel_h + render.GAP),
        render.GAP + 5 * (panel_w + render.GAP),
        3,
    )
    assert np.array_equal(grid, pictures.last_rendering.grid)
    assert grid.std() > 20  # not blank

    table = json.loads((tmp_path / "val-step000002.json").read_text())
    assert table["columns"] == ["sequence", "J", "F", "J&F", "objects", "fps"]
    assert [row["sequence"] for row in table["sequences"]] == ["seq0", "seq1", "seq2"]
    assert table["sequences"][0] == {
        "sequence": "seq0",
        "J": 0.5,
        "F": 0.7,
        "J&F": 0.6,
        "objects": 1,
        "fps": None,
    }
    overlay = np.array(Image.open(folder / "val-step000002.png"))
    assert overlay.shape[0] > 2 * 60  # two sequences shown, one row each

    media = run_dir / "media"
    logged = sorted(p.relative_to(media).as_posix() for p in media.rglob("*") if p.is_file())
    assert any(name.startswith("images/attention/pictures_") and name.endswith(".png") for name in logged)
    assert any(name.startswith("images/attention/offsets_") for name in logged)
    assert sum(name.startswith("images/val/overlays_") for name in logged) == 4  # 2 sequences × 2 frames
    assert any(name.startswith("images/mask/") for name in logged)  # the prediction / ground-truth masks
    assert any(name.startswith("table/val/sequences_") for name in logged)


def test_drawing_failures_warn_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(attention_module, "render_attention", broken)
    monkeypatch.setattr(vos_module, "render_overlays", broken)
    module = TinyDistill()
    pictures, results = AttentionPictures(every_n_steps=1), VOSResults()
    trainer = make_trainer(tmp_path, [pictures, results], logger=False)
    train, val = loaders()
    with pytest.warns(PictureWarning) as caught:
        trainer.fit(module, train, val)
    assert trainer.global_step == 2
    messages = [str(w.message) for w in caught if issubclass(w.category, PictureWarning)]
    assert len(messages) == 2  # one per callback, though the attention one failed twice
    assert any("AttentionPictures" in m and "no ink" in m for m in messages)
    assert any("VOSResults" in m for m in messages)
    assert (tmp_path / "val-step000002.json").is_file()  # written before the failing picture
    assert not (tmp_path / "pictures").exists() or not any((tmp_path / "pictures").glob("attention-*"))


def test_disabled_callbacks_do_nothing(tmp_path):
    module = TinyDistill()
    trainer = make_trainer(
        tmp_path, [AttentionPictures(enabled=False), VOSResults(enabled=False)], logger=False
    )
    train, val = loaders()
    trainer.fit(module, train, val)
    assert not (tmp_path / "pictures").exists()
    assert not list(tmp_path.glob("val-step*.json"))
    assert module.modes == [True, True]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionPictures(every_n_steps=0)
    with pytest.raises(ValueError, match="num_queries"):
        AttentionPictures(num_queries=0)
    with pytest.raises(ValueError, match="num_overlays"):
        VOSResults(num_overlays=-1)


# ---------------------------------------------------------------------------------------- validation results
def test_gather_objects_through_a_process_group(tmp_path):
    import torch.distributed as dist

    assert gather_objects({"a": 1}) == [{"a": 1}]  # no process group: local
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert gather_objects([table_row(sequence_result("x"))]) == [[table_row(sequence_result("x"))]]
    finally:
        dist.destroy_process_group()


def test_overlays_tint_predictions_and_outline_ground_truth():
    result = sequence_result("dog")
    row = table_row(result)
    assert row["fps"] is None and math.isclose(row["J&F"], 0.6)
    picture = render_overlays([row], {"dog": result["samples"]}, max_width=400)
    gap, title = render.GAP, render.TITLE_HEIGHT
    assert picture.shape == (title + gap + title + 60 + gap, gap + 2 * (80 + gap), 3)  # no upscaling
    x, y = render.panel_origin(0, 0, (60, 80), header=True)
    sample = result["samples"][0]
    inside = picture[y + 25, x + 35].astype(int)  # predicted object 1: tinted towards (128, 0, 0)
    expected = np.rint(0.5 * sample["image"][25, 35] + 0.5 * np.array([128, 0, 0])).astype(int)
    assert np.abs(inside - expected).max() <= 1
    assert picture[y + 13, x + 35].tolist() == [255, 255, 255]  # the ground truth's top edge
    assert render_overlays([row], {}) is None


@pytest.mark.skipif(
    os.environ.get("DVOS_KEEP_PICTURES") is None, reason="set DVOS_KEEP_PICTURES=dir to keep an example"
)
def test_write_example_picture():
    """Writes an example attention picture for people to look at (opt-in)."""
    module = TinyDistill()
    set_offsets(module.student, (1.5, -1.0), (-0.5, 2.0))
    clip = make_clip(0)
    rendering = render_attention(clip, run_clip(module, clip))
    out = Path(os.environ["DVOS_KEEP_PICTURES"])
    render.save_png(out / "attention-example.png", rendering.grid)
    render.save_png(out / "attention-offsets-example.png", rendering.offsets)


# --------------------------------------------------------------------------------------------------
# Progress lines where output is not a terminal
# --------------------------------------------------------------------------------------------------
class KnownLoss(pl.LightningModule):
    """Batch i has loss i + 1 (a parameter is multiplied by 0 so the loss has a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return batch[0].float().sum() + 1 + 0 * self.weight

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


LINE = r"\[{job}\] step {step}/{total} \({share}%\)  loss {loss}  [0-9.]+ steps/s  ETA \d+s"


def test_progress_lines_every_n_steps_with_loss_rate_and_eta(tmp_path):
    from dvos.callbacks.progress import LogProgress

    stream = io.StringIO()
    batches = torch.utils.data.DataLoader(torch.arange(7).view(7, 1), batch_size=1)
    sequences = torch.utils.data.DataLoader(torch.arange(25).view(25, 1), batch_size=1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=7,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        callbacks=[LogProgress(3, label="distill", stream=stream)],
    )
    trainer.fit(KnownLoss(), train_dataloaders=batches, val_dataloaders=sequences)
    lines = stream.getvalue().splitlines()
    training = [line for line in lines if " step " in line]
    # steps 3 and 6, then the last one; the loss is the mean over the batches since the line before
    expected = [(3, 43, "2.0000"), (6, 86, "5.0000"), (7, 100, "7.0000")]
    assert len(training) == 3
    for line, (step, share, loss) in zip(training, expected):
        assert re.fullmatch(LINE.format(job="distill", step=step, total=7, share=share, loss=loss), line), (
            line
        )
    validation = [line for line in lines if "validation" in line]  # every 3rd of 25 sequences, and the 25th
    done = [int(re.match(r"\[distill\] validation (\d+)/25 ", line).group(1)) for line in validation]
    assert done == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert all(re.search(r"sequences/s  ETA \d+s$", line) for line in validation)


def test_evaluation_progress_and_durations():
    from dvos.callbacks.progress import EvaluationProgress, format_duration

    stream = io.StringIO()
    progress = EvaluationProgress("evaluate student", 4, stream=stream)
    for _ in range(4):
        progress.update()
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        f"[evaluate student] sequences {done}/4 ({100 * done // 4}%)" for done in (1, 2, 3, 4)
    ]
    quiet = io.StringIO()
    silent = EvaluationProgress("x", 3, stream=quiet, enabled=False)
    silent.update(3)
    assert quiet.getvalue() == ""
    assert [format_duration(s) for s in (0.4, 42, 185, 7620, float("inf"))] == [
        "0s",
        "42s",
        "3m05s",
        "2h07m",
        "?",
    ]


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_on_a_terminal_lines_elsewhere(tmp_path, monkeypatch, terminal):
    from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

    from dvos.callbacks.progress import LogProgress
    from dvos.cli.factory import build_trainer
    from dvos.config import load_config

    class Stdout:
        def isatty(self) -> bool:
            return terminal

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stdout", Stdout())
    cfg = load_config(["logger=none", "callbacks.progress_every_n_steps=20", f"paths.runs_dir={tmp_path}"])
    trainer = build_trainer(cfg, tmp_path, job_type="pretrain")
    bars = [callback for callback in trainer.callbacks if isinstance(callback, ProgressBar)]
    lines = [callback for callback in trainer.callbacks if isinstance(callback, LogProgress)]
    if terminal:
        assert len(bars) == 1 and isinstance(bars[0], RichProgressBar) and not lines
    else:  # no bar at all (not even Lightning's tqdm one): one line every 20 steps
        assert not bars and len(lines) == 1
        assert (lines[0].every_n_steps, lines[0].label) == (20, "pretrain")
