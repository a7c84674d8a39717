"""The ClickHouse sink: batched idempotent writes of the projection, and the read-only analyst query path.

Works against chDB in-process (``chdb:///abs/path``) or a ClickHouse server (``http://...``), both through
clickhouse-connect. chDB hosts one engine per process: every client in the process must use the same path
(clients on that path share its data); opening another path, or ``:memory:``, while one is open fails
until every client is closed. A second process cannot open a path this process holds (the engine locks
``<path>/status``), so other processes reach the data through the worker's HTTP query endpoint.

Reads de-duplicate: the analyst client runs with ``final=1``, which applies FINAL to every
ReplacingMergeTree read (including subqueries and joins), so rows not yet merged never show twice. It is
then pinned with ``readonly=1``: no writes, DDL, setting changes (so ``final`` cannot be switched off) or
table functions that reach outside the tables (``file()``, ``url()``, ``remote()``, ``s3()``, chDB's
``python()`` which reads objects of this process). ``readonly=2`` was measured to allow all of those,
including ``INSERT INTO FUNCTION file(...)``, so it is not used.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError
from pydantic import BaseModel

from sinks.base import Batch, BatchingSink, SinkBackpressure
from sinks.clickhouse_ddl import TABLE_BY_MODEL, TABLE_BY_NAME, TABLES

logger = logging.getLogger(__name__)

#: Errors expected to clear by themselves, with how long to wait before retrying the flush (seconds).
TRANSIENT_CODES: dict[int, float] = {
    159: 1.0,  # TIMEOUT_EXCEEDED
    202: 0.5,  # TOO_MANY_SIMULTANEOUS_QUERIES
    209: 1.0,  # SOCKET_TIMEOUT
    210: 1.0,  # NETWORK_ERROR
    241: 1.0,  # MEMORY_LIMIT_EXCEEDED
    242: 5.0,  # TABLE_IS_READ_ONLY (replica lost its keeper session)
    252: 2.0,  # TOO_MANY_PARTS: merges must catch up
    319: 1.0,  # UNKNOWN_STATUS_OF_INSERT: retrying is safe, writes are idempotent
    999: 5.0,  # KEEPER_EXCEPTION
}
_READONLY = 164
#: Order matters: ``readonly=1`` must come last, it freezes every setting applied before it.
ANALYST_SETTINGS: dict[str, Any] = {
    "final": 1,
    # An explicit PREWHERE would otherwise filter before FINAL and could match a superseded memory version.
    "apply_prewhere_after_final": 1,
    "max_execution_time": 60,
    "readonly": 1,
}


class ReadOnlyViolation(PermissionError):
    """An analyst query tried to write, change a setting, or use a table function that reaches outside."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Result of an analyst query: column names and rows (tuples, in column order)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


class ClickHouseSink(BatchingSink[BaseModel]):
    """Projects turns, usage, runs, decisions, dead letters, memory records and invalidations to ClickHouse.

    Guarantees: ``write`` is idempotent (re-sent or re-cut batches leave one visible row per record
    identity on the analyst path); a ``no_retention`` turn's content is never sent to ClickHouse; transient
    failures raise :class:`SinkBackpressure`; ``query`` cannot modify anything.
    """

    def __init__(self, dsn: str, database: str = "ctxflow") -> None:
        super().__init__()
        self.dsn = dsn
        self.database = database
        self._writer = _connect(dsn)
        self._reader: Client | None = None
        self._reader_lock = threading.Lock()

    def ensure_schema(self) -> None:
        """Create the database and every projected table if missing (safe to call any number of times)."""
        self._writer.command(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
        for spec in TABLES:
            self._writer.command(spec.create_sql(self.database))
        logger.info("clickhouse schema ready in %s (%d tables)", self.database, len(TABLES))

    def table_for(self, record: BaseModel) -> str:
        """The table projecting ``record``'s type; ``TypeError`` for types with no table."""
        spec = TABLE_BY_MODEL.get(type(record))
        if spec is None:
            raise TypeError(f"no ClickHouse table projects {type(record).__name__}")
        return spec.name

    def write(self, batch: Batch[BaseModel]) -> None:
        """Insert ``batch`` as one block; safe to repeat with the same or other batch boundaries.

        Row-oriented: column-oriented inserts measured no faster on chDB 26.9 (the fixed cost per insert,
        about 15 ms for the INFILE round trip and a new part, dominates), so batch size is what matters.
        """
        spec = TABLE_BY_NAME[batch.table]
        rows = [spec.to_row(record) for record in batch.records]
        if not rows:
            return
        try:
            table = f"`{self.database}`.`{spec.name}`"
            self._writer.insert(table, rows, column_names=spec.column_names)
        except OperationalError as exc:
            if exc.code is None or exc.code in TRANSIENT_CODES:
                raise SinkBackpressure(TRANSIENT_CODES.get(exc.code or 0, 1.0), str(exc)) from exc
            raise
        except DatabaseError as exc:
            if exc.code in TRANSIENT_CODES:
                raise SinkBackpressure(TRANSIENT_CODES[exc.code], str(exc)) from exc
            raise

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """Run one read-only analyst statement over de-duplicated tables (unqualified names resolve to the
        sink's database). Bind values with ``{name:Type}`` placeholders and ``parameters``.

        Raises :class:`ReadOnlyViolation` for anything that would write or change settings.
        """
        with self._reader_lock:
            if self._reader is None:
                # tz_mode="aware": timestamps come back as UTC-aware datetimes, like the contract's models.
                self._reader = _connect(
                    self.dsn, database=self.database, settings=ANALYST_SETTINGS, tz_mode="aware"
                )
            reader = self._reader
        try:
            result = reader.query(sql, parameters=parameters)
        except DatabaseError as exc:
            if exc.code == _READONLY:
                raise ReadOnlyViolation(f"analyst queries are read-only: {exc}") from exc
            raise
        return QueryResult(tuple(result.column_names), [tuple(row) for row in result.result_rows])

    def close(self) -> None:
        """Close both clients; with chDB this releases the process's engine once no other client is open."""
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        self._writer.close()


def _connect(dsn: str, **kwargs: Any) -> Client:
    try:
        return clickhouse_connect.get_client(dsn=dsn, **kwargs)
    except ProgrammingError as exc:
        if "already initialized with path" in str(exc):
            raise RuntimeError(
                f"chDB hosts one engine per process and another path is open here; cannot open {dsn}: {exc}"
            ) from exc
        raise
