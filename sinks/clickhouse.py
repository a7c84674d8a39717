"""The ClickHouse sink: batched idempotent writes of the projection, and the read-only analyst query path.

Works against chDB in-process (``chdb:///abs/path``) or a ClickHouse server (``http://...``), both through
clickhouse-connect. chDB hosts one engine per process: every client in the process must use the same path
(clients on that path share its data); opening another path, or ``:memory:``, while one is open fails
until every client is closed. A second process cannot open a path this process holds (the engine locks
``<path>/status``), so other processes reach the data through the HTTP query endpoint of the process holding it
(:mod:`streams.sink.ownership`).

Reads de-duplicate: the analyst client runs with ``final=1``, which applies FINAL to every
ReplacingMergeTree read (including subqueries and joins), so rows not yet merged never show twice. It is
then pinned with ``readonly=1``: no writes, DDL, setting changes (so ``final`` cannot be switched off) or
table functions that reach outside the tables (``file()``, ``url()``, ``remote()``, ``s3()``, chDB's
``python()`` which reads objects of this process). ``readonly=2`` was measured to allow all of those,
including ``INSERT INTO FUNCTION file(...)``, so it is not used.

Fast path (chDB only): turns, usage reports and run events arrive as Avro; :meth:`ClickHouseSink.add_encoded`
keeps their bytes, each followed by its offset, and a flush wraps each writer schema's bodies into one Avro object
container file, whose schema is the writer's plus a trailing ``source_offset`` long, that chDB parses itself
(``INSERT ... SELECT <projection> FROM file(..., 'Avro')``). Building rows and the Native
block in Python cost ~15 us per turn, most of it holding the GIL; the container costs ~1 us, and chDB's own
parse runs without the GIL. The SELECT applies the same projection as ``clickhouse_ddl`` (no-retention content
dropped, a missing digest computed, embedding dimensions) and is checked against it by EXCEPT in both
directions. Records this cannot express exactly go the model path: Confluent framing, and a writer schema that
lacks a column whose reader default is not null. The container lives in an anonymous in-memory file
(``memfd_create``, read by chDB as ``/proc/self/fd/<n>``), so no-retention content never reaches a filesystem on
its way to the SELECT that drops it; :meth:`ClickHouseSink.add_avro` therefore takes bodies without decoding
them. Where there is no ``memfd_create`` (not Linux) the container is a temporary file, and no-retention turns
that still carry content go the model path instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import clickhouse_connect
from clickhouse_connect.driver import options
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError
from ctxflow.schemas.codec import SINGLE_OBJECT_MAGIC, SchemaVersion, kept_schemas
from ctxflow.schemas.models import PrivacyMode, RunEvent, TurnEvent, UsageReport
from ctxflow.sinks.base import Batch, BatchingSink, SinkBackpressure
from ctxflow.sinks.clickhouse_ddl import FEEDS, TABLE_BY_MODEL, TABLE_BY_NAME, Logged, TableSpec, spec_of
from ctxflow.sinks.migrations import migrate
from ctxflow.sinks.table_retention import TableRetention
from pydantic import BaseModel

logger = logging.getLogger(__name__)

#: The database ctxflow's tables live in.
DEFAULT_DATABASE = "ctxflow"
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


#: Record types the fast path writes from their Avro bytes.
ENCODED_TYPES = (TurnEvent, UsageReport, RunEvent)
#: Columns the projection derives (mirrors ``clickhouse_ddl._turn_row``); other columns are the Avro field.
_DERIVED: dict[str, dict[str, str]] = {
    "turns": {
        "content": "if(privacy = 'retained', content, NULL)",
        "content_digest": (
            "if(isNull(content_digest) AND isNotNull(content), lower(hex(SHA256(content))), content_digest)"
        ),
        "embedding_dims": "length(embedding)",
    },
}
_SYNC = bytes(range(16))  # any 16 bytes: an object container only needs them to repeat after each block


class ReadOnlyViolation(PermissionError):
    """An analyst query tried to write, change a setting, or use a table function that reaches outside."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Result of an analyst query: column names and rows (tuples, in column order)."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def as_json(self) -> dict[str, Any]:
        """``{"columns": [...], "rows": [[...]]}`` holding only JSON types; see :func:`json_value`."""
        return {"columns": list(self.columns), "rows": [[json_value(v) for v in row] for row in self.rows]}


