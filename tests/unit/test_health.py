"""A worker that stops committing while records wait is reported degraded, once; an idle one is not."""

from __future__ import annotations

from ctxflow.streams.runtime.health import CommitClock, PartitionObservation, StallWatch, assess, partition_health
from faust.types import TP

STALL = 30.0
TURNS0, TURNS1 = TP("ctxflow.turns", 0), TP("ctxflow.turns", 1)


def seen(highwater: int | None, committed: int | None, advanced_at: float, fetched_at: float | None = 99.0,
         partition: int = 0, caught_up_at: float | None = None) -> PartitionObservation:
    return PartitionObservation("ctxflow.turns", partition, highwater, committed, advanced_at, fetched_at,
                                caught_up_at)


def test_lag_is_the_log_end_minus_the_committed_offset_and_a_recent_commit_is_ok() -> None:
    health = partition_health(seen(highwater=120, committed=100, advanced_at=95.0), now=100.0, stall_after_s=STALL)
    assert (health.lag, health.last_commit_age_s, health.state) == (20, 5.0, "ok")


def test_nothing_committed_yet_counts_the_lag_from_offset_zero() -> None:
    assert partition_health(seen(40, None, 90.0), 100.0, STALL).lag == 40


def test_records_waiting_with_no_commit_for_longer_than_the_threshold_is_degraded() -> None:
    assert partition_health(seen(120, 100, advanced_at=60.0), 100.0, STALL).state == "degraded"
    assert partition_health(seen(120, 100, advanced_at=70.0), 100.0, STALL).state == "ok"  # not longer: ok


def test_records_arriving_after_a_long_idle_spell_are_not_a_stall_until_they_wait_too_long() -> None:
    # Last commit an hour ago, caught up until 2 s ago, records since: waiting 2 s, not an hour.
    arrived = seen(150, 100, advanced_at=0.0, fetched_at=3599.0, caught_up_at=3598.0)
    health = partition_health(arrived, 3600.0, STALL)
    assert (health.state, health.lag, health.last_commit_age_s) == ("ok", 50, 3600.0)
    assert partition_health(arrived, 3598.0 + STALL + 1, STALL).state == "degraded"


def test_no_lag_is_idle_however_old_the_last_commit() -> None:
    health = partition_health(seen(100, 100, advanced_at=0.0, fetched_at=3599.0), 3600.0, STALL)
    assert health.state == "idle" and health.lag == 0


def test_an_unanswered_fetch_makes_an_old_commit_degraded_even_at_zero_known_lag() -> None:
    # The broker stopped answering: the last known lag (0) says nothing about what arrived since.
    assert partition_health(seen(100, 100, advanced_at=0.0, fetched_at=10.0), 100.0, STALL).state == "degraded"
    never = partition_health(seen(None, None, advanced_at=0.0, fetched_at=None), 100.0, STALL)
    assert (never.lag, never.last_fetch_age_s, never.state) == (None, None, "degraded")
    # ... but not before the threshold: a worker that just started has not fetched yet.
    assert partition_health(seen(None, None, advanced_at=90.0, fetched_at=None), 100.0, STALL).state == "ok"


def test_status_is_starting_without_partitions_degraded_if_any_is_else_ready() -> None:
    assert assess([], 100.0, STALL).status == "starting"
    calm = [seen(10, 10, 0.0, partition=0), seen(20, 15, 99.0, partition=1)]
    assert assess(calm, 100.0, STALL).status == "ready"
    stalled = assess([*calm, seen(50, 10, 10.0, partition=2)], 100.0, STALL)
    assert stalled.status == "degraded"
    assert [(p.partition, p.state) for p in stalled.partitions] == [(0, "idle"), (1, "ok"), (2, "degraded")]
    assert [p.partition for p in stalled.degraded] == [2]


def test_json_form_rounds_ages() -> None:
    health = partition_health(seen(5, 2, advanced_at=1.0, fetched_at=99.96), 100.0, STALL)
    assert health.as_json() == {"topic": "ctxflow.turns", "partition": 0, "lag": 3, "last_commit_age_s": 99.0,
                                "last_fetch_age_s": 0.0, "state": "degraded"}


def test_commit_clock_restarts_only_when_the_offset_moves_forward() -> None:
    clock = CommitClock()
    clock.assigned([TURNS0, TURNS1], now=10.0)
    assert clock.since(TURNS0, default=0.0) == 10.0
    clock.committed({TURNS0: 50}, now=20.0)
    clock.committed({TURNS0: 50, TURNS1: 7}, now=30.0)  # TURNS0 did not move
    assert (clock.since(TURNS0, 0.0), clock.since(TURNS1, 0.0)) == (20.0, 30.0)
    clock.assigned([TURNS1], now=40.0)  # a rebalance: TURNS0 revoked, TURNS1 assigned again
    clock.committed({TURNS0: 60}, now=45.0)  # a late commit of a revoked partition is not progress here
    assert (clock.since(TURNS0, -1.0), clock.since(TURNS1, 0.0)) == (-1.0, 40.0)
    clock.caught_up(TURNS1, 50.0)
    clock.caught_up(TURNS1, 48.0)  # an older sample never moves it back
    clock.caught_up(TURNS0, 50.0)  # not assigned: ignored
    assert (clock.caught_up_at(TURNS1), clock.caught_up_at(TURNS0)) == (50.0, None)


def test_stall_watch_reports_a_stall_once_when_it_begins_spreads_and_ends() -> None:
    watch = StallWatch()
    ok = [seen(10, 10, 0.0, partition=0), seen(10, 10, 0.0, partition=1)]
    one = [seen(10, 10, 0.0, partition=0), seen(20, 10, 0.0, partition=1)]
    both = [seen(20, 10, 0.0, partition=0), seen(20, 10, 0.0, partition=1)]
    assert watch.update(assess(ok, 100.0, STALL)) is None
    began = watch.update(assess(one, 100.0, STALL))
    assert began is not None and [p.partition for p in began.degraded] == [1] and began.recovered == ()
    assert watch.update(assess(one, 101.0, STALL)) is None  # still stalled: nothing new to say
    spread = watch.update(assess(both, 102.0, STALL))
    assert spread is not None and [p.partition for p in spread.degraded] == [0, 1]
    ended = watch.update(assess(ok, 103.0, STALL))
    assert ended is not None and ended.degraded == () and ended.recovered == ("ctxflow.turns[0]", "ctxflow.turns[1]")
