"""Line and bar charts as plain SVG text, for the run report (toa.report).

Why not matplotlib: importing it and saving the report's two figures cost ~1 s of CPU at the end
of every `toa run`, more than everything else the report does at a few thousand prompts
(py-spy of benchmarks/orchestrator.py; the report is part of every run's fixed cost: README,
"Speed and memory"). The report needs lines, shaded bands, bars, axes with round ticks and
legends; that is a page of string formatting, and SVG is text: the HTML page inlines it, Markdown
and the Prefect artifact reference it.

A chart is a `Panel` (one x axis, one y axis) of `Line`s, `Band`s and `Bar`s; `figure` lays out
panels side by side with a title and one legend below, and returns the SVG document.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# matplotlib's tab10 palette: the colours the report's readers know from before
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
DASHES = {"solid": None, "dashed": "6 4"}
FONT = 'font-family="system-ui,Helvetica,Arial,sans-serif"'


def colors(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


@dataclass
class Line:
    xs: Sequence[float]
    ys: Sequence[float]
    color: str
    style: str = "solid"  # a key of DASHES
    markers: bool = True


@dataclass
class Band:
    """A shaded area between lo and hi at each x (an interval around a curve)."""

    xs: Sequence[float]
    lo: Sequence[float]
    hi: Sequence[float]
    color: str
    opacity: float = 0.15


@dataclass
class Bar:
    x: float  # centre, in data units
    width: float
    height: float
    color: str
    label: str | None = None  # drawn above the bar


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    xticks: list[tuple[float, str]] | None = None  # fixed ticks (bar groups); None: round numbers
    ylim: tuple[float, float] | None = None
    integer_x: bool = False  # x ticks on whole numbers only (k)
    legend: list[tuple[str, str, str]] = field(default_factory=list)  # (label, colour, solid|dashed|band|box)


def nice_ticks(lo: float, hi: float, count: int = 6, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (1.0 if lo == 0 else abs(lo) * 0.1)
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        t += step
    return ticks


def tick_text(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def _extent(panel: Panel) -> tuple[float, float, float, float]:
    xs = [x for line in panel.lines for x in line.xs] + [x for b in panel.bands for x in b.xs]
    xs += [v for bar in panel.bars for v in (bar.x - bar.width / 2, bar.x + bar.width / 2)]
    ys = [y for line in panel.lines for y in line.ys] + [y for b in panel.bands for y in (*b.lo, *b.hi)]
    ys += [bar.height for bar in panel.bars] + ([0.0] if panel.bars else [])
    xs, ys = [v for v in xs if math.isfinite(v)] or [0.0, 1.0], [v for v in ys if math.isfinite(v)] or [0.0, 1.0]
    y0, y1 = panel.ylim or (min(ys), max(ys))
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.0 if panel.ylim else (y1 - y0) * 0.05
    x0, x1 = min(xs), max(xs)
    if panel.xticks:  # categories (bar groups): half a slot of room at each end
        x0, x1 = min(t for t, _ in panel.xticks) - 0.5, max(t for t, _ in panel.xticks) + 0.5
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    return x0, x1, y0 - pad, y1 + pad


def _points(xs, ys, sx, sy) -> str:
    return " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT}{extra}>{escape(text)}</text>'


def panel_svg(panel: Panel, left: float, top: float, width: float, height: float) -> list[str]:
    """One panel's elements, its plot area being (left, top, width, height) in pixels."""
    x0, x1, y0, y1 = _extent(panel)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * width

    def sy(y: float) -> float:
        return top + height - (y - y0) / (y1 - y0) * height

    out = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="white" stroke="#444"/>']
    xticks = panel.xticks or [(t, tick_text(t)) for t in nice_ticks(x0, x1, integer=panel.integer_x)]
    for t, label in xticks:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + height}" stroke="#ddd"/>')
        out.append(_text(sx(t), top + height + 15, label, 10))
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + width}" y2="{sy(t):.1f}" stroke="#ddd"/>')
        out.append(_text(left - 5, sy(t) + 4, tick_text(t), 10, "end"))
    for b in panel.bands:
        if b.xs:
            outline = _points([*b.xs, *reversed(b.xs)], [*b.hi, *reversed(b.lo)], sx, sy)
            out.append(f'<polygon class="band" points="{outline}" fill="{b.color}" fill-opacity="{b.opacity}" stroke="none"/>')
    for bar in panel.bars:
        x, y = sx(bar.x - bar.width / 2), sy(max(bar.height, 0.0))
        out.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{sx(bar.x + bar.width / 2) - x:.1f}" '
                   f'height="{sy(0.0) - y:.1f}" fill="{bar.color}"/>')
        if bar.label is not None:
            out.append(_text(sx(bar.x), y - 3, bar.label, 9))
    for line in panel.lines:
        dash = DASHES[line.style]
        out.append(f'<polyline class="line" points="{_points(line.xs, line.ys, sx, sy)}" fill="none" stroke="{line.color}" '
                   f'stroke-width="1.8"{f" stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')
        if line.markers:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{line.color}"/>' for x, y in zip(line.xs, line.ys)]
    out.append(_text(left + width / 2, top - 8, panel.title, 13, extra=' font-weight="bold"'))
    out.append(_text(left + width / 2, top + height + 34, panel.xlabel, 11))
    out.append(_text(left - 42, top + height / 2, panel.ylabel, 11,
                     extra=f' transform="rotate(-90 {left - 42:.1f} {top + height / 2:.1f})"'))
    out += _legend(panel.legend, left + width - 8, top + 10, anchor="end")
    return out


