"""Spend windows on event time: UTC boundaries, resets, late events and order independence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from ctxflow.processors.windows import SpendLedger, WindowCounter, to_ms, window_index, window_start
from ctxflow.schemas.models import SpendWindowKind as W
from hypothesis import given
from hypothesis import strategies as st


def ms(*args: int) -> int:
    return to_ms(datetime(*args, tzinfo=UTC))


@pytest.mark.parametrize(
    ("kind", "before", "after"),
    [
        (W.HOUR, (2025, 3, 1, 9, 59, 59, 999_000), (2025, 3, 1, 10)),
        (W.DAY, (2025, 3, 1, 23, 59, 59, 999_000), (2025, 3, 2)),
        (W.MONTH, (2025, 1, 31, 23, 59, 59, 999_000), (2025, 2, 1)),
        (W.MONTH, (2024, 2, 29, 23, 59, 59, 999_000), (2024, 3, 1)),  # leap-year February
        (W.MONTH, (2025, 2, 28, 23, 59, 59, 999_000), (2025, 3, 1)),
        (W.MONTH, (2024, 12, 31, 23, 59, 59, 999_000), (2025, 1, 1)),  # year boundary
    ],
)
def test_a_window_ends_exactly_at_its_utc_boundary(kind: W, before: tuple, after: tuple) -> None:
    last, first = ms(*before), ms(*after)
    assert window_index(kind, first) == window_index(kind, last) + 1
    assert window_start(kind, window_index(kind, first)) == datetime(*after, tzinfo=UTC)


def test_month_start_is_the_first_of_the_calendar_month() -> None:
    idx = window_index(W.MONTH, ms(2025, 4, 17, 8))
    assert window_start(W.MONTH, idx) == datetime(2025, 4, 1, tzinfo=UTC)
    assert window_start(W.MONTH, idx + 9) == datetime(2026, 1, 1, tzinfo=UTC)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)))
def test_event_time_converts_to_exact_milliseconds(moment: datetime) -> None:
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=to_ms(moment)) == moment


def test_counter_resets_when_an_event_falls_in_a_later_window() -> None:
    c = WindowCounter()
    c.add(10, 100, 5)
    c.add(11, 7, 1)
    assert c.usage_at(11) == (7, 1)
    assert c.usage_at(10) == (100, 5)  # the previous window is kept
    c.add(10, 3, 0)  # a late event lands in the window it belongs to
    assert c.usage_at(10) == (103, 5)
    c.add(9, 50, 50)  # older than the retained windows: dropped
    assert (c.usage_at(9), c.usage_at(11)) == ((0, 0), (7, 1))
    c.add(14, 1, 0)  # a jump clears both
    assert (c.usage_at(13), c.usage_at(14)) == ((0, 0), (1, 0))


def test_spend_ledger_resets_hour_and_day_and_month_at_month_end() -> None:
    ledger = SpendLedger()
    assert ledger.apply("usage", 0, ms(2025, 1, 31, 23, 30), 100, 10)
    assert ledger.apply("usage", 1, ms(2025, 1, 31, 23, 59), 50, 5)
    assert ledger.usage(W.MONTH) == ledger.usage(W.DAY) == ledger.usage(W.HOUR) == (150, 15)
    assert ledger.apply("usage", 2, ms(2025, 2, 1, 0, 1), 1, 0)
    assert ledger.usage(W.HOUR) == ledger.usage(W.DAY) == ledger.usage(W.MONTH) == (1, 0)
    assert ledger.usage(W.MONTH, ms(2025, 1, 15)) == (150, 15)
    assert window_start(W.MONTH, ledger.counter(W.MONTH).index) == datetime(2025, 2, 1, tzinfo=UTC)
    assert (ledger.tokens, ledger.cost) == (151, 15)


def test_spend_ledger_applies_an_offset_once() -> None:
    ledger = SpendLedger()
    assert ledger.apply("usage", 5, ms(2025, 3, 1), 10, 1)
    assert not ledger.apply("usage", 5, ms(2025, 3, 1), 10, 1)
    assert not ledger.apply("usage", 4, ms(2025, 3, 1), 10, 1)
    assert ledger.apply("runs", 4, ms(2025, 3, 1), 0, 0)  # offsets are per stream
    assert ledger.tokens == 10


def test_estimates_are_assigned_per_run_not_added() -> None:
    ledger = SpendLedger()
    t = ms(2025, 3, 1, 10)
    assert ledger.assign_estimate("r1", 3, 500, 50, t)
    assert not ledger.assign_estimate("r1", 3, 900, 90, t)  # not newer: ignored
    assert ledger.assign_estimate("r1", 4, 200, 20, t)
    assert (ledger.usage(W.HOUR), ledger.estimated_tokens) == ((200, 20), 200)
    assert ledger.assign_estimate("r1", 5, 0, 0, t)
    assert (ledger.usage(W.HOUR), ledger.estimates) == ((0, 0), {})


def test_snapshots_round_trip() -> None:
    ledger = SpendLedger()
    ledger.apply("usage", 1, ms(2025, 3, 1, 10), 10, 1)
    ledger.assign_estimate("r9", 2, 30, 3, ms(2025, 3, 1, 11))
    ledger.set_level(W.DAY, 2)
    assert SpendLedger.from_dict(ledger.to_dict()) == ledger


contribution = st.tuples(
    st.integers(0, 24 * 70).map(lambda h: ms(2025, 1, 1) + h * 3_600_000 + 1_234), st.integers(-50, 500)
)


@given(st.lists(contribution, max_size=30), st.randoms(use_true_random=False))
def test_windows_end_the_same_in_any_arrival_order(items: list[tuple[int, int]], rnd) -> None:
    shuffled = items[:]
    rnd.shuffle(shuffled)
    for kind in (W.HOUR, W.DAY, W.MONTH):
        a, b = WindowCounter(), WindowCounter()
        for t, n in items:
            a.add(window_index(kind, t), n, 2 * n)
        for t, n in shuffled:
            b.add(window_index(kind, t), n, 2 * n)
        assert a == b
        newest = max((window_index(kind, t) for t, _ in items), default=-1)
        assert a.index == newest
        assert a.tokens == sum(n for t, n in items if window_index(kind, t) == newest)
        assert a.prev_tokens == sum(n for t, n in items if window_index(kind, t) == newest - 1)
