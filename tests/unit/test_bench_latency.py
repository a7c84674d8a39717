"""The latency benchmark's arithmetic: nearest-rank percentiles and the split of a window into halves."""

from __future__ import annotations

import math

from ctxflow.streams.bench.latency import Sample, _p99_halves, percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 99))


def test_halves_split_probes_by_send_time_not_by_arrival() -> None:
    # The first half's probes were fast and the second half's slow; the slowest fast probe was sent last of its
    # half, so a split by completion order would mix them.
    fast = [Sample(sent_at=t / 10, seconds=0.010) for t in range(50)]
    slow = [Sample(sent_at=5 + t / 10, seconds=0.200) for t in range(50)]
    fast[-1] = Sample(sent_at=4.9, seconds=0.300)
    first, second = _p99_halves([*slow, *fast], middle=5.0)
    assert first == 300.0
    assert second == 200.0


def test_an_empty_half_has_no_percentile() -> None:
    first, second = _p99_halves([Sample(sent_at=1.0, seconds=0.05)], middle=2.0)
    assert first == 50.0
    assert math.isnan(second)
