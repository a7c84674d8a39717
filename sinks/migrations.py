"""Brings a ClickHouse database to the newest schema: the pending migrations of :mod:`sinks.schema_versions`, once
each, in version order, then the columns the table specs add and the retention TTLs.

What :func:`migrate` guarantees
-------------------------------
- **Any number of times.** Applied versions are recorded in ``schema_migrations`` (version, name, when, by whom)
  and skipped; the column and TTL steps change nothing when nothing differs.
- **Concurrent runners** (processes on one ClickHouse server, or threads on one chDB engine): one at a time holds
  the schema lock, a table ``schema_lock`` its holder creates and drops when done. ``CREATE TABLE`` without
  ``IF NOT EXISTS`` is atomic (exactly one creator succeeds; the others get ``TABLE_ALREADY_EXISTS``), so no two
  runners apply migrations at once. The others poll until it is gone, then read the applied versions again
  and, normally, find nothing left to do. ``migrate`` returns only when the schema is current, so a process that
  starts writing after it never writes into a table being rebuilt.
- **A runner that died** mid-migration: that migration was not recorded, and the next runner applies it again
  from its first statement (every migration is written to be re-runnable). The lock it held stays behind.
  On chDB a data directory belongs to one process, so a lock left by another process is stale and is broken at
  once. On a server the others wait ``lock_timeout_s`` and then fail naming the holder;
  ``ctxflow migrate --unlock`` removes the lock once that process is known to be gone.
- **A database from before migrations** (ctxflow's tables, no ``schema_migrations``): migration 1 is the
  schema as released then, with ``IF NOT EXISTS``, so it recreates nothing and is recorded as version 1; the
  later migrations upgrade it in place, keeping its rows.

Not guaranteed: a process of an *older* ctxflow version writing while a table is rebuilt (migration 2) may
lose the rows it inserts between the copy and the swap. Stop older sinks before starting the new version (the
Kafka log still holds those records; replaying it re-projects them).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from ctxflow.sinks.clickhouse_ddl import TABLES
from ctxflow.sinks.schema_versions import MIGRATIONS, Migration
from ctxflow.sinks.table_retention import TableRetention, retention_statements

logger = logging.getLogger(__name__)

HISTORY = "schema_migrations"
LOCK = "schema_lock"
_TABLE_EXISTS = 57
#: This process, told apart from an earlier one that had the same pid (a restarted container's pid 1).
_PROCESS = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
#: Statements of a migration see their predecessors' mutations finished.
_MIGRATION_SETTINGS = {"mutations_sync": 2}


class SchemaLocked(RuntimeError):
    """Another runner holds the schema lock and did not release it in time."""


@dataclass(frozen=True, slots=True)
class MigrationState:
    """Where one migration stands in a database: when it was applied (None: pending)."""

    migration: Migration
    applied_at: datetime | None


def schema_state(client: Client, database: str) -> list[MigrationState]:
    """Every migration with its state in ``database`` (read without taking the lock)."""
    applied = _applied(client, database)
    return [MigrationState(m, applied.get(m.version)) for m in MIGRATIONS]


def pending_statements(client: Client, database: str) -> list[tuple[Migration, tuple[str, ...]]]:
    """The migrations :func:`migrate` would apply now, with their SQL (a dry run: nothing is changed)."""
    return [(s.migration, s.migration.statements(database)) for s in schema_state(client, database)
            if s.applied_at is None]


def migrate(
    client: Client,
    database: str,
    *,
    retention: TableRetention | None = None,
    exclusive_engine: bool = False,
    lock_timeout_s: float = 600.0,
) -> list[Migration]:
    """Apply the pending migrations of ``database`` (created if missing), add the spec columns its tables lack,
    and set the TTLs of ``retention`` (None leaves TTLs as they are); returns the migrations applied now.

    ``exclusive_engine``: the client is chDB, whose data directory one process owns, so a lock left by another
    process is stale. Raises :class:`SchemaLocked` when another runner holds the lock past ``lock_timeout_s``.
    """
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    with _SchemaLock(client, database, exclusive_engine, lock_timeout_s):
        client.command(
            f"CREATE TABLE IF NOT EXISTS `{database}`.{HISTORY} (version UInt32, name String, "
            "applied_at DateTime64(3, 'UTC'), applied_by String) ENGINE = ReplacingMergeTree ORDER BY version"
        )
        # Read again under the lock: a runner that held it before may have applied them.
        done = [s.migration for s in schema_state(client, database) if s.applied_at is None]
        for migration in done:
            _apply(client, database, migration)
        for spec in TABLES:
            client.command(spec.add_columns_sql(database))
        if retention is not None:
            for statement in retention_statements(client, database, retention):
                logger.info("retention changed: %s", statement)
                client.command(statement, settings=_MIGRATION_SETTINGS)
    return done


def unlock(client: Client, database: str) -> str | None:
    """Remove the schema lock whoever holds it; returns who held it (None: nobody). Only for a holder known to
    be gone: a live runner would continue without it."""
    holder = _lock_holder(client, database)
    client.command(f"DROP TABLE IF EXISTS `{database}`.{LOCK} SYNC")
    return holder


def _apply(client: Client, database: str, migration: Migration) -> None:
    started = time.monotonic()
    if migration.version == 1 and _tables(client, database) >= {"turns", "usage", "runs"}:
        logger.info("recognised a ctxflow schema from before versioned migrations in %s: recording it as version 1",
                    database)
    for statement in migration.statements(database):
        client.command(statement, settings=_MIGRATION_SETTINGS)
    client.insert(
        f"`{database}`.{HISTORY}",
        [(migration.version, migration.name, datetime.now(UTC), _holder())],
        column_names=["version", "name", "applied_at", "applied_by"],
    )
    logger.info("applied migration %d (%s) to %s in %.2f s", migration.version, migration.name, database,
                time.monotonic() - started)


def _applied(client: Client, database: str) -> dict[int, datetime]:
    if HISTORY not in _tables(client, database):
        return {}
    rows = client.query(
        f"SELECT version, min(applied_at) FROM `{database}`.{HISTORY} FINAL GROUP BY version"
    ).result_rows
    return {int(version): applied_at for version, applied_at in rows}


def _tables(client: Client, database: str) -> set[str]:
    rows = client.query("SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": database})
    return {name for (name,) in rows.result_rows}


def _holder() -> str:
    return f"{_PROCESS}:{threading.get_ident()}"


def _lock_holder(client: Client, database: str) -> str | None:
    rows = client.query(
        "SELECT comment FROM system.tables WHERE database = {db:String} AND name = {lock:String}",
        parameters={"db": database, "lock": LOCK},
    ).result_rows
    return rows[0][0] if rows else None


class _SchemaLock:
    """Held while this runner changes the schema (see the module docstring)."""

    def __init__(self, client: Client, database: str, exclusive_engine: bool, timeout_s: float) -> None:
        self._client, self._database = client, database
        self._exclusive, self._timeout_s = exclusive_engine, timeout_s
        self._holder = _holder()

    def __enter__(self) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                self._client.command(
                    f"CREATE TABLE `{self._database}`.{LOCK} (holder String) ENGINE = Memory "
                    f"COMMENT '{self._holder} since {datetime.now(UTC).isoformat(timespec='seconds')}'"
                )
                return
            except DatabaseError as error:
                if error.code != _TABLE_EXISTS and f"Code: {_TABLE_EXISTS}." not in str(error):
                    raise
            holder = _lock_holder(self._client, self._database)
            if holder is None:
                continue  # released between our attempt and the look
            if self._exclusive and not holder.startswith(f"{_PROCESS}:"):
                logger.warning("breaking a stale schema lock of %s: chDB data belongs to this process", holder)
                self._client.command(f"DROP TABLE IF EXISTS `{self._database}`.{LOCK} SYNC")
                continue
            if time.monotonic() >= deadline:
                raise SchemaLocked(
                    f"the schema of {self._database} is locked by {holder}; if that process is gone, remove the "
                    "lock with `ctxflow migrate --unlock` and start again"
                )
            time.sleep(0.2)  # another runner is migrating: nothing to do but wait for it

    def __exit__(self, *exc: object) -> None:
        holder = _lock_holder(self._client, self._database)
        if holder is not None and holder.startswith(f"{self._holder} "):
            self._client.command(f"DROP TABLE IF EXISTS `{self._database}`.{LOCK} SYNC")
