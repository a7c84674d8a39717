"""Is the worker making progress? Per input partition: lag, age of the last commit advance, and a state.

A worker that stops committing while records wait is stalled, whatever the reason (a broker that stopped
answering, a sink that hangs, a batch that never finishes); one with nothing to read is merely idle. This
module decides which, from what the worker already knows (offsets it committed, highwaters from its last
fetch responses, when each advanced) without asking the broker anything: :func:`assess` is pure, and
:class:`CommitClock` is the only state, kept by the consumer as it commits.

It replaces Faust's stream monitors, which judge progress by Faust streams the worker does not use for its
inputs and by fetches of changelog partitions it pauses on purpose (see :mod:`streams.runtime.transport`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from faust.types import TP

PartitionState = Literal["ok", "idle", "degraded"]
WorkerStatus = Literal["ready", "starting", "degraded"]


@dataclass(frozen=True)
class PartitionObservation:
    """What the worker knows of one input partition at ``now`` (all times on one monotonic clock, seconds).

    ``highwater`` is the log end from the last fetch response (None before the first one); ``committed`` the
    offset the group committed (None when nothing was ever committed: the worker then reads from offset 0);
    ``commit_advanced_at`` when ``committed`` last moved forward, or when the partition was assigned if it
    has not moved since; ``fetched_at`` when the last fetch response for it arrived (None before the first);
    ``caught_up_at`` when a fetch response last showed nothing waiting (None if none did yet).
    """

    topic: str
    partition: int
    highwater: int | None
    committed: int | None
    commit_advanced_at: float
    fetched_at: float | None
    caught_up_at: float | None = None


@dataclass(frozen=True)
class PartitionHealth:
    """One input partition's progress. ``lag`` is None while no fetch response told its log end."""

    topic: str
    partition: int
    lag: int | None
    last_commit_age_s: float
    last_fetch_age_s: float | None
    state: PartitionState

    def as_json(self) -> dict[str, Any]:
        """The ``/health`` form: ages rounded to 0.1 s."""
        fields = asdict(self)
        fields["last_commit_age_s"] = round(self.last_commit_age_s, 1)
        if self.last_fetch_age_s is not None:
            fields["last_fetch_age_s"] = round(self.last_fetch_age_s, 1)
        return fields


@dataclass(frozen=True)
class WorkerHealth:
    """The worker's status and its input partitions' health, ordered by topic and partition.

    ``status`` is ``starting`` while the worker owns no partition (it starts, rebalances or recovers its
    tables), ``degraded`` when any partition is, ``ready`` otherwise.
    """

    status: WorkerStatus
    partitions: tuple[PartitionHealth, ...]

    @property
    def degraded(self) -> tuple[PartitionHealth, ...]:
        """The partitions in state ``degraded``."""
        return tuple(p for p in self.partitions if p.state == "degraded")


def partition_health(seen: PartitionObservation, now: float, stall_after_s: float) -> PartitionHealth:
    """``degraded`` when for more than ``stall_after_s`` no commit advanced and nothing showed the partition caught
    up, while records wait (lag > 0) or the lag is unknown because no fetch response came for as long; ``idle``
    when nothing waits; else ``ok``. A partition that sat idle for an hour and just received records is not
    stalled: its wait began when it was last seen caught up, not at its last commit."""
    commit_age = max(0.0, now - seen.commit_advanced_at)
    fetch_age = None if seen.fetched_at is None else max(0.0, now - seen.fetched_at)
    lag = None if seen.highwater is None else max(0, seen.highwater - (seen.committed or 0))
    unseen = fetch_age is None or fetch_age > stall_after_s  # the log end may have moved since
    progressed_at = max(seen.commit_advanced_at, seen.caught_up_at or seen.commit_advanced_at)
    if now - progressed_at > stall_after_s and ((lag or 0) > 0 or unseen):
        state: PartitionState = "degraded"
    elif lag == 0:
        state = "idle"
    else:
        state = "ok"
    return PartitionHealth(seen.topic, seen.partition, lag, commit_age, fetch_age, state)


def assess(observations: Iterable[PartitionObservation], now: float, stall_after_s: float) -> WorkerHealth:
    """The worker's health from its input partitions' observations (none: it owns no partition yet)."""
    partitions = tuple(sorted(
        (partition_health(seen, now, stall_after_s) for seen in observations),
        key=lambda p: (p.topic, p.partition),
    ))
    if not partitions:
        return WorkerHealth("starting", partitions)
    return WorkerHealth("degraded" if any(p.state == "degraded" for p in partitions) else "ready", partitions)


class CommitClock:
    """When each partition's committed offset last advanced (or it was assigned, if it has not since), and when
    it was last seen caught up.

    The consumer calls :meth:`assigned` on every assignment, :meth:`committed` after every successful commit
    and :meth:`caught_up` whenever it sees a partition with nothing waiting; a partition assigned again (after
    a rebalance) starts a new clock.
    """

    def __init__(self) -> None:
        self._offsets: dict[TP, int | None] = {}
        self._since: dict[TP, float] = {}
        self._caught_up: dict[TP, float] = {}

    def assigned(self, tps: Iterable[TP], now: float) -> None:
        """Start the clock of every partition in ``tps`` at ``now``; forget the ones no longer assigned."""
        fresh = set(tps)
        for tp in set(self._since) - fresh:
            del self._since[tp]
            self._offsets.pop(tp, None)
            self._caught_up.pop(tp, None)
        for tp in fresh:
            self._since[tp] = now
            self._offsets[tp] = None

    def committed(self, offsets: Mapping[TP, int], now: float) -> None:
        """Record offsets just committed; a partition's clock restarts only if its offset moved forward."""
        for tp, offset in offsets.items():
            if tp not in self._since:
                continue  # revoked meanwhile: Faust discards that commit
            before = self._offsets.get(tp)
            if before is None or offset > before:
                self._offsets[tp] = offset
                self._since[tp] = now

    def since(self, tp: TP, default: float) -> float:
        """When ``tp``'s commit last advanced (or it was assigned); ``default`` for a partition never seen."""
        return self._since.get(tp, default)

    def caught_up(self, tp: TP, at: float) -> None:
        """Record that a fetch response at ``at`` showed nothing waiting on ``tp`` (an assigned partition)."""
        if tp in self._since:
            self._caught_up[tp] = max(at, self._caught_up.get(tp, at))

    def caught_up_at(self, tp: TP) -> float | None:
        """When ``tp`` was last seen with nothing waiting, or None."""
        return self._caught_up.get(tp)


@dataclass(frozen=True)
class StallChange:
    """The set of degraded partitions changed: what to log, once."""

    degraded: tuple[PartitionHealth, ...]
    recovered: tuple[str, ...]


class StallWatch:
    """Turns a series of :class:`WorkerHealth` into changes of the degraded set, so a stall is logged once
    when it begins (or spreads, or ends) and never again while it lasts."""

    def __init__(self) -> None:
        self._degraded: frozenset[str] = frozenset()

    def update(self, health: WorkerHealth) -> StallChange | None:
        """The change since the previous update, or None when the degraded partitions are the same."""
        now = {f"{p.topic}[{p.partition}]": p for p in health.degraded}
        if frozenset(now) == self._degraded:
            return None
        recovered = tuple(sorted(self._degraded - set(now)))
        self._degraded = frozenset(now)
        return StallChange(health.degraded, recovered)
