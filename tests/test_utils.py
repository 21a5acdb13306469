"""Atomic output, run folders and the W&B mode choice."""

import os
from pathlib import Path

import numpy as np
import pytest

from dvos.utils.errors import DataError, DvosError
from dvos.utils.io import atomic_write, write_json
from dvos.utils.masks import default_palette, read_mask, write_mask
from dvos.utils.runs import (
    choose_wandb_mode,
    has_wandb_credentials,
    make_run_dir,
    wandb_configured_mode,
    wandb_init_mode,
)


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


WANDB_ENV = (
    *("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"),
    *("WANDB_CONFIG_DIR", "WANDB_DIR", "NETRC"),
)


@pytest.fixture
def no_wandb_setup(monkeypatch, tmp_path):
    """A user with no W&B configuration at all: empty home, no W&B variables, an empty work folder."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def _settings_file(path: Path, **keys: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[default]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items()))


def test_wandb_mode_offline_without_any_configuration(no_wandb_setup):
    assert not has_wandb_credentials() and wandb_configured_mode() is None
    assert choose_wandb_mode("auto") == "offline"
    assert wandb_init_mode("auto") == "offline"  # the only case dvos decides: no prompt, no failure
    assert wandb_init_mode("online") == "online" and choose_wandb_mode("offline") == "offline"
    with pytest.raises(DvosError, match="logger.mode"):
        choose_wandb_mode("sometimes")


@pytest.mark.parametrize(
    "where", ["api_key_env", "netrc", "netrc_env", "netrc_other_host", "settings_api_key", "token_file"]
)
def test_wandb_credentials_found_where_wandb_looks(no_wandb_setup, monkeypatch, where):
    home = no_wandb_setup / "home"
    netrc_line = "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n"
    if where == "api_key_env":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    elif where == "netrc":  # `wandb login` writes ~/.netrc
        (home / ".netrc").write_text(netrc_line)
        (home / ".netrc").chmod(0o600)
    elif where == "netrc_env":
        (no_wandb_setup / "auth").write_text(netrc_line)
        (no_wandb_setup / "auth").chmod(0o600)
        monkeypatch.setenv("NETRC", str(no_wandb_setup / "auth"))
    elif where == "netrc_other_host":  # a private server: its host from the settings file's base_url
        (home / ".netrc").write_text(netrc_line.replace("api.wandb.ai", "wandb.example.org"))
        (home / ".netrc").chmod(0o600)
        _settings_file(home / ".config" / "wandb" / "settings", base_url="https://wandb.example.org")
    elif where == "settings_api_key":
        _settings_file(home / ".config" / "wandb" / "settings", api_key="k" * 40)
    else:
        monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(no_wandb_setup / "token"))
    assert has_wandb_credentials()
    assert choose_wandb_mode("auto") == "online"
    assert wandb_init_mode("auto") is None  # wandb decides, as the user set it up


def test_wandb_own_mode_setting_wins_over_credentials(no_wandb_setup, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    _settings_file(no_wandb_setup / "work" / "wandb" / "settings", mode="offline")  # `wandb offline`
    assert wandb_configured_mode() == "offline" and choose_wandb_mode("auto") == "offline"
    assert wandb_init_mode("auto") is None
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over the file
    assert choose_wandb_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(no_wandb_setup / "config"))  # global file, moved
    _settings_file(no_wandb_setup / "config" / "settings", mode="online")
    (no_wandb_setup / "work" / "wandb" / "settings").unlink()
    assert wandb_configured_mode() == "online" and wandb_init_mode("auto") is None
    assert wandb_init_mode("offline") == "offline"  # logger.mode given: dvos passes it


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
        write_mask(tmp_path / "m.png", np.zeros((2, 2), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.png").stat().st_mode & 0o777 == 0o644
