"""What an operator (``/health``, metrics) sees of a ClickHouse sink: one immutable snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

#: ``starting`` until the group assigns partitions; ``writing`` while flushes succeed; ``retrying`` from a failed
#: flush until one succeeds (nothing is committed meanwhile); ``stopped`` once it has left its group.
SinkState = Literal["starting", "writing", "retrying", "stopped"]


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One assigned partition: the offset the sink committed (None before its first commit) and the log end from
    its last fetch response (None before one came; the embedded broker may report a batch's base offset + 1)."""

    topic: str
    partition: int
    committed: int | None
    log_end: int | None

    @property
    def lag(self) -> int | None:
        """Records on the partition not yet written and committed; None while the log end is unknown."""
        if self.log_end is None:
            return None
        return max(0, self.log_end - (self.committed or 0))


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """A sink's state and counters since it started.

    ``rows_written`` counts rows the backend acknowledged (a replayed row counts again); ``skipped`` records it did
    not write because the workers refused them or they do not decode; ``buffered`` records waiting for a flush;
    ``held`` records waiting for the workers' verdict (:mod:`streams.sink.verdict`); ``retries`` failed flushes;
    ``last_error`` the latest backend failure, kept after recovery for the post-mortem; ``failing_for_s`` how long
    the current outage lasts (None when writing). ``first_record_at`` and ``last_commit_at`` are Unix times (None
    before the first).
    """

    group: str
    backend: str
    state: SinkState
    rows_written: int
    flushes: int
    retries: int
    skipped: int
    buffered: int
    held: int
    last_error: str | None
    failing_for_s: float | None
    first_record_at: float | None
    last_commit_at: float | None
    partitions: tuple[PartitionLag, ...]

    @property
    def healthy(self) -> bool:
        """True unless a backend failure holds the sink back (it is retrying) or it stopped."""
        return self.state in ("starting", "writing")

    def as_json(self) -> dict[str, Any]:
        """The ``/health`` form: every field, ``healthy``, and each partition's ``lag``."""
        fields = asdict(self)
        fields["healthy"] = self.healthy
        fields["partitions"] = [{**asdict(p), "lag": p.lag} for p in self.partitions]
        if self.failing_for_s is not None:
            fields["failing_for_s"] = round(self.failing_for_s, 1)
        return fields
