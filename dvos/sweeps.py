"""W&B sweep files and the runs of their trials, behind `dvos sweep`.

The sweep file is in W&B's format (`method` grid | random | bayes, `metric`, `parameters` named by
config dot-keys, `command` with `${args_no_hyphens}` passed to `dvos train`), so the same file serves
both paths:

- **online** (a W&B API key is configured, or `--mode online`): the sweep is created on the W&B
  server (`wandb.sweep`) and `wandb agent` runs its trials, each one `dvos train key=value ...`;
- **offline** (no key, as on a laptop or a cluster without internet; `wandb sweep` refuses there): the
  runner below expands grid and random sweeps itself from the same file (a bayes sweep falls back to
  random search, with a warning), checks every trial's config before the first one starts, then runs
  the trials one after another. Each trial is a separate `dvos train` process with its own run
  folder `<sweep folder>/<name>-tNN/` and its own offline W&B run in the group named after the sweep
  folder (`logger.group`: one group per sweep run). A trial that crashes is recorded as failed and the sweep goes on. After every
  trial `ranking.json` is rewritten (atomically), so a killed sweep leaves what it has; at the end the
  ranking by the sweep's metric is printed.

The metric of a trial is read from its `run_summary.json` (the keys every run also puts into its W&B
summary, `dvos/utils/run_summary.py`): `val/J&F` is the best validation J&F of the run, the score its
kept checkpoint had.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvos.utils.errors import DvosError

METHODS = ("grid", "random", "bayes")
DEFAULT_COMMAND = ["${env}", "dvos", "train", "${args_no_hyphens}"]
RANKING_JSON = "ranking.json"


# --------------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """A W&B sweep file, read and checked.

    Attributes:
        path: the file.
        name: the sweep's name (`name:` in the file, else the file's stem); its trials are `<name>-tNN`.
        method: grid | random | bayes.
        metric: name of the metric to rank by (`val/J&F`).
        goal: maximize | minimize.
        parameters: dot-key → W&B parameter spec (`value`, `values`, `distribution`, `min`, `max`, ...),
            in the file's order; nested `parameters:` blocks are flattened to dot-keys.
        command: the `command:` list (W&B's default for dvos when absent).
        run_cap: `run_cap:` of the file (trials of a random/bayes sweep), or None.
        raw: the file's mapping as read (sent to W&B as is, plus the default command when absent).
    """

    path: Path
    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    run_cap: int | None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept_keys(self) -> list[str]:
        """Parameters that take more than one value."""
        return [key for key, spec in self.parameters.items() if not _is_constant(spec)]


def _is_constant(spec: dict[str, Any]) -> bool:
    return "value" in spec or ("values" in spec and len(spec["values"]) == 1)


def _flatten_parameters(parameters: Any, where: str, prefix: str = "") -> dict[str, dict[str, Any]]:
    if not isinstance(parameters, dict) or not parameters:
        raise DvosError(f"{where}: 'parameters' must be a non-empty mapping of config dot-keys")
    flat: dict[str, dict[str, Any]] = {}
    for key, spec in parameters.items():
        full = f"{prefix}{key}"
        if not isinstance(spec, dict):
            raise DvosError(
                f"{where}: parameter '{full}' must be a mapping such as {{values: [...]}} or {{value: x}}"
            )
        if "parameters" in spec:  # W&B's nested form: {model: {parameters: {deform_stride: ...}}}
            flat.update(_flatten_parameters(spec["parameters"], where, prefix=f"{full}."))
        else:
            flat[full] = dict(spec)
    return flat


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and check a W&B sweep file; a one-line `DvosError` names the file and key at fault."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DvosError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DvosError(f"{path}: cannot parse YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(raw, dict):
        raise DvosError(f"{path}: expected a W&B sweep mapping (method, metric, parameters, command)")
    method = raw.get("method")
    if method not in METHODS:
        raise DvosError(f"{path}: 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    metric = raw.get("metric") or {"name": "val/J&F", "goal": "maximize"}
    if not isinstance(metric, dict) or not metric.get("name"):
        raise DvosError(f"{path}: 'metric' must be a mapping with a 'name' (e.g. val/J&F)")
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise DvosError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    parameters = _flatten_parameters(raw.get("parameters"), str(path))
    for key, spec in parameters.items():
        _check_parameter(key, spec, str(path))
    command = raw.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(word, str) for word in command):
        raise DvosError(f"{path}: 'command' must be a list of strings")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise DvosError(f"{path}: run_cap must be a positive integer, got {run_cap!r}")
    name = str(raw.get("name") or path.stem)
    return SweepSpec(path, name, method, str(metric["name"]), goal, parameters, command, run_cap, raw)


RANGED = (  # samplers drawing between `min` and `max`
    "uniform",
    "int_uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
)
SAMPLERS = ("constant", "categorical", *RANGED, "normal", "log_normal")


def _distribution(spec: dict[str, Any]) -> str:
    """W&B's rule when `distribution` is left out: value → constant, values → categorical,
    integer min/max → int_uniform, other min/max → uniform."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform"


def _check_parameter(key: str, spec: dict[str, Any], where: str) -> None:
    kind = _distribution(spec)
    if kind not in SAMPLERS:
        raise DvosError(
            f"{where}: parameter '{key}': distribution {kind!r} is not supported offline "
            f"(use one of {', '.join(SAMPLERS)})"
        )
    if kind == "constant" and "value" not in spec:
        raise DvosError(f"{where}: parameter '{key}': a constant needs 'value'")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise DvosError(f"{where}: parameter '{key}': 'values' must be a non-empty list")
        probabilities = spec.get("probabilities")
        if probabilities is not None and (
            len(probabilities) != len(values) or abs(sum(probabilities) - 1.0) > 1e-6
        ):
            raise DvosError(f"{where}: parameter '{key}': 'probabilities' must match 'values' and sum to 1")
    if kind in RANGED:
        low, high = spec.get("min"), spec.get("max")
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low > high:
            raise DvosError(f"{where}: parameter '{key}': {kind} needs numbers min <= max")
        if kind in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
            raise DvosError(f"{where}: parameter '{key}': {kind} needs min > 0")


# --------------------------------------------------------------------------------------------------
# Expanding trials
# --------------------------------------------------------------------------------------------------
def grid_size(spec: SweepSpec) -> int:
    size = 1
    for key, parameter in spec.parameters.items():
        size *= len(_grid_values(key, parameter, spec.path))
    return size


def _grid_values(key: str, parameter: dict[str, Any], path: Path) -> list[Any]:
    if "value" in parameter:
        return [parameter["value"]]
    if "values" in parameter:
        return list(parameter["values"])
    raise DvosError(f"{path}: parameter '{key}': grid sweeps need 'values' or 'value', not a distribution")


def expand_grid(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """Every combination, the last parameter of the file changing fastest."""
    keys = list(spec.parameters)
    choices = [_grid_values(key, spec.parameters[key], spec.path) for key in keys]
    for combination in itertools.product(*choices):
        yield dict(zip(keys, combination))


def sample_parameter(parameter: dict[str, Any], rng: random.Random) -> Any:
    """One draw of a W&B parameter spec (the distributions W&B's random search uses); continuous
    draws are rounded to 6 significant digits, so the value recorded is the value passed."""
    value = _draw(parameter, rng)
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _draw(parameter: dict[str, Any], rng: random.Random) -> Any:
    kind = _distribution(parameter)
    if kind == "constant":
        return parameter["value"]
    if kind == "categorical":
        values = parameter["values"]
        weights = parameter.get("probabilities")
        return rng.choices(values, weights=weights, k=1)[0] if weights else rng.choice(values)
    low, high = parameter.get("min"), parameter.get("max")
    q = parameter.get("q", 1)
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    if kind == "q_uniform":
        return _quantise(rng.uniform(low, high), q)
    if kind == "log_uniform":  # min and max are natural logarithms
        return math.exp(rng.uniform(low, high))
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "q_log_uniform_values":
        return _quantise(math.exp(rng.uniform(math.log(low), math.log(high))), q)
    mu, sigma = parameter.get("mu", 0.0), parameter.get("sigma", 1.0)
    if kind == "normal":
        return rng.gauss(mu, sigma)
    if kind == "log_normal":
        return math.exp(rng.gauss(mu, sigma))
    raise DvosError(f"unsupported distribution {kind!r}")  # guarded by load_sweep


def _quantise(value: float, q: float) -> float | int:
    rounded = round(value / q) * q
    return int(rounded) if isinstance(q, int) else rounded


def expand_trials(spec: SweepSpec, *, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials' parameter values: a grid's combinations (the first `count`), or `count` random draws.

    Random draws use `random.Random(seed)`: the same file, count and seed give the same trials.
    A bayes sweep is sampled like a random one (its model of the metric needs the W&B server).
    """
    if spec.method == "grid":
        trials = list(expand_grid(spec))
        return trials[:count] if count is not None else trials
    count = count if count is not None else spec.run_cap
    if count is None:
        raise DvosError(
            f"{spec.path}: a {spec.method} sweep needs a number of trials: --count N (make sweep COUNT=N) "
            "or run_cap in the file"
        )
    rng = random.Random(seed)
    return [
        {key: sample_parameter(parameter, rng) for key, parameter in spec.parameters.items()}
        for _ in range(count)
    ]


def format_value(value: Any) -> str:
    """A parameter value as the command line's `key=value` text (OmegaConf/YAML reads it back)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value)


def parameter_words(parameters: dict[str, Any]) -> list[str]:
    """`${args_no_hyphens}`: one `key=value` word per parameter."""
    return [f"{key}={format_value(value)}" for key, value in parameters.items()]


def train_overrides(spec: SweepSpec, parameters: dict[str, Any], extra: list[str]) -> list[str]:
    """The `dvos train` overrides of one trial: the command's own `key=value` words, the trial's
    parameters, then the extra command-line words (last, so they win)."""
    words = []
    for word in spec.command:
        if word == "${args_no_hyphens}":
            words += parameter_words(parameters)
        elif "=" in word and not word.startswith("$"):
            words.append(word)
    if "${args_no_hyphens}" not in spec.command:
        raise DvosError(f"{spec.path}: 'command' must pass ${{args_no_hyphens}} to dvos train")
    return words + list(extra)


def check_train_command(spec: SweepSpec) -> None:
    """The offline runner starts `dvos train` itself: the file's `command` must be that command."""
    if "${args}" in spec.command or "${args_json}" in spec.command:
        raise DvosError(f"{spec.path}: dvos train takes key=value words: use ${{args_no_hyphens}}")
    words = [word for word in spec.command if "=" not in word and not word.startswith("$")]
    if words[-2:] != ["dvos", "train"]:
        raise DvosError(
            f"{spec.path}: an offline sweep runs `dvos train`: 'command' must be like "
            "[${env}, dvos, train, ${args_no_hyphens}], got " + " ".join(spec.command)
        )


# --------------------------------------------------------------------------------------------------
# Running trials offline
# --------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    index: int
    name: str
    parameters: dict[str, Any]
    overrides: list[str]
    run_dir: Path
    log: Path
    status: str = "pending"  # pending | running | finished | failed | interrupted
    returncode: int | None = None
    metric: float | None = None
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.name,
            "status": self.status,
            "metric": self.metric,
            "parameters": self.parameters,
            "overrides": self.overrides,
            "run_dir": str(self.run_dir),
            "log": str(self.log),
            "returncode": self.returncode,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "error": self.error,
            "summary": self.summary,
        }


Launcher = Callable[[list[str], Path, bool], int]


def train_command(overrides: list[str]) -> list[str]:
    """The process of one trial: this Python's `dvos train` (no reliance on PATH)."""
    return [sys.executable, "-m", "dvos.cli.main", "train", *overrides]


def launch(overrides: list[str], log_path: Path, verbose: bool) -> int:
    """Run `dvos train <overrides>`, its output into `log_path` (and the terminal when verbose)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WANDB_SERVICE", None)  # each trial its own W&B service: a crashed trial blocks no other
    with open(log_path, "w", encoding="utf-8") as log_file:
        log_file.write("$ dvos train " + " ".join(overrides) + "\n")
        log_file.flush()
        process = subprocess.Popen(
            train_command(overrides),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()  # `tail -f` on the log follows the trial
                if verbose:
                    sys.stdout.write(line)
            return process.wait()
        except BaseException:  # Ctrl-C: stop the trial too, never leave it running
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


def _last_error_line(log_path: Path) -> str:
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("dvos: error:") or "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def read_trial_summary(run_dir: Path) -> dict[str, Any]:
    """The trial's flat summary (`run_summary.json`), or {} when it has none."""
    from dvos.utils.run_summary import SUMMARY_FILE

    path = run_dir / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def rank_trials(trials: list[Trial], goal: str) -> list[Trial]:
    """Trials with a metric, best first; then finished ones without it; then the others."""
    scored = [trial for trial in trials if trial.metric is not None]
    scored.sort(key=lambda trial: trial.metric, reverse=goal == "maximize")
    rest = [trial for trial in trials if trial.metric is None]
    rest.sort(key=lambda trial: (trial.status != "finished", trial.index))
    return scored + rest


def write_ranking(sweep_dir: Path, spec: SweepSpec, method: str, trials: list[Trial], seed: int) -> Path:
    from dvos.utils.io import write_json

    ranked = rank_trials(trials, spec.goal)
    rows = []
    position = 0
    for trial in ranked:
        row = trial.as_dict()
        if trial.metric is not None:
            position += 1
            row["rank"] = position
        else:
            row["rank"] = None
        rows.append(row)
    path = sweep_dir / RANKING_JSON
    write_json(
        path,
        {
            "sweep": spec.name,
            "file": str(spec.path),
            "method": spec.method,
            "method_run": method,
            "seed": seed,
            "metric": {"name": spec.metric, "goal": spec.goal},
            "trials": rows,
        },
    )
    return path


def format_ranking(spec: SweepSpec, trials: list[Trial]) -> str:
    """The ranking as a text table: rank, trial, status, metric, the swept parameters."""
    keys = spec.swept_keys or list(spec.parameters)
    ranked = rank_trials(trials, spec.goal)
    header = ["rank", "trial", "status", spec.metric, *keys]
    rows = []
    position = 0
    for trial in ranked:
        if trial.metric is not None:
            position += 1
        rows.append(
            [
                str(position) if trial.metric is not None else "-",
                trial.name,
                trial.status,
                f"{trial.metric:.4f}" if trial.metric is not None else "-",
                *(_short(trial.parameters.get(key)) for key in keys),
            ]
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return format_value(value)


def prepare_trials(
    spec: SweepSpec, sweep_dir: Path, parameters_list: list[dict[str, Any]], extra: list[str]
) -> list[Trial]:
    """One `Trial` per parameter set, every config checked with `load_config` before anything runs."""
    from dvos.config import load_config

    trials = []
    for index, parameters in enumerate(parameters_list):
        name = f"{spec.name}-t{index:02d}"
        run_dir = sweep_dir / name
        overrides = train_overrides(
            spec,
            parameters,
            # one W&B group per sweep run (its folder's name): two sweeps of one file stay apart
            [f"run_dir={run_dir}", f"name={name}", f"logger.group={sweep_dir.name}", *extra],
        )
        try:
            load_config(overrides)
        except DvosError as err:
            raise DvosError(f"sweep {spec.name}, trial {name}: {err}") from err
        trials.append(Trial(index, name, parameters, overrides, run_dir, sweep_dir / "logs" / f"{name}.log"))
    return trials


def run_trials(
    spec: SweepSpec,
    trials: list[Trial],
    sweep_dir: Path,
    *,
    method: str,
    seed: int,
    launcher: Launcher = launch,
    verbose: bool = False,
) -> list[Trial]:
    """Run the trials one after another; a failed one is recorded and the sweep goes on."""
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_ranking(sweep_dir, spec, method, trials, seed)
    for trial in trials:
        shown = " ".join(parameter_words({k: trial.parameters[k] for k in spec.swept_keys})) or "(constants)"
        print(f"[{trial.index + 1}/{len(trials)}] {trial.name}: {shown}", flush=True)
        trial.status = "running"
        started = time.perf_counter()
        try:
            trial.returncode = launcher(trial.overrides, trial.log, verbose)
        except KeyboardInterrupt:
            trial.status = "interrupted"
            trial.seconds = time.perf_counter() - started
            write_ranking(sweep_dir, spec, method, trials, seed)
            raise
        except Exception as err:  # the launcher itself failed: record it, go on
            trial.returncode = None
            trial.error = f"{type(err).__name__}: {err}"
        trial.seconds = time.perf_counter() - started
        trial.summary = read_trial_summary(trial.run_dir)
        # the W&B summary's name of a final-table key (`final/student/J&F`) reads the same number
        value = trial.summary.get(spec.metric, trial.summary.get(spec.metric.removeprefix("final/")))
        trial.metric = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        if trial.returncode == 0:
            trial.status = "finished"
            result = f"{spec.metric} {trial.metric:.4f}" if trial.metric is not None else f"no {spec.metric}"
            print(f"    finished in {trial.seconds:.0f} s: {result}", flush=True)
        else:
            trial.status = "failed"
            trial.metric = None  # a crashed trial is not ranked, whatever it wrote before
            trial.error = trial.error or _last_error_line(trial.log)
            print(
                f"    FAILED (exit {trial.returncode}) after {trial.seconds:.0f} s: {trial.error}; "
                f"log: {trial.log}; the sweep goes on",
                flush=True,
            )
        write_ranking(sweep_dir, spec, method, trials, seed)
    return trials


# --------------------------------------------------------------------------------------------------
# Online: W&B's sweep server and agent
# --------------------------------------------------------------------------------------------------
def online_sweep_config(spec: SweepSpec, extra: list[str]) -> dict[str, Any]:
    """The file's sweep as W&B gets it: the default command when absent, extra words appended."""
    config = dict(spec.raw)
    command = list(spec.command)
    if extra:
        position = (
            command.index("${args_no_hyphens}") + 1 if "${args_no_hyphens}" in command else len(command)
        )
        command[position:position] = list(extra)
    config["command"] = command
    config.setdefault("name", spec.name)
    return config


def run_online(spec: SweepSpec, extra: list[str], *, count: int | None, cfg: Any) -> int:
    import wandb

    config = online_sweep_config(spec, extra)
    try:
        sweep_id = wandb.sweep(sweep=config, project=cfg.logger.project, entity=cfg.logger.entity)
    except Exception as err:  # no key, no network, a file W&B rejects: one line, and the way out
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DvosError(
            f"W&B could not create the sweep ({message}); run it offline with --mode offline"
        ) from err
    if not sweep_id:
        raise DvosError("W&B could not create the sweep (no sweep id); run it offline with --mode offline")
    target = "/".join(part for part in (cfg.logger.entity, cfg.logger.project, sweep_id) if part)
    bin_dir = str(Path(sys.executable).parent)
    agent = shutil.which("wandb", path=bin_dir) or shutil.which("wandb")
    if agent is None:
        raise DvosError("the `wandb` command is not installed beside this Python (pip install wandb)")
    command = [agent, "agent", target] + (["--count", str(count)] if count is not None else [])
    print(f"W&B sweep {target} created; starting: {' '.join(command)}", flush=True)
    # The agent runs the file's command (`dvos train ...`): this environment's bin first on PATH.
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.call(command, env=env)
