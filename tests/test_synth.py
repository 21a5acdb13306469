"""The embedded default data: procedural renderer, mp4 + DAVIS-layout writer, cache, CLI."""

import argparse
import json
import os

import numpy as np
import pytest
from PIL import Image

from dvos.data import synth
from dvos.data.readers import open_video
from dvos.utils.errors import DataError
from dvos.utils.masks import default_palette, read_mask

SIZE = (64, 96)
PARAMS = {"num_train": 2, "num_val": 2, "seed": 0, "size": SIZE, "train_frames": 12, "val_frames": 8}


def _files(root):
    """{relative path: (bytes, mtime_ns)} of every file under root."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _decode(path):
    with open_video(path) as reader:
        return reader.get_batch(range(len(reader)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return synth.generate_synthetic(tmp_path_factory.mktemp("synth") / "out", **PARAMS)


# --- renderer ---------------------------------------------------------------------------------------


def test_render_sequence_is_deterministic_and_well_formed():
    frames, masks = synth.render_sequence(np.random.default_rng(3), 10, SIZE, 3)
    assert frames.shape == (10, *SIZE, 3) and frames.dtype == np.uint8
    assert masks.shape == (10, *SIZE) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1, 2, 3}
    again_frames, again_masks = synth.render_sequence(np.random.default_rng(3), 10, SIZE, 3)
    assert np.array_equal(frames, again_frames) and np.array_equal(masks, again_masks)
    other_frames, other_masks = synth.render_sequence(np.random.default_rng(4), 10, SIZE, 3)
    assert not np.array_equal(frames, other_frames) and not np.array_equal(masks, other_masks)
    # The generator form yields the same frames.
    for t, (frame, mask) in enumerate(synth.iter_sequence(np.random.default_rng(3), 10, SIZE, 3)):
        assert np.array_equal(frame, frames[t]) and np.array_equal(mask, masks[t])


def test_objects_are_textured_not_flat():
    frames, masks = synth.render_sequence(np.random.default_rng(5), 1, (120, 200), 3)
    for object_id in range(1, 4):
        pixels = frames[0][masks[0] == object_id].astype(float)
        assert len(pixels) > 50
        assert pixels.std(axis=0).max() > 5.0  # texture, not a flat colour
    assert frames[0][masks[0] == 0].astype(float).std(axis=0).max() > 5.0


def test_objects_move_and_occlude_each_other():
    occluded_somewhere = False
    for seed in range(3):
        rng = np.random.default_rng(seed)
        scene = synth.sample_scene(rng, SIZE, 3, num_frames=24)
        masks = np.stack([scene.render(t)[1] for t in range(24)])
        for object_id in range(1, 4):
            ys, xs = zip(*[np.nonzero(masks[t] == object_id) for t in (0, 23)])
            assert len(xs[0]) > 0, "every object is visible in frame 0"
            start = np.array([xs[0].mean(), ys[0].mean()])
            if len(xs[1]):
                end = np.array([xs[1].mean(), ys[1].mean()])
                assert np.linalg.norm(end - start) > 0.5, f"object {object_id} does not move"
        # Occlusion: an object's visible area is smaller than its whole (amodal) area in frame.
        for t in range(24):
            amodal = scene.layer_masks(t)
            for k in range(3):
                visible = int((masks[t] == k + 1).sum())
                if amodal[k].sum() > 0 and visible < amodal[k].sum() - 4:
                    occluded_somewhere = True
    assert occluded_somewhere


def test_first_frame_shows_every_object_well():
    for seed in range(6):
        scene = synth.sample_scene(np.random.default_rng(seed), SIZE, 4, num_frames=16)
        _, mask = scene.render(0)
        whole = scene.layer_masks(0)
        for k in range(4):
            assert (mask == k + 1).sum() >= 0.3 * whole[k].sum() > 0


def test_long_sequence_keeps_objects_in_view():
    seen = np.zeros(3, int)
    count = 400
    for _, mask in synth.iter_sequence(np.random.default_rng(7), count, SIZE, 3):
        seen += [(mask == k).any() for k in (1, 2, 3)]
    assert (seen >= 0.9 * count).all(), seen


# --- files --------------------------------------------------------------------------------------------


def test_davis_layout(built):
    root = built / "val"
    names = (root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == [synth.val_sequence_name(i) for i in range(PARAMS["num_val"])]
    assert (root / "ImageSets" / "2016" / "val.txt").read_text().split() == names
    for name in names:
        images = sorted((root / "JPEGImages" / "480p" / name).iterdir())
        annotations = sorted((root / "Annotations" / "480p" / name).iterdir())
        assert [p.name for p in images] == [f"{t:05d}.jpg" for t in range(PARAMS["val_frames"])]
        assert [p.name for p in annotations] == [f"{t:05d}.png" for t in range(PARAMS["val_frames"])]
        with Image.open(images[0]) as image:
            assert image.size == (SIZE[1], SIZE[0]) and image.mode == "RGB"
        with Image.open(annotations[0]) as image:
            assert image.mode == "P"
        first, palette = read_mask(annotations[0])
        assert palette[:768] == default_palette()
        ids = sorted(set(np.unique(first).tolist()))
        num_objects = ids[-1]
        assert num_objects >= 2 and ids == list(range(num_objects + 1)), ids
        for path in annotations[1:]:
            mask, _ = read_mask(path)
            assert mask.shape == SIZE and mask.max() <= num_objects


def test_train_videos_read_back_through_the_video_reader(built):
    manifest = json.loads((built / "train" / "manifest.json").read_text())
    assert [v["name"] for v in manifest["videos"]] == [synth.train_video_name(i) for i in range(2)]
    for index, video in enumerate(manifest["videos"]):
        with open_video(built / "train" / video["file"]) as reader:
            assert len(reader) == video["frames"] == PARAMS["train_frames"]
            assert reader[0].shape == (*SIZE, 3) == (video["height"], video["width"], 3)
            # Frame-aligned with the renderer (no shift from B-frames), random access included.
            picked = [3, 7, 11]
            decoded = reader.get_batch(picked).astype(float)
        scene = synth.video_scene(0, "train", index, size=SIZE, num_frames=PARAMS["train_frames"])
        for row, t in enumerate(picked):
            error = np.abs(decoded[row] - scene.render(t)[0]).mean()
            assert error < 6.0, (t, error)


def test_same_seed_same_files_other_seed_differs(built, tmp_path):
    again = synth.generate_synthetic(tmp_path / "again", **PARAMS)
    first, second = _files(built), _files(again)
    assert first.keys() == second.keys()
    for rel in first:
        if rel.endswith((".jpg", ".png", ".json")):
            assert first[rel][0] == second[rel][0], rel
        elif rel.endswith(".mp4"):
            assert np.array_equal(_decode(built / rel), _decode(again / rel)), rel
    other = synth.generate_synthetic(tmp_path / "other", **{**PARAMS, "seed": 1})
    name = synth.val_sequence_name(0)
    mask_a, _ = read_mask(built / "val" / "Annotations" / "480p" / name / "00000.png")
    mask_b, _ = read_mask(other / "val" / "Annotations" / "480p" / name / "00000.png")
    assert not np.array_equal(mask_a, mask_b)


def test_video_does_not_depend_on_counts(built, tmp_path):
    fewer = synth.generate_synthetic(tmp_path / "fewer", **{**PARAMS, "num_train": 1, "num_val": 1})
    rel = f"val/Annotations/480p/{synth.val_sequence_name(0)}/00003.png"
    assert (fewer / rel).read_bytes() == (built / rel).read_bytes()
    rel = f"train/{synth.train_video_name(0)}.mp4"
    assert np.array_equal(_decode(fewer / rel), _decode(built / rel))


def test_cache_skips_identical_and_rebuilds_on_change(tmp_path):
    out = tmp_path / "cached"
    params = {**PARAMS, "num_train": 1, "num_val": 1}
    synth.generate_synthetic(out, **params)
    before = _files(out)
    assert synth.ensure_synthetic(out, **params) == out
    assert _files(out) == before  # nothing rewritten: same bytes, same mtimes
    assert synth.is_synthetic_current(out, **params)
    assert not synth.is_synthetic_current(out, **{**params, "seed": 5})

    synth.generate_synthetic(out, **{**params, "val_frames": 5})
    record = json.loads((out / "synth.json").read_text())
    assert record["format_version"] == synth.FORMAT_VERSION and record["params"]["val_frames"] == 5
    assert len(list((out / "val" / "JPEGImages" / "480p" / synth.val_sequence_name(0)).iterdir())) == 5
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []

    stamp = (out / "synth.json").stat().st_mtime_ns
    synth.generate_synthetic(out, **{**params, "val_frames": 5}, overwrite=True)
    assert (out / "synth.json").stat().st_mtime_ns != stamp


def test_refuses_foreign_folder_and_bad_params(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(DataError, match="not a dvos synthetic dataset"):
        synth.generate_synthetic(foreign, **PARAMS)
    assert (foreign / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(DataError, match="even"):
        synth.generate_synthetic(tmp_path / "odd", **{**PARAMS, "size": (63, 96)})
    with pytest.raises(DataError, match="num_train"):
        synth.generate_synthetic(tmp_path / "neg", **{**PARAMS, "num_train": -1})


def test_interrupted_build_never_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "broken"

    def fail(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(synth, "write_mask", fail)
    with pytest.raises(RuntimeError):
        synth.generate_synthetic(out, **PARAMS)
    assert not out.exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_stale_build_folder_of_dead_process_is_removed(tmp_path):
    out = tmp_path / "data"
    stale = tmp_path / "data.tmp-999999999"  # no such process
    (stale / "train").mkdir(parents=True)
    synth.generate_synthetic(out, **{**PARAMS, "num_train": 1, "num_val": 1})
    assert not stale.exists() and (out / "synth.json").is_file()


# --- command line ---------------------------------------------------------------------------------------


def _cli(argv):
    from dvos.cli.data_cmd import register

    parser = argparse.ArgumentParser(prog="dvos")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_builds_then_reports_up_to_date(tmp_path, capsys):
    argv = ["data", "synth", "--out", str(tmp_path / "d"), "--train", "1", "--val", "1", "--size", "64x96"]
    argv += ["--train-frames", "6", "--val-frames", "4"]
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "built" in printed and "1 training videos" in printed and " s]" in printed
    assert (tmp_path / "d" / "train" / f"{synth.train_video_name(0)}.mp4").is_file()
    assert _cli(argv) == 0
    assert "up to date" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _cli(["data", "synth", "--out", str(tmp_path / "e"), "--size", "64by96"])


def test_cli_reports_bad_size_as_dvos_error(tmp_path):
    with pytest.raises(DataError):
        _cli(["data", "synth", "--out", str(tmp_path / "f"), "--size", "65x96", "--quiet"])


@pytest.mark.skipif(os.name != "posix", reason="lock file uses fcntl")
def test_lock_file_sits_beside_output(built):
    assert (built.parent / f".{built.name}.lock").exists()
