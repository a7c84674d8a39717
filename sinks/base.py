"""The batching sink contract every projection (ClickHouse, Redis) implements.

Shape borrowed from quix-streams: ``add()`` only buffers, per destination table; ``flush()`` hands each
table's buffer to ``write(batch)``, which does the I/O. The worker's commit order is: add records while
processing -> ``flush()`` every sink -> produce changelogs -> commit offsets. Offsets therefore commit only
after the effects they cover are durable, and a crash between a flush and the commit replays records that
were already written, possibly cut into different batches. That is why ``write`` must be idempotent: a
batch written twice, or re-written with other boundaries, must leave no duplicate visible to readers.

Transient failures surface as :class:`SinkBackpressure`; the unwritten records stay buffered, so the
caller waits ``retry_after`` seconds and calls ``flush()`` again (or crashes and replays; both are safe).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

R = TypeVar("R")


class SinkBackpressure(Exception):
    """The destination is temporarily unable to take writes; retry the flush after ``retry_after`` seconds.

    Raised only for conditions expected to clear by themselves (overload, too many parts, connection loss).
    Records that were not written remain buffered in the sink.
    """

    def __init__(self, retry_after: float, reason: str = "") -> None:
        super().__init__(f"sink backpressure, retry after {retry_after:.2f}s: {reason}")
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Batch(Generic[R]):
    """Records bound for one table, in the order they were added."""

    table: str
    records: tuple[R, ...]

    def __len__(self) -> int:
        return len(self.records)


class BatchingSink(ABC, Generic[R]):
    """Buffers records per table and writes them in batches.

    Guarantees: ``add`` never does I/O; ``flush`` returns only after every record buffered when it started
    has been written, and a table's records leave the buffer only after ``write`` returned for them. ``add``
    and ``flush`` may be called from different threads (flush takes the buffers, writes them outside the
    lock, and puts back what it could not write ahead of records added meanwhile).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[str, list[R]] = {}

    @abstractmethod
    def table_for(self, record: R) -> str:
        """The table ``record`` belongs to; raises ``TypeError`` for records this sink does not project."""

    @abstractmethod
    def write(self, batch: Batch[R]) -> None:
        """Write ``batch`` durably and idempotently; raise :class:`SinkBackpressure` on transient failure."""

    def add(self, record: R) -> None:
        """Buffer ``record`` for its table (no I/O)."""
        table = self.table_for(record)
        with self._lock:
            self._buffers.setdefault(table, []).append(record)

    @property
    def buffered(self) -> int:
        """Number of records added and not yet written."""
        with self._lock:
            return sum(len(records) for records in self._buffers.values())

    def flush(self) -> int:
        """Write everything buffered, one ``write`` per table; returns the number of records written.

        On any exception (``SinkBackpressure`` or a bug) the tables not yet written, including the failing
        one, go back into the buffer and the exception propagates; tables already written are not re-sent.
        """
        with self._lock:
            pending, self._buffers = self._buffers, {}
        written = 0
        tables = list(pending)
        for index, table in enumerate(tables):
            batch = Batch(table, tuple(pending[table]))
            try:
                self.write(batch)
            except BaseException:
                self._restore({name: pending[name] for name in tables[index:]})
                raise
            written += len(batch)
            logger.debug("sink wrote %d records to %s", len(batch), table)
        return written

    def _restore(self, unwritten: dict[str, list[R]]) -> None:
        with self._lock:
            for table, records in unwritten.items():
                self._buffers[table] = records + self._buffers.get(table, [])

    def close(self) -> None:
        """Release connections. Buffered records are not flushed: the caller decides (flush first)."""
