"""``ctxflow report``: the analyst views as terminal tables, and with ``--html FILE`` as one offline HTML file.

Registered by ``streams/cli/main.py`` (see ``SUBCOMMANDS`` there).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# No markup: tenant ids and errors may hold "[". Piped output has no width of its own: rich would squeeze every
# table into 80 columns, so it gets a wide one unless COLUMNS says otherwise.
console = Console(markup=False, highlight=False,
                  width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)


def _moment(text: str) -> dt.datetime:
    """An ISO date or timestamp; UTC unless it names its offset."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since and --until take an ISO date or time (2026-03-01, 2026-03-01T09:30), not {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def report(
    ctx: typer.Context,
    tenant: Annotated[list[str] | None, typer.Option(help="Only this tenant (repeat for several).")] = None,
    days: Annotated[float, typer.Option(min=0.001, help="How many days up to --until to cover.")] = 28.0,
    since: Annotated[str | None, typer.Option(help="Start (ISO date or time, UTC by default); overrides --days.")]
    = None,
    until: Annotated[str | None, typer.Option(help="End (ISO date or time); default now.")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write the report as one self-contained HTML file.")]
    = None,
    compact: Annotated[bool, typer.Option(help="Only the headline tables.")] = False,
) -> None:
    """Cost per tenant and sub-agent, top runs, cost per run week over week, context utilization, eviction per
    slot, compression, memory promotion and ingest lag; through the running worker, else on chDB directly."""
    from ctxflow.streams.cli.main import settings_of
    from ctxflow.streams.report.collect import collect, settings_query
    from ctxflow.streams.report.scope import ReportScope

    try:
        end = _moment(until) if until else dt.datetime.now(dt.UTC)
        start = _moment(since) if since else end - dt.timedelta(days=days)
        scope = ReportScope(start, end, tuple(tenant or ()))
    except ValueError as error:
        console.print(f"ctxflow report: {error}", style="red")
        raise typer.Exit(2) from error
    if start >= end:
        console.print(f"ctxflow report: --since {start:%Y-%m-%d %H:%M} is not before --until {end:%Y-%m-%d %H:%M}",
                      style="red")
        raise typer.Exit(2)
    settings = settings_of(ctx)
    made = collect(settings_query(settings), scope, source=settings.chdb_dsn.removeprefix("chdb://"))
    from ctxflow.streams.report.terminal import print_report

    print_report(made, console, compact=compact)
    if html is not None:
        from ctxflow.streams.report.html import write_html

        write_html(made, html)
        console.print(f"HTML report: {html.resolve()}")
