"""Run folders and the W&B mode: every run gets its own folder; W&B never prompts or blocks."""

from __future__ import annotations

import datetime as _dt
import netrc
import os
import re
from pathlib import Path

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


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def choose_wandb_mode(requested: str = "auto") -> str:
    """The W&B mode to use: an explicit `requested` mode wins, then $WANDB_MODE, then online only
    when credentials exist, else offline (W&B would otherwise prompt at a terminal and wait)."""
    if requested not in WANDB_MODES:
        raise ConfigError(f"logger.mode must be one of {', '.join(WANDB_MODES)}, got '{requested}'")
    if requested != "auto":
        return requested
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env_mode == "dryrun" else env_mode
    return "online" if has_wandb_credentials() else "offline"
