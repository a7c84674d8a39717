"""Run the report's views through the analyst query path and keep each one's rows or why it has none."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ctxflow.sinks.clickhouse import QueryResult, json_value
from ctxflow.streams.config import Settings
from ctxflow.streams.report.scope import ReportScope
from ctxflow.streams.report.views import VIEWS, View
from ctxflow.streams.stack.query import QueryFailed, run_query

#: Runs one SQL statement with bound parameters (the worker's ``/query`` or chDB directly).
QueryFn = Callable[[str, dict[str, Any]], QueryResult]
_SHOWN_ERROR = 300
_UNKNOWN_TABLE = re.compile(r"Unknown table expression identifier '(?:\w+\.)?(\w+)'")
_EXCEPTION = re.compile(r"DB::Exception: (.+?)(?:\. In scope|\. \(|\n|$)")


@dataclass(frozen=True, slots=True)
class Section:
    """A view's outcome: ``rows`` as dicts keyed by column name (JSON values whichever path answered), or
    ``error`` when the query failed (a table this ClickHouse does not have yet, say)."""

    view: View
    rows: tuple[dict[str, Any], ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """Every section of one report, with the scope it covers and when it was made."""

    scope: ReportScope
    sections: tuple[Section, ...]
    made_at: dt.datetime
    source: str


def settings_query(settings: Settings, *, direct_fallback: bool = True) -> QueryFn:
    """A :data:`QueryFn` on the analyst path of ``ctxflow query``: the running worker, else chDB itself."""
    return lambda sql, parameters: run_query(settings, sql, parameters=parameters, direct_fallback=direct_fallback)


def collect(query: QueryFn, scope: ReportScope, source: str, views: Iterable[View] = VIEWS) -> Report:
    """Run every view of ``views`` in ``scope``; a failing view becomes a section with its error, never an
    exception, so one missing table does not cost the rest of the report."""
    sections = []
    for view in views:
        try:
            result = query(view.sql(scope), scope.parameters)
        except QueryFailed as error:
            sections.append(Section(view, error=_reason(str(error))))
            continue
        names = result.columns
        rows = tuple({name: json_value(value) for name, value in zip(names, row, strict=True)} for row in result.rows)
        sections.append(Section(view, rows))
    return Report(scope, tuple(sections), dt.datetime.now(dt.UTC), source)


def _reason(message: str) -> str:
    """What a reader needs of a failed query: ClickHouse's own sentence, without the SQL and stack it repeats."""
    if (missing := _UNKNOWN_TABLE.search(message)) is not None:
        return f"no table {missing[1]} in this ClickHouse yet (its schema is older: a current worker adds it)"
    found = _EXCEPTION.search(message)
    line = found[1] if found else (message.strip().splitlines() or ["query failed"])[0]
    return line if len(line) <= _SHOWN_ERROR else line[:_SHOWN_ERROR] + " ..."
