"""The worker's garbage-collector settings, and the same for whatever measures itself against the worker.

A worker holds hundreds of thousands of long-lived objects (table values, cached counts); CPython's default
thresholds (700, 10, 10) re-scan them in full collections over and over: measured ~25% of the worker's CPU at
100k events. Its values hold no reference cycles, so young collections find the garbage there is; full
collections become rare (after 100 x 50 x 50,000 allocations). A benchmark's reference loop (the raw decode
ceiling) runs under the same settings, or the ratio between them would partly measure the collector.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (50_000, 50, 100)


def apply() -> None:
    """The worker's settings for the rest of the process: what exists now is never scanned again."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextmanager
def held() -> Iterator[None]:
    """The worker's settings while the block runs, the previous thresholds after. Objects are unfrozen after only
    when nothing was frozen before: unfreezing is all or nothing, and a caller's own freeze must stand."""
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    apply()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        if not frozen:
            gc.unfreeze()
