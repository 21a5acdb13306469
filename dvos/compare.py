"""Runs side by side, behind `dvos compare`: J&F, J, F, FPS, peak memory, parameters and the config
keys in which they differ, as a text table, a PNG and an HTML page.

Where the runs come from:

- **offline**: run folders (`config.yaml` and `run_summary.json` or `summary.json`), sweep folders
  (their trials, best first as in their `ranking.json`) or any folder holding such folders (searched
  three levels deep); a `group` keeps the runs whose `logger.group` it is (a sweep's trials have the
  sweep's name as group).
- **online**: the runs of a W&B project (in a group), or W&B run paths (`entity/project/run_id`),
  read through `wandb.Api()`: the summary keys every dvos run logs (`dvos/utils/run_summary.py`) and
  its config.

`write_outputs` writes, each file atomically: `comparison.png` (one bar chart per metric, best run
outlined, and the table of differing config keys), `comparison.html` (the same table, best values
in bold, the PNG inline) and `comparison.json` (every number and key).
"""

from __future__ import annotations

import html
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvos.utils.errors import DvosError
from dvos.utils.runs import is_failed

# (summary field, label, unit, higher is better, format)
METRICS = (
    ("J&F", "J&F", "", True, "{:.4f}"),
    ("J", "J (IoU)", "", True, "{:.4f}"),
    ("F", "F (boundary)", "", True, "{:.4f}"),
    ("fps", "FPS", "frames/s", True, "{:.1f}"),
    ("peak_rss_mb", "peak memory", "MB", False, "{:.0f}"),
    ("params", "parameters", "M", False, "{:.2f}"),
)
# Keys that differ between any two runs without saying anything about the method.
IGNORED_KEYS = ("run_dir", "name", "ckpt_path")
IGNORED_PREFIXES = ("paths.", "environment.")
ABSENT = "(absent)"  # a key one run's config does not have (an older version of the schema)
SKIPPED_FOLDERS = {"checkpoints", "eval", "wandb", "pictures", "pretrain", "logs", "comparisons"}
OUTPUT_NAMES = ("comparison.png", "comparison.html", "comparison.json")


