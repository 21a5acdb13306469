"""Run folders and the W&B mode: every run gets its own folder; W&B never prompts or blocks."""

from __future__ import annotations

import configparser
import datetime as _dt
import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from dvos.utils.errors import ConfigError
from dvos.utils.io import ensure_writable_dir

WANDB_MODES = ("auto", "online", "offline", "disabled")


def make_run_dir(runs_dir: str | os.PathLike, name: str, *, run_dir: str | None = None) -> Path:
    """Create `runs_dir/<YYYYmmdd>-<HHMMSS>-<name>/` (or `run_dir` when given) and return it.

    A second run started in the same second gets a `-2`, `-3`, ... suffix instead of sharing a folder.
    """
    if run_dir:
        return ensure_writable_dir(run_dir)
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(runs_dir) / f"{stamp}-{safe_name}"
    ensure_writable_dir(base.parent)
    candidate, counter = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            counter += 1
            candidate = base.with_name(f"{base.name}-{counter}")


# Where wandb (0.31: wandb_setup.py, sdk/lib/wbauth/) reads its mode and credentials; read here the
# same way, live from the environment, so that dvos never overrides a choice the user made there.
WANDB_DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_settings_files() -> list[Path]:
    """W&B's settings files, global first: `$WANDB_CONFIG_DIR/settings` (default
    `~/.config/wandb/settings`, where `wandb login --host` writes) and the workspace's
    `wandb/settings` (or `.wandb/settings`) under `$WANDB_DIR` or the current folder (where
    `wandb offline` / `wandb disabled` write)."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    global_file = Path(config_dir).expanduser() if config_dir else Path("~/.config/wandb").expanduser()
    root = Path(os.environ.get("WANDB_DIR") or os.getcwd()).expanduser()
    workspace = root / (".wandb" if (root / ".wandb").exists() else "wandb")
    return [global_file / "settings", workspace / "settings"]


def wandb_file_settings() -> dict[str, str]:
    """The `[default]` keys of W&B's settings files (the workspace's win), {} where there are none."""
    settings: dict[str, str] = {}
    for path in wandb_settings_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # wandb itself skips an unreadable file
        if parser.has_section("default"):
            settings.update(parser.items("default"))
    return settings


def wandb_configured_mode() -> str | None:
    """The mode the user's own W&B configuration sets: `$WANDB_MODE`, `$WANDB_DISABLED`, or `mode`
    in a settings file (`wandb offline`); None when nothing sets one."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return "offline" if mode == "dryrun" else mode
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    mode = wandb_file_settings().get("mode", "").strip().lower()
    return ("offline" if mode == "dryrun" else mode) or None


def _netrc_file() -> Path:
    """wandb's netrc: `$NETRC`, else `~/.netrc`, else `~/_netrc` (Windows' name)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def has_wandb_credentials() -> bool:
    """True where wandb finds credentials: `$WANDB_API_KEY`, `$WANDB_IDENTITY_TOKEN_FILE`, the netrc
    file (`$NETRC` or `~/.netrc`, where `wandb login` writes) for its host (`$WANDB_BASE_URL`, the
    settings files' `base_url`, else api.wandb.ai), or an `api_key` in its settings files."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings = wandb_file_settings()
    if settings.get("api_key"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or WANDB_DEFAULT_BASE_URL
    host = urlsplit(base_url).netloc or base_url
    try:
        auth = netrc.netrc(str(_netrc_file())).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _check_mode(requested: str) -> None:
    if requested not in WANDB_MODES:
        raise ConfigError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got '{requested}'")


def choose_wandb_mode(requested: str = "auto") -> str:
    """The W&B mode a run will have: an explicit `requested` mode; for auto the mode the user's W&B
    configuration sets (`wandb_configured_mode`), else online when credentials exist, else offline
    (W&B would otherwise prompt at a terminal and wait)."""
    _check_mode(requested)
    if requested != "auto":
        return requested
    configured = wandb_configured_mode()
    if configured in ("online", "offline", "disabled", "shared"):
        return "online" if configured == "shared" else configured
    return "online" if has_wandb_credentials() else "offline"


def wandb_init_mode(requested: str = "auto") -> str | None:
    """The `mode` to pass to `wandb.init`: an explicit `requested` mode; for auto None (wandb decides,
    as the user configured it) when the user's W&B configuration sets a mode or holds credentials,
    and offline only when it has neither (no prompt, no failure)."""
    _check_mode(requested)
    if requested != "auto":
        return requested
    if wandb_configured_mode() is not None or has_wandb_credentials():
        return None
    return "offline"
