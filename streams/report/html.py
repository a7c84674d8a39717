"""The report as one HTML file that opens with no network: inline CSS, inline SVG charts, no script."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from ctxflow.streams.report.collect import Report, Section
from ctxflow.streams.report.formats import show
from ctxflow.streams.report.svg import bar_chart, line_chart
from ctxflow.streams.report.views import Chart, Format

#: Rows a chart draws (the table below it has them all): more bars than this no longer read.
CHART_ROWS = 15
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; background: #f4f5f7; margin: 0; }
header { background: #1f2d3d; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c9d3de; }
main { padding: 16px 32px 40px; display: grid; grid-template-columns: repeat(auto-fill, minmax(800px, 1fr));
       gap: 16px; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 14px 18px; overflow-x: auto; }
h2 { font-size: 16px; margin: 0 0 4px; }
p.about { color: #555; margin: 0 0 10px; }
p.empty { color: #8a6d00; background: #fff8e1; padding: 8px 10px; border-radius: 4px; }
p.failed { color: #8b1a1a; background: #fdecea; padding: 8px 10px; border-radius: 4px; }
table { border-collapse: collapse; margin-top: 10px; font-variant-numeric: tabular-nums; }
table { font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eceef1; text-align: left; white-space: nowrap; }
th { background: #f7f8fa; font-weight: 600; }
td.n, th.n { text-align: right; }
svg.chart { display: block; max-width: 100%; height: auto; }
"""


def render_html(report: Report) -> str:
    """The whole page for ``report``: a header saying what it covers, then every view with its chart and table."""
    scope = report.scope
    tenants = ", ".join(scope.tenant_ids) or "all tenants"
    covered = f"{scope.since:%Y-%m-%d %H:%M} to {scope.until:%Y-%m-%d %H:%M} UTC"
    body = "\n".join(_section(s) for s in report.sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ctxflow report: {escape(tenants)}, {escape(covered)}</title><style>{_STYLE}</style></head>"
            f"<body><header><h1>ctxflow report</h1><p>{escape(tenants)} · {escape(covered)} · made "
            f"{report.made_at:%Y-%m-%d %H:%M} UTC from {escape(report.source)}</p></header>"
            f"<main>\n{body}\n</main></body></html>\n")


def write_html(report: Report, path: Path) -> Path:
    """Write :func:`render_html` of ``report`` to ``path`` (parents made); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path


def _section(section: Section) -> str:
    view = section.view
    head = f'<section id="{view.key}"><h2>{escape(view.title)}</h2><p class="about">{escape(view.description)}</p>'
    if section.error is not None:
        return f'{head}<p class="failed">Not available: {escape(section.error)}</p></section>'
    if not section.rows:
        return f'{head}<p class="empty">No data yet in this range.</p></section>'
    chart = _chart(view.chart, section.rows) if view.chart else ""
    return f"{head}{chart}{_table(section)}</section>"


def _chart(chart: Chart, rows: tuple[dict[str, Any], ...]) -> str:
    def shown(value: float) -> str:
        return show(value, chart.format)

    if chart.kind == "bar":
        top = rows[:CHART_ROWS]
        labels = [show(r.get(chart.label), Format.TEXT) for r in top]
        series = {_header(name): [None if r.get(name) is None else float(r[name]) for r in top]
                  for name in chart.values}
        if all(v is None for values in series.values() for v in values):
            return ""  # nothing to draw: the table says "-" for each
        return bar_chart(labels, series, shown, stacked=chart.stacked)
    xs = list(dict.fromkeys(show(r.get(chart.label), Format.TEXT) for r in rows))
    lines: dict[str, list[float | None]] = {}
    for r in rows:
        for name in chart.values:
            key = " · ".join(p for p in (str(r.get(chart.series)) if chart.series else "", _header(name)) if p)
            points = lines.setdefault(key, [None] * len(xs))
            value = r.get(name)
            points[xs.index(show(r.get(chart.label), Format.TEXT))] = None if value is None else float(value)
    return line_chart(xs, lines, shown)


def _header(name: str) -> str:
    return name.removesuffix("_usd").removesuffix("_ms").replace("_", " ")


def _table(section: Section) -> str:
    columns = section.view.columns
    head = "".join(f'<th class="{"n" if c.format.numeric else ""}">{escape(c.header)}</th>' for c in columns)
    rows = "".join(
        "<tr>" + "".join(f'<td class="{"n" if c.format.numeric else ""}">{escape(show(r.get(c.name), c.format))}'
                         "</td>" for c in columns) + "</tr>"
        for r in section.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
