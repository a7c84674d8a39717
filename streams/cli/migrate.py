"""``ctxflow migrate``: the ClickHouse schema's versions (applied or pending) and applying them.

Registered by ``streams/cli/main.py`` as ``app.command()(migrate)`` from ``ctxflow.streams.cli.migrate:migrate``.
Workers and sinks apply pending migrations themselves when they start (:mod:`sinks.migrations`); this command
shows where a database stands, prints the SQL an upgrade would run, or applies it ahead of a rollout.
"""

from __future__ import annotations

from typing import Annotated

import typer
from clickhouse_connect.driver.client import Client
from ctxflow.sinks import migrations
from ctxflow.sinks.clickhouse import DEFAULT_DATABASE, connect
from ctxflow.sinks.table_retention import TableRetention
from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True, markup=False, highlight=False)


def migrate(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option(help="Print the SQL of the pending migrations; change nothing.")] = False,
    unlock_schema: Annotated[bool, typer.Option(
        "--unlock", help="Remove the schema lock a runner that died left behind, then stop.")] = False,
    database: Annotated[str, typer.Option(help="ClickHouse database of ctxflow's tables.")] = DEFAULT_DATABASE,
) -> None:
    """Show the ClickHouse schema's migrations and apply the pending ones, with the retention TTLs of
    CTXFLOW_CLICKHOUSE_RETENTION_DAYS and CTXFLOW_CLICKHOUSE_ROLLUP_RETENTION_DAYS. On chDB, stop the process that
    holds the data directory first (the worker or `ctxflow sink` running the ClickHouse sink; it applies the
    migrations itself when it opens the directory)."""
    from ctxflow.streams.cli.main import settings_of  # main imports this module to register the command

    settings = settings_of(ctx)
    try:
        client = connect(settings.chdb_dsn)
    except Exception as error:
        console.print(f"cannot open {settings.chdb_dsn}: {error}. On chDB only one process may open the data "
                      "directory: stop the one running the ClickHouse sink (a worker or `ctxflow sink`; it migrates "
                      "the schema itself when it opens the directory).", style="red")
        raise typer.Exit(1) from error
    try:
        if unlock_schema:
            holder = migrations.unlock(client, database)
            console.print(f"removed the schema lock of {holder}" if holder else "the schema was not locked")
            return
        if dry_run:
            for migration, statements in migrations.pending_statements(client, database):
                console.print(f"-- {migration.version}: {migration.name}")
                for statement in statements:
                    console.print(f"{statement};")
            _show(client, database)
            return
        try:
            applied = migrations.migrate(client, database, exclusive_engine=settings.chdb_dsn.startswith("chdb:"),
                                       retention=TableRetention(settings.clickhouse_retention_days,
                                                                settings.clickhouse_rollup_retention_days))
        except migrations.SchemaLocked as error:
            console.print(str(error), style="red")
            raise typer.Exit(1) from error
        console.print(f"applied {', '.join(str(m.version) for m in applied)}" if applied else "nothing to apply")
        _show(client, database)
    finally:
        client.close()


def _show(client: Client, database: str) -> None:
    table = Table("version", "migration", "state", title=f"ClickHouse schema of {database}")
    for state in migrations.schema_state(client, database):
        where = "pending" if state.applied_at is None else f"applied {state.applied_at:%Y-%m-%d %H:%M:%S}"
        table.add_row(str(state.migration.version), state.migration.name, where)
    console.print(table)
