"""Grafana dashboard SQL made concrete: template variables and grafana-clickhouse-datasource macros expanded the
way Grafana and the plugin expand them (pkg/macros of grafana/clickhouse-datasource, ``$__conditionalAll`` of
grafana/sqlds), for a chosen time range, interval and tenant selection."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def dashboards(folder: Path) -> dict[str, dict[str, Any]]:
    """Every dashboard JSON in ``folder`` by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def panel_queries(boards: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """``("file: panel title [refId]", rawSql)`` for every target of every panel (rows' panels included), and
    ``("file: $tenant", rawSql)`` for each dashboard's tenant variable."""
    for name, board in boards.items():
        for top in board["panels"]:
            for panel in top.get("panels", []) if top["type"] == "row" else [top]:
                for target in panel["targets"]:
                    yield f"{name}: {panel['title']} [{target['refId']}]", target["rawSql"]
        for variable in board["templating"]["list"]:
            yield f"{name}: ${variable['name']}", variable["query"]["rawSql"]


def _call_args(sql: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose ``(`` is at ``start``, and the index after its ``)``."""
    depth, args, begin = 0, [], start + 1
    for pos in range(start, len(sql)):
        char = sql[pos]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[begin:pos].strip())
                return args, pos + 1
        elif char == "," and depth == 1:
            args.append(sql[begin:pos].strip())
            begin = pos + 1
    raise ValueError(f"unbalanced macro call in {sql!r}")


def expand(sql: str, start: dt.datetime, end: dt.datetime, interval_s: int, tenants: list[str] | None) -> str:
    """``sql`` as ClickHouse receives it from Grafana over ``[start, end]`` with ``tenants`` selected in the
    ``tenant`` variable (None: "All", which ``$__conditionalAll`` turns into ``1=1``)."""
    quoted = ",".join("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in tenants or [])
    sql = sql.replace("${tenant:singlequote}", quoted or "''")
    while (at := sql.find("$__conditionalAll(")) >= 0:
        args, after = _call_args(sql, at + len("$__conditionalAll"))
        sql = sql[:at] + (args[0] if tenants is not None else "1=1") + sql[after:]
    sql = sql.replace("$tenant", quoted or "''")
    seconds, millis = (int(start.timestamp()), int(end.timestamp())), (int(start.timestamp() * 1000),
                                                                       int(end.timestamp() * 1000))
    sql = re.sub(r"\$__timeFilter_ms\(([^()]+)\)", lambda m: f"{m[1]} >= fromUnixTimestamp64Milli({millis[0]}) AND "
                 f"{m[1]} <= fromUnixTimestamp64Milli({millis[1]})", sql)
    sql = re.sub(r"\$__timeFilter\(([^()]+)\)",
                 lambda m: f"{m[1]} >= toDateTime({seconds[0]}) AND {m[1]} <= toDateTime({seconds[1]})", sql)
    sql = re.sub(r"\$__timeInterval\(([^()]+)\)",
                 lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {max(interval_s, 1)} second)", sql)
    sql = (sql.replace("$__fromTime_ms", f"fromUnixTimestamp64Milli({millis[0]})")
              .replace("$__toTime_ms", f"fromUnixTimestamp64Milli({millis[1]})")
              .replace("$__fromTime", f"toDateTime({seconds[0]})").replace("$__toTime", f"toDateTime({seconds[1]})")
              .replace("$__interval_s", str(max(interval_s, 1))))
    if "$" in sql:
        raise ValueError(f"a macro or variable this expansion does not know: {sql}")
    return sql