@dataclass
class RunRecord:
    """One run to compare: its name, where it came from, its flat summary and flat config."""

    name: str
    source: str
    summary: dict[str, Any]
    config: dict[str, Any]
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, model: str, key: str) -> float | None:
        # run_summary.json: `student/J&F`; a W&B run's summary: `final/student/J&F`
        value = self.summary.get(f"{model}/{key}", self.summary.get(f"final/{model}/{key}"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value) / 1e6 if key == "params" else float(value)


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dot-keys (`{"a": {"b": 1}}` → `{"a.b": 1}`); lists stay values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_run_folder(path: Path) -> bool:
    """A finished run with results (a run marked failed is none: `dvos.utils.runs.is_failed`)."""
    return (
        (path / "config.yaml").is_file()
        and ((path / "run_summary.json").is_file() or (path / "summary.json").is_file())
        and not is_failed(path)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DvosError(f"{path}: cannot read JSON ({type(err).__name__}: {err})") from err


def read_run_folder(path: Path) -> RunRecord:
    """A run folder: `run_summary.json` (or the flattened `summary.json` of an older run) and its config."""
    import yaml

    from dvos.utils.run_summary import SUMMARY_FILE, flat_summary

    if (path / SUMMARY_FILE).is_file():
        summary = _read_json(path / SUMMARY_FILE)
    else:
        summary = flat_summary(_read_json(path / "summary.json"))
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DvosError(f"{path / 'config.yaml'}: cannot read ({type(err).__name__})") from err
    flat_config = flatten(config)
    return RunRecord(
        name=path.name,
        source=str(path),
        summary=summary,
        config=flat_config,
        group=flat_config.get("logger.group"),
    )


def find_run_folders(path: Path, depth: int = 3) -> list[Path]:
    """Run folders at or under `path`: a sweep folder's trials in ranking order, else sorted by name."""
    if is_run_folder(path):
        return [path]
    ranking = path / "ranking.json"
    if ranking.is_file():
        try:
            trials = json.loads(ranking.read_text()).get("trials", [])
        except (OSError, ValueError, AttributeError):
            trials = []
        names = [Path(row["run_dir"]).name for row in trials if isinstance(row, dict) and row.get("run_dir")]
        # The trials are the sweep folder's sub-folders (by name: the folder may have moved since).
        found = [path / name for name in names if is_run_folder(path / name)]
        others = [child for child in sorted(path.iterdir()) if is_run_folder(child) and child not in found]
        return found + others
    if depth == 0 or not path.is_dir():
        return []
    found = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and child.name not in SKIPPED_FOLDERS and not child.name.startswith("."):
            found += find_run_folders(child, depth - 1)
    return found


def offline_runs(paths: list[Path], group: str | None) -> tuple[list[RunRecord], list[str]]:
    """The runs under `paths` (in `group` when given) and notes on what was left out."""
    notes: list[str] = []
    folders: list[Path] = []
    for path in paths:
        if not path.exists():
            raise DvosError(f"{path}: no such run folder")
        found = find_run_folders(path)
        if not found:
            notes.append(f"{path}: no run folder with results (config.yaml + run_summary.json) here")
        folders += [folder for folder in found if folder.resolve() not in {f.resolve() for f in folders}]
    runs = [read_run_folder(folder) for folder in folders]
    if group is not None:
        kept = [run for run in runs if run.group == group]
        if len(kept) < len(runs):
            notes.append(f"{len(runs) - len(kept)} run(s) outside group {group!r} left out")
        runs = kept
    _unique_names(runs)
    return runs, notes


def _unique_names(runs: list[RunRecord]) -> None:
    """Two folders with the same name (trials of two sweeps): add the parent folder's name."""
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{Path(run.source).parent.name}/{run.name}"


def online_runs(
    run_paths: list[str], *, project: str, entity: str | None, group: str | None, limit: int
) -> list[RunRecord]:
    """Runs from the W&B API: the given run paths, or the project's runs (in `group`)."""
    import wandb

    try:
        api = wandb.Api(timeout=30)
        if run_paths:
            found = [api.run(path) for path in run_paths]
        else:
            target = f"{entity}/{project}" if entity else project
            filters = {"group": group} if group else None
            found = list(itertools.islice(api.runs(target, filters=filters, per_page=min(limit, 100)), limit))
    except Exception as err:  # network, authentication, unknown project: one line
        raise DvosError(
            f"W&B API: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    runs = []
    for run in found:
        summary = {key: value for key, value in dict(run.summary).items() if not key.startswith("_")}
        config = flatten({key: value for key, value in dict(run.config).items() if not key.startswith("_")})
        runs.append(RunRecord(run.name, run.url, summary, config, group=getattr(run, "group", None)))
    _unique_names(runs)
    return runs


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------
def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as a value)."""
    keys = sorted({key for run in runs for key in run.config})
    missing = object()
    out = []
    for key in keys:
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        values = [json.dumps(run.config.get(key, missing), default=str, sort_keys=True) for run in runs]
        if len(set(values)) > 1:
            out.append(key)
    return out


def format_config_value(value: Any, width: int = 28) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    else:
        text = str(value)
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def best_index(values: list[float | None], higher_is_better: bool) -> int | None:
    present = [(value, index) for index, value in enumerate(values) if value is not None]
    if len(present) < 2 or len({value for value, _ in present}) == 1:
        return None  # nothing to choose between
    best = (max if higher_is_better else min)(value for value, _ in present)
    return next(index for value, index in present if value == best)


def comparison(runs: list[RunRecord], model: str) -> dict[str, Any]:
    """Everything the outputs show: per metric the values and the best run; the differing keys."""
    keys = differing_keys(runs)
    metrics = []
    for key, label, unit, higher, fmt in METRICS:
        values = [run.metric(model, key) for run in runs]
        metrics.append(
            {
                "key": key,
                "label": label,
                "unit": unit,
                "higher_is_better": higher,
                "format": fmt,
                "values": values,
                "best": best_index(values, higher),
            }
        )
    return {
        "model": model,
        "runs": [
            {"name": run.name, "source": run.source, "group": run.group, "summary": run.summary}
            for run in runs
        ],
        "metrics": metrics,
        "differing_keys": keys,
        "differing_values": {key: [run.config.get(key, ABSENT) for run in runs] for key in keys},
    }


def format_table(data: dict[str, Any], *, max_width: int = 24) -> str:
    """Runs as columns; rows: the metrics (best marked *), then the config keys that differ."""
    names = [run["name"] for run in data["runs"]]
    rows: list[list[str]] = []
    for metric in data["metrics"]:
        label = metric["label"] + (f" ({metric['unit']})" if metric["unit"] else "")
        cells = []
        for index, value in enumerate(metric["values"]):
            text = "-" if value is None else metric["format"].format(value)
            cells.append(text + ("*" if index == metric["best"] else ""))
        rows.append([label, *cells])
    if data["differing_keys"]:
        rows.append(["config that differs:", *([""] * len(names))])
        for key in data["differing_keys"]:
            rows.append([key, *(format_config_value(v, max_width) for v in data["differing_values"][key])])
    header = ["", *(name if len(name) <= max_width else "…" + name[-(max_width - 1) :] for name in names)]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(header, widths)))
    ]
    for row in rows:
        lines.append(
            "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    lines.append(f"(* best; {data['model']} rows; higher is better except memory and parameters)")
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------
# Picture (PIL only)
# --------------------------------------------------------------------------------------------------
RUN_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
INK, GREY, LIGHT, BACKGROUND = (30, 30, 30), (110, 110, 110), (225, 225, 225), (255, 255, 255)


def run_colour(index: int) -> tuple[int, int, int]:
    base = RUN_COLOURS[index % len(RUN_COLOURS)]
    if index < len(RUN_COLOURS):
        return base
    return tuple(int(0.6 * channel) for channel in base)  # type: ignore[return-value]


def _font(size: int, bold: bool = False) -> Any:
    from PIL import ImageFont

    for name in ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf",):
        for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/Library/Fonts"):
            candidate = Path(folder) / name
            if candidate.is_file():
                return ImageFont.truetype(str(candidate), size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: float) -> str:
    """`text`, shortened from the left with '…' until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def render_comparison(data: dict[str, Any], *, width: int = 1400) -> Any:
    """The comparison as a PIL image: legend, one horizontal bar chart per metric, differing keys."""
    from PIL import Image, ImageDraw

    names = [run["name"] for run in data["runs"]]
    count = len(names)
    margin, gap = 28, 22
    title_font, head_font, font, small = _font(22, True), _font(15, True), _font(13), _font(12)
    columns = 3
    panel_w = (width - 2 * margin - (columns - 1) * gap) // columns
    bar_h, bar_gap = 18, 6
    panel_h = 40 + count * (bar_h + bar_gap) + 10
    legend_cols = max(1, min(count, 4))
    legend_rows = math.ceil(count / legend_cols)
    keys = data["differing_keys"]
    row_h = 22
    table_h = (row_h * (len(keys) + 1) + 40) if keys else 40
    height = margin + 40 + legend_rows * 22 + 16 + 2 * (panel_h + gap) + table_h + margin
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    y = margin
    draw.text((margin, y), f"dvos compare: {count} runs, {data['model']}", fill=INK, font=title_font)
    y += 40
    legend_w = (width - 2 * margin) // legend_cols
    for index, name in enumerate(names):
        x = margin + (index % legend_cols) * legend_w
        yy = y + (index // legend_cols) * 22
        draw.rectangle((x, yy + 3, x + 14, yy + 17), fill=run_colour(index))
        draw.text((x + 20, yy + 2), _fit(draw, name, font, legend_w - 30), fill=INK, font=font)
    y += legend_rows * 22 + 16

    for number, metric in enumerate(data["metrics"]):
        px = margin + (number % columns) * (panel_w + gap)
        py = y + (number // columns) * (panel_h + gap)
        draw.rectangle((px, py, px + panel_w, py + panel_h), outline=LIGHT)
        unit = f" ({metric['unit']})" if metric["unit"] else ""
        better = "higher is better" if metric["higher_is_better"] else "lower is better"
        draw.text((px + 10, py + 8), metric["label"] + unit, fill=INK, font=head_font)
        draw.text(
            (px + panel_w - 10 - draw.textlength(better, font=small), py + 11), better, fill=GREY, font=small
        )
        values = metric["values"]
        present = [value for value in values if value is not None]
        top = max(present) if present else 0.0
        scale_max = top * 1.05 if top > 0 else 1.0
        label_w = 70
        x0, x1 = px + 10, px + panel_w - 10 - label_w
        for index, value in enumerate(values):
            by = py + 40 + index * (bar_h + bar_gap)
            draw.rectangle((x0, by, x1, by + bar_h), fill=(246, 246, 246))
            if value is None:
                draw.text((x0 + 4, by + 2), "no value", fill=GREY, font=small)
                continue
            length = 0 if scale_max <= 0 else max(1.0, (x1 - x0) * max(value, 0.0) / scale_max)
            draw.rectangle((x0, by, x0 + length, by + bar_h), fill=run_colour(index))
            text = metric["format"].format(value)
            if index == metric["best"]:
                draw.rectangle((x0 - 2, by - 2, x0 + length + 2, by + bar_h + 2), outline=INK, width=2)
                text += "  best"
            draw.text((x1 + 6, by + 2), text, fill=INK, font=small)

    y += 2 * (panel_h + gap)
    if keys:
        draw.text((margin, y), "config keys that differ", fill=INK, font=head_font)
        y += 26
        key_w = min(320, (width - 2 * margin) // 3)
        cell_w = (width - 2 * margin - key_w) / max(count, 1)
        for index, name in enumerate(names):
            cx = margin + key_w + index * cell_w
            draw.rectangle((cx + 2, y, cx + cell_w - 2, y + row_h - 2), fill=run_colour(index))
            draw.text((cx + 6, y + 3), _fit(draw, name, small, cell_w - 12), fill=BACKGROUND, font=small)
        y += row_h
        for row, key in enumerate(keys):
            if row % 2 == 0:
                draw.rectangle((margin, y, width - margin, y + row_h - 1), fill=(246, 246, 246))
            draw.text((margin + 4, y + 4), _fit(draw, key, small, key_w - 8), fill=INK, font=small)
            for index, value in enumerate(data["differing_values"][key]):
                cx = margin + key_w + index * cell_w
                text = _fit(draw, format_config_value(value, 200), small, cell_w - 12)
                draw.text((cx + 6, y + 4), text, fill=INK, font=small)
            y += row_h
    else:
        draw.text((margin, y), "the runs' configs are identical", fill=GREY, font=font)
    return image


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def render_html(data: dict[str, Any], picture: str | None) -> str:
    """A self-contained page: the table (runs as columns, best values bold) and the picture."""
    esc = html.escape
    names = [run["name"] for run in data["runs"]]
    head = "".join(
        f'<th style="border-bottom:4px solid rgb{run_colour(i)}" title="{esc(run["source"])}">{esc(name)}</th>'
        for i, (name, run) in enumerate(zip(names, data["runs"]))
    )
    rows = []
    for metric in data["metrics"]:
        unit = f" ({esc(metric['unit'])})" if metric["unit"] else ""
        cells = []
        for index, value in enumerate(metric["values"]):
            text = "–" if value is None else esc(metric["format"].format(value))
            cells.append(f"<td><b>{text}</b></td>" if index == metric["best"] else f"<td>{text}</td>")
        better = "↑" if metric["higher_is_better"] else "↓"
        rows.append(f"<tr><th>{esc(metric['label'])}{unit} {better}</th>{''.join(cells)}</tr>")
    if data["differing_keys"]:
        rows.append(f'<tr class="section"><th colspan="{len(names) + 1}">config keys that differ</th></tr>')
        for key in data["differing_keys"]:
            cells = "".join(
                f"<td>{esc(format_config_value(value, 80))}</td>" for value in data["differing_values"][key]
            )
            rows.append(f"<tr><th><code>{esc(key)}</code></th>{cells}</tr>")
    image = (
        f'<p><img src="{esc(picture)}" alt="comparison chart" style="max-width:100%"></p>' if picture else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dvos compare: {len(names)} runs</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #1e1e1e; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 4px 10px; text-align: right; border-bottom: 1px solid #e1e1e1; }}
tr > th:first-child {{ text-align: left; font-weight: normal; }}
tr.section th {{ text-align: left; font-weight: bold; padding-top: 1em; }}
td b {{ color: #1a7f37; }}
</style></head>
<body>
<h1>dvos compare: {len(names)} runs ({esc(data["model"])})</h1>
<p>Bold: the best value of each row. ↑ higher is better, ↓ lower is better.</p>
<table>
<tr><th></th>{head}</tr>
{chr(10).join(rows)}
</table>
{image}
</body></html>
"""


def write_outputs(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """comparison.png, comparison.html and comparison.json in `out_dir`, each written atomically."""
    from dvos.utils.io import atomic_path, atomic_write, ensure_writable_dir, write_json

    ensure_writable_dir(out_dir)
    paths = {name: out_dir / name for name in OUTPUT_NAMES}
    with atomic_path(paths["comparison.png"]) as tmp:
        render_comparison(data).save(tmp, format="PNG")
    with atomic_write(paths["comparison.html"], encoding="utf-8") as handle:
        handle.write(render_html(data, "comparison.png"))
    write_json(paths["comparison.json"], data)
    return paths