def _key(x: float, y: float, color: str, kind: str) -> str:
    if kind in ("band", "box"):  # a shaded band's key, or a bar's (solid)
        return (f'<rect x="{x:.1f}" y="{y - 5:.1f}" width="22" height="10" fill="{color}" '
                f'fill-opacity="{0.15 if kind == "band" else 1}"/>')
    dash = DASHES.get(kind)
    return (f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 22:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="1.8"'
            f'{f" stroke-dasharray={chr(34)}{dash}{chr(34)}" if dash else ""}/>')


def _legend(entries: list[tuple[str, str, str]], x: float, y: float, anchor: str) -> list[str]:
    """Entries stacked downwards; anchor "end": right-aligned at x (inside a panel's corner)."""
    if not entries:
        return []
    width = 30 + 6.2 * max(len(label) for label, _, _ in entries)
    left = x - width if anchor == "end" else x
    box = (f'<rect x="{left - 4:.1f}" y="{y - 9:.1f}" width="{width + 8:.1f}" height="{16 * len(entries) + 4}" '
           f'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    out = [box]
    for i, (label, color, kind) in enumerate(entries):
        out += [_key(left, y + 16 * i, color, kind), _text(left + 28, y + 16 * i + 4, label, 10, "start")]
    return out


def figure(panels: list[Panel], title: str, legend: list[tuple[str, str, str]], legend_title: str,
           panel_width: int = 420, panel_height: int = 300) -> str:
    """Panels side by side under a title, one legend row below them; the SVG document."""
    margin_left, margin_top, gap = 70, 60, 80
    legend_top = margin_top + panel_height + 60
    width = max(margin_left + len(panels) * panel_width + (len(panels) - 1) * gap + 30, 40 + 9 * len(title))
    height = legend_top + 40
    body = [_text(width / 2, 24, title, 15, extra=' font-weight="bold"')]
    for i, panel in enumerate(panels):
        body += panel_svg(panel, margin_left + i * (panel_width + gap), margin_top, panel_width, panel_height)
    x = margin_left
    body.append(_text(x, legend_top + 4, f"{legend_title}:", 11, "start", ' font-weight="bold"'))
    x += 16 + 8 * len(legend_title)  # bold
    for label, color, kind in legend:
        body += [_key(x, legend_top, color, kind), _text(x + 28, legend_top + 4, label, 11, "start")]
        x += 44 + 7.5 * len(label)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
