"""Run folders and the W&B mode: every run gets its own folder, a run that ends early leaves no
folder that looks finished; W&B never prompts or blocks."""

from __future__ import annotations

import configparser
import contextlib
import datetime as _dt
import netrc
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dvos.utils.errors import ConfigError
from dvos.utils.io import ensure_writable_dir

WANDB_MODES = ("auto", "online", "offline", "disabled")


def make_run_dir(
    runs_dir: str | os.PathLike, name: str, *, run_dir: str | None = None, resume: bool = False
) -> Path:
    """Create `runs_dir/<YYYYmmdd>-<HHMMSS>-<name>/` (or `run_dir` when given) and return it.

    A second run started in the same second gets a `-2`, `-3`, ... suffix instead of sharing a folder.
    A given `run_dir` must be new or empty unless the job continues that run (`resume`): a new run
    never writes into another run's folder.
    """
    if run_dir:
        path = Path(run_dir)
        if not resume and path.is_dir() and any(path.iterdir()):
            what = "a run" if (path / "config.yaml").is_file() else "files"
            raise ConfigError(
                f"run_dir {path} already holds {what}: a new run needs a new or empty folder "
                f"(to continue that run: dvos train ckpt_path=last run_dir={shlex.quote(str(path))})"
            )
        return ensure_writable_dir(path)
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


# --------------------------------------------------------------------------------------------------
# Runs that end early (docs/DESIGN.md, "Bad input")
# --------------------------------------------------------------------------------------------------
FAILED_MARKER = "FAILED"  # in a run folder: the run failed after its first checkpoint (the error inside)


def is_failed(run_dir: str | os.PathLike) -> bool:
    """True for a run folder marked failed: `ckpt_path=last`, segment, evaluate and compare skip it."""
    return (Path(run_dir) / FAILED_MARKER).is_file()


@dataclass
class StartedRun:
    """A run folder this process started (rank 0), until its command ends.

    path: the folder; created: this job made it; fresh: it was new or empty, so that everything in
    it is this job's (a resumed run's folder is not).
    """

    path: Path
    created: bool
    fresh: bool


STARTED_RUNS: list[StartedRun] = []


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last.ckpt").is_file()


def settle_unfinished_runs(failure: str | None) -> str:
    """Leave nothing that looks like a usable run behind a command that did not finish.

    Each run folder the command started: a fresh one (new or empty at the start) without a
    checkpoint is deleted (emptied, when it existed before); any other is marked failed (`FAILED`
    holds `failure`, the error line), or, when the job was stopped on request (`failure` None), kept
    as it is, to be resumed. A resumed run's files are never deleted.

    Returns:
        what the user should know, as the end of the error line ("" when nothing was started).
    """
    notes = []
    while STARTED_RUNS:
        run = STARTED_RUNS.pop()
        if not run.path.is_dir():
            continue
        if run.fresh and not has_checkpoint(run.path):
            _discard(run)
            notes.append(f"no checkpoint yet: run folder {run.path} removed")
            continue
        resume = f"dvos train ckpt_path=last run_dir={shlex.quote(str(run.path))}"
        if failure is None:
            notes.append(f"resume with: {resume}" if has_checkpoint(run.path) else "")
            continue
        with contextlib.suppress(OSError):  # best effort: the failure may be a full disk
            (run.path / FAILED_MARKER).write_text(f"{failure}\ncontinue it with: {resume}\n")
        notes.append(f"run folder {run.path} marked {FAILED_MARKER}")
    notes = [note for note in notes if note]
    return "; " + "; ".join(notes) if notes else ""


def _discard(run: StartedRun) -> None:
    """Delete a run folder this job made (empty it, when it existed before)."""
    if run.created:
        shutil.rmtree(run.path, ignore_errors=True)
        return
    for entry in run.path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


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
