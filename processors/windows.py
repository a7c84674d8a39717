"""Spend windows on event time: UTC hours, UTC days and calendar months.

A window is identified by an integer *index* (hours or days since the epoch, or ``year * 12 + month - 1``),
so comparing and stepping windows is integer arithmetic and a month boundary (28, 29, 30 or 31 days) needs no
special case.

Each :class:`WindowCounter` keeps the two most recent windows of one kind (current and previous). That choice
makes the counter *order independent*: adding the same multiset of ``(time, tokens, cost)`` contributions in
any order leaves the same final state, because a contribution lands in its own window when that window is
still retained and is dropped exactly when the final state would have dropped it anyway (retention only moves
forward, to the newest window seen). Replays after a crash may interleave the input topics differently from
the live run; totals per window do not change. Keeping the previous window also attributes a late event
(e.g. a usage report for 09:59 processed at 10:00) to the hour it belongs to instead of the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ctxflow.schemas.models import SpendWindowKind

HOUR_MS = 3_600_000
DAY_MS = 86_400_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)

WINDOW_KINDS: tuple[SpendWindowKind, ...] = (SpendWindowKind.HOUR, SpendWindowKind.DAY, SpendWindowKind.MONTH)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime (the Avro ``timestamp-millis`` value)."""
    # Exact integer arithmetic: float seconds * 1000 can land one millisecond early.
    return (moment - _EPOCH) // _ONE_MS


def from_ms(ms: int) -> datetime:
    """The UTC instant ``ms`` milliseconds after the epoch: the exact inverse of :func:`to_ms`."""
    return _EPOCH + ms * _ONE_MS


def window_index(kind: SpendWindowKind, ms: int) -> int:
    """The index of the window of ``kind`` containing the instant ``ms`` (epoch milliseconds, UTC)."""
    if kind is SpendWindowKind.HOUR:
        return ms // HOUR_MS
    if kind is SpendWindowKind.DAY:
        return ms // DAY_MS
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.year * 12 + moment.month - 1


def window_start(kind: SpendWindowKind, index: int) -> datetime:
    """The first instant (UTC) of window ``index`` of ``kind``."""
    if kind is SpendWindowKind.HOUR:
        return datetime.fromtimestamp(index * HOUR_MS / 1000, tz=UTC)
    if kind is SpendWindowKind.DAY:
        return datetime.fromtimestamp(index * DAY_MS / 1000, tz=UTC)
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class WindowCounter:
    """Tokens and cost (micro-USD) of the current and previous window of one kind.

    Guarantees: ``index`` is the newest window any contribution fell into; windows older than
    ``index - 1`` are forgotten; negative contributions (an estimate being replaced) are allowed and are
    clamped at read time, never stored as a negative usage.
    """

    index: int = -1
    tokens: int = 0
    cost: int = 0
    prev_tokens: int = 0
    prev_cost: int = 0

    def advance(self, index: int) -> None:
        """Make ``index`` the current window if it is newer (a reset: the new window starts empty)."""
        if index <= self.index:
            return
        if index == self.index + 1:
            self.prev_tokens, self.prev_cost = self.tokens, self.cost
        else:
            self.prev_tokens = self.prev_cost = 0
        self.tokens = self.cost = 0
        self.index = index

    def add(self, index: int, tokens: int, cost: int) -> None:
        """Attribute a contribution to window ``index`` (advancing first when it is newer)."""
        self.advance(index)
        if index == self.index:
            self.tokens += tokens
            self.cost += cost
        elif index == self.index - 1:
            self.prev_tokens += tokens
            self.prev_cost += cost

    def usage_at(self, index: int) -> tuple[int, int]:
        """``(tokens, cost)`` of window ``index`` as known now; a window newer than ``index`` is empty."""
        if index == self.index:
            return max(self.tokens, 0), max(self.cost, 0)
        if index == self.index - 1:
            return max(self.prev_tokens, 0), max(self.prev_cost, 0)
        return 0, 0

    def to_list(self) -> list[int]:
        """A JSON-able snapshot for the changelog."""
        return [self.index, self.tokens, self.cost, self.prev_tokens, self.prev_cost]

    @classmethod
    def from_list(cls, values: list[int]) -> WindowCounter:
        """Inverse of :meth:`to_list`."""
        return cls(*values)


