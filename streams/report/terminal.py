"""The report as rich tables: one per view, a "no data yet" line for an empty one, the error for a failed one."""

from __future__ import annotations

from ctxflow.streams.report.collect import Report, Section
from ctxflow.streams.report.formats import show
from rich.console import Console
from rich.table import Table

#: Rows a terminal table shows before it says how many more there are (the HTML file shows them all).
SHOWN_ROWS = 20


def print_report(report: Report, console: Console, *, compact: bool = False) -> None:
    """Print ``report``'s terminal sections (only the compact ones when ``compact``), after a header line."""
    scope = report.scope
    tenants = ", ".join(scope.tenant_ids) or "all tenants"
    console.print(f"ctxflow report: {tenants}, {scope.since:%Y-%m-%d %H:%M} to {scope.until:%Y-%m-%d %H:%M} UTC "
                  f"({report.source})", style="bold")
    for section in report.sections:
        if section.view.terminal and (section.view.compact or not compact):
            print_section(section, console, description=not compact)


def print_section(section: Section, console: Console, *, description: bool = True) -> None:
    """One view as a table, or the line that says why there is none."""
    view = section.view
    if section.error is not None:
        console.print(f"{view.title}: not available: {section.error}", style="yellow")
        return
    if not section.rows:
        console.print(f"{view.title}: no data yet in this range", style="yellow")
        return
    table = Table(title=view.title, title_justify="left", caption=view.description if description else None,
                  caption_justify="left")
    for column in view.columns:
        table.add_column(column.header, justify="right" if column.format.numeric else "left")
    for row in section.rows[:SHOWN_ROWS]:
        table.add_row(*(show(row.get(c.name), c.format) for c in view.columns))
    console.print(table)
    if len(section.rows) > SHOWN_ROWS:
        console.print(f"... and {len(section.rows) - SHOWN_ROWS} more rows (in the HTML file)")
