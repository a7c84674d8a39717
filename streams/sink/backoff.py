"""How long a failing sink waits before it tries again: exponential, capped, jittered."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``first_s`` up to ``cap_s``, each drawn from its upper half ("equal jitter").

    Jitter keeps several sinks that failed together (a ClickHouse server restarting) from retrying in step;
    the lower half is never drawn, so a retry never comes sooner than half the nominal delay. ``reset``
    starts over after a success.
    """

    def __init__(self, first_s: float = 0.25, cap_s: float = 30.0, rng: random.Random | None = None) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError(f"need 0 < first_s <= cap_s, got {first_s} and {cap_s}")
        self.first_s = first_s
        self.cap_s = cap_s
        self._rng = rng or random.Random()
        self._failures = 0

    def next(self, at_least_s: float = 0.0) -> float:
        """The delay before the next attempt, and one more failure counted; never below ``at_least_s``."""
        nominal = min(self.cap_s, self.first_s * 2 ** min(self._failures, 32))
        self._failures += 1
        return max(at_least_s, nominal / 2 + self._rng.uniform(0, nominal / 2))

    def reset(self) -> None:
        """Back to ``first_s`` (after a success)."""
        self._failures = 0
