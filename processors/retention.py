"""Bounded state: when a run's state retires, and which records come too late to be counted exactly once.

Without retirement a worker holds every run it ever saw (~1.1 KB each), so its memory and restart time grow
for ever. Retirement is decided in *event time*, so that a replay of the log retires exactly what the live
worker retired, whatever the wall clock says.

Watermarks. For every tenant and each input stream (turns, usage, runs) the :class:`Watermark` holds the
largest event time applied so far and the last offset processed. A tenant's records of one stream are read in
offset order, so the value a record sees depends only on the records before it *in its own stream*: it is the
same live and in every replay, however the three streams interleave. Per tenant rather than per partition:
another tenant's clock (a skewed or far-future one) must never retire this tenant's state or refuse its
records (isolation). The cost: an idle tenant's watermark stands still, so its last window of runs stays until
it sends again (bounded by one window of that tenant's runs).

The rule (``R`` = the retention window, ``CTXFLOW_RUN_RETENTION_S``):

1. *Late records are refused.* A turn, usage report or run event whose event time is more than ``R`` behind
   its stream's watermark is dead-lettered (:class:`schemas.contract.OutsideDedupWindow`), never counted and
   never dropped silently.
2. *Runs retire after the window.* The tenant's *low* watermark is the least of its streams' watermarks (over
   the streams that have carried any record of the tenant). A run whose last event time lies before the
   bucket boundary at or below ``low - R`` is retired: its run ledger is deleted (a tombstone on the run
   ledgers' changelog); its workflow ledger goes with the last run of the workflow that holds an entry in it.

Why dedup stays exact within the window: a duplicate carries its original's event time (resends are
byte-identical). If run X retired, every record X applied in stream ``s`` has time ``t <= last(X) < low - R
<= W_s - R``, and ``W_s`` only grows, so a later duplicate of it is late by rule 1 in its own stream: it is
refused, never counted again. The low watermark is what makes this hold for every stream; the maximum across
streams would retire a run while a stream that lags behind could still bring a duplicate of one of its usage
reports inside that stream's window. A record that is *not* a duplicate of a retired run (the run resumed
after being idle longer than the window) is counted; it starts the run's ledger afresh.

Crash safety. Watermarks are persisted *after* the run ledgers (the last step of the commit order in
:mod:`streams.runtime.pipeline`), so a watermark is never ahead of any effect of a record it covers: a record
at an offset the watermark already holds had all its effects (decisions or dead letter, aggregates, run
ledger, tombstones) made durable, and is skipped outright. Records after it replay against exactly the
watermark they first saw, so rule 1 refuses the same records in every replay.

Finding due runs costs nothing per record: :class:`RetirementIndex` files each run key under the bucket
(``R / 16`` wide) of its last activity and hands over whole buckets once the cutoff passes them; an entry whose
run moved on to a later bucket is skipped when its old bucket is swept (lazy deletion).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

#: Default retention window: a day of event time.
DEFAULT_RETENTION_S = 24 * 3600
#: Buckets per window: a run retires between R and R + R/16 after its last event.
_BUCKETS_PER_WINDOW = 16


@dataclass(slots=True)
class Watermark:
    """One tenant's event-time progress per input stream (key ``tenant``): largest event time applied (epoch ms,
    -1 before any) and last offset processed (-1 before any).

    Guarantees: both only grow; :meth:`to_list` round-trips exactly.
    """

    times: array = field(default_factory=lambda: array("q", (-1, -1, -1)))
    offsets: array = field(default_factory=lambda: array("q", (-1, -1, -1)))

    def low(self) -> int | None:
        """The least event time over the streams that carried a record, or None before any record."""
        seen = [t for t in self.times if t >= 0]
        return min(seen) if seen else None

    def advance(self, stream: int, offset: int, ms: int) -> bool:
        """Record that the record at ``offset`` of ``stream``, stamped ``ms``, was processed; True when the
        stream's event time moved forward."""
        self.offsets[stream] = offset
        if ms > self.times[stream]:
            self.times[stream] = ms
            return True
        return False

    def to_list(self) -> list:
        """The changelog form: ``[times, offsets]``."""
        return [self.times.tolist(), self.offsets.tolist()]

    @classmethod
    def from_list(cls, v: list) -> Watermark:
        """Inverse of :meth:`to_list`."""
        return cls(array("q", v[0]), array("q", v[1]))


@dataclass(frozen=True, slots=True)
class Retention:
    """The retention window and the two rules of the module docstring, as pure functions of a watermark."""

    window_ms: int = DEFAULT_RETENTION_S * 1000

    @classmethod
    def of_seconds(cls, seconds: float) -> Retention:
        """A window of ``seconds`` (at least one millisecond)."""
        return cls(max(int(seconds * 1000), 1))

    @property
    def empty(self) -> bool:
        """Whether no key is filed (O(1))."""
        return self._floor is None

    @property
    def bucket_ms(self) -> int:
        """Width of a retirement bucket."""
        return max(self.window_ms // _BUCKETS_PER_WINDOW, 1)

    def late(self, ms: int, mark: Watermark, stream: int) -> bool:
        """Rule 1: True when a record of ``stream`` stamped ``ms`` is more than the window behind the stream."""
        return mark.times[stream] >= 0 and ms < mark.times[stream] - self.window_ms

    def cutoff(self, mark: Watermark) -> int | None:
        """Rule 2: runs last active before this instant retire (a bucket boundary; None before any record)."""
        low = mark.low()
        if low is None:
            return None
        bucket = self.bucket_ms
        return (low - self.window_ms) // bucket * bucket


class RetirementIndex:
    """One tenant's run keys filed by the bucket of their last activity, to find due runs without a scan.

    Guarantees: every key noted with a time before a cutoff is returned by :meth:`due` for that cutoff or an
    earlier one (possibly more than once, and possibly after it moved on: callers check the run itself). Memory:
    one list slot per bucket a run's activity entered, plus the key.
    """

    __slots__ = ("_bucket_ms", "_buckets", "_floor")

    def __init__(self, bucket_ms: int) -> None:
        self._bucket_ms = bucket_ms
        self._buckets: dict[int, list[str]] = {}
        self._floor: int | None = None  # the lowest bucket that may hold keys

    @property
    def empty(self) -> bool:
        """Whether no key is filed (O(1))."""
        return self._floor is None

    @property
    def bucket_ms(self) -> int:
        """Width of a bucket: :meth:`due` hands over a key once the cutoff reaches the end of its bucket."""
        return self._bucket_ms

    def note(self, key: str, old_ms: int | None, new_ms: int) -> None:
        """File ``key`` under ``new_ms``'s bucket unless its previous activity ``old_ms`` already filed it there."""
        bucket = new_ms // self._bucket_ms
        if old_ms is not None and old_ms >= 0 and old_ms // self._bucket_ms == bucket:
            return
        self._buckets.setdefault(bucket, []).append(key)
        if self._floor is None or bucket < self._floor:
            self._floor = bucket

    def due(self, cutoff: int) -> list[str]:
        """Take every key filed in a bucket that ends at or before ``cutoff``."""
        below = cutoff // self._bucket_ms
        if self._floor is None or self._floor >= below:
            return []
        keys: list[str] = []
        for bucket in sorted(b for b in self._buckets if b < below):
            keys += self._buckets.pop(bucket)
        self._floor = min(self._buckets) if self._buckets else None
        return keys

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._buckets.values())


#: The default window (a day).
DEFAULT_RETENTION = Retention()
