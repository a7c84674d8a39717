"""The report's views as Grafana panels: the panel titled as a view, in the view's :attr:`View.dashboard`, runs
the view's SQL.

``python -m ctxflow.streams.report.grafana DASHBOARDS_DIR`` writes every view's SQL and description into its
panel (after a view changes); :func:`drift` lists the panels that no longer match, and a test keeps it empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ctxflow.streams.report.scope import GrafanaScope
from ctxflow.streams.report.views import VIEWS, Format, View

DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "ctxflow-clickhouse"}
#: Grafana's unit for each of the report's formats.
UNITS = {Format.USD: "currencyUSD", Format.SHARE: "percentunit", Format.CHANGE: "percentunit", Format.MS: "ms",
         Format.TOKENS: "short", Format.COUNT: "short", Format.RATIO: "x", Format.SCORE: "none"}


def panel_sql(view: View) -> str:
    """The view's SQL with the datasource's macros and the dashboards' ``tenant`` variable."""
    return view.sql(GrafanaScope())


def panel_description(view: View) -> str:
    """The view's description, and where the same numbers are in the terminal."""
    return f"{view.description} Same query as the '{view.title}' section of `ctxflow report`."


def panel(view: View, panel_id: int, grid: dict[str, int], kind: str) -> dict[str, Any]:
    """A new panel (``kind``: ``table`` or ``timeseries``) running ``view``'s query, with a unit per column."""
    time_series = kind == "timeseries"
    overrides = [{"matcher": {"id": "byName", "options": c.name},
                  "properties": [{"id": "unit", "value": UNITS[c.format]}, {"id": "displayName", "value": c.header}]}
                 for c in view.columns if c.format in UNITS]
    return {
        "id": panel_id, "type": kind, "title": view.title, "description": panel_description(view),
        "datasource": DATASOURCE, "gridPos": grid,
        "targets": [{"refId": "A", "datasource": DATASOURCE, "editorType": "sql",
                     "queryType": "timeseries" if time_series else "table", "format": 0 if time_series else 1,
                     "rawSql": panel_sql(view)}],
        "fieldConfig": {"defaults": {"unit": UNITS[view.chart.format]} if time_series and view.chart else {},
                        "overrides": [] if time_series else overrides},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["last", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if time_series
        else {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
    }


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for top in board["panels"] for p in (top.get("panels", []) if top["type"] == "row" else [top])]


def drift(dashboards: Path) -> list[str]:
    """Every view whose panel is missing, or whose panel's SQL or description is not the view's."""
    problems = []
    for view in VIEWS:
        if view.dashboard is None:
            continue
        board = json.loads((dashboards / view.dashboard).read_text())
        found = [p for p in _panels(board) if p["title"] == view.title]
        if len(found) != 1:
            problems.append(f"{view.dashboard}: {len(found)} panels titled {view.title!r}")
        elif [t["rawSql"] for t in found[0]["targets"]] != [panel_sql(view)]:
            problems.append(f"{view.dashboard}: {view.title!r} does not run the view's SQL")
        elif found[0].get("description") != panel_description(view):
            problems.append(f"{view.dashboard}: {view.title!r} does not describe the view")
    return problems


def sync(dashboards: Path) -> list[str]:
    """Write each view's SQL and description into its (existing) panel; returns the titles changed."""
    changed = []
    for view in VIEWS:
        if view.dashboard is None:
            continue
        path = dashboards / view.dashboard
        board = json.loads(path.read_text())
        for found in (p for p in _panels(board) if p["title"] == view.title):
            (target,) = found["targets"]
            if target["rawSql"] != panel_sql(view) or found.get("description") != panel_description(view):
                target["rawSql"], found["description"] = panel_sql(view), panel_description(view)
                changed.append(view.title)
        path.write_text(json.dumps(board, indent=2, ensure_ascii=False) + "\n")
    return changed


if __name__ == "__main__":
    print("\n".join(sync(Path(sys.argv[1]))) or "every panel already runs its view's SQL")
