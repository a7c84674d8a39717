"""Small hand-written SVG charts for the HTML report: horizontal bars and lines, no script, no fonts to fetch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

#: Tableau 10: tells series apart for most readers, colour-blind ones included.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
WIDTH = 760
_LABEL_W = 170
_VALUE_W = 90
_BAR_H = 14
_LEGEND_H = 26
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'

Show = Callable[[float], str]


def _legend(names: Sequence[str]) -> str:
    items, x = [], 0
    for i, name in enumerate(names):
        items.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{x + 16}" y="14">{escape(name)}</text>')
        x += 28 + 7 * len(name)
    return f'<g class="legend">{"".join(items)}</g>'


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], show: Show, *,
              stacked: bool = False) -> str:
    """One row per label: a bar per series side by side, or (``stacked``) one bar of the series end to end.
    Values below zero draw as zero; a missing value (None) draws no bar and reads "-", never a zero; each bar
    group ends with its value (the total when stacked)."""
    names = list(series)
    per_row = 1 if stacked else len(names)
    row_h = per_row * _BAR_H + 10
    height = _LEGEND_H + row_h * len(labels) + 4
    def at(name: str, i: int) -> float:
        return max(series[name][i] or 0.0, 0.0)

    ends = [sum(at(n, i) for n in names) if stacked else max(at(n, i) for n in names) for i in range(len(labels))]
    top = max(ends, default=0) or 1
    scale = (WIDTH - _LABEL_W - _VALUE_W) / top
    parts = [_legend(names)]
    for i, label in enumerate(labels):
        y = _LEGEND_H + i * row_h
        parts.append(f'<text x="{_LABEL_W - 8}" y="{y + row_h / 2 + 2:.0f}" text-anchor="end">'
                     f'{escape(label[:26])}</text>')
        x = float(_LABEL_W)
        for j, name in enumerate(names):
            value, width = at(name, i), at(name, i) * scale
            bar_y = y + (0 if stacked else j * _BAR_H)
            if series[name][i] is None and not stacked:
                parts.append(f'<text x="{x + 4:.1f}" y="{bar_y + _BAR_H - 3}">-</text>')
                continue
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{bar_y}" width="{max(width, 1):.1f}" '
                         f'height="{_BAR_H - 2}" fill="{PALETTE[j % len(PALETTE)]}">'
                         f'<title>{escape(label)} · {escape(name)}: {escape(show(value))}</title></rect>')
            if stacked:
                x += width
            else:
                parts.append(f'<text x="{x + width + 4:.1f}" y="{bar_y + _BAR_H - 3}">{escape(show(value))}</text>')
        if stacked:
            parts.append(f'<text x="{x + 4:.1f}" y="{y + _BAR_H - 3}">{escape(show(ends[i]))}</text>')
    return _svg(height, parts)


def line_chart(xs: Sequence[str], series: dict[str, Sequence[float | None]], show: Show) -> str:
    """A line per series over the x values (in order), a dot on every point (a single week still shows); missing
    points break nothing: the line joins the points it has. The y axis starts at zero, or below when a value is."""
    height, left, right, top, bottom = 260, 70, 16, _LEGEND_H + 8, 40
    values = [v for points in series.values() for v in points if v is not None]
    high, low = max(values, default=1.0), min(0.0, *values) if values else 0.0
    high = high if high > low else low + 1
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    step = plot_w / max(len(xs) - 1, 1)

    def px(i: int) -> float:
        return left + (i * step if len(xs) > 1 else plot_w / 2)

    def py(v: float) -> float:
        return top + plot_h * (1 - (v - low) / (high - low))

    parts = [_legend(list(series))]
    for k in range(5):  # gridlines with their values
        v = low + (high - low) * k / 4
        parts.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{escape(show(v))}</text>')
    every = max(1, -(-len(xs) // 8))
    for i, x in enumerate(xs):
        if i % every == 0 or i == len(xs) - 1:
            # The end labels lean inwards: centred on the plot's edge, half of each would fall outside the chart.
            anchor = "middle" if len(xs) == 1 else "start" if i == 0 else "end" if i == len(xs) - 1 else "middle"
            parts.append(f'<text x="{px(i):.1f}" y="{height - bottom + 18}" text-anchor="{anchor}">{escape(x)}</text>')
    for j, (name, points) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        drawn = [(px(i), py(v), v) for i, v in enumerate(points) if v is not None]
        path = " ".join(f"{'M' if n == 0 else 'L'}{x:.1f},{y:.1f}" for n, (x, y, _) in enumerate(drawn))
        parts.append(f'<path class="line" d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>{escape(name)}: '
                     f'{escape(show(v))}</title></circle>' for x, y, v in drawn)
    return _svg(height, parts)


def _svg(height: int, parts: list[str]) -> str:
    return (f'<svg class="chart" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}" {_FONT} fill="#222">{"".join(parts)}</svg>')
