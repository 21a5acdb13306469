"""Atomic output, run folders and the W&B mode choice."""

import os

import numpy as np
import pytest

from dvos.utils.errors import DataError, DvosError
from dvos.utils.io import atomic_write, write_json
from dvos.utils.masks import default_palette, read_mask, write_mask
from dvos.utils.runs import choose_wandb_mode, make_run_dir


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_write_json_full_precision(tmp_path):
    write_json(tmp_path / "r.json", {"x": 0.1 + 0.2})
    assert "0.30000000000000004" in (tmp_path / "r.json").read_text()


def test_unwritable_output_folder_is_one_line_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(DvosError, match="cannot create output folder"):
            write_json(blocker / "sub" / "r.json", {})
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DvosError, match="not writable"):
            write_json(locked / "r.json", {})


def test_palette_mask_round_trip_keeps_palette(tmp_path):
    ids = np.zeros((5, 7), np.uint8)
    ids[1:3, 2:5] = 2
    ids[4, 6] = 255
    palette = default_palette()
    palette[6:9] = [1, 2, 3]  # a custom colour for id 2
    write_mask(tmp_path / "m.png", ids, palette)
    back, back_palette = read_mask(tmp_path / "m.png")
    assert np.array_equal(back, ids)
    assert back_palette[6:9] == [1, 2, 3]


def test_davis_palette_first_colours():
    # PASCAL VOC / DAVIS colour map: black, dark red, dark green, olive.
    assert default_palette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]


def test_rgb_mask_is_rejected_naming_the_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png.*mode 'RGB'"):
        read_mask(tmp_path / "rgb.png")


def test_run_dirs_are_unique(tmp_path):
    first = make_run_dir(tmp_path, "exp 1")
    second = make_run_dir(tmp_path, "exp 1")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-exp-1")


def test_wandb_mode_never_online_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert choose_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert choose_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode("auto") == "disabled"
    assert choose_wandb_mode("offline") == "offline"
    with pytest.raises(DvosError, match="logger.mode"):
        choose_wandb_mode("sometimes")


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
        write_mask(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644
