"""The benchmark's picture, drawn with PIL (matplotlib is not a dependency).

Four panels from `results.json`: FPS against video length, peak-memory growth against video length
(per model), J&F against FPS (per model and data set), and clips per second of data loading against
the training step's consumption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from dvos.utils.io import atomic_path

COLORS = {
    "student": (31, 119, 180),
    "dense": (214, 39, 40),
    "teacher": (44, 160, 44),
    "exported-torchscript": (148, 103, 189),
    "exported-onnx": (140, 86, 75),
    "exported-onnx-int8": (227, 119, 194),
}
OTHER_COLOR = (100, 100, 100)
MARKERS = ("circle", "square", "triangle", "diamond")
PANEL = (620, 420)
MARGIN = (78, 46, 24, 58)  # left, top, right, bottom inside a panel


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _format(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.2g}"


class Panel:
    """One chart in a box of the picture: axes, ticks, series, legend."""

    def __init__(
        self, draw: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, xlabel: str, ylabel: str
    ):
        self.draw = draw
        self.x0 = origin[0] + MARGIN[0]
        self.y0 = origin[1] + MARGIN[1]
        self.x1 = origin[0] + PANEL[0] - MARGIN[2]
        self.y1 = origin[1] + PANEL[1] - MARGIN[3]
        self.origin = origin
        draw.text(
            (origin[0] + PANEL[0] // 2, origin[1] + 14), title, fill="black", font=_font(16), anchor="mt"
        )
        draw.text(((self.x0 + self.x1) // 2, self.y1 + 40), xlabel, fill="black", font=_font(13), anchor="mt")
        draw.text((origin[0] + 8, self.y0 - 22), ylabel, fill="black", font=_font(13), anchor="lt")
        self.xlog = False
        self.xrange = (0.0, 1.0)
        self.yrange = (0.0, 1.0)

    def set_ranges(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlog: bool = False,
        y_from_zero: bool = True,
        x_from_zero: bool = False,
        yticks: bool = True,
    ) -> None:
        self.xlog = xlog and all(x > 0 for x in xs)
        xv = [math.log10(x) for x in xs] if self.xlog else list(xs)
        low, high = (min(xv), max(xv)) if xv else (0.0, 1.0)
        pad = (high - low) * 0.08 or 0.5
        self.xrange = (0.0 if x_from_zero else low - pad, high + pad)
        ylow = min([0.0, *ys]) if y_from_zero else min(ys, default=0.0)
        yhigh = max(ys, default=1.0)
        if yhigh <= ylow:
            yhigh = ylow + 1.0
        self.yrange = (ylow, yhigh + (yhigh - ylow) * 0.08)
        self._axes(xs, yticks=yticks)

    def px(self, x: float, y: float) -> tuple[float, float]:
        xv = math.log10(x) if self.xlog else x
        fx = (xv - self.xrange[0]) / (self.xrange[1] - self.xrange[0])
        fy = (y - self.yrange[0]) / (self.yrange[1] - self.yrange[0])
        return self.x0 + fx * (self.x1 - self.x0), self.y1 - fy * (self.y1 - self.y0)

    def _axes(self, xs: Sequence[float], *, yticks: bool = True) -> None:
        draw, font = self.draw, _font(12)
        draw.rectangle((self.x0, self.y0, self.x1, self.y1), outline="black")
        for y in _nice_ticks(*self.yrange) if yticks else []:
            if self.yrange[0] <= y <= self.yrange[1]:
                py = self.y1 - (y - self.yrange[0]) / (self.yrange[1] - self.yrange[0]) * (self.y1 - self.y0)
                draw.line((self.x0, py, self.x1, py), fill=(230, 230, 230))
                draw.text((self.x0 - 6, py), _format(y), fill="black", font=font, anchor="rm")
        if self.xlog:
            xticks = sorted(set(xs))
        else:
            xticks = [x for x in _nice_ticks(*self.xrange) if self.xrange[0] <= x <= self.xrange[1]]
        for x in xticks:
            px, _ = self.px(x, self.yrange[0])
            draw.line((px, self.y1, px, self.y1 + 4), fill="black")
            draw.text((px, self.y1 + 8), _format(x), fill="black", font=font, anchor="mt")

    def line(self, points: Sequence[tuple[float, float]], color: tuple[int, int, int]) -> None:
        pixels = [self.px(x, y) for x, y in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=2)
        for px, py in pixels:
            self.marker(px, py, color, "circle")

    def marker(self, px: float, py: float, color: tuple[int, int, int], shape: str, r: int = 5) -> None:
        box = (px - r, py - r, px + r, py + r)
        if shape == "square":
            self.draw.rectangle(box, fill=color)
        elif shape == "triangle":
            self.draw.polygon([(px, py - r), (px - r, py + r), (px + r, py + r)], fill=color)
        elif shape == "diamond":
            self.draw.polygon([(px, py - r), (px + r, py), (px, py + r), (px - r, py)], fill=color)
        else:
            self.draw.ellipse(box, fill=color)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int], str]]) -> None:
        font = _font(12)
        y = self.y0 + 8
        for label, color, shape in entries:
            self.marker(self.x1 - 150, y + 6, color, shape)
            self.draw.text((self.x1 - 140, y), label, fill="black", font=font)
            y += 18

    def message(self, text: str) -> None:
        self.draw.text(
            ((self.x0 + self.x1) // 2, (self.y0 + self.y1) // 2),
            text,
            fill="gray",
            font=_font(13),
            anchor="mm",
        )


def _color(model: str) -> tuple[int, int, int]:
    return COLORS.get(model, OTHER_COLOR)


def _length_panel(draw, origin, rows: list[dict[str, Any]], key: str, title: str, ylabel: str) -> None:
    panel = Panel(draw, origin, title, "video length (frames)", ylabel)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get(key) is not None:
            series.setdefault(row["model"], []).append((float(row["length"]), float(row[key])))
    points = [p for pts in series.values() for p in pts]
    if not points:
        panel.message("no measurements")
        return
    panel.set_ranges([p[0] for p in points], [p[1] for p in points], xlog=True)
    for model, pts in series.items():
        panel.line(sorted(pts), _color(model))
    panel.legend([(model, _color(model), "circle") for model in series])


def _accuracy_panel(draw, origin, datasets: list[dict[str, Any]]) -> None:
    panel = Panel(draw, origin, "J&F against speed", "frames per second", "J&F")
    points = []
    for index, dataset in enumerate(datasets):
        for row in dataset.get("rows", []):
            if row.get("J&F") is not None and row.get("fps"):
                points.append((row["fps"], row["J&F"], row["model"], MARKERS[index % len(MARKERS)]))
    if not points:
        panel.message("no J&F measured")
        return
    speeds = [p[0] for p in points]
    panel.set_ranges(speeds, [p[1] for p in points], xlog=max(speeds) > 10 * min(speeds))
    for fps, score, model, shape in points:
        panel.marker(*panel.px(fps, score), _color(model), shape, r=6)
    models = sorted(
        {p[2] for p in points}, key=list(COLORS).index if all(p[2] in COLORS for p in points) else str
    )
    entries = [(model, _color(model), "circle") for model in models]
    entries += [
        (dataset["name"], (60, 60, 60), MARKERS[index % len(MARKERS)])
        for index, dataset in enumerate(datasets)
        if dataset.get("rows")
    ]
    panel.legend(entries)


def _loading_panel(draw, origin, loading: dict[str, Any]) -> None:
    panel = Panel(draw, origin, "Data loading vs training step", "clips per second", "")
    bars = []
    for key, label in (("mp4", "mp4 (decord)"), ("frames", "frame folders")):
        for mode in ("single", "loader"):
            value = (loading.get(key) or {}).get(mode) or {}
            if value.get("clips_per_s"):
                workers = value.get("num_workers", 0)
                bars.append(
                    (
                        f"{label}, {workers} worker{'s' if workers != 1 else ''}",
                        value["clips_per_s"],
                        (31, 119, 180),
                    )
                )
    step = loading.get("train_step") or {}
    if step.get("clips_per_s"):
        bars.append(("training step consumes", step["clips_per_s"], (214, 39, 40)))
    if not bars:
        panel.message("not measured")
        return
    panel.set_ranges([0.0, max(b[1] for b in bars)], [0.0, float(len(bars))], x_from_zero=True, yticks=False)
    font = _font(12)
    height = (panel.y1 - panel.y0) / (len(bars) + 0.5)
    for index, (label, value, color) in enumerate(bars):
        top = panel.y0 + height * (index + 0.25)
        right, _ = panel.px(value, 0)
        draw.rectangle((panel.x0 + 1, top, max(panel.x0 + 2, right), top + height * 0.7), fill=color)
        draw.text(
            (panel.x0 + 6, top + height * 0.35),
            f"{label}: {value:.3g}",
            fill="white" if right - panel.x0 > 260 else "black",
            font=font,
            anchor="lm",
        )


def draw_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write the four-panel PNG of `results` (the dict written to results.json) to `path`, atomically."""
    width, height = 2 * PANEL[0], 2 * PANEL[1] + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    inference = results.get("inference") or {}
    size = inference.get("size")
    where = f"{size[0]}x{size[1]}" if size else ""
    machine = results.get("machine") or {}
    student = str(results.get("student", {}).get("weights", "?"))
    title = (
        f"dvos bench - {machine.get('cuda') or machine.get('device', '?')}, {machine.get('threads', '?')} threads, "
        f"{results.get('created', '')}; student: {student}"
    )
    draw.text((10, 12), title if len(title) <= 150 else title[:147] + "...", fill="black", font=_font(14))
    rows = inference.get("rows") or []
    _length_panel(draw, (0, 40), rows, "fps", f"Inference speed at {where}", "frames per second")
    _length_panel(
        draw,
        (PANEL[0], 40),
        rows,
        "growth_mb",
        f"Peak memory growth at {where}",
        "MB over the model's baseline",
    )
    _accuracy_panel(draw, (0, 40 + PANEL[1]), (results.get("accuracy") or {}).get("datasets") or [])
    _loading_panel(draw, (PANEL[0], 40 + PANEL[1]), results.get("data_loading") or {})
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
