"""Lag in seconds: the age of the oldest record the worker has not committed, from periodic lag samples.

A record's offset says nothing about when it arrived, and fetching it to read its timestamp would add fetches to
the broker whose fetch cost a soak measures. Instead every sample of the log ends is remembered where an end
moved: the record at offset ``o`` of a partition arrived after the last sample whose end was ``<= o``. Its age
is dated from that sample, so it reads at most one sampling period high and never low: a lag limit judged on
it is never met by accident.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

__all__ = ["LagAge"]


@dataclass(frozen=True, slots=True)
class _Arrival:
    end: int  # the partition's end after the move
    not_before: float  # the last sample time at which the end was still lower


class LagAge:
    """Ages of the oldest uncommitted record per partition, fed one sample (log ends, committed) at a time.

    Memory holds one entry per sample in which a partition's end moved and that is not yet committed.
    """

    def __init__(self, started_at: float) -> None:
        self._started_at = started_at
        self._last_seen: dict[Hashable, tuple[float, int]] = {}  # partition -> (sample time, end)
        self._arrivals: dict[Hashable, deque[_Arrival]] = {}

    def observe(self, at: float, ends: Mapping[Hashable, int], committed: Mapping[Hashable, int]) -> float:
        """Record one sample taken at ``at`` and return the oldest uncommitted record's age, in seconds (0 when
        everything is committed)."""
        oldest = 0.0
        for tp, end in ends.items():
            seen_at, seen_end = self._last_seen.get(tp, (self._started_at, 0))
            arrivals = self._arrivals.setdefault(tp, deque())
            if end > seen_end:
                arrivals.append(_Arrival(end, seen_at))
            self._last_seen[tp] = (at, max(end, seen_end))
            done = committed.get(tp, 0)
            while arrivals and arrivals[0].end <= done:
                arrivals.popleft()
            if arrivals and done < end:
                oldest = max(oldest, at - arrivals[0].not_before)
        return oldest