def json_value(value: Any) -> Any:
    """``value`` as strict JSON can hold it, the same whichever path a query took: timestamps, dates and times
    in ISO 8601 (an aware timestamp keeps its offset), decimals as their exact text, bytes as UTF-8 text or,
    when they are not UTF-8, as hex; NaN and infinities (an empty ``quantile``) as null; arrays, tuples and
    maps element by element; anything else (UUID, IP address) as its text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return bytes(value).hex()
    if isinstance(value, dict):
        return {str(json_value(k)): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(v) for v in value]
    return str(value)


class ClickHouseSink(BatchingSink[BaseModel | Logged[Any]]):
    """Projects turns, usage, runs, decisions, dead letters, memory records and invalidations to ClickHouse.

    Guarantees: ``write`` is idempotent (re-sent or re-cut batches leave one visible row per record
    identity on the analyst path, and for turns, usage and runs, added as :class:`Logged`, the visible copy of an
    identity is the one with the lowest offset: the one the budget counted); a ``no_retention`` turn's content is
    never sent to ClickHouse; transient failures raise :class:`SinkBackpressure`; ``query`` cannot modify
    anything.
    """

    def __init__(self, dsn: str, database: str = DEFAULT_DATABASE) -> None:
        super().__init__()
        self.dsn = dsn
        self.database = database
        self._writer = connect(dsn)
        self._reader: Client | None = None
        self._reader_lock = threading.Lock()
        self._encoded: dict[bytes, list[bytes]] = {}  # writer fingerprint -> Avro bodies
        self._plans: dict[bytes, _AvroPlan] = {}  # filled by ensure_schema on chDB

    def ensure_schema(self, retention: TableRetention | None = None) -> None:
        """Bring the database to the newest schema (:func:`sinks.migrations.migrate`: safe to call any number of
        times, and from several processes at once) with the TTLs of ``retention`` (None leaves them as they are)."""
        # clickhouse-connect looks for pandas on its first insert: an import that would stall the first batch.
        options.pd  # noqa: B018
        migrate(self._writer, self.database, retention=retention, exclusive_engine=self.dsn.startswith("chdb:"))
        if self.dsn.startswith("chdb:"):  # a server could not read the container from this host's files
            for model in ENCODED_TYPES:
                for writer in kept_schemas()[model.__name__]:
                    plan = self._make_plan(writer, TABLE_BY_MODEL[model])
                    if plan is not None:
                        self._plans[writer.fingerprint] = plan
        logger.info("clickhouse schema ready in %s", self.database)

    def table_for(self, record: BaseModel | Logged[Any]) -> str:
        """The table projecting ``record``'s type; ``TypeError`` for types with no table, and for a bare turn,
        usage report or run event (those are added as ``Logged(record, offset)``)."""
        return spec_of(record).name

    def write(self, batch: Batch[BaseModel | Logged[Any]]) -> None:
        """Insert ``batch`` as one block; safe to repeat with the same or other batch boundaries.

        Row-oriented: column-oriented inserts measured no faster on chDB 26.9 (the fixed cost per insert,
        about 15 ms for the INFILE round trip and a new part, dominates), so batch size is what matters.
        """
        spec = TABLE_BY_NAME[batch.table]
        # The tables fed by the same records (the memory index) in the same write: a failure retries the batch
        # into both, harmless as both collapse copies.
        for table in (spec, *FEEDS[spec.name]):
            rows = [table.row(record) for record in batch.records]
            if not rows:
                return
            with _backpressure_on_transient_errors():
                self._writer.insert(f"`{self.database}`.`{table.name}`", rows, column_names=table.column_names)

    def add_encoded(self, record: BaseModel, value: bytes, offset: int) -> None:
        """Buffer ``record`` (decoded from ``value``, read at ``offset`` of its topic partition) for its table,
        keeping only its Avro body when the fast path can project it exactly (see the module docstring);
        otherwise as :meth:`add` does with ``Logged(record, offset)``. No I/O."""
        private = isinstance(record, TurnEvent) and record.privacy is not PrivacyMode.RETAINED and record.content
        if (private and not _IN_MEMORY) or not self._take_body(value, offset):
            self.add(Logged(record, offset))

    def add_avro(self, value: bytes, offset: int) -> bool:
        """Buffer the Avro record ``value`` (read at ``offset`` of its topic partition) by its body, without
        decoding it, when the fast path projects its writer schema exactly and keeps no-retention content off
        every filesystem; False (nothing buffered) otherwise. No I/O. The caller vouches that ``value`` holds a
        valid record of a projected type (the worker accepted it): a body chDB cannot parse fails the flush."""
        return _IN_MEMORY and self._take_body(value, offset)

    def _take_body(self, value: bytes, offset: int) -> bool:
        if value[:2] != SINGLE_OBJECT_MAGIC or value[2:10] not in self._plans:
            return False
        with self._lock:
            self._encoded.setdefault(value[2:10], []).append(value[10:] + _zigzag(offset))
        return True

    @property
    def buffered(self) -> int:
        """Number of records added and not yet written."""
        with self._lock:
            encoded = sum(len(bodies) for bodies in self._encoded.values())
        return super().buffered + encoded

    def flush(self) -> int:
        """Write everything buffered (models, then Avro bodies per writer schema); see ``BatchingSink.flush``."""
        written = super().flush()
        with self._lock:
            pending, self._encoded = self._encoded, {}
        keys = list(pending)
        for index, key in enumerate(keys):
            try:
                self._write_encoded(self._plans[key], pending[key])
            except BaseException:
                with self._lock:
                    for unwritten in keys[index:]:
                        self._encoded[unwritten] = pending[unwritten] + self._encoded.get(unwritten, [])
                raise
            written += len(pending[key])
        return written

    def _make_plan(self, writer: SchemaVersion, spec: TableSpec) -> _AvroPlan | None:
        """The SELECT projecting ``writer``'s fields as ``spec``'s row mapping does, or None if SQL cannot."""
        header = _container_header(writer)
        with _TempFile(header) as path:
            described = self._writer.query(f"DESCRIBE file({_quote(path)}, 'Avro')").result_rows
        avro_types = {row[0]: row[1] for row in described}
        reader_defaults = {f["name"]: f.get("default", ...) for f in kept_schemas()[writer.name][-1].parsed["fields"]}
        select = []
        for column in spec.column_names:
            derived = _DERIVED.get(spec.name, {}).get(column)
            avro_type = avro_types.get(column)
            if derived is not None:
                select.append(derived)
            elif avro_type is None:
                if reader_defaults.get(column, ...) is not None:
                    return None  # the model path fills this default; SQL here would not
                select.append("NULL")
            elif "Enum" in avro_type:
                select.append(f"toString(`{column}`)")
            elif avro_type.startswith("DateTime64"):
                select.append(f"toDateTime64(`{column}`, 3, 'UTC')")
            else:
                select.append(f"`{column}`")
        return _AvroPlan(spec, header, ", ".join(select))

    def _write_encoded(self, plan: _AvroPlan, bodies: list[bytes]) -> None:
        data = b"".join(bodies)
        block = plan.header + _zigzag(len(bodies)) + _zigzag(len(data)) + data + _SYNC
        columns = ", ".join(f"`{name}`" for name in plan.spec.column_names)
        with _TempFile(block) as path:
            sql = (
                f"INSERT INTO `{self.database}`.`{plan.spec.name}` ({columns}) "
                f"SELECT {plan.select} FROM file({_quote(path)}, 'Avro')"
            )
            with _backpressure_on_transient_errors():
                self._writer.command(sql)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> QueryResult:
        """Run one read-only analyst statement over de-duplicated tables (unqualified names resolve to the
        sink's database). Bind values with ``{name:Type}`` placeholders and ``parameters``.

        Raises :class:`ReadOnlyViolation` for anything that would write or change settings.
        """
        with self._reader_lock:
            if self._reader is None:
                # tz_mode="aware": timestamps come back as UTC-aware datetimes, like the contract's models.
                self._reader = connect(
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


@dataclass(frozen=True, slots=True)
class _AvroPlan:
    """How one writer schema's bodies become rows: the container header and the projecting SELECT list."""

    spec: TableSpec
    header: bytes
    select: str


@contextmanager
def _backpressure_on_transient_errors() -> Iterator[None]:
    """Turn ClickHouse errors expected to clear by themselves into :class:`SinkBackpressure`; re-raise others."""
    try:
        yield
    except OperationalError as exc:  # connection-level: no code, or a transient one
        if exc.code is None or exc.code in TRANSIENT_CODES:
            raise SinkBackpressure(TRANSIENT_CODES.get(exc.code or 0, 1.0), str(exc)) from exc
        raise
    except DatabaseError as exc:
        if exc.code in TRANSIENT_CODES:
            raise SinkBackpressure(TRANSIENT_CODES[exc.code], str(exc)) from exc
        raise


#: Whether containers can live in anonymous memory (Linux) rather than in a temporary file.
_IN_MEMORY = hasattr(os, "memfd_create")


class _TempFile:
    """A path holding ``data`` for chDB (in this process) to read: an anonymous in-memory file where the system
    has them, else a temporary file; gone on exit."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._path = ""
        self._fd = -1

    def __enter__(self) -> str:
        if _IN_MEMORY:
            self._fd = os.memfd_create("ctxflow-sink", os.MFD_CLOEXEC)
            os.write(self._fd, self._data)  # a memfd takes any size in one write
            self._path = f"/proc/self/fd/{self._fd}"
            return self._path
        fd, self._path = tempfile.mkstemp(suffix=".avro", prefix="ctxflow-sink-")
        with os.fdopen(fd, "wb") as out:
            out.write(self._data)
        return self._path

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        else:
            os.unlink(self._path)


def _zigzag(n: int) -> bytes:
    """An Avro ``long``: zig-zag, then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _avro_bytes(data: bytes) -> bytes:
    return _zigzag(len(data)) + data


def _container_header(writer: SchemaVersion) -> bytes:
    """An Avro object container header naming ``writer``'s schema plus ``source_offset``, no compression."""
    schema = json.loads(writer.text)
    # Each body is followed by its offset: a record of this schema, then one long, is a record of this one.
    schema["fields"] = [*schema["fields"], {"name": "source_offset", "type": "long"}]
    meta = {b"avro.schema": json.dumps(schema).encode(), b"avro.codec": b"null"}
    entries = b"".join(_avro_bytes(k) + _avro_bytes(v) for k, v in meta.items())
    return b"Obj\x01" + _zigzag(len(meta)) + entries + _zigzag(0) + _SYNC


def _quote(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def connect(dsn: str, **kwargs: Any) -> Client:
    """A clickhouse-connect client on ``dsn`` (``kwargs`` as ``get_client`` takes them); a RuntimeError that says
    why when chDB cannot open the path because this process holds another one."""
    try:
        return clickhouse_connect.get_client(dsn=dsn, **kwargs)
    except ProgrammingError as exc:
        if "already initialized with path" in str(exc):
            raise RuntimeError(
                f"chDB hosts one engine per process and another path is open here; cannot open {dsn}: {exc}"
            ) from exc
        raise