@dataclass(slots=True)
class SpendLedger:
    """Consumption of one tenant (key ``tenant``) or one user (key ``tenant:user``) per spend window.

    ``counters`` holds the hour, day and month windows; ``offsets`` the highest applied offset per input
    stream; ``estimates`` the estimated top-up of each finalized run still inside the retained windows,
    assigned by run (rule 3 in ``processors.ledger``). ``tokens``/``cost`` are lifetime totals and
    ``estimated_tokens`` the part of them that is estimated. The ledger's clock is the newest event time seen.
    """

    counters: tuple[WindowCounter, WindowCounter, WindowCounter] = field(
        default_factory=lambda: (WindowCounter(), WindowCounter(), WindowCounter())
    )
    offsets: dict[str, int] = field(default_factory=dict)
    levels: int = 0
    tokens: int = 0
    cost: int = 0
    estimated_tokens: int = 0
    clock_ms: int = 0
    estimates: dict[str, list[int]] = field(default_factory=dict)

    def _add(self, ms: int, tokens: int, cost: int) -> None:
        for kind, counter in zip(WINDOW_KINDS, self.counters, strict=True):
            counter.add(window_index(kind, ms), tokens, cost)
        self.tokens += tokens
        self.cost += cost
        self.clock_ms = max(self.clock_ms, ms)

    def apply(self, stream: str, offset: int, ms: int, tokens: int, cost: int) -> bool:
        """Add one record's consumption unless this ledger already holds ``offset`` of ``stream``."""
        if offset <= self.offsets.get(stream, -1):
            return False
        self.offsets[stream] = offset
        self._add(ms, tokens, cost)
        return True

    def assign_estimate(self, run_id: str, applied: int, tokens: int, cost: int, ms: int) -> bool:
        """Set a finalized run's estimated top-up (at its finalization ``ms``) if ``applied`` is newer."""
        entry = self.estimates.get(run_id)
        if entry is not None and entry[0] >= applied:
            return False
        old_tokens, old_cost = (entry[1], entry[2]) if entry is not None else (0, 0)
        # Always add, even a zero delta: the finalization time advances the windows in every interleaving.
        self._add(ms, tokens - old_tokens, cost - old_cost)
        self.estimated_tokens += tokens - old_tokens
        if tokens or cost:
            self.estimates[run_id] = [applied, tokens, cost, ms]
        else:
            self.estimates.pop(run_id, None)
        oldest = self.counters[2].index - 1
        for stale in [r for r, e in self.estimates.items() if window_index(SpendWindowKind.MONTH, e[3]) < oldest]:
            del self.estimates[stale]
        return True

    def counter(self, kind: SpendWindowKind) -> WindowCounter:
        """The counter of window ``kind``."""
        return self.counters[WINDOW_KINDS.index(kind)]

    def usage(self, kind: SpendWindowKind, ms: int | None = None) -> tuple[int, int]:
        """``(tokens, cost)`` of the window of ``kind`` containing ``ms`` (default: the ledger's clock)."""
        return self.counter(kind).usage_at(window_index(kind, self.clock_ms if ms is None else ms))

    def level(self, kind: SpendWindowKind) -> int:
        """The stored level (0 ok, 1 soft, 2 hard) of window ``kind``."""
        return (self.levels >> (2 * WINDOW_KINDS.index(kind))) & 3

    def set_level(self, kind: SpendWindowKind, level: int) -> None:
        """Store the level of window ``kind``."""
        shift = 2 * WINDOW_KINDS.index(kind)
        self.levels = (self.levels & ~(3 << shift)) | (level << shift)

    def to_dict(self) -> dict:
        """A JSON-able snapshot for the changelog."""
        return {
            "counters": [c.to_list() for c in self.counters],
            "offsets": dict(self.offsets),
            "levels": self.levels,
            "tokens": self.tokens,
            "cost": self.cost,
            "estimated_tokens": self.estimated_tokens,
            "clock_ms": self.clock_ms,
            "estimates": {k: list(v) for k, v in self.estimates.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpendLedger:
        """Inverse of :meth:`to_dict`."""
        c = [WindowCounter.from_list(v) for v in d["counters"]]
        return cls(
            (c[0], c[1], c[2]),
            dict(d["offsets"]),
            d["levels"],
            d["tokens"],
            d["cost"],
            d["estimated_tokens"],
            d["clock_ms"],
            {k: list(v) for k, v in d["estimates"].items()},
        )
